"""Commands: `retromem index build-ngram|build-fm|ngram-query` and `retromem ngram score|eval-interpolation` (issue: n-gram search).

Imported at the end of :mod:`retromem.cli`; attach commands to its groups and register a demo step
with :func:`retromem.cli.demo_step`.
"""

from __future__ import annotations
