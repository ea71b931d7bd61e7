"""The ``metasent`` command line: ``train``, ``evaluate``, ``serve``, ``export``, ``speed``,
``benchmark``, ``adapt``, ``classify`` and ``db upgrade``. It parses options and calls the library:
training in :func:`metasent.meta.train.train`, evaluation in
:func:`metasent.meta.evaluate.evaluate_checkpoint`, export in
:func:`metasent.meta.checkpoint.export_model`, the server in :mod:`metasent.app`, the benchmarks
in the repository's ``bench`` package.

The commands are grouped in modules: ``train``'s options are generated from
:class:`metasent.meta.config.TrainingArguments` (:mod:`metasent.cli_train`) when the command is
first used, because that import pulls in torch, which the client commands (``adapt``, ``classify``;
:mod:`metasent.cli_client`) do without; the benchmark commands are in :mod:`metasent.cli_bench`.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from metasent.cli_bench import bench, benchmark, speed
from metasent.cli_client import adapt, classify
from metasent.cli_common import setup, split

if TYPE_CHECKING:
    from metasent.meta.config import TrainingArguments
    from metasent.meta.resolve import ArgumentError

logger = logging.getLogger("metasent")


class _Commands(TyperGroup):
    """The command group; ``train`` is built when first asked for (see the module docstring) and
    listed first."""

    lazy = "train"

    def list_commands(self, ctx: Any) -> list[str]:
        return [self.lazy, *(name for name in super().list_commands(ctx) if name != self.lazy)]

    _listing = False  # True while the group's own help is written

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True  # `metasent --help` lists train by its docstring, without importing torch
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name == self.lazy and self._listing:
            return TyperCommand(self.lazy, help=inspect.getdoc(train))
        if cmd_name == self.lazy:  # built each time: algorithms registered since then are choices too
            from metasent.cli_train import train_command

            return train_command(train)
        return super().get_command(ctx, cmd_name)


cli = typer.Typer(
    cls=_Commands,
    help="metasent: meta-train a BERT encoder across sentiment domains (first-order MAML over LoRA adapters by "
    "default; Reptile, prototypical and matching networks and more), evaluate it on few-shot tasks, and serve "
    "K-shot adaptation to new domains over REST.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
cli.command()(speed)
cli.command("bench", hidden=True, help="Deprecated alias of `metasent speed` (same options).")(bench)
cli.command()(benchmark)
cli.command()(adapt)
cli.command()(classify)


def _bad_parameter(error: ArgumentError, options: dict[str, str] | None = None) -> typer.BadParameter:
    """The command-line error of a library :class:`~metasent.meta.resolve.ArgumentError`, naming
    the option of its argument (``options`` maps names that differ, e.g. ``steps``)."""
    option = (options or {}).get(error.argument) or "--" + error.argument.replace("_", "-")
    return typer.BadParameter(str(error), param_hint=option)


def train(args: TrainingArguments) -> None:
    """Meta-train: sample N-way K-shot episodes from the training domains, adapt on each support
    set (inner loop), update the meta-parameters (outer loop, AdamW). Validates every --eval-every
    steps and keeps the best. --algorithm picks the method (default: FOMAML with Meta-SGD rates over
    LoRA adapters, label anchors and natural-proportion query sets). --resume goes on with a run's
    own settings; --init-from starts a new run, with these settings, from a model's meta-parameters.
    Every option can also come from a --config file or --set KEY=VALUE. Under torchrun
    (`torchrun --nproc-per-node N -m metasent.cli train ...`) the meta-batch is split over the N
    processes (README, "Distributed meta-training")."""
    setup(args.threads)
    from metasent.meta import train as training
    from metasent.meta.resolve import ArgumentError

    try:
        summary = training.train(args)
    except ArgumentError as error:
        raise _bad_parameter(error) from error
    if summary is not None:  # rank 0
        typer.echo(json.dumps(summary, indent=2))


_INNER_OPTIONS = {"steps": "--inner-steps", "lr": "--inner-lr"}
"""``evaluate``'s options whose names differ from their inner-loop field."""


@cli.command()
def evaluate(
    data: Annotated[str, typer.Option(help="ARSC directory, or a JSONL/CSV/HF dataset")],
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Checkpoint directory; omit for the un-meta-trained encoder (baseline)"),
    ] = None,
    encoder: Annotated[str | None, typer.Option(help="Encoder for the baseline (default all-MiniLM-L6-v2)")] = None,
    algorithm: Annotated[
        str,
        typer.Option(
            help="Without --checkpoint: an algorithm that is not meta-trained, e.g. 'none' (head-only inner "
            "loop) or 'finetune' (every tensor adapted)"
        ),
    ] = "none",
    domains: Annotated[
        str | None,
        typer.Option(help="Comma-separated domains to evaluate (default: ARSC's 4 target domains)"),
    ] = None,
    protocol: Annotated[
        str,
        typer.Option(
            help="'fixed': support = --support-split file, query = --query-split file; "
            "'sampled': K-shot episodes over --seeds"
        ),
    ] = "fixed",
    support_split: str = "train",
    query_split: str = "test",
    k_shot: int = 5,
    seeds: Annotated[int, typer.Option(help="Sampled episodes per task (seeds 0..n-1)")] = 5,
    inner_steps: Annotated[int | None, typer.Option(help="Override the inner-loop steps")] = None,
    inner_lr: Annotated[float | None, typer.Option(help="Override the inner learning rate")] = None,
    adapted_layers: Annotated[int | None, typer.Option(help="Override the adapted layers")] = None,
    max_length: Annotated[int | None, typer.Option(help="Override tokens per text")] = None,
    classifier: Annotated[
        str | None,
        typer.Option(help="Override the head built from the support set: 'prototype' or 'matching'"),
    ] = None,
    label_anchors: Annotated[
        bool | None,
        typer.Option("--label-anchors/--no-label-anchors", help="Override whether label names join their class"),
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Write the results as JSON here")] = None,
    batch_size: int = 64,
    device: str = "auto",
    threads: int | None = None,
    estimate: Annotated[
        bool,
        typer.Option(
            help="Also make the server's accuracy estimate at each adaptation and report its error, interval "
            "coverage and cost"
        ),
    ] = False,
) -> None:
    """Meta-test: adapt on each task's support set with the checkpoint's inner loop and score
    the query set. Prints per-task accuracy and macro-F1 (percent) and their mean, with 95%
    confidence intervals for sampled episodes, and the calibration error of the scores."""
    setup(threads)
    from metasent.meta.evaluate import evaluate_checkpoint, format_table
    from metasent.meta.resolve import ArgumentError

    overrides: dict[str, Any] = {"steps": inner_steps, "lr": inner_lr, "adapted_layers": adapted_layers}
    overrides |= {"classifier": classifier, "label_anchors": label_anchors}
    try:
        summary, title = evaluate_checkpoint(
            data, checkpoint, encoder=encoder, algorithm=algorithm, domains=split(domains), protocol=protocol,
            support_split=support_split, query_split=query_split, k_shot=k_shot, seeds=seeds, inner_loop=overrides,
            max_length=max_length, batch_size=batch_size, device=device, estimate=estimate,
        )  # fmt: skip
    except ArgumentError as error:
        raise _bad_parameter(error, _INNER_OPTIONS) from error
    typer.echo(format_table(summary, title))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(summary, indent=2))


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (METASENT_HOST, default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (METASENT_PORT, default 8000)")] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(
            help="The model (METASENT_CHECKPOINT): default, the meta-trained model shipped in the package; "
            "none, the un-meta-trained encoder; or a checkpoint directory  [default: default]"
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda (METASENT_DEVICE)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (METASENT_THREADS)")] = None,
) -> None:
    """Start the REST server: POST /v1/domains adapts a domain from a support set with the
    checkpoint's inner loop; POST /v1/domains/{id}/classify classifies texts; PUT
    /v1/domains/{id}/examples updates a support set; POST /v1/classify adapts and classifies
    without storing. Domains persist in METASENT_DATA_DIR (SQLite) or METASENT_DATABASE_URL;
    METASENT_API_KEYS turns on API keys. /healthz, /readyz and /metrics for operators. Docs at /docs,
    a playground page at /."""
    import uvicorn

    from metasent.app.main import create_app
    from metasent.app.observability import configure_logging
    from metasent.app.server import uvicorn_config
    from metasent.app.settings import Settings

    overrides = {"host": host, "port": port, "checkpoint": checkpoint, "device": device, "threads": threads}
    settings = Settings.model_validate({k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings.log_level, settings.log_format)  # one place, before uvicorn starts
    setup(settings.threads, settings.log_level)
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:  # the port was taken or the app failed to start: exit non-zero as uvicorn.run does
        raise typer.Exit(3)


@cli.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A training run's checkpoint directory, e.g. runs/fomaml/best")],
    output: Annotated[Path, typer.Option(help="The compact model's directory")] = Path("metasent/models/default"),
    name: Annotated[str | None, typer.Option(help="The model's name, shown by /healthz")] = None,
    inner_steps: Annotated[
        int | None, typer.Option(help="Inner-loop steps the model is served with (default: as trained)")
    ] = None,
) -> None:
    """Write a training run's checkpoint as a compact model: its config and a safetensors file of
    the meta-learned tensors only (LoRA adapters, temperature, anchor weight, inner learning
    rates; at most 8 MiB), loaded over the base encoder from its package. With no --output it
    rebuilds the shipped default model, metasent/models/default, in a checkout."""
    setup(None)
    from metasent.meta.checkpoint import CONFIG_FILE, export_model, model_fingerprint
    from metasent.meta.config import CheckpointConfig

    try:
        directory = export_model(
            checkpoint, output, name=name or "metasent-" + checkpoint.resolve().parent.name, inner_steps=inner_steps
        )
    except (FileNotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="CHECKPOINT") from error
    config = CheckpointConfig.model_validate_json((directory / CONFIG_FILE).read_text())
    size = sum(f.stat().st_size for f in directory.iterdir())
    summary = {"model": config.name, "output": str(directory), "bytes": size}
    summary["sha256"] = model_fingerprint(directory, config)
    typer.echo(json.dumps(summary, indent=2))


db = typer.Typer(help="The domain store's database: schema migrations (Alembic).", no_args_is_help=True)
cli.add_typer(db, name="db")


@db.command("upgrade")
def db_upgrade(
    database_url: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL (default: METASENT_DATABASE_URL, else the SQLite file in METASENT_DATA_DIR)"),
    ] = None,
    revision: Annotated[str, typer.Option(help="Target revision")] = "head",
) -> None:
    """Bring the database to the newest schema revision (or --revision). A database created before
    migrations existed is recognised as revision 0001 and upgraded; stored domains are kept. Safe
    to run while replicas serve and from several hosts at once (one migrator at a time)."""
    setup(None)
    from metasent.app import migrations
    from metasent.app.settings import Settings
    from metasent.app.store import make_engine

    url = database_url or Settings().database()
    engine = make_engine(url)
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        before, after = migrations.upgrade(engine, revision)
    finally:
        engine.dispose()
    typer.echo(f"{engine.url.render_as_string(hide_password=True)}: schema revision {before} -> {after}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
