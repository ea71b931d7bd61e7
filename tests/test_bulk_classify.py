"""``metasent classify --file TABLE --output FILE``: bulk classification against a live server (the
tiny checkpoint in a thread), in CSV, JSONL and Parquet, resumed after an interruption."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from metasent.app.bulk import not_sent_reason, open_journal
from metasent.app.client import MetasentClient
from metasent.app.main import create_app
from metasent.app.settings import Settings
from metasent.cli import cli
from tests.conftest import NEGATIVE, POSITIVE, serve_in_thread, support

runner = CliRunner()
LABELS = ["positive", "negative"]
ROWS = 23  # 5 batches of 5 (the last one of 3)
BLANK = {4: "", 11: "  \u200b "}  # rows whose text the server would refuse


def flat(output: str) -> str:
    """CLI output as one line of words: rich wraps error panels at the terminal width."""
    return " ".join(output.replace("│", " ").split())


def review(i: int) -> str:
    return f"{(POSITIVE + NEGATIVE)[i % 20]} {'okay fine' if i % 3 == 0 else 'average'}"


def reviews() -> list[dict[str, Any]]:
    """The input table: an id with leading zeros (kept as written), the review, a gold label (a
    prediction column's name: written as input_label)."""
    return [
        {"id": f"{i:04d}", "review": BLANK.get(i, review(i)), "label": "positive" if i % 20 < 10 else "negative"}
        for i in range(ROWS)
    ]


@dataclass
class Traffic:
    """What the server received: texts per classify request; ``fail_after``: classify requests it
    answers before it answers 500 to every other one (None: never)."""

    batches: list[int] = field(default_factory=list)
    fail_after: int | None = None

    def reset(self, fail_after: int | None = None) -> None:
        self.batches.clear()
        self.fail_after = fail_after


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    return Traffic()


@pytest.fixture(scope="module")
def live(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, traffic: Traffic) -> Iterator[str]:
    """A live server whose classify requests are counted (and made to fail) by a middleware."""
    app: FastAPI = create_app(Settings(checkpoint=tiny_checkpoint, device="cpu", data_dir=tmp_path_factory.mktemp("b")))

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        if request.method == "POST" and request.url.path.endswith("/classify"):
            if traffic.fail_after is not None and len(traffic.batches) >= traffic.fail_after:
                error = {"code": "boom", "message": "injected failure", "details": []}
                return JSONResponse({"error": error}, status_code=500)
            traffic.batches.append(len(json.loads(await request.body())["texts"]))
        return await call_next(request)

    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def domain(live: str) -> str:
    with MetasentClient(live) as client:
        return client.create_domain("food", support())["domain_id"]


@pytest.fixture
def expected(live: str, domain: str) -> list[dict[str, Any]]:
    """Each row's prediction from its own REST request (None for the rows not to send)."""
    with MetasentClient(live) as client:
        return [
            None if i in BLANK else client.classify(domain, [row["review"]])["predictions"][0]
            for i, row in enumerate(reviews())
        ]


def bulk(live: str, domain: str, source: Path, output: Path, *extra: str) -> Any:
    args = ["classify", "--server", live, "--domain", domain, "--file", str(source), "--output", str(output)]
    return runner.invoke(cli, [*args, "--text-column", "review", "--batch-size", "5", "--no-progress", *extra])


def write_table(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read_table(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as file:
            return list(csv.DictReader(file))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return pq.read_table(path).to_pylist()


def as_float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def assert_predictions(rows: list[dict[str, Any]], expected: list[dict[str, Any] | None]) -> None:
    """Every input row, in order, with its columns and its prediction (or the reason it was not sent)."""
    columns = ["id", "review", "input_label", "label", "score_positive", "score_negative", "truncated", "error"]
    assert len(rows) == ROWS and all(list(row) == columns for row in rows)
    for i, (row, source, prediction) in enumerate(zip(rows, reviews(), expected, strict=True)):
        assert (row["id"], row["review"], row["input_label"]) == (source["id"], source["review"], source["label"])
        if prediction is None:
            assert row["label"] in (None, "") and as_float(row["score_positive"]) is None, i
            assert row["error"].startswith("not sent: the text must contain a visible character"), row
            continue
        assert row["label"] == prediction["label"] and row["error"] in (None, ""), i
        scores = {label: as_float(row[f"score_{label}"]) for label in LABELS}
        assert scores == pytest.approx(prediction["scores"], abs=1e-6 + 1e-12)  # batched vs alone: 6th decimal
        assert str(row["truncated"]).lower() == "false"


@pytest.mark.parametrize(("source", "output"), [(".csv", ".csv"), (".jsonl", ".jsonl"), (".parquet", ".parquet")])
def test_bulk_output_equals_per_row_predictions(
    live: str, domain: str, expected: list, traffic: Traffic, tmp_path: Path, source: str, output: str
) -> None:
    traffic.reset()
    table = write_table(tmp_path / f"reviews{source}", reviews())
    result = bulk(live, domain, table, tmp_path / f"predictions{output}")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == {
        "output": str(tmp_path / f"predictions{output}"),
        "rows": ROWS,
        "resumed_at": 0,
        "sent": ROWS - 2,
        "requests": 5,
        "not_sent": 2,
    }
    assert traffic.batches == [4, 5, 4, 5, 3]  # batches of 5 rows, the blank rows 4 and 11 left out
    assert_predictions(read_table(tmp_path / f"predictions{output}"), expected)
    assert not (tmp_path / f"predictions{output}.partial").exists()
    if output == ".csv":  # the CSV's columns are read as written: "0007" stays "0007"
        assert read_table(tmp_path / "predictions.csv")[7]["id"] == "0007"


def test_formats_convert_and_the_output_format_option(live: str, domain: str, expected: list, tmp_path: Path) -> None:
    table = write_table(tmp_path / "reviews.csv", reviews())
    to_parquet = bulk(live, domain, table, tmp_path / "predictions.parquet")
    assert to_parquet.exit_code == 0, to_parquet.output
    rows = read_table(tmp_path / "predictions.parquet")
    assert_predictions(rows, expected)
    assert isinstance(rows[0]["score_positive"], float) and rows[0]["truncated"] is False  # typed columns

    named = tmp_path / "predictions.out"
    as_jsonl = bulk(live, domain, tmp_path / "predictions.parquet", named, "--output-format", "jsonl")
    assert as_jsonl.exit_code == 0, as_jsonl.output
    lines = [json.loads(line) for line in named.read_text().splitlines()]
    assert [line["review"] for line in lines] == [row["review"] for row in reviews()]
    assert "input_input_label" in lines[0] and "input_label" in lines[0]  # prefixed again while taken


def run_interrupted(live: str, domain: str, traffic: Traffic, table: Path, output: Path, batches: int) -> None:
    """A run the server stops answering after ``batches`` requests: exit 1, the journal kept."""
    traffic.reset(fail_after=batches)
    failed = bulk(live, domain, table, output)
    assert failed.exit_code == 1, failed.output
    assert "500 boom: injected failure" in failed.output and "rerun the same command to resume" in failed.output
    assert not output.exists()
    journal = output.with_name(output.name + ".partial")
    assert len(journal.read_text().splitlines()) == 1 + 5 * batches  # the run line, then one line per row


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_an_interrupted_run_resumes_with_the_remaining_rows_only(
    live: str, domain: str, traffic: Traffic, tmp_path: Path, suffix: str
) -> None:
    table = write_table(tmp_path / "reviews.csv", reviews())
    whole = tmp_path / f"whole{suffix}"
    assert bulk(live, domain, table, whole).exit_code == 0

    resumed = tmp_path / f"resumed{suffix}"
    run_interrupted(live, domain, traffic, table, resumed, batches=2)
    traffic.reset()
    result = bulk(live, domain, table, resumed)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["resumed_at"], summary["sent"], summary["requests"]) == (10, ROWS - 10 - 1, 3)
    assert traffic.batches == [4, 5, 3]  # rows 10-22 only (row 11 is blank)
    assert resumed.read_bytes() == whole.read_bytes()


def test_a_line_cut_mid_write_is_repaired_and_resent(live: str, domain: str, traffic: Traffic, tmp_path: Path) -> None:
    table = write_table(tmp_path / "reviews.jsonl", reviews())
    whole = tmp_path / "whole.jsonl"
    assert bulk(live, domain, table, whole).exit_code == 0

    output = tmp_path / "predictions.jsonl"
    run_interrupted(live, domain, traffic, table, output, batches=3)
    journal = output.with_name("predictions.jsonl.partial")
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:-1]) + lines[-1][:20])  # row 14's line half written: a kill mid-write
    traffic.reset()
    result = bulk(live, domain, table, output)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_at"] == 14
    assert traffic.batches == [5, 4]  # rows 14-18, 19-22: row 14 again, nothing before it
    assert read_table(output) == read_table(whole)  # a batch boundary moved: equal as read (scores to 6 decimals)


def test_open_journal_keeps_complete_rows_only(tmp_path: Path) -> None:
    run = {"metasent_bulk": 1, "domain_id": "d", "domain_version": 1, "labels": LABELS, "checkpoint_hash": "h"}
    run |= {"input_sha256": "s", "text_column": "text", "rows": 9}
    journal = tmp_path / "out.csv.partial"
    assert open_journal(journal, run) == 0 and open_journal(journal, run) == 0
    row = [json.dumps({"row": i, "label": "positive"}) + "\n" for i in range(4)]
    with journal.open("a") as file:
        file.write(row[0] + row[1] + '{"row": 2, "lab\n' + row[3])  # an unreadable line: cut with what follows
    assert open_journal(journal, run) == 2
    assert journal.read_text().splitlines()[1:] == [row[0].strip(), row[1].strip()]
    with journal.open("a") as file:
        file.write(row[3])  # not the next row
    assert open_journal(journal, run) == 2


def test_another_domain_or_input_is_refused_with_an_existing_output(
    live: str, domain: str, traffic: Traffic, tmp_path: Path
) -> None:
    table = write_table(tmp_path / "reviews.csv", reviews())
    output = tmp_path / "predictions.csv"
    run_interrupted(live, domain, traffic, table, output, batches=1)
    traffic.reset()
    with MetasentClient(live) as client:
        other = client.create_domain("other", support("good", "bad"))["domain_id"]
    refused = bulk(live, other, table, output)
    assert refused.exit_code == 2 and traffic.batches == []
    text = flat(refused.output)
    assert f"domain_id '{domain}' (now '{other}')" in text and "--overwrite" in text

    changed = write_table(tmp_path / "reviews.csv", reviews()[:-1])  # the same file name, other rows
    refused = bulk(live, domain, changed, output)
    assert refused.exit_code == 2 and "input_sha256" in flat(refused.output) and traffic.batches == []

    started_over = bulk(live, other, changed, output, "--overwrite")
    assert started_over.exit_code == 0, started_over.output
    assert traffic.batches == [4, 5, 4, 5, 2] and read_table(output)[0]["label"] in ("good", "bad")
    finished = bulk(live, other, changed, output)  # a finished output is not replaced without --overwrite
    assert finished.exit_code == 2 and "exists (a finished run)" in flat(finished.output)


def test_a_missing_text_column_names_the_columns(live: str, domain: str, traffic: Traffic, tmp_path: Path) -> None:
    traffic.reset()
    for suffix in (".csv", ".jsonl", ".parquet"):
        table = write_table(tmp_path / f"reviews{suffix}", reviews())
        args = ["classify", "--server", live, "--domain", domain, "--file", str(table), "--no-progress"]
        result = runner.invoke(cli, [*args, "--output", str(tmp_path / "out.csv"), "--text-column", "body"])
        assert result.exit_code == 2, result.output
        text = flat(result.output)
        assert "--text-column" in text and "has no column 'body'; its columns are 'id', 'review', 'label'" in text
    assert traffic.batches == [] and not (tmp_path / "out.csv.partial").exists()


def test_bulk_option_errors(live: str, domain: str, tmp_path: Path) -> None:
    table = write_table(tmp_path / "reviews.csv", reviews())
    unknown = bulk(live, domain, table, tmp_path / "predictions.xlsx")
    assert unknown.exit_code == 2 and "--output-format" in unknown.output
    many = write_table(tmp_path / "many.csv", [{"review": "great"}] * 520)
    too_big = bulk(live, domain, many, tmp_path / "predictions.csv", "--batch-size", "600")  # > MAX_TEXTS 512
    assert too_big.exit_code == 1 and "413" in too_big.output and "lower --batch-size" in flat(too_big.output)
    missing = bulk(live, "f" * 32, table, tmp_path / "predictions.csv")
    assert missing.exit_code == 1 and "404 domain_not_found" in missing.output
    args = ["classify", "--server", live, "--domain", domain, "great", "--output", str(tmp_path / "o.csv")]
    assert runner.invoke(cli, args).exit_code == 2  # texts as arguments: --file only


def test_without_the_bulk_extra_it_says_what_to_install(
    live: str, domain: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = write_table(tmp_path / "reviews.csv", reviews())
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    result = bulk(live, domain, table, tmp_path / "predictions.csv")
    assert result.exit_code == 2 and "pip install 'metasent[bulk]'" in result.output


def test_not_sent_reasons() -> None:
    assert not_sent_reason("fine") is None
    assert "visible character" in not_sent_reason("\u200b \t")
    assert "NUL" in not_sent_reason("a\x00b")
    assert not_sent_reason(None) == "not sent: no text (the text column is empty in this row)"
    assert not_sent_reason(3) == "not sent: the text is a int, not a string"


def test_ctrl_c_after_a_batch_then_a_rerun_finishes_it(
    live: str, domain: str, traffic: Traffic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = write_table(tmp_path / "reviews.parquet", reviews())
    whole = tmp_path / "whole.jsonl"
    assert bulk(live, domain, table, whole).exit_code == 0

    classify, calls = MetasentClient.classify, []

    def interrupted(self: MetasentClient, domain_id: str, texts: list[str]) -> dict[str, Any]:
        calls.append(len(texts))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return classify(self, domain_id, texts)

    monkeypatch.setattr(MetasentClient, "classify", interrupted)
    output = tmp_path / "predictions.jsonl"
    stopped = bulk(live, domain, table, output)
    assert stopped.exit_code == 130 and "interrupted: rerun the same command to resume" in flat(stopped.output)
    monkeypatch.setattr(MetasentClient, "classify", classify)
    traffic.reset()
    args = ["classify", "--server", live, "--domain", domain, "--file", str(table), "--output", str(output)]
    resumed = runner.invoke(cli, [*args, "--text-column", "review", "--batch-size", "5"])  # with the progress bar
    assert resumed.exit_code == 0, resumed.output
    assert traffic.batches == [5, 3] and json.loads(resumed.stdout)["resumed_at"] == 15
    assert "classify" in resumed.stderr and f"{ROWS}/{ROWS}" in resumed.stderr  # tqdm's bar, on stderr
    assert output.read_bytes() == whole.read_bytes()
