"""End to end with the real all-MiniLM-L6-v2 and ARSC food reviews, through the HTTP API."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from metasent.app.main import create_app
from metasent.app.settings import Settings
from metasent.data.episodes import EpisodeSampler
from metasent.data.readers import read_arsc
from tests.conftest import ARSC_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ARSC_DIR.is_dir(), reason=f"ARSC data not found at {ARSC_DIR}"),
]


def test_adapt_to_gourmet_food_and_classify_over_http(tmp_path) -> None:
    (task,) = [t for t in read_arsc(ARSC_DIR, include=["gourmet_food"]) if t.name == "gourmet_food.t2"]
    episode = EpisodeSampler([task], k_shot=5, q_query=None, query_split="test", seed=0).sample()
    queries = episode.query[:40]
    with TestClient(create_app(Settings(device="cpu", data_dir=tmp_path))) as client:
        created = client.post(
            "/v1/domains",
            json={
                "name": "gourmet food",
                "examples": [{"text": e.text, "label": e.label} for e in episode.support],
            },
        )
        assert created.status_code == 201, created.text
        domain = created.json()
        assert domain["adaptation"]["steps"] == 5 and domain["adaptation"]["device"] == "cpu"
        assert domain["adaptation"]["support_accuracy"] >= 0.9
        texts = [e.text for e in queries]
        response = client.post(f"/v1/domains/{domain['domain_id']}/classify", json={"texts": texts})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert len(predictions) == len(texts)
        assert all(abs(sum(p["scores"].values()) - 1) < 1e-4 for p in predictions)
        assert len({round(p["scores"]["positive"], 4) for p in predictions}) > len(texts) // 2  # not constant
        support = client.post(
            f"/v1/domains/{domain['domain_id']}/classify", json={"texts": [e.text for e in episode.support]}
        ).json()["predictions"]
        assert [p["label"] for p in support] == [e.label for e in episode.support]


def test_bench_prints_every_figure_with_its_ratio(tiny_checkpoint) -> None:
    from bench.speed import run_bench

    result = run_bench(
        ARSC_DIR,
        tiny_checkpoint,
        "cpu",
        repeats=2,
        texts=24,
        batch_size=8,
        train_steps=1,
        clients=2,
        requests=2,
        per_request=3,
        domains=3,
        port=8791,
    )
    assert result["adaptation"]["ratio_to_forward"] == pytest.approx(
        result["adaptation"]["adapt_seconds_median"] / result["adaptation"]["forward_seconds_median"], rel=0.02
    )
    assert result["classification"]["texts"] == 24 and result["classification"]["ratio_to_bare_sorted"] > 0
    assert result["meta_training"]["episodes_timed"] == 4 and result["meta_training"]["after_episodes_per_s"] > 0
    assert result["meta_training"]["frozen_lower_layers"] == 1  # the tiny BERT has 2 layers
    assert result["meta_training"]["frozen_lower_warm_cache_episodes_per_s"] > 0
    assert result["http"]["requests"] == 4 and result["http"]["p99_ms"] >= result["http"]["p50_ms"] > 0
    assert result["memory"]["domains"] == 3 and result["memory"]["peak_rss_mib"] > 0
    assert result["model"]["bytes_per_domain_tensors"] > 0
