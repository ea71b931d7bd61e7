"""The algorithm registry: the built-in methods, what reads the registry, third-party methods
(one file, or an entry point), and a new method trained, evaluated and served end to end."""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from metasent.cli import cli
from metasent.meta import algorithms
from metasent.meta.algorithms import AlgorithmSpec, UnknownAlgorithmError, default_inner_loop, make_outer_loop
from metasent.meta.checkpoint import load_checkpoint, load_model, save_checkpoint
from metasent.meta.config import CheckpointConfig, InnerLoopConfig, TrainingArguments
from metasent.meta.model import MetaLearner
from metasent.meta.resolve import ArgumentError, checkpoint_config, run_inner_loop, train_config
from tests.conftest import NEGATIVE, POSITIVE, save_tiny_encoder, write_arsc_like

BUILT_IN = ("fomaml", "reptile", "protonet", "matching", "multitask", "finetune", "none")

# the inner loops of the if-chain the registry replaced (meta/config.py before issue 9)
OLD_INNER_LOOPS = {
    # LoRA + Meta-SGD since issue 10, the matching head with 3 steps since its second stop
    "fomaml": InnerLoopConfig(steps=3, adapted_layers=2, classifier="matching", adapter="lora", meta_sgd=True),
    "reptile": InnerLoopConfig(adapted_layers=2),
    "protonet": InnerLoopConfig(steps=0),
    "matching": InnerLoopConfig(steps=0, classifier="matching"),
    "multitask": InnerLoopConfig(),
    "finetune": InnerLoopConfig(steps=10, lr=0.02, adapted_layers=-1),
    "none": InnerLoopConfig(),
}


def flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


def test_built_in_methods_register_in_order_with_their_old_inner_loops() -> None:
    assert algorithms.names()[: len(BUILT_IN)] == BUILT_IN
    assert set(algorithms.meta_trained()) >= {"fomaml", "reptile", "protonet", "matching", "multitask"}
    assert not {"finetune", "none"} & set(algorithms.meta_trained())
    for name, inner in OLD_INNER_LOOPS.items():
        assert default_inner_loop(name) == inner, name
        assert algorithms.get(name).default_inner_loop() is not algorithms.get(name).default_inner_loop()
    assert dict(algorithms.get("matching").training_defaults) == {"label_anchors": True, "query_sampling": "natural"}
    assert dict(algorithms.get("fomaml").training_defaults) == {
        "label_anchors": True, "query_sampling": "natural", "outer_lr": 1e-3
    }  # fmt: skip
    with pytest.raises(UnknownAlgorithmError, match="unknown algorithm 'maml2'; choose from fomaml, reptile") as info:
        algorithms.get("maml2")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_register_checks_the_spec() -> None:
    spec = AlgorithmSpec("probe", "a probe (tests)", default_inner_loop=lambda: InnerLoopConfig(steps=2))
    assert algorithms.register(spec) is spec and algorithms.get("probe") is spec
    try:
        assert algorithms.names()[-1] == "probe" and "probe" not in algorithms.meta_trained()
        with pytest.raises(ValueError, match="already registered"):
            algorithms.register(AlgorithmSpec("probe", "again"))
        replacement = AlgorithmSpec("probe", "again", default_inner_loop=lambda: InnerLoopConfig(steps=3))
        algorithms.register(replacement, replace=True)
        assert default_inner_loop("probe").steps == 3
    finally:
        algorithms.unregister("probe")
    assert "probe" not in algorithms.names()
    with pytest.raises(ValueError, match="must match"):
        algorithms.register(AlgorithmSpec("Bad-Name", "x"))
    with pytest.raises(ValueError, match=r"\['query_samplng'\] are not training arguments"):
        algorithms.register(AlgorithmSpec("typo", "x", training_defaults={"query_samplng": "natural"}))
    with pytest.raises(TypeError, match="InnerLoopConfig"):
        algorithms.register(AlgorithmSpec("wrong", "x", default_inner_loop=dict))  # type: ignore[arg-type]
    assert not {"typo", "wrong", "Bad-Name"} & set(algorithms.names())


def test_checkpoints_name_a_registered_algorithm(tmp_path: Path, tiny_model: MetaLearner) -> None:
    for name in BUILT_IN:  # a checkpoint written before the registry, with each of today's names
        old = {"format_version": 1, "algorithm": name, "inner_loop": OLD_INNER_LOOPS[name].model_dump()}
        assert CheckpointConfig.model_validate_json(json.dumps(old)).algorithm == name
    save_checkpoint(tmp_path / "maml2", tiny_model, CheckpointConfig(algorithm="maml2"))  # config is plain data
    with pytest.raises(ValueError, match="unknown algorithm 'maml2'; choose from fomaml, reptile"):
        load_checkpoint(tmp_path / "maml2")  # the name is checked against the registry on load
    with pytest.raises(ValueError, match="'fomaml' needs a meta-trained checkpoint; without one choose from finetune"):
        load_model(None, "tiny", algorithm="fomaml")
    with pytest.raises(ValueError, match="unknown algorithm 'maml2'"):
        load_model(None, "tiny", algorithm="maml2")
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'finetune' is not meta-trained"):
        make_outer_loop(tiny_model, CheckpointConfig(algorithm="finetune"), optimizer, ["negative", "positive"])


def test_entry_point_plugins_are_loaded_and_broken_ones_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "plugged_method.py").write_text(
        "from metasent.meta.algorithms import AlgorithmSpec\n"
        "from metasent.meta.config import InnerLoopConfig\n"
        "SPEC = AlgorithmSpec('plugged', 'a plugin (tests)', default_inner_loop=lambda: InnerLoopConfig(steps=7))\n"
    )
    (tmp_path / "broken_method.py").write_text("raise RuntimeError('broken plugin')\n")
    info = tmp_path / "plugged_method-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugged-method\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[metasent.algorithms]\nplugged = plugged_method:SPEC\nbroken = broken_method\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with caplog.at_level(logging.ERROR):
            loaded = algorithms.load_entry_points()
        assert loaded == ["plugged"] and default_inner_loop("plugged").steps == 7
        assert "could not load algorithm entry point broken" in caplog.text
        assert algorithms.load_entry_points() == ["plugged"]  # loading again is harmless
    finally:
        algorithms.unregister("plugged")


@pytest.fixture
def toy_method() -> Iterator[None]:
    """``tests/toy_algorithm.py`` registered (importing it is all a new method needs), and
    unregistered afterwards so that no other test sees it."""
    import tests.toy_algorithm as toy

    if "toy" not in algorithms.names():  # imported and unregistered earlier: register again
        importlib.reload(toy)
    yield
    algorithms.unregister("toy")


@pytest.mark.usefixtures("toy_method")
def test_a_method_in_one_file_is_trained_evaluated_and_served(tmp_path: Path) -> None:
    from metasent.app.main import create_app
    from metasent.app.settings import Settings

    runner = CliRunner()
    assert "toy: toy (tests)" in flat(runner.invoke(cli, ["train", "--help"], env={"COLUMNS": "200"}).output)
    data = write_arsc_like(tmp_path / "arsc")
    encoder = save_tiny_encoder(tmp_path / "encoder")
    out = tmp_path / "run"
    args = ["train", "--algorithm", "toy", "--data", str(data), "--output", str(out), "--encoder", str(encoder)]
    args += ["--exclude-domains", "snacks", "--val-domains", "drinks", "--outer-steps", "3", "--k-shot", "2"]
    args += ["--q-query", "2", "--meta-batch-size", "2", "--val-q-query", "2", "--outer-lr", "0.05"]
    args += ["--warmup-steps", "1", "--max-length", "16", "--no-progress", "--device", "cpu"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output

    model, config = load_checkpoint(out / "last")
    assert config.algorithm == "toy" and config.step == 3
    assert config.inner_loop == InnerLoopConfig(steps=1, lr=0.1)  # the toy's own inner loop
    assert config.training is not None and config.training.query_sampling == "natural"  # its training default
    pretrained = MetaLearner.from_pretrained(config.encoder)
    assert model.logit_scale.item() != pytest.approx(math.log(10.0))  # the toy's outer step moved it ...
    for name, tensor in pretrained.encoder.state_dict().items():  # ... and nothing else
        torch.testing.assert_close(model.encoder.state_dict()[name], tensor, msg=name)

    report = tmp_path / "eval.json"
    args = ["evaluate", "--data", str(data), "--checkpoint", str(out / "best"), "--domains", "snacks"]
    result = runner.invoke(cli, [*args, "--output", str(report), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads(report.read_text())
    assert summary["config"]["algorithm"] == "toy" and summary["config"]["inner_loop"]["steps"] == 1
    assert summary["tasks"]["snacks.t2"]["episodes"] == 1

    settings = Settings(checkpoint=out / "best", device="cpu", data_dir=tmp_path / "store")
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json()["algorithm"] == "toy"
        examples = [{"text": t, "label": "positive"} for t in POSITIVE[:3]]
        examples += [{"text": t, "label": "negative"} for t in NEGATIVE[:3]]
        created = client.post("/v1/domains", json={"name": "food", "examples": examples})
        assert created.status_code == 201, created.text
        assert created.json()["adaptation"]["steps"] == 1
        domain = created.json()["domain_id"]
        response = client.post(f"/v1/domains/{domain}/classify", json={"texts": ["great coffee", "awful tea"]})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert [set(p["scores"]) for p in predictions] == [{"positive", "negative"}] * 2


def test_training_arguments_take_the_algorithms_defaults_unless_given() -> None:
    matching = TrainingArguments(data="d", output=Path("o"))
    assert checkpoint_config(matching).inner_loop.label_anchors
    assert train_config(matching).query_sampling == "natural"
    chosen = TrainingArguments(data="d", output=Path("o"), label_anchors=False, query_sampling="balanced")
    assert not checkpoint_config(chosen).inner_loop.label_anchors
    assert train_config(chosen).query_sampling == "balanced"
    fomaml = TrainingArguments(
        data="d", output=Path("o"), algorithm="fomaml", inner_steps=2, adapted_layers=1, label_anchors=False
    )
    config = checkpoint_config(fomaml)
    lora = {"adapter": "lora", "meta_sgd": True, "classifier": "matching"}
    assert config.inner_loop == InnerLoopConfig(steps=2, adapted_layers=1, **lora)
    assert config.training is not None and config.training.query_sampling == "natural"
    assert config.training.outer_lr == 1e-3  # the algorithm's, not TrainConfig's 2e-5
    plain = TrainingArguments(data="d", output=Path("o"), algorithm="fomaml", meta_sgd=False, lora_rank=4)
    assert (run_inner_loop(plain).meta_sgd, run_inner_loop(plain).lora_rank) == (False, 4)
    with pytest.raises(ArgumentError, match="at most lora_layers") as info:
        run_inner_loop(TrainingArguments(data="d", output=Path("o"), algorithm="fomaml", lora_layers=1))
    assert info.value.argument == "lora_layers"  # the argument the command line names
    assert checkpoint_config(TrainingArguments(data="d", output=Path("o"), algorithm="finetune")).training is None
    unknown = TrainingArguments(data="d", output=Path("o"), algorithm="maml2")  # plain data: checked on resolving
    with pytest.raises(ArgumentError, match="unknown algorithm 'maml2'; choose from fomaml, reptile") as info:
        checkpoint_config(unknown)
    assert info.value.argument == "algorithm"
    with pytest.raises(ArgumentError, match="no tensors of its own") as info:
        checkpoint_config(TrainingArguments(data="d", output=Path("o"), algorithm="matching", inner_steps=3))
    assert info.value.argument == "inner_steps"
    # matching over LoRA adapters, stepping on the top layer's: the adapter and steps apply
    lora = run_inner_loop(
        TrainingArguments(
            data="d", output=Path("o"), algorithm="matching", adapter="lora", inner_steps=2, adapted_layers=1
        )
    )
    assert (lora.classifier, lora.adapter, lora.steps, lora.adapted_layers) == ("matching", "lora", 2, 1)
    fomaml = run_inner_loop(TrainingArguments(data="d", output=Path("o"), algorithm="fomaml", classifier="prototype"))
    assert (fomaml.classifier, fomaml.adapter, fomaml.steps, fomaml.meta_sgd) == ("prototype", "lora", 3, True)
