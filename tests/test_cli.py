"""The ``metasent`` command line, end to end on a tiny encoder given by path."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from metasent.cli import cli
from metasent.meta.checkpoint import load_checkpoint
from tests.conftest import NEGATIVE, POSITIVE, save_tiny_encoder, write_arsc_like

runner = CliRunner()


def flat(output: str) -> str:
    """CLI output as one line of words: rich wraps error panels at the terminal width."""
    return " ".join(output.replace("│", " ").split())


WIDE = {"COLUMNS": "250"}  # no option's row wraps


def test_help_explains_each_command() -> None:
    group = typer.main.get_command(cli)
    result = runner.invoke(cli, ["--help"], env=WIDE)
    assert result.exit_code == 0
    context = typer.Context(group)
    commands = {name: group.get_command(context, name) for name in group.list_commands(context)}  # train: lazy
    assert {"train", "evaluate", "serve", "speed", "benchmark", "adapt", "classify"} <= set(commands)
    for name, command in commands.items():  # each command with the start of its own help
        if command.hidden:  # the deprecated `bench` alias (tested with `speed`)
            assert name not in result.output.split(), name
            continue
        assert re.search(rf"{name}\s+{re.escape(command.help.split()[0])}", result.output), name
        if hasattr(command, "commands"):  # a group (`db`): its subcommands are tested with it
            continue
        sub = runner.invoke(cli, [name, "--help"], env=WIDE)
        assert sub.exit_code == 0, sub.output
        options = [p for p in command.params if p.param_type_name == "option" and not p.hidden]
        assert options, name
        for option in options:  # every option is listed, with its default or as required
            row = next((line for line in sub.output.splitlines() if f" {option.opts[0]} " in line), None)
            assert row is not None, f"{name} {option.opts[0]} is not in the help"
            if option.required:
                assert "[required]" in row, row
            elif option.default is not None and not option.is_flag and option.show_default:
                shown = getattr(option.default, "value", option.default)  # a choice's enum member: its value
                assert f"[default: {shown}]" in sub.output, f"{name} {option.opts[0]}"
    # defaults a user relies on, as the help states them
    facts = {"train": "[default: fomaml]", "evaluate": "[default: fixed]", "serve": "default 8000"}
    for name, fact in facts.items():
        assert fact in runner.invoke(cli, [name, "--help"], env=WIDE).output, name


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
    result = runner.invoke(cli, args)
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
    result = runner.invoke(cli, args)
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
    assert "calibration: ECE" in result.output and summary["mean"]["estimate_mae"] is None  # no --estimate

    result = runner.invoke(cli, [*args, "--estimate"])
    assert result.exit_code == 0, result.output
    assert "accuracy estimate at adaptation: MAE" in result.output
    estimated = json.loads(report.read_text())
    episodes = estimated["episodes"]
    assert [e["accuracy"] for e in episodes] == [e["accuracy"] for e in summary["episodes"]]  # same adaptations
    errors = [100 * abs(e["estimated_accuracy"] - e["accuracy"]) for e in episodes]
    assert estimated["mean"]["estimate_mae"] == pytest.approx(sum(errors) / 3, abs=0.005)


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


def test_paired_table_differences_by_task() -> None:
    from bench.compare import paired_table

    def summary(accuracies: dict[str, float]) -> dict:
        return {"tasks": {t: {"accuracy": a, "macro_f1": a - 10} for t, a in accuracies.items()}}

    base = summary({"a.t2": 50.0, "a.t4": 60.0, "b.t2": 70.0})
    other = summary({"a.t2": 52.0, "a.t4": 64.0, "b.t2": 69.0, "c.t2": 99.0})  # c.t2 is not paired
    lines = paired_table([base, other], ["base", "other"]).splitlines()
    # differences +2, +4, -1: mean 5/3, CI 4.303 * stdev / sqrt(3)
    half = 4.3027 * statistics.stdev([2.0, 4.0, -1.0]) / 3**0.5
    assert lines[2] == f"| other | 3 | +1.67 ± {half:.2f} | +1.67 ± {half:.2f} | 2 of 3 |"
    with pytest.raises(ValueError, match="shares no task"):
        paired_table([base, summary({"z.t2": 1.0})], ["base", "z"])


def test_restrict_seeds_summarises_the_chosen_episodes_only() -> None:
    from bench.compare import restrict_seeds

    def episode(task: str, seed: int, accuracy: float) -> dict:
        return {"task": task, "seed": seed, "accuracy": accuracy, "macro_f1": accuracy / 2, "num_query": 10}

    rows = [episode("a.t2", 0, 0.5), episode("a.t2", 1, 0.7), episode("a.t2", 2, 0.0), episode("b.t2", 0, 0.9)]
    result = {"episodes": [{**r, "adapt_seconds": 0.1, "support_accuracy": 1.0, "retired_field": 1} for r in rows]}
    summary = restrict_seeds(result, {0, 1})
    assert summary["tasks"]["a.t2"]["accuracy"] == pytest.approx(60.0)  # seed 2's 0.0 left out
    assert summary["tasks"]["b.t2"]["macro_f1"] == pytest.approx(45.0)
    with pytest.raises(ValueError, match="no episode"):
        restrict_seeds(result, {7})


def test_train_defaults_to_the_dev_chosen_method(tmp_path: Path) -> None:
    data = write_arsc_like(tmp_path / "arsc")
    encoder_dir = save_tiny_encoder(tmp_path / "encoder")
    args = ["train", "--data", str(data), "--output", str(tmp_path / "run"), "--encoder", str(encoder_dir)]
    args += ["--exclude-domains", "snacks", "--val-domains", "drinks", "--outer-steps", "1", "--k-shot", "2"]
    args += ["--q-query", "2", "--meta-batch-size", "1", "--val-q-query", "2", "--max-length", "16", "--no-progress"]
    result = runner.invoke(cli, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    model, config = load_checkpoint(tmp_path / "run" / "best")
    assert config.algorithm == "fomaml"
    inner = config.inner_loop
    assert (inner.classifier, inner.steps, inner.adapter, inner.meta_sgd) == ("matching", 3, "lora", True)
    assert inner.label_anchors and config.training is not None
    assert config.training.query_sampling == "natural" and config.training.outer_lr == 1e-3
    assert model.lora is not None and len(model.inner_log_lr) > 1  # LoRA adapters and Meta-SGD rates loaded
    bad = runner.invoke(cli, [*args, "--algorithm", "maml2"])
    assert bad.exit_code == 2 and "'maml2' is not one of 'fomaml', 'reptile'" in flat(bad.output)
    args += ["--algorithm", "matching"]
    steps = runner.invoke(cli, [*args, "--inner-steps", "5"])  # matching steps on encoder layers only
    assert steps.exit_code != 0 and "--inner-steps: the matching classifier has no tensors of its own" in flat(
        steps.output
    )
    protonet = runner.invoke(cli, [*args, "--algorithm", "protonet", "--output", str(tmp_path / "protonet")])
    assert protonet.exit_code == 0, protonet.output
    _, config = load_checkpoint(tmp_path / "protonet" / "best")  # no training defaults of its own
    assert config.algorithm == "protonet" and not config.inner_loop.label_anchors
    assert config.training is not None and config.training.query_sampling == "balanced"


# every option `metasent train` had before its options were generated from TrainingArguments
TRAIN_OPTIONS = [
    "--data", "--output", "--exclude-domains", "--val-domains", "--val-split", "--encoder", "--max-length",
    "--algorithm", "--inner-steps", "--inner-lr", "--adapted-layers", "--label-anchors", "--no-label-anchors",
    "--query-sampling", "--n-way", "--k-shot", "--q-query", "--meta-batch-size", "--outer-steps", "--outer-lr",
    "--warmup-steps", "--eval-every", "--save-every", "--val-episodes", "--val-q-query", "--max-minutes",
    "--frozen-layers", "--seed", "--resume", "--device", "--threads", "--progress", "--no-progress",
]  # fmt: skip


def train_command():
    import typer

    return typer.main.get_command(cli).get_command(None, "train")


def test_train_options_are_the_training_arguments_with_their_defaults() -> None:
    from metasent.meta.config import TrainConfig, TrainingArguments

    params = {p.name: p for p in train_command().params}
    assert {opt for p in params.values() for opt in (*p.opts, *p.secondary_opts)} >= set(TRAIN_OPTIONS)
    for name, info in TrainingArguments.model_fields.items():
        option = params[name]
        default = option.default.value if hasattr(option.default, "value") else option.default
        if info.is_required():
            assert default is None and not option.required, name  # may come from --config instead
        elif isinstance(info.get_default(call_default_factory=True), list):
            assert (default.split(",") if default else []) == info.get_default(call_default_factory=True), name
        else:
            assert default == info.get_default(call_default_factory=True), name
        assert info.description and info.description in option.help, name
    assert params["save_every"].default == TrainConfig().save_every == 25  # what CLI users always got
    assert params["exclude_domains"].default == "books,dvd,electronics,kitchen_housewares,gourmet_food,grocery"


def capture_training(monkeypatch, tmp_path: Path) -> tuple[list, list[str]]:
    """Replace meta_train by a recorder; returns the list it fills and the common arguments."""
    import metasent.meta.train

    seen: list = []
    monkeypatch.setattr(
        metasent.meta.train, "meta_train", lambda model, tr, va, config, *rest: seen.append(config) or config
    )
    data = write_arsc_like(tmp_path / "arsc")
    encoder = save_tiny_encoder(tmp_path / "encoder")
    return seen, ["train", "--data", str(data), "--encoder", str(encoder), "--device", "cpu"]


def test_train_without_options_runs_the_training_arguments_defaults(monkeypatch, tmp_path: Path) -> None:
    from metasent.meta.config import TrainConfig, TrainingArguments
    from metasent.meta.resolve import checkpoint_config

    seen, args = capture_training(monkeypatch, tmp_path)
    result = runner.invoke(cli, [*args, "--output", str(tmp_path / "run"), "--val-domains", "drinks"])
    assert result.exit_code == 0, result.output
    (config,) = seen
    expected = TrainingArguments(data=args[2], output=tmp_path / "run", encoder=args[4], val_domains=["drinks"])
    assert config == checkpoint_config(expected)
    assert config.algorithm == "fomaml" and config.inner_loop.label_anchors and config.inner_loop.meta_sgd
    training = config.training.model_dump()
    defaults = TrainConfig().model_dump()
    assert {k for k in defaults if training[k] != defaults[k]} == {
        "data", "exclude_domains", "val_domains", "query_sampling", "outer_lr"
    }  # fmt: skip


def test_train_reads_a_config_file_then_options_then_set(monkeypatch, tmp_path: Path) -> None:
    seen, args = capture_training(monkeypatch, tmp_path)
    toml = tmp_path / "train.toml"
    toml.write_text(
        f'output = "{tmp_path / "run"}"\nalgorithm = "fomaml"\nouter_steps = 7\nk_shot = 2\nsave_every = 3\n'
        'exclude_domains = ["snacks"]\nval_domains = ["drinks"]\ninner_steps = 2\nlabel_anchors = false\n'
        'query_sampling = "balanced"\n'
    )
    options = ["--k-shot", "3", "--set", "save_every=4", "--set", "max_minutes=1.5"]
    assert runner.invoke(cli, [*args, "--config", str(toml), *options]).exit_code == 0
    (config,) = seen
    assert config.algorithm == "fomaml" and config.inner_loop.steps == 2 and not config.inner_loop.label_anchors
    training = config.training
    assert (training.outer_steps, training.k_shot, training.save_every) == (7, 3, 4)
    assert training.max_minutes == 1.5 and training.query_sampling == "balanced"
    assert training.exclude_domains == ["snacks"] and training.val_domains == ["drinks"]

    as_json = tmp_path / "train.json"
    as_json.write_text(json.dumps({"output": str(tmp_path / "run2"), "val_domains": ["drinks"], "max_minutes": 2}))
    options = ["--set", "val_domains=snacks,drinks", "--set", "max_minutes=none"]
    assert runner.invoke(cli, [*args, "--config", str(as_json), *options]).exit_code == 0
    assert seen[1].algorithm == "fomaml" and seen[1].training.val_domains == ["snacks", "drinks"]
    assert seen[1].training.max_minutes is None

    bad = {
        ("--set", "outer_stpes=3"): "--set: expected KEY=VALUE with KEY one of data,",
        ("--set", "max_length=4"): "--max-length: Input should be greater than or equal to 8",
        ("--set", "seed=null"): "--seed: Input should be a valid integer",
        ("--algorithm", "maml2"): "'maml2' is not one of 'fomaml', 'reptile', 'protonet', 'matching'",
        ("--set", "algorithm=maml2"): "--algorithm: unknown algorithm 'maml2'; choose from fomaml, reptile",
        ("--query-sampling", "random"): "'random' is not one of 'balanced', 'natural'",
        ("--adapted-layers", "-2"): "--adapted-layers: Input should be greater than or equal to -1",
        ("--inner-lr", "0"): "--inner-lr: Input should be greater than 0",
    }
    for option, message in bad.items():
        result = runner.invoke(cli, [*args, "--config", str(toml), *option])
        assert result.exit_code == 2 and message in flat(result.output), (option, flat(result.output))
    toml.write_text('outer_stpes = 3\noutput = "x"\n')
    result = runner.invoke(cli, [*args, "--config", str(toml)])
    assert result.exit_code == 2 and "--config: Extra inputs are not permitted" in flat(result.output)
    assert len(seen) == 2


def test_evaluate_reads_the_inner_loop_options_with_train(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = write_arsc_like(tmp_path / "arsc")
    args = ["evaluate", "--data", str(data), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    for option, message in {
        ("--inner-lr", "-1"): "--inner-lr: Input should be greater than 0",
        ("--inner-steps", "101"): "--inner-steps: Input should be less than or equal to 100",
        ("--classifier", "knn"): "--classifier: Input should be 'prototype' or 'matching'",
    }.items():
        result = runner.invoke(cli, [*args, *option])
        assert result.exit_code == 2 and message in flat(result.output), flat(result.output)
    # the head and the label anchors can be changed at evaluation, as a serving choice made on dev
    output = tmp_path / "matching.json"
    overrides = ["--classifier", "matching", "--label-anchors", "--inner-steps", "0", "--domains", "snacks"]
    result = runner.invoke(cli, [*args, *overrides, "--output", str(output)])
    assert result.exit_code == 0, result.output
    inner = json.loads(output.read_text())["config"]["inner_loop"]  # the checkpoint's: prototype, no anchors
    assert (inner["classifier"], inner["label_anchors"], inner["steps"]) == ("matching", True, 0)
    baseline = ["evaluate", "--data", str(data), "--algorithm", "fomaml", "--encoder", "tiny"]
    result = runner.invoke(cli, baseline)
    assert result.exit_code == 2
    assert (
        "--algorithm: algorithm 'fomaml' needs a meta-trained checkpoint; without one choose from finetune, none"
        in flat(result.output)
    )


def test_speed_and_its_deprecated_alias_bench(monkeypatch, caplog, tmp_path: Path) -> None:
    import logging

    import bench.speed

    calls: list[tuple] = []
    monkeypatch.setattr(bench.speed, "run_bench", lambda *args: calls.append(args) or {"repeats": args[3]})
    listing = runner.invoke(cli, ["--help"], env={"COLUMNS": "200"}).output
    assert "speed" in listing.split() and "bench" not in listing.split()
    with caplog.at_level(logging.WARNING, logger="metasent"):
        speed = runner.invoke(cli, ["speed", "--repeats", "4", "--no-http", "--device", "cpu"])
        assert speed.exit_code == 0, speed.output
        assert "deprecated" not in caplog.text
        old = runner.invoke(cli, ["bench", "--repeats", "4", "--no-http", "--device", "cpu"])
    assert old.exit_code == 0, old.output
    assert json.loads(speed.stdout) == json.loads(old.stdout) == {"repeats": 4}
    assert calls[0] == calls[1] and calls[0][8] is False  # the same options reach the same function
    assert "`metasent bench` is deprecated and will be removed: use `metasent speed`" in caplog.text


def test_client_commands_and_help_start_without_torch() -> None:
    script = (
        "import sys; from typer.main import get_command; from typer.testing import CliRunner; "
        "from metasent.cli import cli; group = get_command(cli); "
        "group.get_command(None, 'classify'); print('torch' in sys.modules); "
        "out = CliRunner().invoke(cli, ['--help']).output; print('torch' in sys.modules, 'Meta-train' in out); "
        "group.get_command(None, 'train'); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False", "True", "True"]  # train's options need TrainingArguments


def test_benchmark_commands_without_bench_say_how_to_get_it(tmp_path: Path) -> None:
    # an installation without bench/ (a wheel, the image): the commands explain it instead of a traceback
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    block = "import sys; sys.modules['bench'] = None; from metasent.cli import main; sys.argv[0] = 'metasent'; main()"
    for command in (["speed", "--no-http"], ["benchmark", "--budget", "smoke"]):
        result = subprocess.run(
            [sys.executable, "-c", block, *command], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert result.returncode == 2, result.stderr
        assert "which this installation lacks: install metasent from a checkout in development mode" in result.stderr
        assert "Traceback" not in result.stderr


def test_benchmark_commands_import_bench_from_any_folder(tmp_path: Path) -> None:
    # the console script, as the README runs it, with no checkout in the current folder or sys.path:
    # the development install maps the bench package (setup.py), so no sys.path trick is needed
    script = Path(sys.executable).with_name("metasent")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"COLUMNS": "300"}
    result = subprocess.run(
        [str(script), "benchmark", "--methods", "bogus"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert "unknown methods bogus; choose from fomaml" in result.stderr, result.stderr


def test_benchmark_names_an_unknown_budget_or_method() -> None:
    for args, message in (
        (["--budget", "huge"], "unknown budget 'huge'; choose from cpu, gpu, smoke"),
        (["--methods", "fomaml,bogus"], "unknown methods bogus; choose from fomaml"),
    ):
        result = runner.invoke(cli, ["benchmark", *args], env=WIDE)
        assert result.exit_code == 2 and message in flat(result.output), result.output


@pytest.fixture
def seen_tasks(monkeypatch) -> list:
    """The (training, validation) tasks each ``metasent train`` run hands to meta-training, which
    is replaced by a recorder."""
    import metasent.meta.train

    seen: list = []
    monkeypatch.setattr(
        metasent.meta.train, "meta_train", lambda model, tr, va, config, *rest: seen.append((tr, va)) or config
    )
    return seen


def _train_args(tmp_path: Path) -> list[str]:
    data, encoder = write_arsc_like(tmp_path / "arsc"), save_tiny_encoder(tmp_path / "encoder")
    return ["train", "--data", str(data), "--encoder", str(encoder), "--device", "cpu", "--output", str(tmp_path / "r")]


def test_train_adds_the_extra_data_domains_to_meta_training_only(seen_tasks: list, tmp_path: Path) -> None:
    seen = seen_tasks
    extra = tmp_path / "reviews"
    extra.mkdir()
    rows = [{"text": t, "label": "positive", "domain": "tea"} for t in POSITIVE[:4]]
    rows += [{"text": t, "label": "negative", "domain": "tea"} for t in NEGATIVE[:4]]
    rows += [{"text": t, "label": "negative", "domain": "snacks"} for t in NEGATIVE[4:6]]  # a held-out domain
    rows += [{"text": t, "label": "positive", "domain": "snacks"} for t in POSITIVE[4:6]]
    (extra / "tea.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = _train_args(tmp_path)
    args += ["--exclude-domains", "snacks", "--val-domains", "drinks"]
    result = runner.invoke(cli, [*args, "--extra-data", str(extra)])
    assert result.exit_code == 0, result.output
    ((train_tasks, val_tasks),) = seen
    assert sorted(t.name for t in train_tasks) == ["food.t2", "tea"]  # snacks stays held out, drinks validates
    assert [t.name for t in val_tasks] == ["drinks.t2"]
    missing = runner.invoke(cli, [*args, "--extra-data", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "--extra-data" in flat(missing.output) and "nowhere" in flat(missing.output)


def test_a_domain_of_the_extra_data_can_be_held_out_whole_as_validation(seen_tasks: list, tmp_path: Path) -> None:
    seen = seen_tasks
    extra = tmp_path / "reviews_zh"
    extra.mkdir()
    for domain, texts in (("tea_zh", ["好喝", "难喝", "很香", "太苦"]), ("hotels_zh", ["干净", "很脏", "舒适"])):
        rows = [
            {"text": t, "label": "positive" if i % 2 == 0 else "negative", "domain": domain}
            for i, t in enumerate(texts)
        ]
        (extra / f"{domain}.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    args = _train_args(tmp_path)
    result = runner.invoke(cli, [*args, "--extra-data", str(extra), "--val-domains", "drinks,hotels_zh"])
    assert result.exit_code == 0, result.output
    ((train_tasks, val_tasks),) = seen
    assert sorted(t.name for t in train_tasks) == ["food.t2", "snacks.t2", "tea_zh"]  # hotels_zh held out
    assert [t.name for t in val_tasks] == ["drinks.t2", "hotels_zh"]
    (hotels,) = [t for t in val_tasks if t.name == "hotels_zh"]
    assert [e.text for e in hotels.split("dev")] == ["干净", "很脏", "舒适"]  # every row, as the dev split
    unknown = runner.invoke(cli, [*args, "--extra-data", str(extra), "--val-domains", "drinks,nowhere_zh"])
    assert unknown.exit_code == 2 and "--val-domains" in flat(unknown.output) and "nowhere_zh" in flat(unknown.output)
