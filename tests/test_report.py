"""The figures and model prose of the README, the docs site and the model card are generated
(``python -m bench.report``) and cannot drift: from ``results/``, from the shipped artifact's
``metasent.json`` and from the code's defaults. Every file under ``results/`` is named in its index."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import report
from metasent.app.main import create_app
from metasent.app.settings import Settings
from metasent.meta.algorithms import names
from metasent.meta.config import DEFAULT_ALGORITHM

ROOT = Path(__file__).resolve().parents[1]


def test_generated_files_are_up_to_date() -> None:
    stale = [str(p.relative_to(ROOT)) for p in report.stale()]
    assert not stale, f"out of date, run `python -m bench.report`: {stale}"


def test_every_results_file_is_in_the_index() -> None:
    index = (ROOT / "results" / "README.md").read_text()
    files = [p for p in (ROOT / "results").rglob("*") if p.is_file() and p.name != "README.md"]
    missing = [
        str(p.relative_to(ROOT / "results")) for p in files if f"`{p.relative_to(ROOT / 'results')}`" not in index
    ]
    assert not missing, f"not named in results/README.md: {missing}"
    named = re.findall(r"`([\w./-]+\.(?:json|md|csv|png|txt|log))`", index)
    gone = [n for n in named if "/" in n and not (ROOT / "results" / n).exists()]
    assert not gone, f"results/README.md names files that do not exist: {gone}"


def test_every_generated_block_renders_and_names_existing_files() -> None:
    for pattern in report.PAGES:
        for page in ROOT.glob(pattern):
            for match in report.BLOCK.finditer(page.read_text()):
                kind, *_ = match["spec"].split()
                assert kind in report.BLOCKS, f"{page.name}: unknown block {kind}"
                for path in re.findall(r"results/[\w./-]+\.json", match["spec"]):
                    assert (ROOT / path).exists(), f"{page.name}: {path} does not exist"


def test_model_sentences_come_from_the_artifact() -> None:
    config = report.artifact_config()
    sentence = report.model_sentence(config)
    assert f"`{config['algorithm']}`" in sentence
    assert report.HEAD_NAMES[config["inner_loop"]["classifier"]] in sentence
    steps = config["inner_loop"]["steps"]
    assert ("no inner step" in sentence) == (steps == 0)
    assert sentence in (ROOT / "README.md").read_text()
    assert sentence in report.MODEL_CARD.read_text()


def _outside_blocks(text: str) -> str:
    return report.BLOCK.sub("", text)


def _prose() -> dict[str, str]:
    pages = [ROOT / "README.md", report.MODEL_CARD_TEMPLATE, *sorted((ROOT / "docs").glob("*.md"))]
    return {p.name: _outside_blocks(p.read_text()) for p in pages}


def test_hand_written_prose_names_the_code_default_algorithm() -> None:
    """A sentence saying what `metasent train` does by default names DEFAULT_ALGORITHM and no
    other registered algorithm (the sentence that describes it in full is generated)."""
    others = [n for n in names() if n != DEFAULT_ALGORITHM]
    for name, text in _prose().items():
        for sentence in re.split(r"(?<=[.!?])\s", " ".join(text.split())):
            if re.search(r"metasent train`?[^.]*\bdefault", sentence) or "default algorithm" in sentence:
                wrong = [o for o in others if re.search(rf"`{o}`|\b{o}\b(?!_)", sentence)]
                assert not wrong, f"{name}: '{sentence}' names {wrong}, the default is {DEFAULT_ALGORITHM}"


def test_hand_written_prose_gives_the_shipped_inner_steps() -> None:
    """'served with N inner steps' outside generated blocks says the artifact's N."""
    steps = report.artifact_config()["inner_loop"]["steps"]
    for name, text in _prose().items():
        for found in re.findall(r"[Ss]erved? with (\d+) inner steps?", " ".join(text.split())):
            assert int(found) == steps, f"{name} says served with {found} inner steps; the artifact has {steps}"


@pytest.fixture(scope="module")
def openapi_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("openapi"), checkpoint="none", device="cpu"))
    schema = app.openapi()
    texts: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("description", "summary") and isinstance(value, str):
                    texts.append(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return "\n".join(texts)


def test_openapi_descriptions_name_no_head_step_count_or_algorithm(openapi_text: str) -> None:
    """The OpenAPI document serves every model, so it names no head, no number of inner steps and
    no meta-learning algorithm: those are the served model's (``/healthz``, ``adaptation.steps``)."""
    text = openapi_text.lower()
    assert "create_domain" in openapi_text or "adapt a new domain" in text
    for phrase in ("proto-maml", "prototype-initialised", "matching-network", "matching head", "k sgd steps"):
        assert phrase not in text, f"the OpenAPI document names '{phrase}'"
    assert not re.search(r"\b\d+ (?:sgd |inner )steps?\b", text), "the OpenAPI document names a step count"
    for algorithm in (n for n in names() if n != "none"):  # "none" is also an English word
        assert not re.search(rf"\b{algorithm}\b", text), f"the OpenAPI document names the algorithm {algorithm}"
