"""Commands: `retromem index embed|build-dense|search|tune|eval-dense` and `retromem plan` (issue: dense retrieval).

Imported at the end of :mod:`retromem.cli`; attach commands to its groups and register a demo step
with :func:`retromem.cli.demo_step`.
"""

from __future__ import annotations
