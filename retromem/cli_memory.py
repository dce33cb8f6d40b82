"""Commands: `retromem memory train|eval|compress` (issue: memory modules).

Imported at the end of :mod:`retromem.cli`; attach commands to its groups and register a demo step
with :func:`retromem.cli.demo_step`.
"""

from __future__ import annotations
