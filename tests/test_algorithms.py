"""The methods besides first-order MAML: Reptile, prototypical and matching networks,
multi-task pre-training, fine-tuning, and label-name anchors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metasent.data.episodes import EpisodeSampler
from metasent.meta.adaptation import AdaptedState, MatchingHead, Predictor, PrototypeHead, inner_loop
from metasent.meta.algorithms import MultitaskHead, default_inner_loop, multitask_step, reptile_step
from metasent.meta.algorithms.fomaml import fomaml_query_loss
from metasent.meta.checkpoint import load_checkpoint, load_model, save_checkpoint
from metasent.meta.config import CheckpointConfig, InnerLoopConfig, TrainConfig
from metasent.meta.model import MetaLearner
from metasent.meta.train import meta_train
from tests.conftest import NEGATIVE, POSITIVE, make_task


def support(k: int = 3) -> tuple[list[str], list[str]]:
    return POSITIVE[:k] + NEGATIVE[:k], ["positive"] * k + ["negative"] * k


def predict_proba(model: MetaLearner, state: AdaptedState, texts: list[str]) -> torch.Tensor:
    return Predictor(model, InnerLoopConfig()).predict_proba(state, texts)


def episodes(n: int, k: int = 2, q: int = 2, seed: int = 0):
    sampler = EpisodeSampler([make_task("food"), make_task("drinks", "drinks")], k_shot=k, q_query=q, seed=seed)
    return [sampler.sample() for _ in range(n)]


def test_prototype_head_with_anchors_is_a_weighted_mean() -> None:
    torch.manual_seed(0)
    z = F.normalize(torch.randn(4, 8), dim=-1)
    anchors = F.normalize(torch.randn(2, 8), dim=-1)
    labels = torch.tensor([0, 0, 1, 1])
    head = PrototypeHead.from_support(z, labels, 2, anchors, torch.tensor(3.0))
    expected = torch.stack([(z[0] + z[1] + 3 * anchors[0]) / 5, (z[2] + z[3] + 3 * anchors[1]) / 5])
    torch.testing.assert_close(head.weight, 2 * expected)
    torch.testing.assert_close(head.bias, -(expected**2).sum(1))


def test_matching_head_is_attention_over_the_support_set(tiny_model: MetaLearner) -> None:
    torch.manual_seed(0)
    z = F.normalize(torch.randn(4, 32), dim=-1)
    head = MatchingHead.from_support(z, torch.tensor([0, 1, 1, 0]), 2)
    queries = F.normalize(torch.randn(3, 32), dim=-1)
    probs = head.logits(queries, tiny_model.logit_scale).softmax(-1)
    attention = (tiny_model.logit_scale.exp() * queries @ z.T).softmax(-1)
    expected = torch.stack([attention[:, [0, 3]].sum(1), attention[:, [1, 2]].sum(1)], dim=1)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="at least one support example"):
        MatchingHead.from_support(z, torch.tensor([0, 0, 0, 0]), 2)


def test_matching_inner_loop_takes_no_step_and_serves_any_text(tiny_model: MetaLearner) -> None:
    config = default_inner_loop("matching")
    texts, labels = support()
    adaptation = inner_loop(tiny_model, texts, labels, config)
    assert adaptation.steps == 0 and set(adaptation.to_tensors()) == {"head.support", "head.support_labels"}
    assert adaptation.to_tensors()["head.support"].shape == (6, 32) and adaptation.shares_encoder
    probs = predict_proba(tiny_model, adaptation, ["great coffee", "awful tea", "fine"])
    assert probs.shape == (3, 2)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    assert predict_proba(tiny_model, adaptation, []).shape == (0, 2)
    with pytest.raises(ValueError, match="no tensors of its own"):
        InnerLoopConfig(steps=3, classifier="matching")  # steps need adapted encoder layers


def test_label_anchors_change_the_head_and_train_their_weight(tiny_model: MetaLearner) -> None:
    texts, labels = support()
    plain = inner_loop(tiny_model, texts, labels, InnerLoopConfig(steps=0))
    anchored = inner_loop(tiny_model, texts, labels, InnerLoopConfig(steps=0, label_anchors=True))
    assert not torch.allclose(plain.to_tensors()["head.weight"], anchored.to_tensors()["head.weight"])
    # the anchor weight is a meta-parameter: the query loss reaches it
    episode = episodes(1)[0]
    loss, _ = fomaml_query_loss(tiny_model, episode, InnerLoopConfig(steps=2, lr=0.1, label_anchors=True))
    loss.backward()
    assert tiny_model.label_log_weight.grad is not None and float(tiny_model.label_log_weight.grad.abs()) > 0


def test_protonet_loss_is_the_prototype_cross_entropy(tiny_model: MetaLearner) -> None:
    episode = episodes(1)[0]
    loss, _ = fomaml_query_loss(tiny_model, episode, default_inner_loop("protonet"))
    support_z = tiny_model(**tiny_model.tokenize([ex.text for ex in episode.support]))
    y = torch.tensor([episode.labels.index(ex.label) for ex in episode.support])
    head = PrototypeHead.from_support(support_z, y, 2)
    query_z = tiny_model(**tiny_model.tokenize([ex.text for ex in episode.query]))
    query_y = torch.tensor([episode.labels.index(ex.label) for ex in episode.query])
    expected = F.cross_entropy(head.logits(query_z, tiny_model.logit_scale), query_y)
    torch.testing.assert_close(loss, expected)


def test_reptile_step_moves_adapted_layers_toward_the_adapted_parameters(tiny_model: MetaLearner) -> None:
    config = InnerLoopConfig(steps=2, lr=0.1, adapted_layers=1)
    batch = episodes(2)
    theta = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    expected_direction = {}
    for episode in batch:
        examples = episode.support + episode.query
        phi = inner_loop(
            tiny_model, [ex.text for ex in examples], [ex.label for ex in examples], config, episode.labels
        )
        for name, value in phi.to_tensors().items():
            if not name.startswith("head."):
                expected_direction[name] = expected_direction.get(name, 0) + (value - theta[name]) / 2
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.5)
    reptile_step(tiny_model, batch, config, optimizer)
    adapted = set(tiny_model.adapted_parameter_names(1))
    for name, parameter in tiny_model.named_parameters():
        if name in adapted:  # SGD with lr 0.5 on theta - phi: half-way toward the mean adapted tensors
            torch.testing.assert_close(parameter.detach() - theta[name], 0.5 * expected_direction[name])
        else:
            assert torch.equal(parameter.detach(), theta[name]), name
    with pytest.raises(ValueError, match="adapted_layers"):
        reptile_step(tiny_model, batch, InnerLoopConfig(), optimizer)


def test_multitask_step_learns_the_source_labels(tiny_model: MetaLearner) -> None:
    head = MultitaskHead(["positive", "negative", "positive"], 32)
    assert head.labels == ("negative", "positive")
    optimizer = torch.optim.AdamW([*tiny_model.parameters(), *head.parameters()], lr=1e-2)
    batch = episodes(2, k=4, q=4)
    first, _ = multitask_step(tiny_model, head, batch, optimizer)
    for _ in range(15):
        loss, accuracy = multitask_step(tiny_model, head, batch, optimizer)
    assert loss < first and accuracy >= 0.9


@pytest.mark.parametrize("algorithm", ["reptile", "protonet", "matching", "multitask"])
def test_meta_train_each_algorithm_saves_a_servable_checkpoint(
    tmp_path: Path, tiny_model: MetaLearner, algorithm: str
) -> None:
    inner = default_inner_loop(algorithm)
    if algorithm == "reptile":
        inner = inner.model_copy(update={"adapted_layers": 1, "steps": 2})
    config = CheckpointConfig(
        algorithm=algorithm,  # type: ignore[arg-type]
        encoder=tiny_model.encoder_config,
        inner_loop=inner,
        training=TrainConfig(
            k_shot=2, q_query=2, meta_batch_size=2, outer_steps=3, outer_lr=1e-3, warmup_steps=1,
            eval_every=3, save_every=3, val_episodes=1, val_split="dev", val_q_query=2, query_sampling="natural",
        ),
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    final = meta_train(tiny_model, [make_task("food"), make_task("drinks", "drinks")], [make_task("snacks")],
                       config, tmp_path / "run", progress=False)  # fmt: skip
    assert final.step == 3 and len(final.metrics["curve"]) == 3 and "seconds" in final.metrics["curve"][-1]
    assert any(not torch.equal(p.detach(), before[n]) for n, p in tiny_model.named_parameters())
    model, saved = load_checkpoint(tmp_path / "run" / "best")
    assert saved.algorithm == algorithm and saved.inner_loop == inner
    texts, labels = support()
    adaptation = inner_loop(model, texts, labels, saved.inner_loop)
    assert predict_proba(model, adaptation, texts).shape == (6, 2)


def test_finetune_and_old_checkpoints_load(tmp_path: Path, tiny_model: MetaLearner) -> None:
    with pytest.raises(ValueError, match="needs a meta-trained checkpoint"):
        load_model(None, "tiny", algorithm="fomaml")
    config = CheckpointConfig(
        algorithm="finetune", encoder=tiny_model.encoder_config, inner_loop=default_inner_loop("finetune")
    )
    save_checkpoint(tmp_path / "ft", tiny_model, config)
    # a checkpoint written before the label-anchor weight existed still loads, with weight 1
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "ft" / "model.safetensors"))
    del weights["label_log_weight"]
    save_file(weights, str(tmp_path / "ft" / "model.safetensors"))
    model, loaded = load_checkpoint(tmp_path / "ft")
    assert loaded.inner_loop.adapted_layers == -1 and float(model.label_log_weight) == 0.0
    texts, labels = support()
    adaptation = inner_loop(model, texts, labels, loaded.inner_loop)
    assert len(adaptation.encoder) > 2 and adaptation.support_losses[-1] < adaptation.support_losses[0]


def test_matching_with_label_anchors_attends_to_the_label_names(tiny_model: MetaLearner) -> None:
    texts, labels = support()
    config = InnerLoopConfig(steps=0, classifier="matching", label_anchors=True)
    state = inner_loop(tiny_model, texts, labels, config, label_names=("negative", "positive"))
    head = state.to_tensors()
    assert head["head.support"].shape == (8, 32) and head["head.support_labels"].shape == (8, 2)
    torch.testing.assert_close(head["head.support_labels"][6:], torch.eye(2))
    torch.testing.assert_close(head["head.support_bias"], torch.zeros(8))  # log of the initial weight 1
    anchors = tiny_model(**tiny_model.tokenize(["negative", "positive"]))
    torch.testing.assert_close(head["head.support"][6:], anchors, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        tiny_model.label_log_weight.fill_(2.0)  # anchors weigh e^2 support examples each
    probs = predict_proba(tiny_model, inner_loop(tiny_model, texts, labels, config, ("negative", "positive")),
                          ["positive"])  # fmt: skip
    assert float(probs[0, 1]) > float(predict_proba(tiny_model, state, ["positive"])[0, 1])
    episode = episodes(1)[0]
    loss, _ = fomaml_query_loss(tiny_model, episode, config)
    loss.backward()
    assert tiny_model.label_log_weight.grad is not None and float(tiny_model.label_log_weight.grad.abs()) > 0
