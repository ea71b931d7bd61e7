"""Meta-training episodes/s with 1 and more ranks (torchrun), and the ratio to one rank.

``python -m bench.distributed --data ../shared/data/arsc --ranks 1,2`` launches, for each rank
count N, ``torchrun --standalone --nproc-per-node N -m bench.distributed --worker ...``: every
rank builds the model and its episode sampler as ``metasent train`` does
(:class:`metasent.meta.train.MetaTrainer`), then times ``steps`` outer steps (after one warm-up
step) of the same total meta-batch, split over the ranks, between barriers (the slowest rank's
time, gradient all-reduce included). Rank 0 reports the median step seconds; the parent prints
episodes/s per rank count and the ratio to one rank as JSON. On the CPU each rank gets
``cpu_count / N`` torch threads (``--threads-per-rank`` to change); on CUDA rank r uses cuda:r.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/arsc", help="ARSC directory")
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts to measure")
    parser.add_argument("--steps", type=int, default=5, help="outer steps timed per rank count (median)")
    parser.add_argument("--meta-batch-size", type=int, default=4, help="total episodes per outer step")
    parser.add_argument("--algorithm", default="fomaml")
    parser.add_argument("--encoder", default=None, help="encoder name or path (default: the training default)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (rank r uses cuda:r)")
    parser.add_argument("--threads-per-rank", type=int, default=None, help="CPU threads (default cpu_count / N)")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def worker(options: argparse.Namespace) -> None:
    """One rank: time ``options.steps`` outer steps; rank 0 writes the figures to ``options.result``."""
    import torch

    from metasent.data.readers import read_arsc
    from metasent.meta import distributed
    from metasent.meta.config import TrainingArguments
    from metasent.meta.model import MetaLearner
    from metasent.meta.resolve import checkpoint_config
    from metasent.meta.train import MetaTrainer

    env, device = distributed.setup(options.device)
    if options.threads_per_rank:
        torch.set_num_threads(options.threads_per_rank)
    with tempfile.TemporaryDirectory() as output:
        values: dict[str, Any] = {"data": options.data, "output": output, "algorithm": options.algorithm}
        values.update(meta_batch_size=options.meta_batch_size, episode_seeds="per_episode", progress=False)
        if options.encoder:
            values["encoder"] = options.encoder
        args = TrainingArguments.model_validate(values)
        config = checkpoint_config(args)
        torch.manual_seed(args.seed)
        model = MetaLearner.from_pretrained(config.encoder).prepare(config.inner_loop).to(device)
        tasks = [t for t in read_arsc(Path(args.data), exclude=args.exclude_domains + args.val_domains)]
        trainer = MetaTrainer(model, [t for t in tasks if t.splits.get("train")], [], config, output, progress=False)
        seconds = []
        for _ in range(options.steps + 1):  # the first is a warm-up
            episodes = trainer.meta_batch()
            distributed.barrier()
            start = time.perf_counter()
            trainer.outer.step(episodes)
            distributed.barrier()
            seconds.append(time.perf_counter() - start)
            trainer.config.step += 1
        if env.is_main and options.result is not None:
            median = statistics.median(seconds[1:])
            figures = {
                "ranks": env.world_size,
                "device": str(device),
                "threads_per_rank": torch.get_num_threads(),
                "step_seconds": [round(s, 3) for s in seconds[1:]],
                "step_seconds_median": round(median, 3),
                "episodes_per_s": round(options.meta_batch_size / median, 3),
            }
            options.result.write_text(json.dumps(figures))
    distributed.teardown()


def launch(options: argparse.Namespace, ranks: int) -> dict[str, Any]:
    """Run the workers of ``ranks`` processes under torchrun and return rank 0's figures."""
    threads = options.threads_per_rank or max(1, (os.cpu_count() or 1) // ranks)
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        command += ["-m", "bench.distributed", "--worker", "--result", str(result), "--data", options.data]
        command += ["--steps", str(options.steps), "--meta-batch-size", str(options.meta_batch_size)]
        command += ["--algorithm", options.algorithm, "--device", options.device, "--threads-per-rank", str(threads)]
        if options.encoder:
            command += ["--encoder", options.encoder]
        logger.info("running %s", " ".join(command))
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> None:
    options = _parser().parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if options.worker:
        worker(options)
        return
    runs = [launch(options, int(n)) for n in options.ranks.split(",")]
    base = runs[0]["episodes_per_s"]
    for run in runs:
        run["ratio_to_first"] = round(run["episodes_per_s"] / base, 2)
    report = {
        "algorithm": options.algorithm,
        "meta_batch_size": options.meta_batch_size,
        "steps_timed": options.steps,
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    print(text)  # the report is the command's output
    if options.output is not None:
        options.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
