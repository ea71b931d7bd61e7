"""The held-out accuracy estimate at adaptation (meta.estimate.estimate_accuracy), the support
set warnings, and what to label next (meta.active, BADGE): unit tests on the tiny BERT and
hand-written tensors."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from metasent.app.service import support_warnings
from metasent.meta import estimate as estimate_module
from metasent.meta.active import gradient_embeddings, kmeans_pp, suggest
from metasent.meta.adaptation import (
    Predictor,
    encode_labels,
    estimate_accuracy,
    held_out_folds,
    init_head,
    wilson_interval,
)
from metasent.meta.config import InnerLoopConfig
from metasent.meta.model import MetaLearner
from tests.conftest import NEGATIVE, POSITIVE


def test_wilson_interval_known_values() -> None:
    from scipy.stats import binomtest

    for correct, n in [(8, 10), (10, 10), (0, 4), (37, 50)]:
        reference = binomtest(correct, n).proportion_ci(0.95, method="wilson")  # Wilson (1927), as scipy has it
        assert wilson_interval(correct, n) == pytest.approx((reference.low, reference.high), abs=1e-9)
    assert (round(wilson_interval(8, 10)[0], 4), round(wilson_interval(8, 10)[1], 4)) == (0.4902, 0.9433)
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low > 0.7  # not empty at n successes, unlike the normal interval
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_held_out_folds_are_stratified_and_keep_a_training_example_per_class() -> None:
    targets = [0, 0, 0, 1, 1, 2]  # class 2 has one example: never held out
    assert held_out_folds(targets, None) == [[0], [1], [2], [3], [4]]
    folds = held_out_folds(targets, 2)
    assert sorted(i for fold in folds for i in fold) == [0, 1, 2, 3, 4]
    for fold in folds:
        rest = [t for i, t in enumerate(targets) if i not in fold]
        assert set(rest) == {0, 1, 2}
    assert held_out_folds([0, 1], 5) == []  # nothing can be held out
    with pytest.raises(ValueError):
        held_out_folds(targets, 1)


def _support(k: int = 4) -> tuple[list[str], list[str]]:
    texts = POSITIVE[:k] + NEGATIVE[:k]
    return texts, ["positive"] * k + ["negative"] * k


@pytest.mark.parametrize("classifier", ["matching", "prototype"])
def test_leave_one_out_equals_heads_built_without_each_example(tiny_model: MetaLearner, classifier: str) -> None:
    config = InnerLoopConfig(steps=0, classifier=classifier, label_anchors=True)
    texts, labels = _support()
    predictor = Predictor(tiny_model, config)
    state = predictor.adapt(texts, labels, estimate=True)
    estimate = state.estimate
    assert estimate is not None and estimate.method == "leave-one-out" and estimate.n == len(texts)
    # by hand: adapt on the support set without example i (anchors kept), classify example i
    hits = 0
    for i in range(len(texts)):
        rest = predictor.adapt(texts[:i] + texts[i + 1 :], labels[:i] + labels[i + 1 :], state.labels)
        hits += predictor.predict(rest, [texts[i]]) == [labels[i]]
    assert estimate.accuracy == pytest.approx(hits / len(texts))
    assert (estimate.low, estimate.high) == pytest.approx(wilson_interval(hits, len(texts)))


def test_leave_one_out_reuses_the_adaptation_embeddings(tiny_model: MetaLearner, monkeypatch) -> None:
    """No inner step: the estimate builds heads from the embeddings the adaptation computed and
    never runs the encoder again."""
    predictor = Predictor(tiny_model, InnerLoopConfig(steps=0, classifier="matching"))
    texts, labels = _support()
    state = predictor.adapt(texts, labels)
    calls = []
    monkeypatch.setattr(tiny_model, "embed", lambda *a, **k: calls.append(a) or pytest.fail("encoder ran"))
    estimate = estimate_accuracy(predictor, state, texts, labels)
    assert estimate is not None and calls == []
    # and it matches a head built from the stored embeddings without example 0
    z = state.support_embeddings
    assert z is not None
    targets = encode_labels(labels, state.labels, z.device)
    head = init_head(tiny_model, z[1:], targets[1:], 2, predictor.inner_config)
    first = bool(head.logits(z[:1], tiny_model.logit_scale).argmax(-1).item() == targets[0].item())
    per_example = estimate_module._leave_one_out_hits(
        tiny_model, state, targets, predictor.inner_config, held_out_folds(targets.tolist(), None)
    )
    assert per_example[0] == first


def test_k_fold_reruns_the_inner_loop_per_fold(tiny_model: MetaLearner, monkeypatch) -> None:
    config = InnerLoopConfig(steps=2, lr=0.1, adapted_layers=1)
    predictor = Predictor(tiny_model, config)
    texts, labels = _support(k=5)
    texts, labels = texts + ["okay fine"], labels + ["neutral"]  # a singleton label: never held out
    state = predictor.adapt(texts, labels)
    supports: list[int] = []
    original = estimate_module.inner_loop

    def counting(model, support_texts, *args, **kwargs):
        supports.append(len(support_texts))
        return original(model, support_texts, *args, **kwargs)

    monkeypatch.setattr(estimate_module, "inner_loop", counting)
    estimate = estimate_accuracy(predictor, state, texts, labels, folds=5)
    assert estimate is not None
    assert estimate.method == "5-fold" and estimate.n == 10  # the 'neutral' example is not counted
    assert supports == [9] * 5  # each fold adapts on the 11 - 2 other examples
    correct = round(estimate.accuracy * estimate.n)
    assert math.isclose(estimate.accuracy, correct / 10)
    assert (estimate.low, estimate.high) == pytest.approx(wilson_interval(correct, 10))


def test_no_estimate_when_no_label_has_two_examples(tiny_model: MetaLearner) -> None:
    predictor = Predictor(tiny_model, InnerLoopConfig(steps=0))
    state = predictor.adapt([POSITIVE[0], NEGATIVE[0]], ["positive", "negative"], estimate=True)
    assert state.estimate is None


def test_support_warnings() -> None:
    assert support_warnings(["a", "a", "b", "b"]) == []
    codes = [w["code"] for w in support_warnings(["a", "a", "b"])]
    assert codes == ["few_examples"]
    assert "'b'" in support_warnings(["a", "a", "b"])[0]["message"]
    assert [w["code"] for w in support_warnings(["a", "b"])] == ["few_examples", "few_examples", "no_estimate"]
    unbalanced = support_warnings(["a"] * 6 + ["b"] * 2)
    assert [w["code"] for w in unbalanced] == ["unbalanced_labels"]
    assert "'a' has 6" in unbalanced[0]["message"]
    assert support_warnings(["a"] * 5 + ["b"] * 2) == []  # 2.5x is below the ratio


# -- what to label next -------------------------------------------------------------------------


def test_gradient_embeddings_are_the_last_layer_gradient() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    g = gradient_embeddings(probs, z)
    assert g.shape == (2, 6)
    # cross-entropy at the predicted label of a linear head W (2, 3): dL/dW = (p - onehot) z^T
    w = torch.zeros(2, 3, requires_grad=True)
    for row in range(2):
        logits = torch.log(probs[row])  # the head's output with these probabilities
        loss = torch.nn.functional.cross_entropy((logits + w @ z[row]).unsqueeze(0), probs[row].argmax().unsqueeze(0))
        (grad,) = torch.autograd.grad(loss, w)
        assert torch.allclose(g[row], grad.flatten(), atol=1e-6)
    # per unit of embedding, the uncertain text (max p 0.6) has the larger gradient than the sure one (0.9)
    assert float(g[1].norm() / z[1].norm()) > float(g[0].norm() / z[0].norm())


def test_kmeans_pp_starts_at_the_largest_and_skips_duplicates() -> None:
    points = torch.tensor([[0.1, 0.0], [3.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    picks = kmeans_pp(points, 3, torch.Generator().manual_seed(0))
    assert picks[0] == 1  # largest norm
    assert len(set(picks)) == 3
    assert 2 not in picks[:2]  # a copy of the first pick has probability 0 while others remain
    for seed in range(20):  # whatever the draw: the copy of the largest point is never second
        assert kmeans_pp(
            torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 0.1]]), 2, torch.Generator().manual_seed(seed)
        ) == [
            0,
            2,
        ]
    again = kmeans_pp(points, 3, torch.Generator().manual_seed(0))
    assert again == picks  # same seed, same picks
    assert sorted(kmeans_pp(points, 10, torch.Generator().manual_seed(1))) == [0, 1, 2, 3, 4]


def test_suggest_prefers_uncertain_distinct_unlabelled_texts(tiny_model: MetaLearner) -> None:
    predictor = Predictor(tiny_model, InnerLoopConfig(steps=0, classifier="prototype"))
    texts, labels = _support()
    state = predictor.adapt(texts, labels)
    candidates = [texts[0], POSITIVE[6], POSITIVE[6], NEGATIVE[6], "okay fine average", POSITIVE[7]]
    picks = suggest(predictor, state, candidates, k=3, exclude=texts)
    chosen = [p.text for p in picks]
    assert texts[0] not in chosen  # already labelled
    assert len(chosen) == len(set(chosen)) == 3  # the duplicate is one candidate
    assert all(candidates[p.index] == p.text for p in picks)
    _, probs = predictor.embed_and_predict(state, candidates)
    uncertainty = 1 - probs.max(-1).values
    for pick in picks:
        assert pick.uncertainty == pytest.approx(float(uncertainty[pick.index]), abs=1e-6)
    # the first pick has the largest gradient embedding among the candidates
    z, p = predictor.embed_and_predict(state, candidates[1:])
    norms = gradient_embeddings(p, z).norm(dim=1)
    assert picks[0].text == candidates[1:][int(norms.argmax())]
    assert suggest(predictor, state, [texts[1]], k=2, exclude=texts) == []
    with pytest.raises(ValueError):
        suggest(predictor, state, candidates, k=0)


# -- the benchmark's figures: calibration, estimate quality, suggested against random ----------------


def test_expected_calibration_error_by_hand() -> None:
    from metasent.meta.evaluate import expected_calibration_error

    probs = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.35, 0.65], [0.4, 0.6]])
    gold = torch.tensor([0, 1, 1, 1])
    # bin [0.9, 1.0): confidences 0.95, 0.9, accuracy 1/2 -> |0.5 - 0.925| = 0.425, weight 1/2
    # bin [0.6, 0.7): confidences 0.65, 0.6, accuracy 1 -> |1 - 0.625| = 0.375, weight 1/2
    assert expected_calibration_error(probs, gold) == pytest.approx(0.5 * 0.425 + 0.5 * 0.375)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, torch.tensor([0, 1])) == 0.0  # confidence 1.0 in the last bin
    assert expected_calibration_error(torch.empty(0, 2), torch.empty(0, dtype=torch.long)) == 0.0


def test_estimate_quality_and_benchmark_episode(tiny_model: MetaLearner, food_task) -> None:
    from metasent.data.episodes import EpisodeSampler
    from metasent.meta.evaluate import EpisodeResult, estimate_quality, evaluate_episode

    def result(accuracy: float, estimate: float, low: float, high: float) -> EpisodeResult:
        return EpisodeResult("t", 0, accuracy, 0.5, 10, 0.2, 1.0, None, 0.1, estimate, low, high, 0.05)

    quality = estimate_quality([result(0.8, 0.7, 0.5, 0.9), result(0.6, 0.9, 0.7, 1.0)])
    assert quality == {
        "estimate_mae": 20.0,  # (10 + 30) / 2 points
        "estimate_coverage": 50.0,  # the second interval misses 0.6
        "estimate_seconds": 0.05,
        "estimate_cost_ratio": 1.25,  # (0.2 + 0.05) / 0.2
    }
    assert estimate_quality([EpisodeResult("t", 0, 0.8, 0.5, 10, 0.2, 1.0)])["estimate_mae"] is None

    episode = EpisodeSampler([food_task], k_shot=4, q_query=None, support_split="train", query_split="test").sample(
        food_task
    )
    scored = evaluate_episode(tiny_model, episode, InnerLoopConfig(steps=0, classifier="matching"), 0, estimate=True)
    assert scored.estimated_accuracy is not None and scored.estimate_low is not None
    assert scored.estimate_low <= scored.estimated_accuracy <= (scored.estimate_high or 0)
    assert scored.ece is not None and 0 <= scored.ece <= 1


def test_evaluate_active_scores_three_adaptations_on_the_same_texts(tiny_model: MetaLearner, food_task) -> None:
    from metasent.data.episodes import EpisodeSampler
    from metasent.meta.evaluate import evaluate_active, summarize_active

    sampler = EpisodeSampler([food_task], k_shot=2, q_query=None, support_split="train", query_split="test")
    episode = sampler.sample(food_task)
    config = InnerLoopConfig(steps=0, classifier="prototype")
    result = evaluate_active(tiny_model, episode, config, k=2, seed=0)
    assert result.pool + result.evaluated == len(episode.query) and result.pool == len(episode.query) // 2
    # the base score is the plain adaptation's accuracy on the same held-out texts
    predictor = Predictor(tiny_model, config)
    base = predictor.adapt([e.text for e in episode.support], [e.label for e in episode.support], episode.labels)
    again = evaluate_active(tiny_model, episode, config, k=2, seed=0)
    assert again == result  # deterministic for a seed
    summary = summarize_active([result, again])
    assert summary["tasks"] == 1 and summary["episodes"] == 2
    assert summary["suggested_minus_random"] == pytest.approx(100 * (result.suggested - result.random), abs=0.01)
    query = list(episode.query)
    random.Random(f"metasent-active:{episode.task}:0").shuffle(query)
    held = query[len(query) // 2 :]
    predicted = predictor.predict(base, [e.text for e in held])
    assert result.base == pytest.approx(sum(p == e.label for p, e in zip(predicted, held, strict=True)) / len(held))


def test_estimate_interval_adds_the_task_spread() -> None:
    from metasent.meta.adaptation import estimate_interval

    assert estimate_interval(8, 10) == wilson_interval(8, 10)  # no spread: Wilson's
    assert estimate_interval(8, 10, 0.0) == wilson_interval(8, 10)
    low, high = estimate_interval(8, 10, 0.15)
    z = 1.959963984540054
    centre = (8 + z * z / 2) / (10 + z * z)
    half = z * math.sqrt(centre * (1 - centre) / (10 + z * z) + 0.15**2)
    assert (low, high) == pytest.approx((centre - half, min(1.0, centre + half)))
    wilson = wilson_interval(8, 10)
    assert low < wilson[0] and high >= wilson[1]
    assert estimate_interval(10, 10, 0.3) == pytest.approx((max(0.0, estimate_interval(10, 10, 0.3)[0]), 1.0))
    assert estimate_interval(0, 10, 0.5)[0] == 0.0  # clipped


def test_the_models_task_spread_widens_the_served_interval(tiny_model: MetaLearner) -> None:
    texts, labels = _support()
    plain = Predictor(tiny_model, InnerLoopConfig(steps=0, classifier="matching")).adapt(texts, labels, estimate=True)
    spread = InnerLoopConfig(steps=0, classifier="matching", estimate_task_sd=0.2)
    wide = Predictor(tiny_model, spread).adapt(texts, labels, estimate=True)
    assert plain.estimate is not None and wide.estimate is not None
    assert wide.estimate.accuracy == plain.estimate.accuracy
    correct = round(plain.estimate.accuracy * plain.estimate.n)
    from metasent.meta.adaptation import estimate_interval

    assert (wide.estimate.low, wide.estimate.high) == pytest.approx(estimate_interval(correct, 8, 0.2))


def test_calibrate_estimate_measures_the_spread_on_dev_and_writes_it(tiny_checkpoint, tmp_path) -> None:
    import json
    import shutil

    from bench.calibrate_estimate import calibrate, task_spread, write_task_sd
    from metasent.meta.checkpoint import load_checkpoint
    from metasent.meta.evaluate import EpisodeResult
    from tests.conftest import write_arsc_like

    def row(accuracy: float, estimate: float, n: int, q: int) -> EpisodeResult:
        return EpisodeResult("t", 0, accuracy, 0.5, q, 0.1, 1.0, estimated_accuracy=estimate, estimate_n=n)

    # residuals 0.3 and -0.1: mean square 0.05; estimate noise (0.25/10 + 0.24/10)/2;
    # query noise (0.16/100 + 0.25/100)/2
    rows = [row(0.8, 0.5, 10, 100), row(0.5, 0.6, 10, 100)]
    expected = math.sqrt(0.05 - (0.025 + 0.024) / 2 - (0.0016 + 0.0025) / 2)
    assert task_spread(rows) == pytest.approx(expected)
    assert task_spread([row(0.5, 0.5, 10, 100)]) == 0.0  # all noise: no spread
    with pytest.raises(ValueError):
        task_spread([EpisodeResult("t", 0, 0.5, 0.5, 10, 0.1, 1.0)])

    data = write_arsc_like(tmp_path / "arsc")
    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    result = calibrate(checkpoint, data, ["food", "drinks"], seeds=2, k_shot=2)
    assert result["episodes"] == 4 and len(result["residuals"]) == 4
    assert result["task_sd"] >= 0
    write_task_sd(checkpoint, result["task_sd"])
    _, config = load_checkpoint(checkpoint, "cpu")
    assert config.inner_loop.estimate_task_sd == result["task_sd"]
    assert json.loads((checkpoint / "metasent.json").read_text())["inner_loop"]["steps"] == 3  # the rest is kept


def test_the_server_can_turn_the_estimate_off(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from metasent.app.main import create_app
    from metasent.app.settings import Settings
    from tests.conftest import valid_domain

    settings = Settings(checkpoint=tiny_checkpoint, device="cpu", data_dir=tmp_path, estimate=False)
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/domains", json=valid_domain())
    assert response.status_code == 201, response.text
    adaptation = response.json()["adaptation"]
    assert adaptation["estimated_accuracy"] is None and adaptation["steps"] == 3
