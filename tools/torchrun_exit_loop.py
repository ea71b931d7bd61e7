"""Count how often a 2-rank CPU (gloo) `metasent train` under torchrun exits non-zero.

The run is the one of ``tests/test_distributed.py`` (tiny random BERT, ARSC-like fixture, 3 outer
steps), repeated ``--runs`` times while ``--load`` busy-loop processes compete for the cores. Each
failure's stderr is kept in ``--output``/failure_<i>.log (with ``PYTHONFAULTHANDLER=1``, so a
rank that aborts prints its Python stack). It is the reproduction behind the README's "Known
issue" under "Distributed meta-training" (pytorch/gloo#155).

    .venv/bin/python tools/torchrun_exit_loop.py --runs 200 --load 2 --output runs/torchrun_exit
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import free_port, save_tiny_encoder, write_arsc_like  # noqa: E402
from tests.test_distributed import _train_args  # noqa: E402

logger = logging.getLogger("torchrun_exit_loop")


def _busy(stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--load", type=int, default=2, help="busy-loop processes running beside the ranks")
    parser.add_argument("--output", type=Path, default=Path("runs/torchrun_exit"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.output.mkdir(parents=True, exist_ok=True)
    data, encoder = write_arsc_like(args.output / "arsc"), save_tiny_encoder(args.output / "encoder")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}
    stop = multiprocessing.Event()
    load = [multiprocessing.Process(target=_busy, args=(stop,)) for _ in range(args.load)]
    for process in load:
        process.start()
    failures = 0
    try:
        for i in range(args.runs):
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
            command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "metasent.cli"]
            command += _train_args(data, encoder, args.output / f"run{i}", 3)
            result = subprocess.run(command, cwd=args.output, env=env, capture_output=True, text=True, timeout=600)
            if result.returncode:
                failures += 1
                (args.output / f"failure_{i}.log").write_text(result.stderr)
            logger.info("%d runs, %d failed", i + 1, failures)
    finally:
        stop.set()
        for process in load:
            process.join()


if __name__ == "__main__":
    main()
