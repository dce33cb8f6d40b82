"""retromem: retrieval- and memory-augmented language models.

This package is the command line (``retromem ...``) and the few things every other package
shares: the error hierarchy, logging set-up, the offline model assets and the version.
"""

__version__ = "0.1.0"
