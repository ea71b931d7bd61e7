"""The client commands of ``metasent``, ``adapt`` and ``classify``: they call a running server
through :class:`metasent.app.client.MetasentClient` (bulk files through
:func:`metasent.app.bulk.classify_file`) and never import torch. :mod:`metasent.cli` registers them.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Any

import typer

ServerOption = Annotated[str, typer.Option(envvar="METASENT_SERVER", help="Server base URL (METASENT_SERVER)")]
ApiKeyOption = Annotated[
    str | None, typer.Option(envvar="METASENT_API_KEY", help="API key, sent as a Bearer token (METASENT_API_KEY)")
]
AttemptsOption = Annotated[
    int,
    typer.Option(
        min=1,
        envvar="METASENT_ATTEMPTS",
        help="Requests in all when the server answers 429 or 503; waits as its Retry-After says (METASENT_ATTEMPTS)",
    ),
]


def _call(fn, *args):
    """Run a client call; a server error is printed (code, message, fix) and exits 1."""
    from metasent.app.client import MetasentError

    try:
        return fn(*args)
    except MetasentError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from error


def adapt(
    name: Annotated[str, typer.Option(help="A name for the domain")],
    examples: Annotated[Path, typer.Option(help="Support set: JSONL ({text, label} a line) or CSV (text,label)")],
    server: ServerOption = "http://127.0.0.1:8000",
    api_key: ApiKeyOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the adaptation")] = 300.0,
    attempts: AttemptsOption = 4,
) -> None:
    """Adapt a new domain on a running server from a labelled support set; prints the domain as
    JSON (its domain_id is what `metasent classify --domain` takes)."""
    from metasent.app.client import MetasentClient, read_examples

    try:
        support = read_examples(examples)
    except (OSError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--examples") from error
    with MetasentClient(server, api_key, timeout, max_attempts=attempts) as client:
        domain = _call(client.create_domain, name, support)
    typer.echo(json.dumps(domain, indent=2))


class TableFormat(str, enum.Enum):
    """File formats of bulk classification (``metasent classify --output``)."""

    csv = "csv"
    jsonl = "jsonl"
    parquet = "parquet"


def classify(
    domain: Annotated[str, typer.Option(help="domain_id returned by `metasent adapt`")],
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to classify")] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            help="More texts: one a line, or JSONL with a text field; with --output, a CSV, JSONL or Parquet table"
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Bulk: write --file's rows with their predictions to this CSV, JSONL or Parquet file, in batches, "
            "with a progress bar; rerun the same command to resume an interrupted run (README: Bulk classification)"
        ),
    ] = None,
    text_column: Annotated[str, typer.Option(help="Bulk: the --file column holding the texts")] = "text",
    batch_size: Annotated[
        int, typer.Option(min=1, help="Bulk: texts per request, at most the server's METASENT_MAX_TEXTS (512)")
    ] = 64,
    input_format: Annotated[
        TableFormat | None, typer.Option(help="Bulk: --file's format (default: from its extension)")
    ] = None,
    output_format: Annotated[
        TableFormat | None, typer.Option(help="Bulk: --output's format (default: from its extension)")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Bulk: replace an existing --output and its journal, start over")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Bulk: show a progress bar on stderr")] = True,
    server: ServerOption = "http://127.0.0.1:8000",
    api_key: ApiKeyOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait")] = 120.0,
    attempts: AttemptsOption = 4,
) -> None:
    """Classify texts with an adapted domain on a running server; prints the predictions as JSON.
    With --output, classifies every row of a CSV, JSONL or Parquet --file in batches into a
    predictions file (resumable) and prints a summary as JSON."""
    from metasent.app.client import MetasentClient, read_texts

    if output is not None:
        _classify_file(
            domain, texts, file, output, text_column, batch_size, input_format, output_format, overwrite, progress,
            MetasentClient(server, api_key, timeout, max_attempts=attempts),
        )  # fmt: skip
        return
    all_texts = list(texts or [])
    if file is not None:
        try:
            all_texts += read_texts(file)
        except (OSError, UnicodeDecodeError) as error:
            raise typer.BadParameter(str(error), param_hint="--file") from error
    if not all_texts:
        raise typer.BadParameter("give texts as arguments or --file", param_hint="TEXTS")
    with MetasentClient(server, api_key, timeout, max_attempts=attempts) as client:
        result = _call(client.classify, domain, all_texts)
    typer.echo(json.dumps(result, indent=2))


def _classify_file(
    domain: str,
    texts: list[str] | None,
    file: Path | None,
    output: Path,
    text_column: str,
    batch_size: int,
    input_format: TableFormat | None,
    output_format: TableFormat | None,
    overwrite: bool,
    progress: bool,
    client: Any,
) -> None:
    """``metasent classify --output``: :func:`metasent.app.bulk.classify_file`; its errors exit 2
    (options) or 1 (the server's answer, with how to resume), an interruption 130."""
    from metasent.app.bulk import BulkError, BulkJob, classify_file
    from metasent.app.client import MetasentError

    if texts:
        raise typer.BadParameter("with --output, put the texts in the --file table", param_hint="TEXTS")
    if file is None:
        raise typer.BadParameter("--output needs a CSV, JSONL or Parquet --file to classify", param_hint="--file")
    job = BulkJob(
        domain,
        file,
        output,
        text_column,
        input_format=input_format.value if input_format is not None else None,
        output_format=output_format.value if output_format is not None else None,
        batch_size=batch_size,
        overwrite=overwrite,
        progress=progress,
    )
    resume = f"rerun the same command to resume from {job.journal}"
    with client:
        try:
            summary = classify_file(client, job)
        except BulkError as error:
            raise typer.BadParameter(str(error), param_hint=error.option) from None
        except MetasentError as error:
            hint = " (lower --batch-size)" if error.status == 413 else ""
            typer.echo(f"error: {error}{hint}", err=True)
            if job.journal.exists():
                typer.echo(resume, err=True)
            raise typer.Exit(1) from error
        except KeyboardInterrupt:
            typer.echo(f"interrupted: {resume}", err=True)
            raise typer.Exit(130) from None
    typer.echo(json.dumps(summary.as_dict(), indent=2))
