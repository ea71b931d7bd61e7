"""What the command modules of ``metasent`` share: logging set-up and comma-separated options."""

from __future__ import annotations

import logging
import os


def setup(threads: int | None, log_level: str = "INFO") -> None:
    """Log to stderr at ``log_level`` (only warnings on torchrun ranks other than 0) and use
    ``threads`` torch CPU threads when given."""
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 logs, the others only warn
        log_level = "WARNING"
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads:
        import torch

        torch.set_num_threads(threads)


def split(values: str | None) -> list[str] | None:
    """A comma-separated option's values, stripped, or ``None`` for none."""
    return [v.strip() for v in values.split(",") if v.strip()] if values else None
