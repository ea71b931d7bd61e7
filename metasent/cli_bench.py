"""The benchmark commands of ``metasent``: ``speed`` (and its deprecated alias ``bench``) and
``benchmark``. They run the repository's ``bench`` package, imported as any package: a development
install of a checkout (``pip install -e .``) maps it (setup.py); wheels and the image hold none, and
the commands then say so. :mod:`metasent.cli` registers them.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer

from metasent.cli_common import setup, split

logger = logging.getLogger("metasent")


def load_bench(module: str) -> ModuleType:
    """``bench.<module>``, the repository's benchmarks, imported as any package: a development
    install of a checkout (``pip install -e .``) maps ``bench`` (setup.py); wheels and the image
    hold none, and the command then says so (exit 2)."""
    try:
        return importlib.import_module(f"bench.{module}")
    except ModuleNotFoundError as error:
        if error.name not in ("bench", f"bench.{module}"):
            raise
        typer.echo(
            "error: the benchmarks live in the repository's bench/ folder, which this installation lacks: "
            "install metasent from a checkout in development mode (the README's set-up command, pip install -e)",
            err=True,
        )
        raise typer.Exit(2) from None


def speed(
    data: Annotated[
        str, typer.Option(help="ARSC directory (support and query texts come from it)")
    ] = "../shared/data/arsc",
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint; omit for the un-meta-trained encoder")] = None,
    device: str = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (here and in the server)")] = None,
    repeats: Annotated[int, typer.Option(help="Adaptations timed (median)")] = 10,
    texts: Annotated[int, typer.Option(help="Texts classified")] = 1000,
    batch_size: int = 32,
    padded_length: Annotated[int, typer.Option(help="Fixed length of the file-order reference")] = 256,
    train_steps: Annotated[int, typer.Option(help="Outer steps timed per meta-training variant")] = 3,
    http: Annotated[bool, typer.Option(help="Also start a server for the HTTP and memory figures")] = True,
    clients: int = 8,
    requests: Annotated[int, typer.Option(help="Classify requests per client")] = 10,
    per_request: Annotated[int, typer.Option(help="Texts per classify request")] = 8,
    domains: Annotated[int, typer.Option(help="Domains adapted for the memory figure")] = 100,
    port: int = 8790,
    output: Annotated[Path | None, typer.Option(help="Write the figures as JSON here")] = None,
) -> None:
    """Measure adaptation seconds, classification and HTTP throughput, meta-training episodes/s
    and server memory, each with its ratio to a reference measured in the same run."""
    setup(threads)
    run_bench = load_bench("speed").run_bench

    result = run_bench(
        Path(data),
        checkpoint,
        device,
        repeats,
        texts,
        batch_size,
        padded_length,
        train_steps,
        http,
        clients,
        requests,
        per_request,
        domains,
        port,
        threads,
    )
    text = json.dumps(result, indent=2)
    typer.echo(text)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")


@functools.wraps(speed)
def bench(**options: Any) -> None:
    """``metasent bench``, the old name of ``metasent speed``: warns, then runs it."""
    logger.warning("`metasent bench` is deprecated and will be removed: use `metasent speed` (same options)")
    speed(**options)


def benchmark(
    data: Annotated[str, typer.Option(help="ARSC directory")] = "../shared/data/arsc",
    output: Annotated[Path, typer.Option(help="Results directory")] = Path("results"),
    budget: Annotated[
        str, typer.Option(help="cpu (fits 2 CPU cores: short meta-training, 128 tokens), gpu (full), smoke")
    ] = "cpu",
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated method names (default: all): each registered algorithm (the un-meta-trained "
            "'none' as 'pretrained'), fomaml_head (FOMAML before LoRA and Meta-SGD), matching_anchors and setfit"
        ),
    ] = None,
    checkpoint: Annotated[
        list[str] | None, typer.Option(help="METHOD=DIR: load this checkpoint instead of training (repeatable)")
    ] = None,
    encoder: Annotated[str, typer.Option(help="Encoder every method starts from")] = (
        "sentence-transformers/all-MiniLM-L6-v2"
    ),
    runs: Annotated[Path, typer.Option(help="Where the benchmark's checkpoints go")] = Path("runs/benchmark"),
    label: Annotated[str | None, typer.Option(help="Suffix of the result files (default: the budget)")] = None,
    device: str = "auto",
    threads: int | None = None,
    seed: int = 0,
    suggest_methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated methods also measured on what to label next (5-shot + 5 suggested labels "
            "against + 5 random; three adaptations per episode); '' for none"
        ),
    ] = "fomaml",
) -> None:
    """Train (or load) every method and evaluate all of them on the same tasks and seeds: the 12
    ARSC test tasks, the 6 food tasks (5 seeds), accuracy against shots, and the dev tasks that
    choose the default; with each, the calibration error of its scores and how close its accuracy
    estimate at adaptation came. Writes results/benchmark_<budget>.{json,csv,md} and PNG plots."""
    setup(threads)
    benchmarks = load_bench("benchmark")
    budgets, select_methods, run_benchmark = benchmarks.BUDGETS, benchmarks.select_methods, benchmarks.run_benchmark
    if budget not in budgets:
        raise typer.BadParameter(f"unknown budget {budget!r}; choose from {', '.join(budgets)}", param_hint="--budget")
    try:
        select_methods(split(methods))
    except KeyError as error:
        raise typer.BadParameter(error.args[0], param_hint="--methods") from None
    loaded = {}
    for item in checkpoint or []:
        name, _, path = item.partition("=")
        if not path:
            raise typer.BadParameter(f"expected METHOD=DIR, got {item!r}", param_hint="--checkpoint")
        loaded[name] = Path(path)
    result = run_benchmark(
        Path(data), output, budget, split(methods), loaded, encoder, device, runs, seed, label,
        split(suggest_methods) or (),
    )  # fmt: skip
    typer.echo((output / f"benchmark_{label or budget}.md").read_text())
    typer.echo(f"default: {result['default']}")
