"""The ``metasent`` command line, end to end on a tiny encoder given by path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from metasent.cli import app
from metasent.meta.checkpoint import load_checkpoint
from tests.conftest import NEGATIVE, POSITIVE, save_tiny_encoder

runner = CliRunner()


def write_arsc_like(root: Path) -> Path:
    root.mkdir()
    for i, domain in enumerate(["food", "drinks", "snacks"]):
        pos, neg = POSITIVE[i:] + POSITIVE[:i], NEGATIVE[i:] + NEGATIVE[:i]
        lines = [f"{t}\t1" for t in pos] + [f"{t}\t-1" for t in neg]
        for split in ("train", "dev", "test"):
            (root / f"{domain}.t2.{split}").write_text("\n".join(lines) + "\n")
    return root


WIDE = {"COLUMNS": "250"}  # no option's row wraps


def test_help_explains_each_command() -> None:
    group = typer.main.get_command(app)
    result = runner.invoke(app, ["--help"], env=WIDE)
    assert result.exit_code == 0
    assert {"train", "evaluate", "serve", "bench", "benchmark", "adapt", "classify"} <= set(group.commands)
    for name, command in group.commands.items():  # each command with the start of its own help
        assert re.search(rf"{name}\s+{re.escape(command.help.split()[0])}", result.output), name
        sub = runner.invoke(app, [name, "--help"], env=WIDE)
        assert sub.exit_code == 0, sub.output
        options = [p for p in command.params if p.param_type_name == "option" and not p.hidden]
        assert options, name
        for option in options:  # every option is listed, with its default or as required
            row = next((line for line in sub.output.splitlines() if f" {option.opts[0]} " in line), None)
            assert row is not None, f"{name} {option.opts[0]} is not in the help"
            if option.required:
                assert "[required]" in row, row
            elif option.default is not None and not option.is_flag and option.show_default:
                assert f"[default: {option.default}]" in sub.output, f"{name} {option.opts[0]}"
    # defaults a user relies on, as the help states them
    facts = {"train": "[default: matching]", "evaluate": "[default: fixed]", "serve": "default 8000"}
    for name, fact in facts.items():
        assert fact in runner.invoke(app, [name, "--help"], env=WIDE).output, name


def test_train_then_evaluate_with_an_encoder_path(tmp_path: Path) -> None:
    data = write_arsc_like(tmp_path / "arsc")
    encoder_dir = save_tiny_encoder(tmp_path / "encoder")

    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--output", str(out), "--encoder", str(encoder_dir)]
    args += ["--exclude-domains", "snacks", "--val-domains", "drinks", "--outer-steps", "2", "--k-shot", "2"]
    args += ["--q-query", "2", "--meta-batch-size", "1", "--eval-every", "1", "--val-q-query", "2"]
    args += ["--algorithm", "fomaml", "--no-label-anchors", "--query-sampling", "balanced"]
    args += [
        "--inner-steps",
        "2",
        "--adapted-layers",
        "1",
        "--max-length",
        "16",
        "--no-progress",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    _, config = load_checkpoint(out / "last")
    assert config.step == 2 and config.algorithm == "fomaml"
    assert config.encoder.name_or_path == str(encoder_dir) and config.encoder.max_length == 16
    assert config.inner_loop.steps == 2 and config.inner_loop.adapted_layers == 1
    assert config.training is not None and config.training.exclude_domains == ["snacks"]
    assert [v["step"] for v in config.metrics["validation"]] == [0, 1, 2]

    report = tmp_path / "eval.json"
    args = ["evaluate", "--data", str(data), "--checkpoint", str(out / "best"), "--domains", "snacks"]
    args += [
        "--protocol",
        "sampled",
        "--k-shot",
        "2",
        "--seeds",
        "3",
        "--output",
        str(report),
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "snacks.t2" in result.output and "MEAN (1 tasks)" in result.output
    summary = json.loads(report.read_text())
    assert summary["tasks"]["snacks.t2"]["episodes"] == 3
    assert summary["config"]["inner_loop"]["steps"] == 2
    assert len(summary["episodes"]) == 3 and {e["seed"] for e in summary["episodes"]} == {0, 1, 2}
    for episode in summary["episodes"]:  # the query set is the whole 20-review test file of snacks
        assert episode["num_query"] == 20
        assert episode["accuracy"] * 20 == pytest.approx(round(episode["accuracy"] * 20))  # k of 20 right
    mean = 100 * sum(e["accuracy"] for e in summary["episodes"]) / 3
    assert summary["tasks"]["snacks.t2"]["accuracy"] == summary["mean"]["accuracy"]  # one task
    assert summary["mean"]["accuracy"] == pytest.approx(mean, abs=0.005)


def test_curve_table_windows_and_validation() -> None:
    from bench.curve import curve_table
    from metasent.meta.config import CheckpointConfig

    config = CheckpointConfig(step=4)
    config.metrics = {
        "curve": [{"step": s, "query_loss": 1.0 / s, "query_accuracy": 0.5} for s in range(1, 5)],
        "validation": [{"step": 0, "accuracy": 50.0}, {"step": 2, "accuracy": 60.0}, {"step": 4, "accuracy": 55.0}],
        "best_val_accuracy": 60.0,
        "best_step": 2,
    }
    lines = curve_table(config, window=2).splitlines()
    assert "50.00 (0)" in lines[1]
    assert lines[2].split()[:3] == ["1-2", "0.750", "50.0"] and "60.00 (2)" in lines[2]
    assert "55.00 (4)" in lines[3]
    assert "best validation 60.0 at step 2" in lines[-1]


def test_compare_table_rows_and_mean() -> None:
    from bench.compare import compare_table

    def summary(acc: float) -> dict:
        row = {"accuracy": acc, "macro_f1": acc - 10, "always_positive_accuracy": 80.0}
        return {"tasks": {"a.t2": row}, "mean": {**row, "accuracy_ci95": 1.5}}

    lines = compare_table([summary(50.0), summary(70.0)], ["base", "meta"]).splitlines()
    assert lines[0] == "| task | base acc | meta acc | base macro-F1 | meta macro-F1 | always positive |"
    assert lines[2] == "| a.t2 | 50.00 | 70.00 | 40.00 | 60.00 | 80.00 |"
    assert lines[3].startswith("| **mean (1 tasks)** | 50.00 ± 1.50 | 70.00 ± 1.50 |")


def test_train_defaults_to_the_dev_chosen_method(tmp_path: Path) -> None:
    data = write_arsc_like(tmp_path / "arsc")
    encoder_dir = save_tiny_encoder(tmp_path / "encoder")
    args = ["train", "--data", str(data), "--output", str(tmp_path / "run"), "--encoder", str(encoder_dir)]
    args += ["--exclude-domains", "snacks", "--val-domains", "drinks", "--outer-steps", "1", "--k-shot", "2"]
    args += ["--q-query", "2", "--meta-batch-size", "1", "--val-q-query", "2", "--max-length", "16", "--no-progress"]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    _, config = load_checkpoint(tmp_path / "run" / "best")
    assert config.algorithm == "matching"
    assert config.inner_loop.classifier == "matching" and config.inner_loop.steps == 0
    assert config.inner_loop.label_anchors and config.training is not None
    assert config.training.query_sampling == "natural"
    bad = runner.invoke(app, [*args, "--algorithm", "maml2"])
    assert bad.exit_code != 0 and "unknown algorithm" in bad.output
    steps = runner.invoke(app, [*args, "--inner-steps", "5"])  # matching takes no inner step
    assert steps.exit_code != 0 and "no gradient steps" in steps.output
    fomaml = runner.invoke(app, [*args, "--algorithm", "fomaml", "--output", str(tmp_path / "fomaml")])
    assert fomaml.exit_code == 0, fomaml.output
    _, config = load_checkpoint(tmp_path / "fomaml" / "best")  # the options stay the matching default's
    assert config.algorithm == "fomaml" and not config.inner_loop.label_anchors
    assert config.training is not None and config.training.query_sampling == "balanced"
