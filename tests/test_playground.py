"""The playground page at ``/`` in a real browser: Debian's chromium driven by Playwright against the
app on the tiny checkpoint, served by uvicorn in a thread. Adapt from pasted examples, list,
classify (labels and percentages equal the REST API's for the same texts), delete; API errors shown
as the API words them; the estimate and warnings of the Domain contract; "what to label next";
the API key field on a server with keys; a 360 px wide screen without horizontal scroll.

Fails (never skips) without chromium: install Debian's with ``apt-get install chromium`` (scripts/setup.sh
does); Playwright never downloads a browser here."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from bench.screenshot import CHROMIUM_ARGS
from metasent.app.main import create_app
from metasent.app.settings import Settings
from tests.conftest import NEGATIVE, POSITIVE, serve_in_thread, support

# expect() waits 5 s by default: an adaptation (with its accuracy estimate) on a busy CI machine
# can take longer; the assertions still wait on the page's state, never a fixed time
expect.set_options(timeout=60_000)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("METASENT_TEST_CHROMIUM", "/usr/bin/chromium"))
INSTALL = "DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium"
KEY = "playground-key-0123456789"
ESTIMATE = {"accuracy": 0.8, "low": 0.49, "high": 0.94, "n": 10, "method": "leave-one-out"}
ESTIMATE_TEXT = "Estimated accuracy 80% (95% interval 49–94%, leave-one-out over 10 examples)"
WARNINGS = [
    {"code": "few_examples", "message": "only 5 examples of 'negative': add a few more"},
    {"code": "label_imbalance", "message": "'positive' has twice as many examples as 'negative'"},
]


def estimate_text(estimate: dict[str, Any]) -> str:
    """The page's wording of ``adaptation.estimated_accuracy``."""
    low, high = round(estimate["low"] * 100), round(estimate["high"] * 100)
    accuracy = round(estimate["accuracy"] * 100)
    how = f"{estimate['method']} over {estimate['n']} examples"
    return f"Estimated accuracy {accuracy}% (95% interval {low}–{high}%, {how})"


def test_estimate_wording_matches_the_brief() -> None:
    assert estimate_text(ESTIMATE) == ESTIMATE_TEXT


def as_csv(examples: list[dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows([ex["text"], ex["label"]] for ex in examples)
    return out.getvalue()


# -- the browser and the servers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"no chromium at {CHROMIUM}: install Debian's with `{INSTALL}` (scripts/setup.sh does), "
            "or point METASENT_TEST_CHROMIUM at a chromium binary; never `playwright install`",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _serve(checkpoint: Path, data_dir: Path, **settings: Any) -> Iterator[str]:
    app = create_app(Settings(checkpoint=checkpoint, device="cpu", data_dir=data_dir, batch_window_ms=0, **settings))
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def open_url(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An open server (no API keys)."""
    yield from _serve(tiny_checkpoint, tmp_path_factory.mktemp("playground-open"))


@pytest.fixture(scope="module")
def keyed_url(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server with API keys on."""
    yield from _serve(tiny_checkpoint, tmp_path_factory.mktemp("playground-keyed"), api_keys=KEY)


@pytest.fixture
def api(open_url: str) -> Iterator[httpx.Client]:
    """The REST API of the open server; every test leaves it with no domain."""
    with httpx.Client(base_url=open_url, timeout=60) as client:
        yield client
        for domain in client.get("/v1/domains").json()["domains"]:
            assert client.delete(f"/v1/domains/{domain['domain_id']}").status_code == 204


def new_page(browser: Browser, url: str, width: int = 1100) -> Page:
    context = browser.new_context(viewport={"width": width, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # "Delete this domain?"
    page.goto(url)
    expect(page.locator("#model-info")).to_contain_text("Model:")
    return page


@pytest.fixture
def page(browser: Browser, open_url: str, api: httpx.Client) -> Iterator[Page]:
    opened = new_page(browser, open_url)
    yield opened
    opened.context.close()


def adapt(page: Page, name: str, examples: list[dict[str, str]]) -> None:
    page.get_by_label("Domain name", exact=True).fill(name)
    page.get_by_label("Labelled examples", exact=True).fill(as_csv(examples))
    page.get_by_role("button", name="Adapt", exact=True).click()


def adapted(page: Page, api: httpx.Client, name: str, examples: list[dict[str, str]]) -> dict[str, Any]:
    """Adapt through the page; the domain as the API lists it."""
    adapt(page, name, examples)
    expect(page.locator("#adapt-result h3")).to_have_text(f"Adapted “{name}”")
    (domain,) = [d for d in api.get("/v1/domains").json()["domains"] if d["name"] == name]
    return domain


def classify(page: Page, texts: list[str]) -> None:
    page.get_by_label("Texts, one per line", exact=True).fill("\n".join(texts))
    page.get_by_role("button", name="Classify").click()


def assert_shows_error(region: Any, error: dict[str, Any]) -> None:
    """``region`` (an alert) shows the API's message and each detail's field and fix."""
    expect(region).to_have_attribute("role", "alert")
    expect(region).to_contain_text(error["message"])
    for detail in error["details"]:
        expect(region).to_contain_text(detail["field"])
        expect(region).to_contain_text(detail["fix"])


# -- the page ------------------------------------------------------------------------------------


def test_page_is_public_and_out_of_the_schema(tiny_checkpoint: Path, tmp_path: Path) -> None:
    settings = Settings(checkpoint=tiny_checkpoint, device="cpu", data_dir=tmp_path, api_keys=KEY)
    with TestClient(create_app(settings)) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for asset, kind in [("/static/playground.js", "javascript"), ("/static/playground.css", "text/css")]:
            response = client.get(asset)
            assert response.status_code == 200 and kind in response.headers["content-type"], asset
        assert client.get("/v1/domains").status_code == 401  # the API behind it still needs the key
        paths = client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()["paths"]
        assert "/" not in paths and not [p for p in paths if p.startswith("/static")]


def test_adapt_list_classify_and_delete(page: Page, api: httpx.Client) -> None:
    domain = adapted(page, api, "food reviews", support())
    item = page.locator(f'#domain-list li[data-domain-id="{domain["domain_id"]}"]')
    expect(item).to_contain_text("food reviews")
    expect(item).to_contain_text("(active)")
    expect(page.get_by_label("Active domain")).to_have_value(domain["domain_id"])
    estimate = page.locator("#adapt-result .estimate")
    assert domain["adaptation"]["estimated_accuracy"]["method"] == "5-fold"  # the tiny model takes inner steps
    expect(estimate).to_have_text(estimate_text(domain["adaptation"]["estimated_accuracy"]))
    expect(page.locator("#adapt-result .warnings")).to_have_count(0)  # 5 examples of each label

    texts = [POSITIVE[8], NEGATIVE[8]]
    classify(page, texts)
    shown = page.locator("#classify-result .prediction")
    expect(shown).to_have_count(2)
    answer = api.post(f"/v1/domains/{domain['domain_id']}/classify", json={"texts": texts})
    for i, want in enumerate(answer.json()["predictions"]):
        prediction = shown.nth(i)
        expect(prediction.locator(".text")).to_have_text(texts[i])
        expect(prediction.locator(".predicted-label")).to_have_text(want["label"])
        rows = prediction.locator(".score")
        expect(rows).to_have_count(len(want["scores"]))
        for j, (label, score) in enumerate(want["scores"].items()):
            row = rows.nth(j)
            expect(row.locator(".score-label")).to_have_text(label)
            value = row.locator(".score-value").inner_text()
            assert value.endswith("%") and float(value[:-1]) == pytest.approx(100 * score, abs=0.05 + 1e-4), value
            assert float(row.get_attribute("data-score") or "nan") == pytest.approx(score, abs=2e-6)
            expect(row.locator(".bar")).to_have_attribute("aria-hidden", "true")  # the percentage is the text

    page.get_by_role("button", name="Delete domain food reviews").click()
    expect(item).to_have_count(0)
    assert api.get("/v1/domains").json()["domains"] == []


def test_uploads_and_the_keyboard(page: Page, api: httpx.Client) -> None:
    """A .jsonl support set and a .csv of texts (a quoted comma, an extra column) are uploaded;
    Enter in the name field adapts (the form's implicit submission), Enter on the button classifies."""
    jsonl = "\n".join(json.dumps(ex) for ex in support()) + "\n"
    page.get_by_label("…or upload a .csv or .jsonl file").set_input_files(
        {"name": "food.jsonl", "mimeType": "application/json", "buffer": jsonl.encode()}
    )
    expect(page.get_by_label("Labelled examples", exact=True)).to_have_value(jsonl)
    name = page.get_by_label("Domain name", exact=True)
    name.fill("uploaded")
    name.press("Enter")
    expect(page.locator("#adapt-result h3")).to_have_text("Adapted “uploaded”")
    (domain,) = api.get("/v1/domains").json()["domains"]
    assert domain["num_examples"] == 10 and domain["labels"] == ["positive", "negative"]

    texts = ["great coffee, love it", NEGATIVE[9]]
    table = f'id,text\n1,"{texts[0]}"\n2,{texts[1]}\n'
    page.get_by_label("…or upload a .txt file").set_input_files(
        {"name": "texts.csv", "mimeType": "text/csv", "buffer": table.encode()}
    )
    expect(page.get_by_label("Texts, one per line", exact=True)).to_have_value("\n".join(texts))
    page.get_by_role("button", name="Classify").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#classify-result .prediction .text")).to_have_text(texts)


def test_csv_texts_with_unquoted_commas(page: Page, api: httpx.Client) -> None:
    """In a text,label paste, commas before the last one belong to the text (quotes optional)."""
    pasted = 'text,label\ngreat coffee, love it,positive\n"bad, bitter, stale",negative\nawful tea,negative\n'
    page.get_by_label("Labelled examples", exact=True).fill(pasted)
    page.get_by_role("button", name="Adapt", exact=True).click()
    expect(page.locator("#adapt-result h3")).to_have_text("Adapted “my reviews”")
    (domain,) = api.get("/v1/domains").json()["domains"]
    stored = api.get(f"/v1/domains/{domain['domain_id']}/examples").json()["examples"]
    assert stored == [
        {"text": "great coffee, love it", "label": "positive"},
        {"text": "bad, bitter, stale", "label": "negative"},
        {"text": "awful tea", "label": "negative"},
    ]


@pytest.mark.parametrize(
    ("case", "examples", "line"),
    [
        ("empty label", [*support()[:2], {"text": NEGATIVE[0], "label": ""}, *support()[5:7]], 4),
        ("one label", [{"text": t, "label": "positive"} for t in POSITIVE[:4]], None),
    ],
)
def test_api_errors_are_shown_as_the_api_words_them(
    page: Page, api: httpx.Client, case: str, examples: list[dict[str, str]], line: int | None
) -> None:
    adapt(page, "food", examples)
    response = api.post("/v1/domains", json={"name": "food", "examples": examples})
    assert response.status_code == 422, response.text
    region = page.locator("#adapt-error")
    assert_shows_error(region, response.json()["error"])
    if line is not None:  # the example's line in the pasted text
        expect(region).to_contain_text(f"line {line} of your examples")
    expect(page.locator("#adapt-result")).to_be_empty()


def test_a_domain_deleted_elsewhere_answers_404_on_the_page(page: Page, api: httpx.Client) -> None:
    domain = adapted(page, api, "gone", support())
    assert api.delete(f"/v1/domains/{domain['domain_id']}").status_code == 204
    classify(page, [POSITIVE[9]])
    response = api.post(f"/v1/domains/{domain['domain_id']}/classify", json={"texts": [POSITIVE[9]]})
    assert response.status_code == 404
    assert_shows_error(page.locator("#classify-error"), response.json()["error"])


def _with(body: dict[str, Any], estimate: dict[str, Any] | None, warnings: list[dict[str, str]]) -> dict[str, Any]:
    for domain in body.get("domains", [body]):
        domain["adaptation"]["estimated_accuracy"] = estimate
        domain["warnings"] = warnings
    return body


def test_estimate_and_warnings_follow_the_domain_contract(page: Page, api: httpx.Client) -> None:
    """The Domain's ``adaptation.estimated_accuracy`` and ``warnings`` (set here by the browser on
    the server's answers, whatever the server sends) are shown; a null estimate shows nothing."""

    def contract(route: Route) -> None:
        response = route.fetch()
        route.fulfill(response=response, json=_with(response.json(), ESTIMATE, WARNINGS))

    page.route("**/v1/domains", contract)
    adapted(page, api, "with estimate", support())
    expect(page.locator("#adapt-result .estimate")).to_have_text(ESTIMATE_TEXT)
    warnings = page.locator("#adapt-result .warnings li")
    expect(warnings).to_have_count(len(WARNINGS))
    for shown, warning in zip(warnings.all(), WARNINGS, strict=True):
        expect(shown).to_contain_text(warning["message"])
        expect(shown).to_have_attribute("data-code", warning["code"])
    expect(page.locator("#domain-list .estimate")).to_have_text(ESTIMATE_TEXT)

    page.unroute("**/v1/domains")
    page.route("**/v1/domains", lambda route: route.fulfill(json=_with(route.fetch().json(), None, [])))
    adapted(page, api, "without estimate", support())
    expect(page.locator("#adapt-result p").first).to_contain_text("10 examples")
    expect(page.locator("#adapt-result .estimate")).to_have_count(0)
    expect(page.locator("#adapt-result .warnings")).to_have_count(0)


def test_the_servers_estimate_and_warnings_are_shown(page: Page, api: httpx.Client) -> None:
    """A lopsided support set (6 positive, 1 negative): the server's own estimate and warnings."""
    lopsided = [e for e in support(k=6) if e["label"] == "positive"] + [{"text": NEGATIVE[0], "label": "negative"}]
    domain = adapted(page, api, "lopsided", lopsided)
    assert [w["code"] for w in domain["warnings"]] == ["few_examples", "unbalanced_labels"]
    expect(page.locator("#adapt-result .estimate")).to_have_text(
        estimate_text(domain["adaptation"]["estimated_accuracy"])
    )
    shown = page.locator("#adapt-result .warnings li")
    expect(shown).to_have_count(2)
    for item, warning in zip(shown.all(), domain["warnings"], strict=True):
        expect(item).to_have_attribute("data-code", warning["code"])
        expect(item).to_contain_text(warning["message"])
    # one example per label: nothing can be held out, so no estimate and a no_estimate warning
    pair = [{"text": POSITIVE[1], "label": "positive"}, {"text": NEGATIVE[1], "label": "negative"}]
    domain = adapted(page, api, "pair", pair)
    assert domain["adaptation"]["estimated_accuracy"] is None
    expect(page.locator("#adapt-result .estimate")).to_have_count(0)
    expect(page.locator('#adapt-result .warnings li[data-code="no_estimate"]')).to_have_count(1)


def test_suggestions_are_labelled_and_added(page: Page, api: httpx.Client) -> None:
    domain = adapted(page, api, "food", support())
    pool = [POSITIVE[7], NEGATIVE[7], "okay fine average"]
    page.get_by_label("Unlabelled texts, one per line").fill("\n".join(pool))
    page.get_by_label("How many suggestions").fill("2")
    page.get_by_role("button", name="Suggest").click()
    # the server's own answer to the same request (deterministic): the same texts, guesses and order
    response = api.post(f"/v1/domains/{domain['domain_id']}/suggest", json={"texts": pool, "k": 2})
    assert response.status_code == 200, response.text
    shown = page.locator("#suggest-result .suggestion")
    expect(shown).to_have_count(2)
    for item, want in zip(shown.all(), response.json()["suggestions"], strict=True):
        expect(item).to_contain_text(want["text"])
        expect(item).to_contain_text(f"model's guess: {want['label']}")
        expect(item).to_contain_text(f"uncertainty {want['uncertainty']:.2f}")

    suggestions = [  # the contract's answer, whatever this server says
        {"index": 2, "text": pool[2], "label": "positive", "scores": {"positive": 0.5, "negative": 0.5}},
        {"index": 1, "text": pool[1], "label": "negative", "scores": {"positive": 0.4, "negative": 0.6}},
    ]
    for suggestion, uncertainty in zip(suggestions, [0.69, 0.67], strict=True):
        suggestion["uncertainty"] = uncertainty
    answer = {"domain_id": domain["domain_id"], "suggestions": suggestions}
    page.route("**/suggest", lambda route: route.fulfill(json=answer))
    page.get_by_role("button", name="Suggest").click()
    expect(page.locator("#suggest-error")).to_be_empty()
    expect(page.locator("#suggest-result .suggestion")).to_have_count(2)
    expect(page.locator("#suggest-result .suggestion").first).to_contain_text("uncertainty 0.69")
    page.get_by_label("Label for suggestion 1").select_option("negative")
    page.get_by_label("Label for suggestion 2").select_option("negative")
    with page.expect_request(lambda request: request.method == "PUT") as sent:
        page.get_by_role("button", name="Add the labelled texts to the domain").click()
    added = [{"text": pool[2], "label": "negative"}, {"text": pool[1], "label": "negative"}]
    assert json.loads(sent.value.post_data or "") == {"examples": added, "mode": "add", "expected_version": 1}
    expect(page.locator("#label-result h3")).to_have_text("Added 2 examples to “food”")
    expect(page.locator("#label-result")).to_contain_text("12 examples · version 2")
    stored = api.get(f"/v1/domains/{domain['domain_id']}/examples").json()
    assert stored["version"] == 2 and stored["examples"][-2:] == added
    expect(page.locator(f'#domain-list li[data-domain-id="{domain["domain_id"]}"]')).to_contain_text("version 2")

    expect(page.locator("#label-form")).to_have_count(0)  # the labelled suggestions were used

    page.get_by_role("button", name="Suggest").click()  # again, then another write wins the race
    expect(page.locator("#suggest-result .suggestion")).to_have_count(2)
    more = {"examples": [{"text": pool[0], "label": "positive"}], "expected_version": 2}
    assert api.put(f"/v1/domains/{domain['domain_id']}/examples", json=more).status_code == 200
    page.get_by_label("Label for suggestion 1").select_option("positive")
    page.get_by_role("button", name="Add the labelled texts to the domain").click()
    conflict = api.put(f"/v1/domains/{domain['domain_id']}/examples", json={**more, "examples": added[:1]})
    assert conflict.status_code == 409
    assert_shows_error(page.locator("#label-error"), conflict.json()["error"])


def test_phone_width_is_one_column_without_horizontal_scroll(
    browser: Browser, open_url: str, api: httpx.Client
) -> None:
    page = new_page(browser, open_url, width=360)
    try:
        no_scroll = "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        assert page.evaluate(no_scroll)
        unlabelled = page.evaluate(
            "[...document.querySelectorAll('input, select, textarea')].filter(e => !e.labels.length).map(e => e.id)"
        )
        assert unlabelled == []
        long_text = "great coffee " + "x" * 300  # one unbreakable word
        adapted(page, api, "a domain name that is rather long for a phone screen", support())
        classify(page, [long_text, NEGATIVE[9]])
        expect(page.locator("#classify-result .prediction")).to_have_count(2)
        adapt(page, "food", [{"text": "okay", "label": "positive"}])  # an error, with its details
        expect(page.locator("#adapt-error")).not_to_be_empty()
        assert page.evaluate(no_scroll), page.evaluate("document.documentElement.scrollWidth")
        lefts = page.evaluate(
            "[...document.querySelectorAll('main > section')].map(s => s.getBoundingClientRect().left)"
        )
        assert len(set(lefts)) == 1  # one column
    finally:
        page.context.close()


def test_api_key_field_on_a_server_with_keys(browser: Browser, keyed_url: str) -> None:
    page = new_page(browser, keyed_url)
    try:
        key_field = page.get_by_role("textbox", name="API key")
        expect(key_field).to_be_visible()
        expect(page.locator("#api-key-note")).to_contain_text("Authorization: Bearer")
        missing = httpx.get(f"{keyed_url}/v1/domains").json()["error"]
        assert_shows_error(page.locator("#domains-error"), missing)  # the list, loaded on start

        key_field.fill("not-the-key")
        page.get_by_role("button", name="Refresh list").click()
        wrong = httpx.get(f"{keyed_url}/v1/domains", headers={"Authorization": "Bearer not-the-key"}).json()["error"]
        assert_shows_error(page.locator("#domains-error"), wrong)

        key_field.fill(KEY)
        with page.expect_request(lambda request: request.url.endswith("/v1/domains")) as sent:
            page.get_by_role("button", name="Refresh list").click()
        assert sent.value.headers["authorization"] == f"Bearer {KEY}"
        expect(page.locator("#domains-error")).to_be_empty()
        adapt(page, "keyed", support())
        expect(page.locator("#adapt-result h3")).to_have_text("Adapted “keyed”")
        classify(page, [POSITIVE[9]])
        expect(page.locator("#classify-result .prediction")).to_have_count(1)

        page.reload()  # the key stays for this tab's session
        expect(page.get_by_role("textbox", name="API key")).to_have_value(KEY)
        expect(page.locator("#domain-list")).to_contain_text("keyed")
    finally:
        page.context.close()


def test_screenshot_command_saves_the_page(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """``python -m bench.screenshot`` (here on the tiny checkpoint) starts a server, adapts and
    classifies through the page, and writes a full-page PNG."""
    output = tmp_path / "docs" / "playground.png"
    command = [sys.executable, "-m", "bench.screenshot", "--checkpoint", str(tiny_checkpoint), "--output", str(output)]
    command += ["--chromium", str(CHROMIUM)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    data = output.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 1000 and height > 900  # the full page, longer than the window
