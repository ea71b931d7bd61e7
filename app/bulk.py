"""Bulk classification of a CSV, JSONL or Parquet file through a running server, resumable
(``metasent classify --domain D --file reviews.csv --text-column review --output predictions.csv``).

The input is read memory-mapped with the ``datasets`` library (one Arrow copy in a temporary
folder, so a large file is never held in Python lists), and sent ``batch_size`` texts per
``POST /v1/domains/{id}/classify`` (the client retries 429 and 503). Each batch's predictions are
appended to a journal, ``<output>.partial``: one JSON line per input row, after a first line that
records the run (domain, its version and labels, the server's model, the input's sha256, the text
column). A rerun with the same ``--output`` continues after the journal's last complete line (a
line cut by a kill mid-write, and anything after it, is dropped and its rows are sent again); a
rerun with another domain, domain version, model, input or text column is refused. When every row
is journalled, the input's columns and the prediction columns (``label``, ``score_<label>`` per
label, ``truncated``, ``error``) are written to ``<output>`` through a temporary file that is then
renamed, so ``<output>`` only ever holds a finished run, and the journal is removed.

Rows whose text the server would refuse (missing, not a string, blank or invisible, with a NUL
character) are not sent: they are written with empty ``label``, scores and ``truncated`` and an
``error`` saying why. An input column named like a prediction column is written as
``input_<name>``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .client import MetasentClient
from .schemas import text_problem

logger = logging.getLogger(__name__)

FORMATS = ("csv", "jsonl", "parquet")
EXTENSIONS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
INSTALL = "pip install 'metasent[bulk]'"
JOURNAL_SUFFIX = ".partial"
# what must match between the journal's run and a rerun for its rows to be kept
IDENTITY = ("domain_id", "domain_version", "labels", "checkpoint_hash", "input_sha256", "text_column", "rows")


class BulkError(Exception):
    """A problem with the command's input or output (not the server's answer).

    Args:
        message (`str`): what is wrong and how to fix it.
        option (`str`, *optional*): the command-line option at fault, e.g. ``"--text-column"``.
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


@dataclass
class BulkJob:
    """One bulk classification.

    Args:
        domain_id (`str`): the adapted domain to classify with.
        input (`Path`): CSV, JSONL or Parquet file.
        output (`Path`): the predictions file (CSV, JSONL or Parquet).
        text_column (`str`, defaults to ``"text"``): the input column holding the texts.
        input_format (`str`, *optional*): one of :data:`FORMATS`; default from the input's extension.
        output_format (`str`, *optional*): one of :data:`FORMATS`; default from the output's extension.
        batch_size (`int`, defaults to 64): texts per request, at most the server's
            ``METASENT_MAX_TEXTS`` (512 by default).
        overwrite (`bool`, defaults to False): discard an existing output and journal, start over.
        progress (`bool`, defaults to True): a tqdm bar on stderr (rows).
    """

    domain_id: str
    input: Path
    output: Path
    text_column: str = "text"
    input_format: str | None = None
    output_format: str | None = None
    batch_size: int = 64
    overwrite: bool = False
    progress: bool = True

    @property
    def journal(self) -> Path:
        return self.output.with_name(self.output.name + JOURNAL_SUFFIX)


@dataclass
class BulkSummary:
    """What a run did.

    Args:
        output (`str`): the file written.
        rows (`int`): input rows (= output rows).
        resumed_at (`int`): rows already in the journal when the run started (0: a fresh run).
        sent (`int`): texts this run sent to the server.
        requests (`int`): classify requests this run sent (retries not counted).
        not_sent (`int`): rows of this run written with an ``error`` instead of a prediction.
    """

    output: str
    rows: int
    resumed_at: int
    sent: int
    requests: int
    not_sent: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _datasets() -> Any:
    """The ``datasets`` module, quiet (no progress bars of its own).

    Raises:
        BulkError: when ``datasets`` or ``tqdm`` is not installed, naming the extra to install.
    """
    try:
        import datasets
        import tqdm  # noqa: F401
    except ImportError as error:
        missing = error.name or "datasets or tqdm"
        raise BulkError(f"bulk classification (--output) needs the {missing} package: {INSTALL}") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def file_format(path: Path, given: str | None, option: str) -> str:
    """``given``, or the format ``path``'s extension names.

    Raises:
        BulkError: an unknown format or extension (naming ``option``).
    """
    if given is not None:
        if given not in FORMATS:
            raise BulkError(f"unknown format {given!r}: choose one of {', '.join(FORMATS)}", option)
        return given
    found = EXTENSIONS.get(path.suffix.lower())
    if found is None:
        known = ", ".join(EXTENSIONS)
        raise BulkError(
            f"{path.name}: cannot tell its format from the extension (known: {known}); pass {option}", option
        )
    return found


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_column(column: str, columns: list[str], path: Path) -> None:
    if column not in columns:
        raise BulkError(
            f"{path.name} has no column {column!r}; its columns are {', '.join(map(repr, columns)) or 'none'}: "
            "pass the one holding the texts as --text-column",
            "--text-column",
        )


def read_table(path: Path, fmt: str, text_column: str, cache_dir: str) -> Any:
    """The rows of ``path`` as a memory-mapped ``datasets.Dataset`` (its Arrow copy in ``cache_dir``).
    CSV columns are read as strings, as written (an empty cell is ``""``, ``007`` stays ``007``);
    JSONL and Parquet keep their types.

    Raises:
        BulkError: a missing or unreadable file (``--file``), or no column ``text_column``.
    """
    datasets = _datasets()
    if not path.is_file():
        raise BulkError(f"{path}: no such file", "--file")
    try:
        if fmt == "csv":
            with path.open(newline="", encoding="utf-8-sig") as file:
                header = next(csv.reader(file), [])
            _check_column(text_column, header, path)
            features = datasets.Features({name: datasets.Value("string") for name in header})
            table = datasets.Dataset.from_csv(
                str(path), features=features, cache_dir=cache_dir, na_filter=False, encoding="utf-8-sig"
            )
        elif fmt == "jsonl":
            table = datasets.Dataset.from_json(str(path), cache_dir=cache_dir)
        else:
            table = datasets.Dataset.from_parquet(str(path), cache_dir=cache_dir)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        cause = error.__cause__ or error
        raise BulkError(f"{path}: cannot read it as {fmt}: {cause}", "--file") from error
    _check_column(text_column, table.column_names, path)
    return table


def prediction_columns(labels: list[str]) -> list[str]:
    """The columns added to each row: ``label``, ``score_<label>`` per label, ``truncated``, ``error``."""
    return ["label", *(f"score_{label}" for label in labels), "truncated", "error"]


def renamed_inputs(columns: list[str], labels: list[str]) -> dict[str, str]:
    """``{input column: new name}`` for input columns named like a prediction column: ``input_<name>``
    (prefixed again while that is taken too)."""
    taken = set(columns) | set(prediction_columns(labels))
    renames = {}
    for column in columns:
        if column in prediction_columns(labels):
            name = f"input_{column}"
            while name in taken:
                name = f"input_{name}"
            renames[column] = name
            taken.add(name)
    return renames


def not_sent_reason(text: Any) -> str | None:
    """Why a row's text is not sent (the server would answer 422), or None to send it."""
    if text is None:
        return "not sent: no text (the text column is empty in this row)"
    if not isinstance(text, str):
        return f"not sent: the text is a {type(text).__name__}, not a string"
    problem = text_problem(text)
    return None if problem is None else f"not sent: the text {problem}"


def _row_record(row: int, labels: list[str], prediction: dict[str, Any] | None, error: str | None) -> dict[str, Any]:
    """One journal line: the row's number and its prediction columns (all None but ``error`` when
    it was not sent)."""
    record: dict[str, Any] = {"row": row, **dict.fromkeys(prediction_columns(labels))}
    if prediction is not None:
        if set(prediction["scores"]) != set(labels):
            raise BulkError(
                f"the server answered labels {list(prediction['scores'])}, the run started with {labels}: the domain "
                "was changed during the run; start over with --overwrite"
            )
        record["label"] = prediction["label"]
        record.update({f"score_{label}": prediction["scores"][label] for label in labels})
        record["truncated"] = bool(prediction.get("truncated", False))
    record["error"] = error
    return record


def open_journal(journal: Path, run: dict[str, Any]) -> int:
    """Start ``journal`` with the ``run`` line, or resume it: returns the rows it already holds.

    A line cut by a kill mid-write (no newline, not JSON, or not the next row), and everything after
    it, is cut off; those rows are sent again.

    Raises:
        BulkError: the journal is of another run (domain, version, model, input, column, rows), or
            not a journal at all (naming ``--output`` and the way out: ``--overwrite``).
    """
    if not journal.exists():
        journal.write_text(json.dumps(run) + "\n", encoding="utf-8")
        return 0
    with journal.open("rb+") as file:
        first = file.readline()
        try:
            started = json.loads(first)
            assert isinstance(started, dict) and "metasent_bulk" in started
        except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
            raise BulkError(
                f"{journal} is not a journal of `metasent classify --output`: delete it or pass --overwrite", "--output"
            ) from None
        differs = [key for key in IDENTITY if started.get(key) != run[key]]
        if differs:
            was = ", ".join(f"{key} {started.get(key)!r} (now {run[key]!r})" for key in differs)
            raise BulkError(
                f"{journal} holds a run with another {was}; its rows cannot be mixed with this one: pass --overwrite "
                "to start over, or choose another --output",
                "--output",
            )
        rows, end = 0, len(first)
        for line in file:
            try:
                complete = line.endswith(b"\n") and json.loads(line).get("row") == rows
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                complete = False
            if not complete:
                break
            rows, end = rows + 1, end + len(line)
        if file.seek(0, os.SEEK_END) > end:
            logger.warning("%s: cut off an incomplete line (row %d, a kill mid-write); resent", journal, rows)
            file.truncate(end)
    return rows


def _journal_rows(path: str) -> Iterator[dict[str, Any]]:
    """The journal's row lines (after the run line), as written."""
    with open(path, encoding="utf-8") as file:
        file.readline()
        for line in file:
            yield json.loads(line)


def _batch_records(
    client: MetasentClient, job: BulkJob, batch: list[Any], begin: int, labels: list[str]
) -> tuple[list[dict[str, Any]], int]:
    """The journal records of one batch of texts (rows ``begin``...), classified in one request
    (none when no text may be sent), and how many texts it sent."""
    reasons = [not_sent_reason(text) for text in batch]
    sendable = [text for text, reason in zip(batch, reasons, strict=True) if reason is None]
    answered = iter(client.classify(job.domain_id, sendable)["predictions"] if sendable else [])
    records = [
        _row_record(begin + i, labels, next(answered) if reason is None else None, reason)
        for i, reason in enumerate(reasons)
    ]
    return records, len(sendable)


def _classify_rows(client: MetasentClient, job: BulkJob, texts: Any, labels: list[str], start: int) -> tuple[int, ...]:
    """Send rows ``start``... of ``texts`` (a one-column dataset) in batches, appending each batch's
    journal lines (flushed and fsynced) before the next request.

    Returns:
        `tuple[int, int, int]`: texts sent, requests sent, rows not sent.
    """
    from tqdm import tqdm

    sent = requests = not_sent = 0
    bar = tqdm(total=len(texts), initial=start, unit="row", desc="classify", file=sys.stderr, disable=not job.progress)
    with bar, job.journal.open("a", encoding="utf-8") as journal:
        for begin in range(start, len(texts), job.batch_size):
            batch = texts[begin : begin + job.batch_size][job.text_column]
            records, count = _batch_records(client, job, batch, begin, labels)
            journal.write("".join(json.dumps(record) + "\n" for record in records))
            journal.flush()
            os.fsync(journal.fileno())
            sent, requests, not_sent = sent + count, requests + (count > 0), not_sent + len(batch) - count
            bar.update(len(batch))
    return sent, requests, not_sent


def write_output(table: Any, journal: Path, labels: list[str], fmt: str, output: Path, cache_dir: str) -> None:
    """Write ``table``'s columns (renamed by :func:`renamed_inputs`) and the journal's prediction
    columns to ``output`` in ``fmt``, through a temporary file in the same folder, renamed at the end."""
    datasets = _datasets()
    value = datasets.Value
    features = datasets.Features(
        {
            "row": value("int64"),
            "label": value("string"),
            **{f"score_{label}": value("float64") for label in labels},
            "truncated": value("bool"),
            "error": value("string"),
        }
    )
    predictions = datasets.Dataset.from_generator(
        _journal_rows, features=features, gen_kwargs={"path": str(journal)}, cache_dir=cache_dir
    )
    table = table.rename_columns(renamed_inputs(table.column_names, labels))
    joined = datasets.concatenate_datasets([table, predictions.remove_columns("row")], axis=1)
    temporary = output.with_name(f".{output.name}.tmp")
    if fmt == "csv":
        joined.to_csv(str(temporary), index=False)
    elif fmt == "jsonl":
        joined.to_json(str(temporary), lines=True, force_ascii=False)
    else:
        joined.to_parquet(str(temporary))
    os.replace(temporary, output)


def classify_file(client: MetasentClient, job: BulkJob) -> BulkSummary:
    """Classify every row of ``job.input`` with ``job.domain_id`` and write ``job.output``, resuming
    from ``job.journal`` when a run with the same domain, model and input left one.

    Returns:
        `BulkSummary`: rows, where it resumed, texts and requests sent.

    Raises:
        BulkError: bad input, output or options (the message names the option and the fix).
        MetasentError: the server's error answer (e.g. 404 unknown domain, 413 a batch larger than
            its ``METASENT_MAX_TEXTS``); the journal keeps every finished batch for a rerun.
    """
    if job.batch_size < 1:
        raise BulkError(f"--batch-size must be at least 1, got {job.batch_size}", "--batch-size")
    in_format = file_format(job.input, job.input_format, "--input-format")
    out_format = file_format(job.output, job.output_format, "--output-format")
    if job.output.resolve() == job.input.resolve():
        raise BulkError(f"{job.output} is the input file: choose another --output", "--output")
    if job.overwrite:
        job.journal.unlink(missing_ok=True)
    elif job.output.exists() and not job.journal.exists():
        raise BulkError(f"{job.output} exists (a finished run): pass --overwrite to replace it", "--output")
    domain = client.get_domain(job.domain_id)
    labels = list(domain["labels"])
    with tempfile.TemporaryDirectory(prefix="metasent-bulk-") as cache_dir:
        table = read_table(job.input, in_format, job.text_column, cache_dir)
        for old, new in renamed_inputs(table.column_names, labels).items():
            logger.warning("the input column %r is written as %r (%r is a prediction column)", old, new, old)
        run = {
            "metasent_bulk": 1,
            "domain_id": job.domain_id,
            "domain_version": domain.get("version"),
            "labels": labels,
            "checkpoint_hash": client.health().get("checkpoint_hash"),
            "input": str(job.input.resolve()),
            "input_sha256": sha256_of(job.input),
            "text_column": job.text_column,
            "rows": len(table),
        }
        start = open_journal(job.journal, run)
        if start:
            logger.info("resuming %s at row %d of %d", job.journal, start, len(table))
        texts = table.select_columns([job.text_column])
        sent, requests, not_sent = _classify_rows(client, job, texts, labels, start)
        write_output(table, job.journal, labels, out_format, job.output, cache_dir)
    job.journal.unlink()
    return BulkSummary(str(job.output), len(table), start, sent, requests, not_sent)


__all__ = ["BulkError", "BulkJob", "BulkSummary", "FORMATS", "classify_file", "not_sent_reason", "read_table"]
