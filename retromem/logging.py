"""Logging set-up for the command line. Library code only calls ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging


def setup_logging(verbose: int = 0) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # third-party chatter that says nothing a user can act on
    for name in ("transformers", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
