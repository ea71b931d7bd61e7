"""The adaptation API: heads against hand computations, the pure SGD step, adapted states and
their stored format, and the predictor's shared-encoder batching."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, get_args

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from metasent.meta.adaptation import (
    HEADS,
    SHARED_ENCODER_KEY,
    AdaptedState,
    MatchingHead,
    Predictor,
    PrototypeHead,
    init_head,
    inner_loop,
    sgd_step,
)
from metasent.meta.config import InnerLoopConfig
from metasent.meta.model import MetaLearner
from tests.conftest import NEGATIVE, POSITIVE

LAYER_1 = "encoder.encoder.layer.1.output.dense.weight"  # a tiny-BERT parameter name


def adapt(model: MetaLearner, config: InnerLoopConfig, shift: int = 0) -> AdaptedState:
    texts = POSITIVE[shift : shift + 3] + NEGATIVE[shift : shift + 3]
    return inner_loop(model, texts, ["positive"] * 3 + ["negative"] * 3, config)


# -- heads ---------------------------------------------------------------------------------------


def test_prototype_head_from_support_and_logits_by_hand() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    head = PrototypeHead.from_support(z, torch.tensor([0, 1, 1]), 2)
    # prototypes p0 = (1, 0), p1 = (0.3, 0.9): W = 2p, b = -|p|^2
    torch.testing.assert_close(head.weight, torch.tensor([[2.0, 0.0], [0.6, 1.8]]))
    torch.testing.assert_close(head.bias, torch.tensor([-1.0, -0.9]))
    # logits = exp(log 2) * (z @ W.T + b); for (1, 0): 2 * (2 - 1, 0.6 - 0.9) = (2, -0.6)
    logits = head.logits(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor(math.log(2.0)))
    torch.testing.assert_close(logits, torch.tensor([[2.0, -0.6], [-2.0, 1.8]]))
    assert head.num_classes == 2 and set(head.tensors()) == {"weight", "bias"}


def test_matching_head_with_anchors_by_hand() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    anchors = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    head = MatchingHead.from_support(z, torch.tensor([0, 1]), 2, anchors, torch.tensor(3.0))
    torch.testing.assert_close(head.support, torch.cat([z, anchors]))
    torch.testing.assert_close(head.support_labels, torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]]))
    assert head.support_bias is not None
    torch.testing.assert_close(head.support_bias, torch.tensor([0.0, 0.0, math.log(3), math.log(3)]))
    # query (1, 0), temperature 1: attention over exp(cos + bias) = (e, 1, 3e^0.6, 3e^0.8)
    weights = [math.e, 1.0, 3 * math.exp(0.6), 3 * math.exp(0.8)]
    expected = [math.log((weights[0] + weights[2]) / sum(weights)), math.log((weights[1] + weights[3]) / sum(weights))]
    logits = head.logits(torch.tensor([[1.0, 0.0]]), torch.tensor(0.0))
    torch.testing.assert_close(logits, torch.tensor([expected]))
    plain = MatchingHead.from_support(z, torch.tensor([0, 1]), 2)
    assert plain.support_bias is None and set(plain.tensors()) == {"support", "support_labels"}
    with pytest.raises(ValueError, match="at least one support example"):
        MatchingHead.from_support(z, torch.tensor([0, 0]), 2)


def test_heads_registry_covers_every_classifier(tiny_model: MetaLearner) -> None:
    assert set(HEADS) == set(get_args(InnerLoopConfig.model_fields["classifier"].annotation))
    z = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    targets = torch.tensor([0, 1, 0, 1])
    for classifier, kind in HEADS.items():
        head = init_head(tiny_model, z, targets, 2, InnerLoopConfig(steps=0, classifier=classifier))  # type: ignore[arg-type]
        assert type(head) is kind and head.num_classes == 2


# -- the pure SGD step ---------------------------------------------------------------------------


def test_sgd_step_clips_the_global_norm() -> None:
    params = [torch.tensor([1.0, 1.0]), torch.tensor([2.0])]
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]  # global norm 5
    clipped = sgd_step(params, grads, lr=0.5, clip=1.0)  # g scaled by 1/5
    torch.testing.assert_close(clipped[0], torch.tensor([1.0 - 0.5 * 0.6, 1.0]))
    torch.testing.assert_close(clipped[1], torch.tensor([2.0 - 0.5 * 0.8]))
    unclipped = sgd_step(params, grads, lr=0.5, clip=None)
    torch.testing.assert_close(unclipped[1], torch.tensor([0.0]))
    assert all(t.requires_grad and t.is_leaf for t in clipped)
    torch.testing.assert_close(params[0], torch.tensor([1.0, 1.0]))  # inputs unchanged


# -- adapted states and their stored format ------------------------------------------------------


def test_state_round_trip_through_tensors_and_safetensors(tiny_model: MetaLearner) -> None:
    queries = ["great coffee", "awful tea", "fine"]
    predictor = Predictor(tiny_model, InnerLoopConfig())
    for config in (
        InnerLoopConfig(steps=2, adapted_layers=1),
        InnerLoopConfig(steps=0, classifier="matching", label_anchors=True),
    ):
        state = adapt(tiny_model, config)
        blob = save_tensors({n: t.contiguous() for n, t in state.to_tensors().items()})
        loaded = AdaptedState.from_tensors(load_tensors(blob), state.labels)
        assert type(loaded.head) is type(state.head) and loaded.labels == ("positive", "negative")
        assert loaded.to_tensors().keys() == state.to_tensors().keys()
        assert loaded.shares_encoder == state.shares_encoder
        torch.testing.assert_close(predictor.predict_proba(loaded, queries), predictor.predict_proba(state, queries))


def test_legacy_stored_tensors_load_unchanged() -> None:
    """Domains stored before the adaptation API: the same names, read into the same heads."""
    proto = {"head.weight": torch.randn(2, 4), "head.bias": torch.randn(2), LAYER_1: torch.randn(4, 8)}
    state = AdaptedState.from_tensors(proto, ["good", "bad"])
    assert isinstance(state.head, PrototypeHead) and state.head.weight is proto["head.weight"]
    assert state.encoder == {LAYER_1: proto[LAYER_1]} and not state.shares_encoder
    assert {n: id(t) for n, t in state.to_tensors().items()} == {n: id(t) for n, t in proto.items()}
    matching = {
        "head.support": torch.randn(5, 4),
        "head.support_labels": torch.eye(3)[[0, 1, 2, 0, 1]],
        "head.support_bias": torch.zeros(5),
    }
    state = AdaptedState.from_tensors(matching, ["a", "b", "c"])
    assert isinstance(state.head, MatchingHead) and state.shares_encoder and state.num_classes == 3
    assert state.to_tensors().keys() == matching.keys()
    without_bias = AdaptedState.from_tensors({k: matching[k] for k in list(matching)[:2]}, ["a", "b", "c"])
    assert isinstance(without_bias.head, MatchingHead) and without_bias.head.support_bias is None
    with pytest.raises(ValueError, match="no head"):
        AdaptedState.from_tensors({"head.weight": torch.randn(2, 4)}, ["good", "bad"])
    with pytest.raises(ValueError, match="2 classes but 3 labels"):
        AdaptedState.from_tensors(proto, ["a", "b", "c"])


def test_shares_encoder_and_batch_key(tiny_model: MetaLearner) -> None:
    head_only = adapt(tiny_model, InnerLoopConfig(steps=1))
    layered = adapt(tiny_model, InnerLoopConfig(steps=1, adapted_layers=1))
    assert head_only.shares_encoder and not layered.shares_encoder
    assert Predictor.batch_key(head_only, "d1") == Predictor.batch_key(head_only, "d2") == SHARED_ENCODER_KEY
    assert Predictor.batch_key(layered, "d1") == "d1"


def test_a_head_that_reads_inside_the_encoder_never_shares_its_pass(tiny_model: MetaLearner) -> None:
    @dataclasses.dataclass(frozen=True, eq=False)
    class InsideHead(PrototypeHead):
        shares_encoder: ClassVar[bool] = False

    state = adapt(tiny_model, InnerLoopConfig(steps=1))
    own = AdaptedState(InsideHead(**state.head.tensors()), state.labels)
    assert state.shares_encoder and not own.shares_encoder  # no adapted encoder tensor in either
    assert Predictor.batch_key(own, "d1") == "d1"


def test_predict_gives_the_most_probable_label(tiny_model: MetaLearner) -> None:
    predictor = Predictor(tiny_model, InnerLoopConfig(), batch_size=2)
    state = adapt(tiny_model, InnerLoopConfig(steps=2))
    texts = ["great coffee", "awful tea", "fine"]
    probs = predictor.predict_proba(state, texts)
    assert predictor.predict(state, texts) == [state.labels[int(row.argmax())] for row in probs]


# -- prediction ----------------------------------------------------------------------------------


def test_predict_many_equals_separate_predict_proba(tiny_model: MetaLearner) -> None:
    predictor = Predictor(tiny_model, InnerLoopConfig(), batch_size=2)
    food = adapt(tiny_model, InnerLoopConfig(steps=2))
    drinks = adapt(tiny_model, InnerLoopConfig(steps=0, classifier="matching"), shift=4)
    layered = adapt(tiny_model, InnerLoopConfig(steps=2, adapted_layers=1))
    requests = [
        (food, ["great coffee", "awful tea", "great coffee"]),
        (layered, ["stale bread", "great"]),
        (drinks, ["awful tea", "fresh bread"]),
        (food, []),
        (AdaptedState.from_tensors(layered.to_tensors(), layered.labels), ["fine"]),  # the same tensors
    ]
    passes = 0

    def count(*_: object) -> None:
        nonlocal passes
        passes += 1

    handle = tiny_model.encoder.register_forward_hook(count)
    results = predictor.predict_many(requests)
    handle.remove()
    # 3 distinct shared texts in batches of 2; the two layered requests form one group of 3 texts
    assert passes == 2 + 2
    assert [r.shape for r in results] == [(3, 2), (2, 2), (2, 2), (0, 2), (1, 2)]
    for (state, texts), probs in zip(requests, results, strict=True):
        torch.testing.assert_close(probs, predictor.predict_proba(state, texts), atol=1e-5, rtol=1e-5)
