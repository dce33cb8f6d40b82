"""``python -m retromem.cli``: the same command line as the ``retromem`` script."""

from retromem.cli import main

main()
