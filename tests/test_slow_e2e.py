"""End to end with the real all-MiniLM-L6-v2 and ARSC food reviews, through the HTTP API."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from metasent.app.main import create_app
from metasent.app.settings import Settings
from metasent.data.episodes import EpisodeSampler
from metasent.data.readers import read_arsc
from metasent.meta.checkpoint import CONFIG_FILE, model_fingerprint, shipped_checkpoint
from metasent.meta.config import CheckpointConfig
from tests.conftest import ARSC_DIR, free_port

pytestmark = pytest.mark.slow


def setup_module() -> None:
    """Fails, never skips, without the data: set METASENT_ARSC_DIR to read it elsewhere."""
    assert ARSC_DIR.is_dir(), f"ARSC data not found at {ARSC_DIR} (set METASENT_ARSC_DIR)"


def test_adapt_to_gourmet_food_and_classify_over_http(tmp_path) -> None:
    """The server with no settings serves the shipped default model (FOMAML over LoRA)."""
    (task,) = [t for t in read_arsc(ARSC_DIR, include=["gourmet_food"]) if t.name == "gourmet_food.t2"]
    episode = EpisodeSampler([task], k_shot=5, q_query=None, query_split="test", seed=0).sample()
    queries = episode.query[:40]
    shipped = CheckpointConfig.model_validate_json((shipped_checkpoint() / CONFIG_FILE).read_text())
    with TestClient(create_app(Settings(device="cpu", data_dir=tmp_path))) as client:
        health = client.get("/healthz").json()
        assert health["model"] == shipped.name and health["algorithm"] == "fomaml"
        assert f'checkpoint="{shipped_checkpoint()}"' in client.get("/metrics").text  # the path: not on /healthz
        assert health["checkpoint_hash"] == model_fingerprint(shipped_checkpoint(), shipped)
        created = client.post(
            "/v1/domains",
            json={
                "name": "gourmet food",
                "examples": [{"text": e.text, "label": e.label} for e in episode.support],
            },
        )
        assert created.status_code == 201, created.text
        domain = created.json()
        assert domain["adaptation"]["steps"] == shipped.inner_loop.steps and domain["adaptation"]["device"] == "cpu"
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
        correct = sum(p["label"] == e.label for p, e in zip(support, episode.support, strict=True))
        assert correct / len(support) == pytest.approx(domain["adaptation"]["support_accuracy"])  # the same model
        stored = client.get(f"/v1/domains/{domain['domain_id']}").json()
        assert stored["checkpoint_hash"] == health["checkpoint_hash"]


def test_checkpoint_none_serves_the_bare_encoder(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("METASENT_CHECKPOINT", "none")
    with TestClient(create_app(Settings(device="cpu", data_dir=tmp_path))) as client:
        health = client.get("/healthz").json()
    assert (health["model"], health["algorithm"]) == (None, "none") and "checkpoint" not in health
    assert len(health["checkpoint_hash"]) == 64


def test_bench_prints_every_figure_with_its_ratio(tiny_checkpoint) -> None:
    from bench.speed import run_bench
    from metasent.meta.checkpoint import load_checkpoint

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
        port=free_port(),
    )
    adaptation = result["adaptation"]
    assert adaptation["repeats"] == 2 and set(adaptation) >= {"adapt_seconds_median", "ratio_to_forward"}
    # the ratio is of the two medians it reports (timings themselves are the benchmark's, not a test's)
    assert adaptation["ratio_to_forward"] == pytest.approx(
        adaptation["adapt_seconds_median"] / adaptation["forward_seconds_median"], rel=0.02
    )
    classification = result["classification"]
    # 24 texts in batches of 8; the tiny BERT cuts at 32 tokens and has 64 positions (padding cap)
    assert (classification["texts"], classification["batch_size"]) == (24, 8)
    assert (classification["max_length"], classification["padded_length"]) == (32, 64)
    assert {"ratio_to_bare_sorted", "ratio_to_file_order_padded"} <= set(classification)
    training = result["meta_training"]
    assert training["episodes_timed"] == 4  # 1 outer step x the default meta-batch of 4 episodes
    assert training["frozen_lower_layers"] == 1  # the tiny BERT has 2 layers
    assert {"speedup", "frozen_lower_warm_speedup", "frozen_lower_warm_cache_episodes_per_s"} <= set(training)
    http = result["http"]
    assert (http["clients"], http["requests"], http["texts_per_request"]) == (2, 4, 3)  # 2 clients x 2 requests
    assert "ratio_to_service" in http
    memory = result["memory"]
    assert memory["domains"] == 3
    assert memory["peak_rss_mib"] >= max(memory["rss_with_1_domain_mib"], memory["rss_with_all_domains_mib"])
    # a domain stores the head (2 classes x 32 + 2 biases) and the adapted top layer, in float32
    model, config = load_checkpoint(tiny_checkpoint)
    assert config.inner_loop.adapted_layers == 1
    parameters = dict(model.named_parameters())
    adapted = sum(parameters[name].numel() for name in model.adapted_parameter_names(1))
    assert result["model"]["bytes_per_domain_tensors"] == 4 * (adapted + 2 * 32 + 2)
