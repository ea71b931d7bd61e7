"""``metasent benchmark`` end to end on a tiny encoder and a tiny ARSC-shaped directory."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.benchmark import ARSC_TEST_DOMAINS, FOOD_DOMAINS, markdown_table
from metasent.cli import cli
from metasent.data.readers import ARSC_VALIDATION
from tests.conftest import NEGATIVE, POSITIVE, save_tiny_encoder


def write_arsc_shaped(root: Path) -> Path:
    root.mkdir()
    domains = ARSC_TEST_DOMAINS + FOOD_DOMAINS + ARSC_VALIDATION + ["apparel", "baby"]
    for i, domain in enumerate(domains):
        pos, neg = POSITIVE[i % 10 :] + POSITIVE[: i % 10], NEGATIVE[i % 10 :] + NEGATIVE[: i % 10]
        test = [f"{t}\t1" for t in pos] + [f"{t}\t-1" for t in neg[:7]]
        # training and validation episodes need K + Q (up to 21) examples per class
        more = [
            f"{t} {w}\t{y}"
            for w in ("fine", "okay", "average")
            for t, y in [(t, 1) for t in pos] + [(t, -1) for t in neg]
        ]
        for split in ("dev", "test") if domain in ARSC_VALIDATION else ("train", "dev", "test"):
            (root / f"{domain}.t2.{split}").write_text("\n".join(test if split == "test" else more) + "\n")
    return root


def achievable_scores(positives: int, negatives: int) -> list[tuple[float, float]]:
    """(accuracy, macro-F1) in percent of every possible prediction of a binary query set with
    ``positives`` and ``negatives`` reviews: ``tp`` positives and ``tn`` negatives labelled right."""
    scores = []
    for tp in range(positives + 1):
        for tn in range(negatives + 1):
            wrong = (positives - tp) + (negatives - tn)  # false negatives + false positives
            f1_positive, f1_negative = 2 * tp / (2 * tp + wrong), 2 * tn / (2 * tn + wrong)
            scores.append((100 * (tp + tn) / (positives + negatives), 50 * (f1_positive + f1_negative)))
    return scores


def test_benchmark_trains_evaluates_and_writes_every_file(tmp_path: Path) -> None:
    data = write_arsc_shaped(tmp_path / "arsc")
    encoder = save_tiny_encoder(tmp_path / "encoder")
    out = tmp_path / "results"
    args = ["benchmark", "--data", str(data), "--output", str(out), "--budget", "smoke", "--encoder", str(encoder)]
    args += [
        "--methods",
        "fomaml,fomaml_head,protonet,finetune",
        "--runs",
        str(tmp_path / "runs"),
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output

    bench = json.loads((out / "benchmark_smoke.json").read_text())
    assert set(bench["methods"]) == {"fomaml", "fomaml_head", "protonet", "finetune"}
    assert bench["machine"]["device"] == "cpu" and bench["budget"]["name"] == "smoke"
    dev = {name: bench["methods"][name]["dev"]["mean"]["accuracy"] for name in ("fomaml", "fomaml_head", "protonet")}
    assert bench["default"] == max(dev, key=dev.__getitem__)  # chosen on dev tasks only
    possible = achievable_scores(10, 7)  # every query set is a test file: 10 positives, 7 negatives
    for name, entry in bench["methods"].items():
        assert set(entry["arsc"]) == {f"{d}.t2" for d in ARSC_TEST_DOMAINS} | {"mean"}
        assert set(entry["food"]) == {f"{d}.t2" for d in FOOD_DOMAINS} | {"mean"}
        for suite in ("arsc", "food"):  # one episode per task: a score some prediction of it gets
            tasks = [row for task, row in entry[suite].items() if task != "mean"]
            for row in tasks:
                assert any(
                    abs(row["accuracy"] - acc) <= 0.006 and abs(row["macro_f1"] - f1) <= 0.006 for acc, f1 in possible
                ), (name, suite, row)
            mean = entry[suite]["mean"]  # every task weighs the same
            assert mean["accuracy"] == pytest.approx(sum(r["accuracy"] for r in tasks) / len(tasks), abs=0.006)
            assert mean["macro_f1"] == pytest.approx(sum(r["macro_f1"] for r in tasks) / len(tasks), abs=0.006)
        assert entry["food"]["mean"]["episodes"] == 2  # 2 food tasks x 1 seed
        assert set(entry["shots"]) == {"1", "5"}
        trained = entry["training"]
        assert (trained is None) == (name == "finetune"), name
        if trained:
            assert trained["outer_steps"] == 4 and trained["validation"][0]["step"] == 0  # the smoke budget's
    assert bench["methods"]["finetune"]["inner_loop"]["adapted_layers"] == -1
    # 10 positives and 7 negatives in every query file
    assert bench["references"]["always_positive"]["arsc"]["mean"]["accuracy"] == round(100 * 10 / 17, 2)
    rows = list(csv.DictReader((out / "benchmark_smoke.csv").open()))
    assert {r["method"] for r in rows} == set(bench["methods"]) and {r["suite"] for r in rows} == {
        "arsc",
        "food",
        "dev",
    }
    table = (out / "benchmark_smoke.md").read_text()
    assert f"| {bench['default']} (default) |" in table and "Induction Networks" in table and "85.63" in table
    for plot in ("shots", "curves", "adapt"):
        assert (out / f"benchmark_smoke_{plot}.png").stat().st_size > 1000
    assert table == markdown_table(bench)
    others = set(bench["methods"]) - {bench["default"]}
    assert set(bench["paired_differences"]) == others and "Accuracy differences" in table
    for name in others:  # the default minus the method, task by task
        tasks = [t for t in bench["methods"][name]["arsc"] if t != "mean"]
        ours, theirs = bench["methods"][bench["default"]]["arsc"], bench["methods"][name]["arsc"]
        diffs = [ours[t]["accuracy"] - theirs[t]["accuracy"] for t in tasks]
        assert abs(bench["paired_differences"][name]["arsc"]["mean"] - sum(diffs) / len(diffs)) < 0.01
