"""LoRA adapters as the adapted tensors, Meta-SGD inner learning rates, and the compact model
that loads over the base encoder (the shipped default's format), on a tiny BERT."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from metasent.data.episodes import EpisodeSampler
from metasent.meta.adaptation import MatchingHead, Predictor, anchor_texts, inner_loop, straight_through
from metasent.meta.algorithms.fomaml import fomaml_meta_batch_loss, fomaml_query_loss, fomaml_step
from metasent.meta.checkpoint import (
    COMPACT_LIMIT_BYTES,
    CONFIG_FILE,
    WEIGHTS_FILE,
    export_model,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
    shipped_checkpoint,
)
from metasent.meta.config import DEFAULT_ENCODER, CheckpointConfig, EncoderConfig, InnerLoopConfig
from metasent.meta.inner import (
    detached_parameters,
    encode_labels,
    init_head,
    support_embedder,
    take_inner_steps,
)
from metasent.meta.model import HEAD_LR_KEY, MetaLearner, lr_key
from tests.conftest import NEGATIVE, POSITIVE, make_task, save_tiny_encoder

LORA = InnerLoopConfig(steps=3, lr=0.1, adapted_layers=1, adapter="lora", lora_rank=2, meta_sgd=True)
MATCHING = LORA.model_copy(update={"classifier": "matching", "label_anchors": True})
TEXTS = POSITIVE[:3] + NEGATIVE[:3]
LABELS = ["positive"] * 3 + ["negative"] * 3


def lora_model(directory: Path, config: InnerLoopConfig = LORA) -> MetaLearner:
    """The tiny BERT saved as a folder (so a compact model can load over it), with LoRA."""
    encoder = save_tiny_encoder(directory / "encoder")
    return MetaLearner.from_pretrained(EncoderConfig(name_or_path=str(encoder), max_length=32)).prepare(config).eval()


def test_prepare_injects_peft_lora_and_one_meta_sgd_rate_per_adapted_tensor(tmp_path: Path) -> None:
    model = lora_model(tmp_path)
    adapted = model.adapted_parameter_names(1, "lora")
    # query, key, value, attention output, intermediate, output: an A and a B each, top layer only
    assert len(adapted) == 12 and all(".lora_" in n and ".layer.1." in n for n in adapted)
    assert len(model.adapted_parameter_names(-1, "lora")) == 24  # lora_layers=-1: both layers carry adapters
    assert not [n for n in model.adapted_parameter_names(1) if ".lora_" in n]  # "full" means the layer's own
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {*model.adapted_parameter_names(-1, "lora"), "logit_scale", "label_log_weight"} | {
        f"inner_log_lr.{key}" for key in model.inner_log_lr
    }  # peft froze the base encoder
    assert set(model.inner_log_lr) == {*map(lr_key, adapted), HEAD_LR_KEY}
    rates = model.inner_lrs([adapted[0], "head.weight"])
    assert rates is not None and [round(float(r), 6) for r in rates] == [0.1, 0.1]
    before = dict(model.state_dict())
    assert model.prepare(LORA) is model and dict(model.state_dict()).keys() == before.keys()  # idempotent
    with pytest.raises(ValueError, match="already injected"):
        model.prepare(LORA.model_copy(update={"lora_rank": 4}))


def test_lora_config_checks_adapted_layers_against_lora_layers() -> None:
    with pytest.raises(ValueError, match="at most lora_layers"):
        InnerLoopConfig(adapter="lora", lora_layers=1, adapted_layers=2)
    assert InnerLoopConfig(adapter="lora", lora_layers=2, adapted_layers=2).adapted_layers == 2


def test_lora_inner_loop_adapts_the_top_adapters_each_at_its_own_rate(tmp_path: Path) -> None:
    model = lora_model(tmp_path)
    base = {n: t.clone() for n, t in model.state_dict().items()}
    adapted = model.adapted_parameter_names(1, "lora")
    usual = inner_loop(model, TEXTS, LABELS, LORA)
    slow_b = next(n for n in adapted if n.endswith("value.lora_B.default.weight"))
    with torch.no_grad():
        model.inner_log_lr[lr_key(slow_b)].fill_(math.log(1e-4))  # the clamp's floor: a 1000x smaller step
    state = inner_loop(model, TEXTS, LABELS, LORA)
    assert set(state.encoder) == set(adapted) and not state.shares_encoder
    assert state.support_losses[-1] < state.support_losses[0]

    def moved(s, name: str) -> float:
        return float((s.encoder[name] - base[name]).abs().max())

    assert moved(usual, slow_b) > 100 * moved(state, slow_b) > 0  # B starts at 0: it moves at its own rate
    assert all(moved(state, n) > 0 for n in adapted if ".lora_B." in n)
    unchanged = [torch.equal(t, base[n]) for n, t in model.state_dict().items() if not n.startswith("inner_log_lr.")]
    assert all(unchanged)  # adaptation never writes the model's tensors
    predictor = Predictor(model, LORA)
    assert predictor.predict(state, TEXTS) == predictor.predict(inner_loop(model, TEXTS, LABELS, LORA), TEXTS)


def test_meta_sgd_straight_through_has_the_first_order_rate_gradient_by_hand() -> None:
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    log_lr = torch.tensor(math.log(0.5), requires_grad=True)
    lr = log_lr.exp()
    g = torch.tensor([0.5, -1.0])  # the sum of the inner loop's (clipped) support gradients
    adapted = theta.detach() - lr.detach() * g
    phi = straight_through(theta, adapted, lr)
    torch.testing.assert_close(phi, adapted)
    (phi * torch.tensor([3.0, 4.0])).sum().backward()
    assert theta.grad is not None and log_lr.grad is not None
    torch.testing.assert_close(theta.grad, torch.tensor([3.0, 4.0]))  # first order: identity
    # dL/dlr = -g . w = -(1.5 - 4) = 2.5, and dL/dlog_lr = lr * dL/dlr
    torch.testing.assert_close(log_lr.grad, torch.tensor(0.5 * 2.5))


def test_fomaml_query_loss_trains_the_lora_init_and_the_inner_rates_not_the_base(tmp_path: Path) -> None:
    model = lora_model(tmp_path)
    episode = EpisodeSampler([make_task()], k_shot=3, q_query=3, seed=0).sample()
    loss, accuracy = fomaml_query_loss(model, episode, LORA)
    loss.backward()
    assert 0.0 <= float(accuracy) <= 1.0 and accuracy.shape == ()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith("encoder.") and ".lora_" not in n)
    for layer in (0, 1):  # the bottom layer's adapters are meta-trained too (not adapted)
        b = [g for n, g in grads.items() if f".layer.{layer}." in n and ".lora_B." in n]
        assert b and all(g is not None and float(g.abs().sum()) > 0 for g in b), layer
    rates = {key: model.inner_log_lr[key].grad for key in model.inner_log_lr}
    assert rates[HEAD_LR_KEY] is not None and float(rates[HEAD_LR_KEY].abs()) > 0
    assert any(g is not None and float(g.abs()) > 0 for key, g in rates.items() if "lora_B" in key)


def _trained(model: MetaLearner) -> MetaLearner:
    """Non-zero adapters and rates, as after meta-training."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
        for p in model.inner_log_lr.values():
            p.fill_(math.log(0.03))
    return model


def test_compact_export_loads_over_the_base_encoder_and_predicts_the_same(tmp_path: Path) -> None:
    model = _trained(lora_model(tmp_path))
    config = CheckpointConfig(algorithm="fomaml", encoder=model.encoder_config, inner_loop=LORA, step=7)
    full = save_checkpoint(tmp_path / "run" / "best", model, config)
    compact = export_model(full, tmp_path / "default", name="tiny-default")
    assert sorted(p.name for p in compact.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    stored = load_file(str(compact / WEIGHTS_FILE))
    assert all(".lora_" in n or not n.startswith("encoder.") for n in stored)  # no base encoder tensor
    assert len(stored) == 24 + 13 + 2  # adapters, rates (12 tensors and the head), temperature, anchor weight
    assert (compact / WEIGHTS_FILE).stat().st_size < (full / WEIGHTS_FILE).stat().st_size / 5
    loaded, loaded_config = load_checkpoint(compact)
    assert (loaded_config.weights, loaded_config.name, loaded_config.step) == ("meta", "tiny-default", 7)
    assert loaded_config.base_sha256 is not None and len(loaded_config.base_sha256) == 64
    reference, _ = load_checkpoint(full)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    state = Predictor(reference, LORA).adapt(TEXTS, LABELS)
    torch.testing.assert_close(
        Predictor(loaded, LORA).predict_proba(Predictor(loaded, LORA).adapt(TEXTS, LABELS), TEXTS),
        Predictor(reference, LORA).predict_proba(state, TEXTS),
    )


def test_compact_export_refuses_what_it_cannot_store_and_load(tmp_path: Path) -> None:
    model = _trained(lora_model(tmp_path))
    config = CheckpointConfig(algorithm="fomaml", encoder=model.encoder_config, inner_loop=LORA)
    full = save_checkpoint(tmp_path / "run" / "best", model, config)
    with pytest.raises(ValueError, match="more than 1000"):
        export_model(full, tmp_path / "small", limit_bytes=1000)
    assert not (tmp_path / "small").exists()
    with torch.no_grad():  # a meta-trained base tensor must be stored too
        model.encoder.embeddings.word_embeddings.weight[0].add_(1.0)
    changed = export_model(save_checkpoint(tmp_path / "run2" / "best", model, config), tmp_path / "changed")
    assert "encoder.embeddings.word_embeddings.weight" in load_file(str(changed / WEIGHTS_FILE))
    compact = export_model(full, tmp_path / "default")
    tensors = load_file(str(compact / WEIGHTS_FILE))
    missing = next(n for n in tensors if ".lora_A." in n)
    save_file({n: t for n, t in tensors.items() if n != missing}, str(compact / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(compact)


def test_checkpoint_names_resolve_to_the_shipped_model_or_the_bare_encoder(tmp_path: Path, monkeypatch) -> None:
    assert resolve_checkpoint("default") == shipped_checkpoint()
    assert shipped_checkpoint().parts[-3:] == ("metasent", "models", "default")
    assert resolve_checkpoint(None) is None and resolve_checkpoint("none") is None and resolve_checkpoint("") is None
    assert resolve_checkpoint(tmp_path / "x") == tmp_path / "x"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()  # a directory of that name, given relative, wins
    assert resolve_checkpoint("default") == Path("default")
    model, config = load_model("none", encoder=str(save_tiny_encoder(tmp_path / "enc")))
    assert config.algorithm == "none" and model.lora is None and not len(model.inner_log_lr)


def test_every_shipped_model_resolves_by_its_folder_name(tmp_path: Path, monkeypatch) -> None:
    import metasent.meta.checkpoint as checkpoint

    models = tmp_path / "metasent" / "models"
    for name in ("default", "english"):
        (models / name).mkdir(parents=True)
        (models / name / "metasent.json").write_text("{}")
    (models / "notes").mkdir()  # no metasent.json: not a model
    monkeypatch.setattr(checkpoint, "files", lambda package: tmp_path / "metasent")
    assert checkpoint.shipped_models() == {"default": models / "default", "english": models / "english"}
    assert resolve_checkpoint("english") == models / "english" and resolve_checkpoint("default") == models / "default"
    assert resolve_checkpoint("notes") == Path("notes")  # any other name is a directory
    monkeypatch.chdir(tmp_path)
    (tmp_path / "english").mkdir()  # a directory of that name wins
    assert resolve_checkpoint("english") == Path("english")


@pytest.mark.parametrize("config", [LORA, MATCHING], ids=["prototype", "matching"])
def test_the_meta_batch_pass_gives_the_per_episode_gradients(tmp_path: Path, config: InnerLoopConfig) -> None:
    model = _trained(lora_model(tmp_path, config))
    sampler = EpisodeSampler([make_task()], k_shot=2, q_query=3, seed=0)
    episodes = [sampler.sample() for _ in range(3)]
    grads, figures = [], []
    for batched in (False, True):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        figures.append(fomaml_step(model, episodes, config, optimizer, grad_clip=None, batched=batched))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    per_episode, meta_batch = grads
    assert per_episode.keys() == meta_batch.keys() and len(per_episode) > 24  # adapters, rates, temperature
    assert all(float(g.abs().sum()) > 0 for n, g in per_episode.items() if ".layer.1." in n and ".lora_" in n)
    for name, grad in per_episode.items():
        torch.testing.assert_close(meta_batch[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert figures[0] == pytest.approx(figures[1], abs=1e-5)  # same loss and accuracy
    with pytest.raises(ValueError, match="adapted_layers"):
        fomaml_meta_batch_loss(model, episodes, LORA.model_copy(update={"adapted_layers": 0}))


def test_the_matching_support_loss_leaves_each_example_out() -> None:
    # rows 0 and 1 are "positive", rows 2 and 3 "negative"; row 2 is nearly row 0's twin
    rows = torch.tensor([[1.0, 0.0], [0.8, 0.6], [1.0, -0.1], [-1.0, 0.0]])
    support = torch.nn.functional.normalize(rows, dim=-1)
    head = MatchingHead.from_support(support, torch.tensor([0, 0, 1, 1]), 2)
    scale = torch.tensor(math.log(50.0))
    assert head.logits(support, scale).argmax(-1).tolist() == [0, 0, 1, 1]  # each row finds itself
    # left out, rows 0 and 2 find each other, and row 3's nearest is row 1 (cos -0.8 beats -1)
    assert head.support_logits(support, scale).argmax(-1).tolist() == [1, 0, 0, 0]


def test_matching_with_inner_steps_adapts_the_encoder_and_re_embeds_the_support_set(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no tensors of its own"):
        InnerLoopConfig(classifier="matching", steps=2)  # head only: nothing to step on
    model = _trained(lora_model(tmp_path, MATCHING))
    base = dict(model.named_parameters())
    still = inner_loop(model, TEXTS, LABELS, MATCHING.model_copy(update={"steps": 0}))
    state = inner_loop(model, TEXTS, LABELS, MATCHING)
    assert isinstance(state.head, MatchingHead) and set(state.encoder) == set(model.adapted_parameter_names(1, "lora"))
    assert state.support_losses[-2] < state.support_losses[0]  # the leave-one-out loss went down
    with torch.no_grad():  # the head is the support set (and anchors) embedded by the adapted encoder
        embedded = model.embed({**base, **state.encoder}, model.tokenize([*TEXTS, *anchor_texts(state.labels)]))
    torch.testing.assert_close(state.head.support, embedded.float(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(state.head.support, still.head.support)
    # meta-training's way (the FOMAML loss): the same steps from the start head, which they leave as it is
    base = detached_parameters(model)
    embed = support_embedder(model, base, [*TEXTS, *anchor_texts(state.labels)], MATCHING.adapted_layers)
    targets = encode_labels(LABELS, state.labels, model.device)
    with torch.no_grad():
        start = init_head(model, embed({}), targets, len(state.labels), MATCHING)
    encoder, head, _ = take_inner_steps(model, base, embed, targets, MATCHING, start)
    assert head == {} and encoder.keys() == state.encoder.keys()
    for name, tensor in state.encoder.items():
        torch.testing.assert_close(encoder[name].detach(), tensor)
    torch.testing.assert_close(start.support, still.head.support)
    assert inner_loop(model, TEXTS, LABELS, MATCHING, score_support=False).support_embeddings is not None  # rebuilt
    predictor = Predictor(model, MATCHING)
    torch.testing.assert_close(
        predictor.predict_proba(state, TEXTS),
        predictor.predict_proba(inner_loop(model, TEXTS, LABELS, MATCHING), TEXTS),
    )


def test_the_shipped_default_model_is_a_compact_fomaml_over_lora_model() -> None:
    directory = shipped_checkpoint()
    files = sorted(p.name for p in directory.iterdir())
    assert files == sorted(["README.md", CONFIG_FILE, WEIGHTS_FILE])  # the model card beside the artifact
    assert sum((directory / name).stat().st_size for name in (CONFIG_FILE, WEIGHTS_FILE)) <= COMPACT_LIMIT_BYTES
    config = CheckpointConfig.model_validate_json((directory / CONFIG_FILE).read_text())
    assert (config.weights, config.algorithm, config.encoder.name_or_path) == ("meta", "fomaml", DEFAULT_ENCODER)
    inner = config.inner_loop  # served with no inner step (chosen on dev), meta-trained with 3
    assert (inner.adapter, inner.meta_sgd, inner.label_anchors, inner.steps) == ("lora", True, True, 0)
    assert inner.classifier == "matching" and config.metrics["trained_inner_loop"]["steps"] == 3
    assert config.name and config.training is not None and config.step > 0
    assert all(".lora_" in n or not n.startswith("encoder.") for n in load_file(str(directory / WEIGHTS_FILE)))


def test_a_lora_domain_survives_a_restart_of_the_service(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from metasent.app.main import create_app
    from metasent.app.settings import Settings
    from tests.conftest import TEXTS, assert_same_scores, support

    model = _trained(lora_model(tmp_path))
    config = CheckpointConfig(algorithm="fomaml", encoder=model.encoder_config, inner_loop=LORA)
    compact = export_model(save_checkpoint(tmp_path / "run" / "best", model, config), tmp_path / "model", name="m")
    settings = Settings(checkpoint=compact, device="cpu", data_dir=tmp_path / "store")
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json()["model"] == "m"
        created = client.post("/v1/domains", json={"name": "food", "examples": support()})
        assert created.status_code == 201, created.text
        domain_id = created.json()["domain_id"]
        before = client.post(f"/v1/domains/{domain_id}/classify", json={"texts": TEXTS}).json()["predictions"]
    with TestClient(create_app(settings)) as client:  # the adapters come back from the store
        after = client.post(f"/v1/domains/{domain_id}/classify", json={"texts": TEXTS}).json()["predictions"]
    assert_same_scores([p["scores"] for p in before], [p["scores"] for p in after])
    state = Predictor(model, LORA).adapt([e["text"] for e in support()], [e["label"] for e in support()])
    assert len(state.encoder) == 12 and state.labels == tuple(created.json()["labels"])


def test_training_goes_on_from_a_compact_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from metasent.cli import cli
    from metasent.meta.config import TrainConfig
    from tests.conftest import write_arsc_like

    data = write_arsc_like(tmp_path / "arsc")
    model = _trained(lora_model(tmp_path))
    training = TrainConfig(
        data=str(data), exclude_domains=["snacks"], val_domains=["drinks"], k_shot=2, q_query=2, meta_batch_size=1,
        outer_steps=2, val_q_query=2, eval_every=1, outer_lr=1e-2,
    )  # fmt: skip
    config = CheckpointConfig(algorithm="fomaml", encoder=model.encoder_config, inner_loop=LORA, training=training)
    config.step = 2
    compact = export_model(save_checkpoint(tmp_path / "run" / "best", model, config), tmp_path / "model")
    args = ["train", "--data", str(data), "--output", str(tmp_path / "more"), "--resume", str(compact)]
    result = CliRunner().invoke(cli, [*args, "--outer-steps", "4", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    trained, went_on = load_checkpoint(tmp_path / "more" / "last")
    assert (went_on.step, went_on.weights, went_on.training.outer_steps) == (4, "full", 4)  # type: ignore[union-attr]
    lora = [n for n in trained.state_dict() if ".lora_B." in n]
    assert any(not torch.equal(trained.state_dict()[n], model.state_dict()[n]) for n in lora)  # it trained on


def test_export_can_serve_another_step_count_and_no_step_keeps_no_tensor(tmp_path: Path) -> None:
    model = _trained(lora_model(tmp_path))
    config = CheckpointConfig(algorithm="fomaml", encoder=model.encoder_config, inner_loop=LORA)
    full = save_checkpoint(tmp_path / "run" / "best", model, config)
    loaded, served = load_checkpoint(export_model(full, tmp_path / "m", inner_steps=0))
    assert served.inner_loop.steps == 0 and served.metrics["trained_inner_loop"]["steps"] == 3
    state = Predictor(loaded, served.inner_loop).adapt(TEXTS, LABELS)
    assert state.encoder == {} and state.shares_encoder  # the meta-trained adapters serve every domain
    with pytest.raises(ValueError):
        export_model(full, tmp_path / "bad", inner_steps=-1)


def test_a_new_run_starts_from_a_models_meta_parameters_with_its_own_inner_loop(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from metasent.cli import cli
    from tests.conftest import write_arsc_like

    data = write_arsc_like(tmp_path / "arsc")
    source = _trained(lora_model(tmp_path))  # prototype head, Meta-SGD, top layer adapted
    config = CheckpointConfig(algorithm="fomaml", encoder=source.encoder_config, inner_loop=LORA)
    compact = export_model(save_checkpoint(tmp_path / "run" / "best", source, config), tmp_path / "model")
    args = [
        "train", "--data", str(data), "--exclude-domains", "snacks", "--val-domains", "drinks",
        "--encoder", source.encoder_config.name_or_path, "--max-length", "32", "--k-shot", "2", "--q-query", "2",
        "--val-q-query", "2", "--meta-batch-size", "1", "--outer-steps", "1", "--outer-lr", "1e-12",
        "--classifier", "matching", "--adapted-layers", "2", "--inner-steps", "2", "--inner-lr", "0.2",
        "--lora-rank", "2", "--init-from", str(compact), "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    model, run = load_checkpoint(tmp_path / "new" / "last")
    assert (run.inner_loop.classifier, run.inner_loop.adapted_layers, run.inner_loop.steps) == ("matching", 2, 2)
    for name, tensor in source.state_dict().items():
        if ".lora_" in name:  # the source's adapters (and the base) carried over; 1e-12 outer steps barely move them
            torch.testing.assert_close(model.state_dict()[name], tensor, atol=1e-6, rtol=0, msg=name)
    rates = {key: float(p.detach().exp()) for key, p in model.inner_log_lr.items()}
    bottom = [key for key in rates if "layer__0__" in key]  # not adapted by the source: fresh at --inner-lr
    assert bottom and all(abs(rates[key] - 0.2) < 1e-4 for key in bottom)
    top = [key for key in rates if "layer__1__" in key]  # the source's learned rate, 0.03
    assert top and all(abs(rates[key] - 0.03) < 1e-4 for key in top)
    other = CliRunner().invoke(cli, [*args, "--lora-rank", "4", "--output", str(tmp_path / "other")])
    assert other.exit_code == 2, other.output
    assert "does not fit this run" in " ".join(other.output.replace("│", " ").split()), other.output
