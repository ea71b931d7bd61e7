"""Test-only launcher: ``metasent`` with fault injection, for the crash test (tests/test_crash.py).

Run as ``python tests/fault_server.py serve ...``. Two environment variables make a SIGKILL land
at a known point, each announced by a log line the test waits for:

- ``FAULT_ADAPT_DELAY_S``: seconds slept after each adaptation, before it is stored
  (log line "test adapt delay");
- ``FAULT_ADAPT_GATE``: a file path; while that file exists, each adaptation waits after the
  inner loop, before it is stored, until the test removes the file (log line "test adapt gate"),
  at most 60 s;
- ``FAULT_WRITE_DELAY_S``: seconds slept inside each write transaction, after the row is written
  (flushed) and before the commit (log line "test write delay"); with
  ``FAULT_WRITE_DELAY_AFTER=n`` the first ``n`` write transactions commit at once (acknowledged
  writes before the one that gets killed, on one server).

The service itself has no such hook: the delays are patched in here, around
:meth:`metasent.app.service.ModelService.adapt` and on SQLAlchemy's ``before_commit`` event (which
fires only for write transactions: the store reads without ``Session.begin``).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from metasent.app.service import ModelService
from metasent.cli import main

logger = logging.getLogger("tests.fault_server")


def _delay_adaptations(seconds: float) -> None:
    adapt = ModelService.adapt

    def slowed(self: ModelService, texts: list[str], labels: list[str]) -> Any:
        state = adapt(self, texts, labels)
        logger.warning("test adapt delay: sleeping %.1f s before storing the adaptation", seconds)
        time.sleep(seconds)
        return state

    ModelService.adapt = slowed  # type: ignore[method-assign]


def _gate_adaptations(gate: Path) -> None:
    adapt = ModelService.adapt

    def gated(self: ModelService, texts: list[str], labels: list[str]) -> Any:
        state = adapt(self, texts, labels)
        if gate.exists():
            logger.warning("test adapt gate: holding the adaptation until %s is removed", gate)
            deadline = time.monotonic() + 60
            while gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return state

    ModelService.adapt = gated  # type: ignore[method-assign]


def _delay_commits(seconds: float, after: int) -> None:
    commits = itertools.count()

    @event.listens_for(Session, "before_commit")
    def slowed(session: Session) -> None:
        if next(commits) < after:
            return
        session.flush()  # the row is written; only the commit is left
        logger.warning("test write delay: sleeping %.1f s inside the write transaction", seconds)
        time.sleep(seconds)


if __name__ == "__main__":
    if adapt_delay := float(os.environ.get("FAULT_ADAPT_DELAY_S", "0")):
        _delay_adaptations(adapt_delay)
    if gate := os.environ.get("FAULT_ADAPT_GATE"):
        _gate_adaptations(Path(gate))
    if write_delay := float(os.environ.get("FAULT_WRITE_DELAY_S", "0")):
        _delay_commits(write_delay, int(os.environ.get("FAULT_WRITE_DELAY_AFTER", "0")))
    main()
