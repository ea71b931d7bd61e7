"""The REST API end to end on the tiny checkpoint: adapt, classify, list/show/delete, every 4xx
in the JSON error shape, limits, health and the OpenAPI document."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from fastapi.testclient import TestClient

from metasent.app.main import create_app
from metasent.app.settings import Settings
from tests.conftest import (
    DATABASES,
    NEGATIVE,
    POSITIVE,
    WORDS,
    assert_error,
    database,
    metric,
    stored_domains,
    support,
    valid_domain,
)

MAX_EXAMPLES, MAX_TEXTS, MAX_DOMAINS = 20, 10, 3


@pytest.fixture(scope="module", params=DATABASES)
def client(
    request: pytest.FixtureRequest, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    """The API over a fresh store: every test runs on SQLite and on PostgreSQL."""
    with database(request.param, tmp_path_factory.mktemp("api-data")) as url:
        settings = Settings(
            checkpoint=tiny_checkpoint,
            device="cpu",
            max_examples=MAX_EXAMPLES,
            max_texts=MAX_TEXTS,
            max_domains_per_tenant=MAX_DOMAINS,
            database_url=url,
        )
        with TestClient(create_app(settings)) as test_client:
            yield test_client


@pytest.fixture(autouse=True)
def empty_store(client: TestClient) -> Iterator[None]:
    """Every test starts and ends with no domains (the store is limited to MAX_DOMAINS)."""
    yield
    for domain in client.get("/v1/domains").json()["domains"]:
        assert client.delete(f"/v1/domains/{domain['domain_id']}").status_code == 204


def create(client: TestClient, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = client.post("/v1/domains", json=body or valid_domain())
    assert response.status_code == 201, response.text
    return response.json()


def classify(client: TestClient, domain_id: str, texts: list[str]) -> list[dict[str, Any]]:
    response = client.post(f"/v1/domains/{domain_id}/classify", json={"texts": texts})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == len(texts)
    return predictions


def test_create_domain(client: TestClient) -> None:
    before = client.get("/metrics").text
    response = client.post("/v1/domains", json=valid_domain())
    after = client.get("/metrics").text
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/domains/{body['domain_id']}"
    assert body["domain_id"] and body["name"] == "food"
    assert body["labels"] == ["positive", "negative"]  # order of first appearance
    assert body["num_examples"] == 10
    adaptation = body["adaptation"]
    assert adaptation["steps"] == 3
    # the inner loop's seconds (4 decimals), within the server's timing of the whole adaptation job
    job_seconds = metric(after, "metasent_adaptation_seconds_sum") - metric(before, "metasent_adaptation_seconds_sum")
    assert 0 < adaptation["seconds"] <= job_seconds + 5e-5
    assert adaptation["device"] == "cpu"
    # the share of the support set the adapted domain labels correctly, as its classify route does
    predicted = classify(client, body["domain_id"], [e["text"] for e in support()])
    correct = sum(p["label"] == e["label"] for p, e in zip(predicted, support(), strict=True))
    assert adaptation["support_accuracy"] == pytest.approx(correct / len(support()))

    reversed_labels = create(client, {"name": "food", "examples": support()[::-1]})
    assert reversed_labels["labels"] == ["negative", "positive"]


def test_classify_input_order_and_scores(client: TestClient) -> None:
    domain = create(client)
    texts = [POSITIVE[7], NEGATIVE[7], POSITIVE[8], NEGATIVE[9], "okay fine average"]
    batch = classify(client, domain["domain_id"], texts)
    for text, prediction in zip(texts, batch, strict=True):
        (alone,) = classify(client, domain["domain_id"], [text])
        assert prediction["label"] == alone["label"]
        assert prediction["scores"] == pytest.approx(alone["scores"], abs=1e-5)
        assert list(prediction["scores"]) == domain["labels"]
        assert sum(prediction["scores"].values()) == pytest.approx(1, abs=1e-4)
        assert prediction["label"] == max(prediction["scores"], key=prediction["scores"].get)
    # order matters: reversing the inputs reverses the predictions
    reversed_batch = classify(client, domain["domain_id"], texts[::-1])
    for a, b in zip(batch, reversed_batch[::-1], strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


def test_any_label_names_and_count(client: TestClient) -> None:
    examples = (
        [{"text": t, "label": "meh"} for t in ["okay fine average", "fine okay", "average okay"]]
        + [{"text": t, "label": "love"} for t in POSITIVE[:3]]
        + [{"text": t, "label": "hate"} for t in NEGATIVE[:3]]
    )
    domain = create(client, {"name": "three", "examples": examples})
    assert domain["labels"] == ["meh", "love", "hate"]
    for prediction in classify(client, domain["domain_id"], [POSITIVE[9], NEGATIVE[9]]):
        assert set(prediction["scores"]) == {"meh", "love", "hate"}
        assert prediction["label"] in {"meh", "love", "hate"}
        assert sum(prediction["scores"].values()) == pytest.approx(1, abs=1e-4)


def test_list_get_delete(client: TestClient) -> None:
    first, second = create(client), create(client, {"name": "other", "examples": support("good", "bad")})
    listed = client.get("/v1/domains")
    assert listed.status_code == 200
    assert {d["domain_id"] for d in listed.json()["domains"]} == {first["domain_id"], second["domain_id"]}
    got = client.get(f"/v1/domains/{second['domain_id']}")
    assert got.status_code == 200 and got.json() == second

    path = f"/v1/domains/{first['domain_id']}"
    deleted = client.delete(path)
    assert deleted.status_code == 204 and deleted.content == b""
    for response in (
        client.get(path),
        client.post(f"{path}/classify", json={"texts": ["great"]}),
        client.delete(path),
    ):
        assert_error(response, 404, "domain_id", "domain_not_found")
    assert [d["domain_id"] for d in client.get("/v1/domains").json()["domains"]] == [second["domain_id"]]


@pytest.mark.parametrize(
    "request_",
    [
        ("GET", "/v1/domains/nope"),
        ("DELETE", "/v1/domains/nope"),
        ("POST", "/v1/domains/nope/classify"),
        ("GET", "/v1/domains/%00"),  # never reaches the database (PostgreSQL rejects NUL)
        ("DELETE", "/v1/domains/" + "0" * 32),
    ],
)
def test_unknown_domain(client: TestClient, request_: tuple[str, str]) -> None:
    method, path = request_
    response = client.request(method, path, json={"texts": ["great"]} if method == "POST" else None)
    error = assert_error(response, 404, code="domain_not_found")
    assert error["details"][0]["field"] == "domain_id"


def _example(text: Any = "great coffee", label: Any = "positive") -> dict[str, Any]:
    return {"text": text, "label": label}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "one label", "examples": [_example(), _example("good tea")]}, "examples"),
        ({"name": "x", "examples": [_example(""), *support()]}, "examples[0].text"),
        ({"name": "x", "examples": [_example("   "), *support()]}, "examples[0].text"),
        ({"name": "x", "examples": [_example(123), *support()]}, "examples[0].text"),
        ({"name": "x", "examples": [_example(label=1), *support()]}, "examples[0].label"),
        ({"name": "x", "examples": [_example(label=""), *support()]}, "examples[0].label"),
        ({"name": "x", "examples": [_example(label="  "), *support()]}, "examples[0].label"),
        ({"name": "x", "examples": [*support(), {"text": "great"}]}, "examples[10].label"),
        ({"name": "x", "examples": [*support(), {**_example(), "weight": 2}]}, "examples[10].weight"),
        ({"name": "x", "examples": []}, "examples"),
        ({"name": "x", "examples": "great coffee"}, "examples"),
        ({"name": "x"}, "examples"),
        ({"examples": support()}, "name"),
        ({"name": "", "examples": support()}, "name"),
        ({"name": 5, "examples": support()}, "name"),
        ({"name": "food\x00", "examples": support()}, "name"),
        ({"name": "x", "examples": [_example("great\x00coffee"), *support()]}, "examples[0].text"),
        ({"name": "x", "examples": [_example("\u200b\u200c\u200d"), *support()]}, "examples[0].text"),
        ({"name": "x", "examples": [_example("\ufeff \u2060\t"), *support()]}, "examples[0].text"),
        ({"name": "x", "examples": [_example(label="\u200b"), *support()]}, "examples[0].label"),
        ({"name": "\u2060\u200b", "examples": support()}, "name"),
        ({"name": "x", "examples": [_example("\u3164\u3164"), *support()]}, "examples[0].text"),  # Hangul filler
        ({"name": "x", "examples": [_example("\u2800 \u2800"), *support()]}, "examples[0].text"),  # Braille blank
        ({"name": "x", "examples": [_example("\u0301"), *support()]}, "examples[0].text"),  # a lone combining mark
        ({"name": "x", "examples": [_example("\ufe0f\U000e0041\u180e"), *support()]}, "examples[0].text"),
        ({"name": "x", "examples": [_example(label="\u3164"), *support()]}, "examples[0].label"),
        ({"name": "\u2800", "examples": support()}, "name"),
        (
            {"name": "x", "examples": [_example(label="pos"), _example(label="pos\u200b"), _example(label=" pos")]},
            "examples",
        ),
        ({**valid_domain(), "extra": True}, "extra"),
        ([valid_domain()], "body"),
        ("food", "body"),
    ],
)
def test_create_domain_422(client: TestClient, body: Any, field: str) -> None:
    assert_error(client.post("/v1/domains", json=body), 422, field, "invalid_request")
    assert client.get("/v1/domains").json()["domains"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"texts": ["great", ""]}, "texts[1]"),
        ({"texts": ["great", "   "]}, "texts[1]"),
        ({"texts": ["great", "\u200b\ufeff"]}, "texts[1]"),
        ({"texts": ["great", "\u3164\u2800\u0301"]}, "texts[1]"),
        ({"texts": ["great", 123]}, "texts[1]"),
        ({"texts": ["great", None]}, "texts[1]"),
        ({"texts": []}, "texts"),
        ({"texts": "great"}, "texts"),
        ({}, "texts"),
        ({"texts": ["great"], "extra": 1}, "extra"),
        ([{"texts": ["great"]}], "body"),
    ],
)
def test_classify_422_keeps_domain(client: TestClient, body: Any, field: str) -> None:
    domain = create(client)
    texts = [POSITIVE[9], NEGATIVE[9]]
    before = classify(client, domain["domain_id"], texts)
    response = client.post(f"/v1/domains/{domain['domain_id']}/classify", json=body)
    assert_error(response, 422, field, "invalid_request")
    # the failed request lost nothing: the domain is still there and classifies identically
    assert client.get(f"/v1/domains/{domain['domain_id']}").json() == domain
    assert classify(client, domain["domain_id"], texts) == before


def test_body_not_utf8_answers_malformed_json(client: TestClient) -> None:
    body = '{"name": "caf\u00e9", "examples": []}'.encode("latin-1")
    response = client.post("/v1/domains", content=body, headers={"Content-Type": "application/json"})
    assert "UTF-8" in assert_error(response, 400, "body", "malformed_json")["message"]


@pytest.mark.parametrize("path", ["/v1/domains/", "/healthz/", "/v1/classify/"])
def test_trailing_slash_is_404_without_a_redirect(client: TestClient, path: str) -> None:
    """No 307 whose Location comes from the client's Host header."""
    response = client.request(
        "POST" if "classify" in path else "GET", path, headers={"Host": "evil.example"}, follow_redirects=False
    )
    assert "location" not in response.headers
    assert_error(response, 404, "path", "http_404")


def test_lone_surrogate_answers_422(client: TestClient) -> None:
    """A JSON ``\\ud800`` escape without its pair is not a string any database can store (pydantic
    refuses it before the text checks)."""
    body = json.dumps({"name": "x", "examples": [_example("great\ud800"), *support()]})  # ASCII: the escape
    response = client.post("/v1/domains", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, 422, "examples[0].text", "invalid_request")


def test_labels_are_compared_after_nfc_and_without_invisible_characters(client: TestClient) -> None:
    """``caf\u00e9`` and ``cafe\u0301`` (NFC), ``pos`` and ``pos\u200b`` are one label each; a
    combining mark on a base character is a visible text."""
    examples = [
        _example("good", "pos"),
        _example("great", "pos\u200b"),
        _example("bad", "caf\u00e9"),
        _example("cafe\u0301", "cafe\u0301"),
    ]
    domain = create(client, {"name": "labels", "examples": examples})
    assert domain["labels"] == ["pos", "caf\u00e9"]
    stored = client.get(f"/v1/domains/{domain['domain_id']}/examples").json()["examples"]
    assert [example["label"] for example in stored] == ["pos", "pos", "caf\u00e9", "caf\u00e9"]


def test_zero_width_characters_inside_a_text_are_kept(client: TestClient) -> None:
    examples = [_example("great\u200bcoffee"), *support()]
    assert create(client, {"name": "caf\u00e9\u200d", "examples": examples})["num_examples"] == 11


@pytest.mark.parametrize("version", [True, "2", "1", 1.0, [1]])
def test_put_expected_version_is_a_strict_integer(client: TestClient, version: Any) -> None:
    domain = create(client)
    path = f"/v1/domains/{domain['domain_id']}/examples"
    response = client.put(path, json={"examples": [_example()], "expected_version": version})
    error = assert_error(response, 422, "expected_version", "invalid_request")
    assert "integer" in error["details"][0]["fix"]
    assert client.get(path).json()["version"] == 1
    assert client.put(path, json={"examples": [_example()], "expected_version": 1}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/domains", "/v1/domains/{id}/classify"])
def test_malformed_json(client: TestClient, path: str) -> None:
    domain = create(client)
    response = client.post(
        path.format(id=domain["domain_id"]),
        content=b'{"name": ',
        headers={"content-type": "application/json"},
    )
    assert_error(response, 400, "body", "malformed_json")


def test_too_many_examples(client: TestClient) -> None:
    examples = (support(k=10) * 2)[: MAX_EXAMPLES + 1]
    response = client.post("/v1/domains", json={"name": "big", "examples": examples})
    assert_error(response, 413, "examples", "too_many_items")
    assert client.get("/v1/domains").json()["domains"] == []
    create(client, {"name": "limit", "examples": examples[:MAX_EXAMPLES]})


def test_too_many_texts(client: TestClient) -> None:
    domain = create(client)
    path = f"/v1/domains/{domain['domain_id']}/classify"
    response = client.post(path, json={"texts": ["great"] * (MAX_TEXTS + 1)})
    assert_error(response, 413, "texts", "too_many_items")
    classify(client, domain["domain_id"], ["great"] * MAX_TEXTS)


def test_too_many_domains(client: TestClient) -> None:
    ids = [create(client)["domain_id"] for _ in range(MAX_DOMAINS)]
    assert_error(client.post("/v1/domains", json=valid_domain()), 422, code="too_many_domains")
    assert len(client.get("/v1/domains").json()["domains"]) == MAX_DOMAINS
    assert client.delete(f"/v1/domains/{ids[0]}").status_code == 204
    create(client)


def _long_text(chars: int) -> str:
    text = " ".join(WORDS[i % len(WORDS)] for i in range(chars))[:chars]
    assert len(text) == chars
    return text


def test_over_long_support_text_is_refused(client: TestClient) -> None:
    """Support texts are stored: one over METASENT_MAX_TEXT_CHARS (20000) answers 422 naming it,
    on create, on PUT .../examples and on the stateless classify; nothing is stored."""
    limit = client.app.state.settings.max_text_chars  # type: ignore[attr-defined]
    assert limit == 20_000
    too_long = [*support(), _example(_long_text(limit + 1))]
    response = client.post("/v1/domains", json={"name": "long", "examples": too_long})
    error = assert_error(response, 422, "examples[10].text", "text_too_long")
    assert "METASENT_MAX_TEXT_CHARS" in error["details"][0]["fix"] and str(limit) in error["details"][0]["fix"]
    assert client.get("/v1/domains").json()["domains"] == []
    assert_error(client.post("/v1/classify", json={"examples": too_long, "texts": ["great"]}), 422, "examples[10].text")

    domain = create(client, {"name": "at the limit", "examples": [_example(_long_text(limit)), *support()]})
    path = f"/v1/domains/{domain['domain_id']}/examples"
    response = client.put(path, json={"examples": [_example(), _example(_long_text(limit + 1))]})
    assert_error(response, 422, "examples[1].text", "text_too_long")
    assert client.get(path).json()["version"] == 1


def test_over_long_text_to_classify_is_truncated(client: TestClient) -> None:
    domain = create(client)
    (prediction,) = classify(client, domain["domain_id"], [_long_text(50_000)])  # not stored: cut, not refused
    assert prediction["truncated"] is True
    assert sum(prediction["scores"].values()) == pytest.approx(1, abs=1e-4)


def test_healthz(client: TestClient) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["model_loaded"] is True
    assert body["device"] == "cpu" and body["checkpoint_hash"]
    assert "checkpoint" not in body and "domains" not in body  # no path, no figure of any tenant: on /metrics
    assert "/" not in body["encoder"]  # a local encoder directory by its name only
    assert stored_domains(client) == 0
    create(client)
    assert stored_domains(client) == 1


def test_openapi_and_docs(client: TestClient) -> None:
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    spec = spec.json()
    routes = {"/v1/domains", "/v1/domains/{domain_id}", "/v1/domains/{domain_id}/classify"}
    assert routes <= set(spec["paths"])
    assert "post" in spec["paths"]["/v1/domains"] and "delete" in spec["paths"]["/v1/domains/{domain_id}"]
    (example,) = spec["components"]["schemas"]["CreateDomain"]["examples"]
    assert example["name"] and len({ex["label"] for ex in example["examples"]}) >= 2
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_openapi_example_is_accepted(client: TestClient) -> None:
    example = client.get("/openapi.json").json()["components"]["schemas"]["CreateDomain"]["examples"][0]
    create(client, example)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("POST", "/v2/domains", 404),
        ("PUT", "/v1/domains", 405),
        ("PATCH", "/v1/domains/abc", 405),
        ("GET", "/v1/domains/abc/classify", 405),
    ],
)
def test_unknown_route_and_method(client: TestClient, method: str, path: str, status: int) -> None:
    assert_error(client.request(method, path), status, "path", f"http_{status}")


def test_request_id_is_echoed_or_generated(client) -> None:
    given = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    generated = client.get("/v1/domains/unknown")
    assert generated.status_code == 404 and len(generated.headers["X-Request-ID"]) == 32


# -- estimated accuracy, warnings, what to label next -----------------------------------------------


def test_adaptation_estimates_accuracy_and_get_shows_it(client: TestClient) -> None:
    domain = create(client)
    estimate = domain["adaptation"]["estimated_accuracy"]
    # the tiny checkpoint takes 3 inner steps: 5 stratified folds over the 10 support examples
    assert estimate["method"] == "5-fold" and estimate["n"] == 10
    assert estimate["low"] <= estimate["accuracy"] <= estimate["high"]
    assert estimate["accuracy"] * 10 == pytest.approx(round(estimate["accuracy"] * 10))  # a count of 10 predictions
    assert domain["warnings"] == []
    shown = client.get(f"/v1/domains/{domain['domain_id']}").json()
    assert shown["adaptation"]["estimated_accuracy"] == estimate  # stored with the domain
    listed = client.get("/v1/domains").json()["domains"]
    assert [d["adaptation"]["estimated_accuracy"] for d in listed] == [estimate]


def test_warnings_for_few_and_unbalanced_examples(client: TestClient) -> None:
    examples = [{"text": t, "label": "positive"} for t in POSITIVE[:6]] + [{"text": NEGATIVE[0], "label": "negative"}]
    domain = create(client, {"name": "lopsided", "examples": examples})
    codes = [w["code"] for w in domain["warnings"]]
    assert codes == ["few_examples", "unbalanced_labels"]
    assert "'negative'" in domain["warnings"][0]["message"]
    assert domain["adaptation"]["estimated_accuracy"]["n"] == 6  # the lone negative is never held out
    assert client.get(f"/v1/domains/{domain['domain_id']}").json()["warnings"] == domain["warnings"]
    # adding negatives clears them
    more = [{"text": t, "label": "negative"} for t in NEGATIVE[1:6]]
    response = client.put(f"/v1/domains/{domain['domain_id']}/examples", json={"examples": more})
    assert response.status_code == 200, response.text
    assert response.json()["warnings"] == []
    two = client.post(
        "/v1/classify",
        json={"examples": [{"text": POSITIVE[0], "label": "positive"}, {"text": NEGATIVE[0], "label": "negative"}],
              "texts": [POSITIVE[1]]},
    )  # fmt: skip
    assert two.status_code == 200, two.text
    assert two.json()["adaptation"]["estimated_accuracy"] is None
    assert [w["code"] for w in two.json()["warnings"]] == ["few_examples", "few_examples", "no_estimate"]


def test_suggest_returns_distinct_unlabelled_texts_with_their_scores(client: TestClient) -> None:
    domain = create(client)
    labelled = [e["text"] for e in support()]
    candidates = [labelled[0], POSITIVE[7], NEGATIVE[7], POSITIVE[7], "okay fine average", NEGATIVE[8]]
    response = client.post(f"/v1/domains/{domain['domain_id']}/suggest", json={"texts": candidates, "k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["domain_id"] == domain["domain_id"] and body["method"] == "badge"
    suggestions = body["suggestions"]
    texts = [s["text"] for s in suggestions]
    assert len(texts) == len(set(texts)) == 3 and labelled[0] not in texts
    predicted = classify(client, domain["domain_id"], texts)
    for suggestion, prediction in zip(suggestions, predicted, strict=True):
        assert candidates[suggestion["index"]] == suggestion["text"]
        assert suggestion["label"] == prediction["label"]
        assert suggestion["scores"] == pytest.approx(prediction["scores"], abs=1e-5)
        assert suggestion["uncertainty"] == pytest.approx(1 - max(prediction["scores"].values()), abs=1e-5)
    store = client.app.state.store  # type: ignore[attr-defined]
    with mock.patch.object(store, "get", wraps=store.get) as reads:
        again = client.post(f"/v1/domains/{domain['domain_id']}/suggest", json={"texts": candidates, "k": 3}).json()
    assert again["suggestions"] == suggestions  # deterministic
    assert reads.call_count == 1  # the domain and the support set it excludes come from one read


def test_suggest_errors(client: TestClient) -> None:
    domain = create(client)
    path = f"/v1/domains/{domain['domain_id']}/suggest"
    assert_error(client.post(path, json={"texts": ["fine"], "k": 0}), 422, "k")
    assert_error(client.post(path, json={"texts": ["fine"], "k": "2"}), 422, "k")
    assert_error(client.post(path, json={"texts": [], "k": 1}), 422, "texts")
    assert_error(client.post(path, json={"texts": ["fine"] * (MAX_TEXTS + 1)}), 413, "texts")
    assert_error(client.post("/v1/domains/" + "0" * 32 + "/suggest", json={"texts": ["fine"]}), 404, "domain_id")
