"""The ``metasent`` command line: ``train``, ``evaluate`` and ``serve``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from metasent.data.readers import ARSC_HELD_OUT, ARSC_VALIDATION

app = typer.Typer(
    help="metasent: meta-train a BERT encoder with first-order MAML across sentiment domains, "
    "evaluate it on few-shot tasks, and serve K-shot adaptation to new domains over REST.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

logger = logging.getLogger("metasent")


def _setup(threads: int | None, log_level: str = "INFO") -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads:
        import torch

        torch.set_num_threads(threads)


def _split(values: str | None) -> list[str] | None:
    return [v.strip() for v in values.split(",") if v.strip()] if values else None


def _read_tasks(data: str, include: list[str] | None = None, exclude: list[str] | None = None):
    from metasent.data.readers import read_arsc, read_table
    from metasent.data.registry import TaskRegistry

    path = Path(data)
    tasks = read_arsc(path) if path.is_dir() and any(path.glob("*.t[245].*")) else read_table(data)
    return TaskRegistry(tasks).select(include=include, exclude=exclude)


@app.command()
def train(
    data: Annotated[str, typer.Option(help="ARSC directory, or a JSONL/CSV/HF dataset with text,label,domain")],
    output: Annotated[Path, typer.Option(help="Directory for the 'best' and 'last' checkpoints")],
    exclude_domains: Annotated[str, typer.Option(help="Comma-separated domains held out of meta-training")] = ",".join(
        ARSC_HELD_OUT
    ),
    val_domains: Annotated[
        str, typer.Option(help="Comma-separated domains validated on (their --val-split)")
    ] = ",".join(ARSC_VALIDATION),
    val_split: Annotated[str, typer.Option(help="Split of the validation domains")] = "dev",
    encoder: Annotated[
        str, typer.Option(help="Encoder name or path (default all-MiniLM-L6-v2, offline)")
    ] = "sentence-transformers/all-MiniLM-L6-v2",
    max_length: Annotated[int, typer.Option(help="Tokens per text")] = 128,
    algorithm: Annotated[
        str,
        typer.Option(
            help="matching (default: best on the dev tasks in `metasent benchmark`), fomaml, reptile, "
            "protonet, multitask; finetune writes the pretrained encoder with a full fine-tuning inner "
            "loop (no meta-training)"
        ),
    ] = "matching",
    inner_steps: Annotated[int | None, typer.Option(help="Inner-loop SGD steps k (default: the algorithm's)")] = None,
    inner_lr: Annotated[float | None, typer.Option(help="Inner learning rate alpha (default: the algorithm's)")] = None,
    adapted_layers: Annotated[
        int | None,
        typer.Option(help="Top encoder layers adapted (0: head only, -1: all; default: the algorithm's)"),
    ] = None,
    label_anchors: Annotated[
        bool | None,
        typer.Option(
            help="Add each label name, embedded, to its class as one more support example (learned weight); "
            "default: on for matching, off for the others"
        ),
    ] = None,
    query_sampling: Annotated[
        str | None,
        typer.Option(
            help="Query sets: 'balanced' per class or 'natural' class proportions; default: natural for "
            "matching, balanced for the others"
        ),
    ] = None,
    n_way: int = 2,
    k_shot: int = 5,
    q_query: Annotated[int, typer.Option(help="Query examples per class")] = 8,
    meta_batch_size: Annotated[int, typer.Option(help="Episodes per outer step")] = 4,
    outer_steps: Annotated[int, typer.Option(help="Outer (meta-parameter) updates")] = 300,
    outer_lr: Annotated[float, typer.Option(help="AdamW learning rate of the meta-parameters")] = 2e-5,
    warmup_steps: int = 20,
    eval_every: Annotated[int, typer.Option(help="Outer steps between validations")] = 25,
    save_every: Annotated[int, typer.Option(help="Outer steps between periodic checkpoints")] = 25,
    val_episodes: Annotated[int, typer.Option(help="Validation episodes per validation task")] = 2,
    val_q_query: Annotated[int, typer.Option(help="Query examples per class in a validation episode")] = 16,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after this many minutes")] = None,
    frozen_layers: Annotated[
        int, typer.Option(help="Bottom encoder layers left out of the outer loop, their outputs cached per text")
    ] = 0,
    seed: int = 0,
    resume: Annotated[Path | None, typer.Option(help="Resume from a 'last' checkpoint directory")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Meta-train: sample N-way K-shot episodes from the training domains, adapt on each support
    set (inner loop), update the meta-parameters (outer loop, AdamW). Validates every --eval-every
    steps and keeps the best. --algorithm picks the method; the defaults (matching networks with
    label anchors and natural-proportion query sets) scored best on the dev tasks of the CPU
    `metasent benchmark`; on the GPU budget, where that variant was not run, plain matching did."""
    _setup(threads)
    from metasent.meta.checkpoint import load_checkpoint, load_training_state, save_checkpoint
    from metasent.meta.config import CheckpointConfig, EncoderConfig, InnerLoopConfig, TrainConfig, default_inner_loop
    from metasent.meta.model import MetaLearner, resolve_device
    from metasent.meta.train import meta_train

    if algorithm not in ("fomaml", "reptile", "protonet", "matching", "multitask", "finetune"):
        raise typer.BadParameter(f"unknown algorithm {algorithm!r}", param_hint="--algorithm")
    chosen = algorithm == "matching"  # the dev-chosen default carries its two options
    label_anchors = chosen if label_anchors is None else label_anchors
    query_sampling = query_sampling or ("natural" if chosen else "balanced")
    overrides = {"steps": inner_steps, "lr": inner_lr, "adapted_layers": adapted_layers}
    try:  # validated: e.g. the matching classifier takes no inner step
        inner = InnerLoopConfig.model_validate(
            {
                **default_inner_loop(algorithm).model_dump(),
                **{k: v for k, v in overrides.items() if v is not None},
                "label_anchors": label_anchors,
            }
        )
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--inner-steps") from error

    torch_device = resolve_device(device)
    held_out = _split(exclude_domains) or []
    val = _split(val_domains) or []
    train_tasks = _read_tasks(data, exclude=held_out + val).select(require_split="train")
    val_tasks = _read_tasks(data, include=val).select(require_split=val_split) if val else []
    if resume is not None:
        model, config = load_checkpoint(resume, torch_device)
        state = load_training_state(resume)
    else:
        config = CheckpointConfig(
            algorithm=algorithm,  # type: ignore[arg-type]
            encoder=EncoderConfig(name_or_path=encoder, max_length=max_length),
            inner_loop=inner,
            training=TrainConfig(
                data=str(data),
                exclude_domains=held_out,
                val_domains=val,
                val_split=val_split,
                n_way=n_way,
                k_shot=k_shot,
                q_query=q_query,
                meta_batch_size=meta_batch_size,
                outer_steps=outer_steps,
                outer_lr=outer_lr,
                warmup_steps=warmup_steps,
                eval_every=eval_every,
                save_every=save_every,
                val_episodes=val_episodes,
                val_q_query=val_q_query,
                seed=seed,
                max_minutes=max_minutes,
                frozen_layers=frozen_layers,
                query_sampling=query_sampling,  # type: ignore[arg-type]
            ),
        )
        model = MetaLearner.from_pretrained(config.encoder).to(torch_device)
        state = None
    if config.algorithm == "finetune":  # transfer learning: nothing to meta-train
        config.training = None
        for name in ("best", "last"):
            save_checkpoint(output / name, model, config)
        typer.echo(json.dumps({"algorithm": "finetune", "checkpoint": str(output / "best")}))
        return
    logger.info("training tasks: %s", ", ".join(t.name for t in train_tasks))
    final = meta_train(model, list(train_tasks), list(val_tasks), config, output, state, progress)
    typer.echo(json.dumps({k: v for k, v in final.metrics.items() if k not in ("curve",)}, indent=2))


@app.command()
def evaluate(
    data: Annotated[str, typer.Option(help="ARSC directory, or a JSONL/CSV/HF dataset")],
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Checkpoint directory; omit for the un-meta-trained encoder (baseline)"),
    ] = None,
    encoder: Annotated[str | None, typer.Option(help="Encoder for the baseline (default all-MiniLM-L6-v2)")] = None,
    algorithm: Annotated[
        str,
        typer.Option(help="Without --checkpoint: 'none' (head-only inner loop) or 'finetune' (every tensor adapted)"),
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
    output: Annotated[Path | None, typer.Option(help="Write the results as JSON here")] = None,
    batch_size: int = 64,
    device: str = "auto",
    threads: int | None = None,
) -> None:
    """Meta-test: adapt on each task's support set with the checkpoint's inner loop and score
    the query set. Prints per-task accuracy and macro-F1 (percent) and their mean, with 95%
    confidence intervals for sampled episodes."""
    _setup(threads)
    from metasent.data.readers import arsc_target_domains
    from metasent.meta.checkpoint import load_model
    from metasent.meta.evaluate import evaluate_tasks, format_table, summarize
    from metasent.meta.model import resolve_device

    model, config = load_model(checkpoint, encoder, resolve_device(device), algorithm)
    overrides = {"steps": inner_steps, "lr": inner_lr, "adapted_layers": adapted_layers}
    try:
        inner = type(config.inner_loop).model_validate(
            {**config.inner_loop.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        )
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--inner-steps") from error
    if max_length is not None:
        model.config = model.config.model_copy(update={"max_length": max_length})
    include = _split(domains) or (arsc_target_domains(data) if Path(data, "workspace.target.list").exists() else None)
    tasks = list(_read_tasks(data, include=include))
    results = evaluate_tasks(model, tasks, inner, protocol, support_split, query_split, k_shot, seeds, batch_size)
    summary = summarize(results)
    summary["config"] = {
        "checkpoint": str(checkpoint) if checkpoint else None,
        "algorithm": config.algorithm,
        "encoder": config.encoder.name_or_path,
        "max_length": model.max_length(),
        "inner_loop": inner.model_dump(),
        "protocol": protocol,
        "support_split": support_split,
        "query_split": query_split,
        "k_shot": k_shot if protocol == "sampled" else None,
        "seeds": seeds if protocol == "sampled" else None,
    }
    model_name = checkpoint or f"un-meta-trained {config.encoder.name_or_path}"
    title = f"{model_name} ({protocol}, {support_split}->{query_split})"
    typer.echo(format_table(summary, title))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(summary, indent=2))


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (METASENT_HOST, default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (METASENT_PORT, default 8000)")] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Checkpoint directory (METASENT_CHECKPOINT); none: the un-meta-trained encoder"),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda (METASENT_DEVICE)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (METASENT_THREADS)")] = None,
) -> None:
    """Start the REST server: POST /v1/domains adapts a domain from a support set with the
    checkpoint's inner loop; POST /v1/domains/{id}/classify classifies texts; PUT
    /v1/domains/{id}/examples updates a support set; POST /v1/classify adapts and classifies
    without storing. Domains persist in METASENT_DATA_DIR (SQLite) or METASENT_DATABASE_URL;
    METASENT_API_KEYS turns on API keys. /healthz, /readyz and /metrics for operators. Docs at /docs."""
    import uvicorn

    from metasent.app.main import create_app
    from metasent.app.observability import configure_logging
    from metasent.app.settings import Settings

    overrides = {"host": host, "port": port, "checkpoint": checkpoint, "device": device, "threads": threads}
    settings = Settings.model_validate({k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings.log_level, settings.log_format)  # one place, before uvicorn starts
    _setup(settings.threads, settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep the logging configured above
        access_log=False,  # the request-id middleware logs every request
    )


@app.command()
def bench(
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
    _setup(threads)
    from bench.speed import run_bench

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


@app.command()
def benchmark(
    data: Annotated[str, typer.Option(help="ARSC directory")] = "../shared/data/arsc",
    output: Annotated[Path, typer.Option(help="Results directory")] = Path("results"),
    budget: Annotated[
        str, typer.Option(help="cpu (fits 2 CPU cores: short meta-training, 128 tokens), gpu (full), smoke")
    ] = "cpu",
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: fomaml, fomaml_anchors, reptile, protonet, matching, multitask, finetune, "
            "pretrained, setfit (default: all)"
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
) -> None:
    """Train (or load) every method and evaluate all of them on the same tasks and seeds: the 12
    ARSC test tasks, the 6 food tasks (5 seeds), accuracy against shots, and the dev tasks that
    choose the default. Writes results/benchmark_<budget>.{json,csv,md} and PNG plots."""
    _setup(threads)
    from bench.benchmark import run_benchmark

    loaded = {}
    for item in checkpoint or []:
        name, _, path = item.partition("=")
        if not path:
            raise typer.BadParameter(f"expected METHOD=DIR, got {item!r}", param_hint="--checkpoint")
        loaded[name] = Path(path)
    result = run_benchmark(Path(data), output, budget, _split(methods), loaded, encoder, device, runs, seed, label)
    typer.echo((output / f"benchmark_{label or budget}.md").read_text())
    typer.echo(f"default: {result['default']}")


ServerOption = Annotated[str, typer.Option(envvar="METASENT_SERVER", help="Server base URL (METASENT_SERVER)")]
ApiKeyOption = Annotated[
    str | None, typer.Option(envvar="METASENT_API_KEY", help="API key, sent as a Bearer token (METASENT_API_KEY)")
]


def _call(fn, *args):
    """Run a client call; a server error is printed (code, message, fix) and exits 1."""
    from metasent.app.client import MetasentError

    try:
        return fn(*args)
    except MetasentError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from error


@app.command()
def adapt(
    name: Annotated[str, typer.Option(help="A name for the domain")],
    examples: Annotated[Path, typer.Option(help="Support set: JSONL ({text, label} a line) or CSV (text,label)")],
    server: ServerOption = "http://127.0.0.1:8000",
    api_key: ApiKeyOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the adaptation")] = 300.0,
) -> None:
    """Adapt a new domain on a running server from a labelled support set; prints the domain as
    JSON (its domain_id is what `metasent classify --domain` takes)."""
    from metasent.app.client import MetasentClient, read_examples

    try:
        support = read_examples(examples)
    except (OSError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--examples") from error
    with MetasentClient(server, api_key, timeout) as client:
        domain = _call(client.create_domain, name, support)
    typer.echo(json.dumps(domain, indent=2))


@app.command()
def classify(
    domain: Annotated[str, typer.Option(help="domain_id returned by `metasent adapt`")],
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to classify")] = None,
    file: Annotated[Path | None, typer.Option(help="More texts: one a line, or JSONL with a text field")] = None,
    server: ServerOption = "http://127.0.0.1:8000",
    api_key: ApiKeyOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait")] = 120.0,
) -> None:
    """Classify texts with an adapted domain on a running server; prints the predictions as JSON."""
    from metasent.app.client import MetasentClient, read_texts

    all_texts = list(texts or [])
    if file is not None:
        try:
            all_texts += read_texts(file)
        except (OSError, UnicodeDecodeError) as error:
            raise typer.BadParameter(str(error), param_hint="--file") from error
    if not all_texts:
        raise typer.BadParameter("give texts as arguments or --file", param_hint="TEXTS")
    with MetasentClient(server, api_key, timeout) as client:
        result = _call(client.classify, domain, all_texts)
    typer.echo(json.dumps(result, indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
