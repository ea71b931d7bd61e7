"""End to end with the real all-MiniLM-L6-v2 and ARSC food reviews, through the HTTP API."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from data.episodes import EpisodeSampler
from data.readers import read_arsc
from tests.conftest import ARSC_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ARSC_DIR.is_dir(), reason=f"ARSC data not found at {ARSC_DIR}"),
]


def test_adapt_to_gourmet_food_and_classify_over_http() -> None:
    (task,) = [t for t in read_arsc(ARSC_DIR, include=["gourmet_food"]) if t.name == "gourmet_food.t2"]
    episode = EpisodeSampler([task], k_shot=5, q_query=None, query_split="test", seed=0).sample()
    queries = episode.query[:40]
    with TestClient(create_app(Settings(device="cpu"))) as client:
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
