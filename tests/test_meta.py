"""The model, the inner loop, the first-order MAML update, checkpoints and evaluation."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metasent.data.episodes import EpisodeSampler, fixed_episode
from metasent.data.registry import Task
from metasent.meta.adaptation import AdaptedState, Predictor, PrototypeHead, encode_labels, inner_loop
from metasent.meta.algorithms.fomaml import fomaml_query_loss
from metasent.meta.checkpoint import is_checkpoint, load_checkpoint, load_training_state, save_checkpoint
from metasent.meta.config import CheckpointConfig, InnerLoopConfig, TrainConfig
from metasent.meta.evaluate import (
    EmbeddingCache,
    EpisodeResult,
    evaluate_episode,
    evaluate_tasks,
    format_table,
    score_episode,
    summarize,
)
from metasent.meta.inner import detached_parameters, init_head, support_embedder, take_inner_steps
from metasent.meta.model import MetaLearner
from metasent.meta.train import meta_train
from tests.conftest import NEGATIVE, POSITIVE, make_task


def support(k: int = 5) -> tuple[list[str], list[str]]:
    return POSITIVE[:k] + NEGATIVE[:k], ["positive"] * k + ["negative"] * k


def predict_proba(model: MetaLearner, state: AdaptedState, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    return Predictor(model, InnerLoopConfig(), batch_size).predict_proba(state, texts)


def test_prototype_head_is_negative_squared_distance() -> None:
    torch.manual_seed(0)
    z = F.normalize(torch.randn(6, 8), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    head = PrototypeHead.from_support(z, labels, 3)
    prototypes = torch.stack([z[labels == c].mean(0) for c in range(3)])
    queries = F.normalize(torch.randn(5, 8), dim=-1)
    logits = head.logits(queries, torch.tensor(0.0))  # temperature exp(0) = 1
    expected = -(torch.cdist(queries, prototypes) ** 2) + (queries**2).sum(1, keepdim=True)
    torch.testing.assert_close(logits, expected)
    with pytest.raises(ValueError, match="at least one support example"):
        PrototypeHead.from_support(z, torch.tensor([0, 0, 0, 0, 0, 0]), 2)


def test_adapted_parameter_names(tiny_model: MetaLearner) -> None:
    assert tiny_model.adapted_parameter_names(0) == []
    top = tiny_model.adapted_parameter_names(1)
    assert top and all(".layer.1." in n for n in top)
    everything = tiny_model.adapted_parameter_names(-1)
    assert any("embeddings" in n for n in everything) and not any("pooler" in n for n in everything)
    with pytest.raises(ValueError):
        tiny_model.adapted_parameter_names(3)


@pytest.mark.parametrize("layers", [0, 1, -1])
def test_inner_loop_lowers_support_loss_and_leaves_base_untouched(tiny_model: MetaLearner, layers: int) -> None:
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    texts, labels = support()
    adaptation = inner_loop(tiny_model, texts, labels, InnerLoopConfig(steps=10, lr=0.01, adapted_layers=layers))
    assert len(adaptation.support_losses) == 11
    assert adaptation.support_losses[-1] < adaptation.support_losses[0]
    tensors = adaptation.to_tensors()
    assert set(tensors) == {"head.weight", "head.bias", *tiny_model.adapted_parameter_names(layers)}
    assert tensors["head.weight"].shape == (2, 32) and adaptation.shares_encoder == (layers == 0)
    for name, param in tiny_model.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=0)


def test_inner_loop_any_labels_and_order(tiny_model: MetaLearner) -> None:
    texts = POSITIVE[:2] + NEGATIVE[:2] + ["okay fine", "average okay"]
    labels = ["love", "love", "hate", "hate", "meh", "meh"]
    adaptation = inner_loop(tiny_model, texts, labels, InnerLoopConfig(steps=2, adapted_layers=1))
    assert adaptation.labels == ("love", "hate", "meh")
    assert adaptation.to_tensors()["head.bias"].shape == (3,) and adaptation.num_classes == 3
    probs = predict_proba(tiny_model, adaptation, ["great coffee", "awful tea"])
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        inner_loop(tiny_model, texts[:2], ["love", "love"], InnerLoopConfig())


def test_inner_loop_is_deterministic(tiny_model: MetaLearner) -> None:
    texts, labels = support()
    config = InnerLoopConfig(steps=3, adapted_layers=1)
    first, second = (inner_loop(tiny_model, texts, labels, config) for _ in range(2))
    for name, tensor in first.to_tensors().items():
        torch.testing.assert_close(tensor, second.to_tensors()[name])


def test_predict_proba_keeps_input_order(tiny_model: MetaLearner) -> None:
    texts, labels = support()
    adaptation = inner_loop(tiny_model, texts, labels, InnerLoopConfig(steps=2, adapted_layers=1))
    queries = ["great", "awful stale bread never again terrible bitter", "love it", "bad"]
    batched = predict_proba(tiny_model, adaptation, queries, batch_size=3)
    one_by_one = torch.cat([predict_proba(tiny_model, adaptation, [q]) for q in queries])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [0, 1])
def test_fomaml_step_equals_hand_computed_first_order_update(tiny_model: MetaLearner, layers: int) -> None:
    """The outer update is theta - eta * (dL_query/dphi at the adapted phi, plus the gradient of
    the prototype initialisation of the head at theta), computed here on separate leaves."""
    episode = EpisodeSampler([make_task()], k_shot=3, q_query=3, seed=0).sample()
    inner = InnerLoopConfig(steps=2, lr=0.3, adapted_layers=layers, grad_clip=None)
    theta = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    adaptation = inner_loop(
        tiny_model,
        [e.text for e in episode.support],
        [e.label for e in episode.support],
        inner,
        episode.labels,
    )

    # Hand computation: theta leaves for the prototypes, phi leaves for the adapted query pass.
    theta_leaves = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    phi_leaves = {
        n: adaptation.encoder[n].clone().requires_grad_(True) for n in tiny_model.adapted_parameter_names(layers)
    }
    s_batch = tiny_model.tokenize([e.text for e in episode.support])
    q_batch = tiny_model.tokenize([e.text for e in episode.query])
    s_y = encode_labels([e.label for e in episode.support], episode.labels, tiny_model.device)
    q_y = encode_labels([e.label for e in episode.query], episode.labels, tiny_model.device)
    head0 = PrototypeHead.from_support(tiny_model.embed(theta_leaves, s_batch), s_y, 2)
    adapted = adaptation.head
    assert isinstance(adapted, PrototypeHead)
    weight = head0.weight + (adapted.weight - head0.weight.detach())  # value: adapted; gradient: head0
    bias = head0.bias + (adapted.bias - head0.bias.detach())
    query_z = tiny_model.embed({**theta_leaves, **phi_leaves}, q_batch)
    loss = F.cross_entropy(theta_leaves["logit_scale"].exp() * (query_z @ weight.T + bias), q_y)
    loss.backward()
    eta = 0.01
    expected = {}
    for name, leaf in theta_leaves.items():
        grad = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
        if name in phi_leaves:
            grad = grad + phi_leaves[name].grad
        expected[name] = theta[name] - eta * grad

    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=eta)
    optimizer.zero_grad()
    query_loss, _ = fomaml_query_loss(tiny_model, episode, inner)
    query_loss.backward()
    optimizer.step()
    torch.testing.assert_close(query_loss.detach(), loss.detach())
    changed = 0
    for name, param in tiny_model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], atol=1e-6, rtol=1e-5)
        changed += int(not torch.equal(param.detach(), theta[name]))
    assert changed > len(theta) // 2  # the outer loop updates the lower layers too


def write_meta_train(tmp_path: Path, model: MetaLearner, steps: int, state=None, config=None) -> CheckpointConfig:
    tasks = [make_task("food", "food"), make_task("drinks", "drinks")]
    val = [make_task("snacks", "snacks")]
    config = config or CheckpointConfig(
        encoder=model.encoder_config,
        inner_loop=InnerLoopConfig(steps=2, lr=0.1, adapted_layers=1),
        training=TrainConfig(
            k_shot=2,
            q_query=2,
            meta_batch_size=2,
            outer_steps=steps,
            outer_lr=1e-3,
            warmup_steps=1,
            eval_every=2,
            save_every=2,
            val_episodes=1,
            val_split="train",
            val_q_query=2,
        ),
    )
    return meta_train(model, tasks, val, config, tmp_path / "run", state, progress=False)


def test_meta_train_writes_best_and_last_and_resumes(tmp_path: Path, tiny_model: MetaLearner) -> None:
    start = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    config = write_meta_train(tmp_path, tiny_model, steps=3)
    assert config.step == 3
    assert [row["step"] for row in config.metrics["curve"]] == [1, 2, 3]
    assert [row["step"] for row in config.metrics["validation"]] == [0, 2, 3]
    assert is_checkpoint(tmp_path / "run" / "best") and is_checkpoint(tmp_path / "run" / "last")
    assert any(not torch.equal(p.detach(), start[n]) for n, p in tiny_model.named_parameters())

    resumed, saved = load_checkpoint(tmp_path / "run" / "last")
    assert saved.step == 3 and saved.training is not None
    saved.training.outer_steps = 5
    state = load_training_state(tmp_path / "run" / "last")
    assert state is not None and "optimizer" in state
    final = write_meta_train(tmp_path, resumed, steps=5, state=state, config=saved)
    assert final.step == 5
    assert [row["step"] for row in final.metrics["curve"]] == [1, 2, 3, 4, 5]


def test_checkpoint_round_trip(tmp_path: Path, tiny_model: MetaLearner) -> None:
    config = CheckpointConfig(
        encoder=tiny_model.encoder_config, inner_loop=InnerLoopConfig(steps=4, lr=0.2, adapted_layers=1)
    )
    config.metrics["note"] = "round trip"
    save_checkpoint(tmp_path / "ckpt", tiny_model, config)
    save_checkpoint(tmp_path / "ckpt", tiny_model, config)  # overwriting is atomic and leaves one copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "vocab.txt"]
    loaded, loaded_config = load_checkpoint(tmp_path / "ckpt")
    assert loaded_config == config
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    texts, labels = support()
    a = inner_loop(tiny_model, texts, labels, config.inner_loop)
    b = inner_loop(loaded, texts, labels, loaded_config.inner_loop)
    torch.testing.assert_close(predict_proba(tiny_model, a, texts), predict_proba(loaded, b, texts))
    with pytest.raises(FileNotFoundError, match="not a metasent checkpoint"):
        load_checkpoint(tmp_path)


def test_evaluate_episode_and_summary(tiny_model: MetaLearner, food_task: Task) -> None:
    episode, inner = fixed_episode(food_task), InnerLoopConfig(steps=1, adapted_layers=0)
    result = evaluate_episode(tiny_model, episode, inner)
    assert result.num_query == len(food_task.split("test"))
    # the same adaptation done by hand: its query predictions give the accuracy
    texts, labels = [e.text for e in episode.support], [e.label for e in episode.support]
    adaptation = inner_loop(tiny_model, texts, labels, inner, episode.labels)
    probs = predict_proba(tiny_model, adaptation, [e.text for e in episode.query])
    predicted = [adaptation.labels[i] for i in probs.argmax(-1).tolist()]
    correct = sum(p == e.label for p, e in zip(predicted, episode.query, strict=True))
    assert result.accuracy == pytest.approx(correct / 8)
    assert result.positive_share == 0.5  # 4 positive, 4 negative test reviews
    # macro-F1 by hand on fixed predictions: always "positive" on 4 + 4 is F1 2/3 and 0, mean 1/3
    always = score_episode(episode, ["positive"] * 8, None, 0.0, 1.0)
    assert always.accuracy == 0.5 and always.macro_f1 == pytest.approx(1 / 3)
    # 3 of 4 positives and 4 of 4 negatives right: F1 6/7 (positive) and 8/9 (negative)
    mostly = score_episode(episode, [e.label if i else "negative" for i, e in enumerate(episode.query)], 0, 0.0, 1.0)
    assert episode.query[0].label == "positive"
    assert mostly.accuracy == 7 / 8 and mostly.macro_f1 == pytest.approx((6 / 7 + 8 / 9) / 2)
    results = [
        EpisodeResult("a", 0, 0.5, 0.4, 10, 0.1, 1.0, 0.8),
        EpisodeResult("a", 1, 0.7, 0.6, 10, 0.3, 1.0, 0.6),
        EpisodeResult("b", 0, 0.9, 0.8, 10, 0.2, 1.0, 0.5),
        EpisodeResult("b", 1, 0.9, 0.8, 10, 0.2, 1.0, 0.5),
    ]
    summary = summarize(results)
    assert summary["tasks"]["a"]["accuracy"] == 60.0
    assert summary["tasks"]["a"]["accuracy_ci95"] == pytest.approx(127.06, abs=0.01)  # t(0.975, 1) * 14.14 / sqrt 2
    assert summary["mean"]["accuracy"] == 75.0 and summary["mean"]["macro_f1"] == 65.0
    # sampled tasks: the mean's CI is over all 4 episodes, t(0.975, 3) * stdev / sqrt 4
    assert summary["mean"]["episodes"] == 4
    assert summary["mean"]["accuracy_ci95"] == pytest.approx(3.1824 * statistics.stdev([50, 70, 90, 90]) / 2, abs=0.01)
    assert summary["tasks"]["a"]["always_positive_accuracy"] == 70.0
    assert summary["mean"]["always_positive_accuracy"] == 60.0
    table = format_table(summary, "title")
    assert "MEAN (2 tasks)" in table and "75.00" in table


def test_embedding_cache_scores_as_the_uncached_evaluation_and_encodes_each_text_once(
    tiny_model: MetaLearner, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = [make_task("food.t2"), make_task("food.t4")]  # two tasks over the same texts, as ARSC's t2/t4/t5
    inner = InnerLoopConfig(steps=0, classifier="matching", label_anchors=True)
    encoded: list[str] = []
    base_embed = Predictor.embed

    def counting_embed(self: Predictor, texts: list[str]) -> torch.Tensor:
        encoded.extend(texts)
        return base_embed(self, texts)

    monkeypatch.setattr(Predictor, "embed", counting_embed)
    cached = evaluate_tasks(tiny_model, tasks, inner, protocol="sampled", k_shot=3, seeds=3, query_split="test")
    query_texts = {ex.text for ex in tasks[0].split("test")}
    assert len(encoded) == len(set(encoded)) == len(query_texts)  # 6 episodes, each text encoded once
    for result, (task, seed) in zip(cached, [(t, s) for t in tasks for s in range(3)], strict=True):
        sampler = EpisodeSampler([task], k_shot=3, q_query=None, support_split="train", query_split="test", seed=seed)
        plain = evaluate_episode(tiny_model, sampler.sample(task), inner, seed)
        assert (result.task, result.seed, result.num_query) == (plain.task, plain.seed, plain.num_query)
        assert result.accuracy == plain.accuracy and result.macro_f1 == plain.macro_f1
        assert result.ece == pytest.approx(plain.ece, abs=1e-5)
    # an inner loop that adapts the encoder cannot use base-encoder embeddings
    texts, labels = support()
    adapted = inner_loop(tiny_model, texts, labels, InnerLoopConfig(steps=1, adapted_layers=1))
    with pytest.raises(ValueError, match="adapted encoder"):
        EmbeddingCache(Predictor(tiny_model, inner)).predict_proba(adapted, texts)


def _inner_steps(model: MetaLearner, config: InnerLoopConfig, cache_frozen: bool) -> dict[str, torch.Tensor]:
    """The adapted encoder and head tensors of the inner steps on :func:`support`, the lower
    layers run once (``cache_frozen``) or at every step."""
    texts, labels = support()
    names = ("negative", "positive")
    targets = encode_labels(labels, names, model.device)
    base = detached_parameters(model)
    embed = support_embedder(model, base, texts, config.adapted_layers, cache_frozen=cache_frozen)
    with torch.no_grad():
        start = init_head(model, embed({}), targets, len(names), config)
    encoder, head, losses = take_inner_steps(model, base, embed, targets, config, start)
    assert len(losses) == config.steps
    return {**encoder, **{"head." + name: t for name, t in head.items()}}


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_cached_frozen_layers_give_the_uncached_adaptation(tiny_model: MetaLearner, layers: int) -> None:
    config = InnerLoopConfig(steps=3, lr=0.05, adapted_layers=layers)
    cached = _inner_steps(tiny_model, config, cache_frozen=True)
    uncached = _inner_steps(tiny_model, config, cache_frozen=False)
    assert cached.keys() == uncached.keys() and len(cached) == len(tiny_model.adapted_parameter_names(layers)) + 2
    for name, tensor in cached.items():
        torch.testing.assert_close(tensor, uncached[name], atol=1e-5, rtol=1e-5)
    # the serving inner loop runs the cached way: the same tensors
    texts, labels = support()
    served = inner_loop(tiny_model, texts, labels, config, label_names=("negative", "positive")).to_tensors()
    assert served.keys() == cached.keys()
    for name, tensor in served.items():
        torch.testing.assert_close(tensor, cached[name].detach())


@pytest.mark.parametrize("adapted_layers", [0, 1])
def test_lower_layer_cache_gives_the_uncached_fomaml_loss_and_gradients(
    tiny_model: MetaLearner, adapted_layers: int
) -> None:
    from metasent.meta.feature_cache import LowerLayerCache

    episode = EpisodeSampler([make_task()], k_shot=3, q_query=3, seed=2).sample()
    inner = InnerLoopConfig(steps=2, lr=0.3, adapted_layers=adapted_layers)
    cache = LowerLayerCache(tiny_model, first_layer=1, dtype=torch.float32)

    def loss_and_grads(feature_cache) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tiny_model.zero_grad(set_to_none=True)
        loss, _ = fomaml_query_loss(tiny_model, episode, inner, feature_cache=feature_cache)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads(None)
    cached_loss, cached_grads = loss_and_grads(cache)
    torch.testing.assert_close(cached_loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert len(cache) == len({e.text for e in episode.support + episode.query})
    for name, grad in cached_grads.items():  # layers above the cache get the same gradients
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert any(".layer.1." in n for n in cached_grads) and not any(".layer.0." in n for n in cached_grads)
    cached_again, _ = loss_and_grads(cache)  # second use: every text from the cache
    assert cache.hits >= len(episode.support) + len(episode.query)
    torch.testing.assert_close(cached_again, plain_loss, atol=1e-5, rtol=1e-5)


def test_meta_train_with_frozen_lower_layers_leaves_them_unchanged(tmp_path: Path, tiny_model: MetaLearner) -> None:
    from metasent.meta.model import frozen_parameter_names

    start = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    config = CheckpointConfig(
        encoder=tiny_model.encoder_config,
        inner_loop=InnerLoopConfig(steps=2, lr=0.1, adapted_layers=0),
        training=TrainConfig(
            k_shot=2, q_query=2, meta_batch_size=2, outer_steps=2, outer_lr=1e-2, warmup_steps=1,
            eval_every=2, save_every=2, val_episodes=1, val_split="train", val_q_query=2, frozen_layers=1,
        ),
    )  # fmt: skip
    write_meta_train(tmp_path, tiny_model, steps=2, config=config)
    frozen = set(frozen_parameter_names(tiny_model, 1))
    assert frozen and all(".layer.1." not in n for n in frozen)
    for name, param in tiny_model.named_parameters():
        if name in frozen:
            assert torch.equal(param.detach(), start[name]), name
    assert any(not torch.equal(p.detach(), start[n]) for n, p in tiny_model.named_parameters() if ".layer.1." in n)


def test_meta_trainer_from_arguments_builds_the_run_the_command_line_trains(tmp_path: Path) -> None:
    from metasent.meta.config import TrainingArguments
    from metasent.meta.resolve import ArgumentError, checkpoint_config
    from metasent.meta.train import MetaTrainer
    from tests.conftest import save_tiny_encoder, write_arsc_like

    data, encoder = write_arsc_like(tmp_path / "arsc"), save_tiny_encoder(tmp_path / "encoder")
    values = {"data": str(data), "output": tmp_path / "run", "encoder": str(encoder), "algorithm": "protonet"}
    values |= {"exclude_domains": ["snacks"], "val_domains": ["drinks"], "outer_steps": 2}
    values |= {"k_shot": 2, "val_q_query": 4}
    args = TrainingArguments.model_validate(values)
    trainer = MetaTrainer.from_arguments(args)
    expected = checkpoint_config(args).model_dump(exclude={"metrics"})
    assert trainer.config.model_dump(exclude={"metrics"}) == expected and trainer.config.inner_loop.steps == 0
    assert [t.name for t in trainer.sampler.tasks] == ["food.t2"]  # snacks held out, drinks validates
    assert trainer.val_set and {e.task for e in trainer.val_set} == {"drinks.t2"}
    final = trainer.train()
    assert final.step == 2 and (tmp_path / "run" / "best").is_dir()
    for source, message in (("none", "give a checkpoint directory"), (str(tmp_path / "nowhere"), "not a metasent")):
        with pytest.raises(ArgumentError, match=message) as info:
            MetaTrainer.from_arguments(args.model_copy(update={"init_from": source}))
        assert info.value.argument == "init_from"
