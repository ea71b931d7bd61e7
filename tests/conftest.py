"""Shared fixtures: a tiny randomly initialised BERT (hidden 32, 2 layers) with a hand-written
vocabulary, hand-written review tasks, and a checkpoint of the tiny model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from metasent.data.readers import Example
from metasent.data.registry import Task
from metasent.meta.checkpoint import save_checkpoint
from metasent.meta.config import CheckpointConfig, EncoderConfig, InnerLoopConfig
from metasent.meta.model import MetaLearner

ARSC_DIR = Path(os.environ.get("METASENT_ARSC_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "arsc"))

POSITIVE = [
    "great tasty coffee love it",
    "excellent fresh bread would buy again",
    "delicious sweet chocolate great value",
    "love this tea excellent flavour",
    "fresh tasty snack great price",
    "wonderful rich coffee delicious",
    "great product love the flavour",
    "excellent value tasty and fresh",
    "delicious cookies love them",
    "wonderful jam great taste",
]
NEGATIVE = [
    "awful stale bread never again",
    "terrible bitter coffee waste of money",
    "bad taste broken package awful",
    "stale cookies terrible value",
    "disgusting flavour bad product",
    "awful tea bitter and stale",
    "terrible snack broken and bad",
    "waste of money disgusting jam",
    "bad coffee never buy again",
    "bitter chocolate awful taste",
]
WORDS = sorted(
    {w for text in POSITIVE + NEGATIVE for w in text.split()} | {"okay", "fine", "average", "positive", "negative"}
)
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer(directory: Path):
    from transformers import BertTokenizer

    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab))  # transformers 5: ``vocab``, not ``vocab_file``
    assert tokenizer.convert_tokens_to_ids(["great", "coffee"]) != [tokenizer.unk_token_id] * 2
    return tokenizer


def make_tiny_model(directory: Path, seed: int = 0, max_length: int = 32) -> MetaLearner:
    """A randomly initialised BERT with hidden size 32 and 2 layers."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = MetaLearner(BertModel(config), tokenizer, EncoderConfig(name_or_path="tiny-bert", max_length=max_length))
    return model.eval()


def save_tiny_encoder(directory: Path) -> Path:
    """Save a tiny BERT and its tokenizer as a Hugging Face folder (an encoder given by path)."""
    model = make_tiny_model(directory.parent)
    model.encoder.save_pretrained(str(directory))
    model.tokenizer.save_pretrained(str(directory))
    return directory


def write_arsc_like(root: Path) -> Path:
    """A tiny ARSC-shaped directory: domains food, drinks and snacks (one binary task each, the
    same 20 reviews rotated), each with train, dev and test files."""
    root.mkdir()
    for i, domain in enumerate(["food", "drinks", "snacks"]):
        pos, neg = POSITIVE[i:] + POSITIVE[:i], NEGATIVE[i:] + NEGATIVE[:i]
        lines = [f"{t}\t1" for t in pos] + [f"{t}\t-1" for t in neg]
        for split in ("train", "dev", "test"):
            (root / f"{domain}.t2.{split}").write_text("\n".join(lines) + "\n")
    return root


def make_task(name: str = "food", domain: str = "food") -> Task:
    pos = [Example(t, "positive") for t in POSITIVE]
    neg = [Example(t, "negative") for t in NEGATIVE]
    return Task(
        name=name,
        domain=domain,
        labels=("negative", "positive"),
        splits={"train": pos[:8] + neg[:8], "dev": pos[8:] + neg[8:], "test": pos[6:] + neg[6:]},
    )


@pytest.fixture
def tiny_model(tmp_path: Path) -> MetaLearner:
    return make_tiny_model(tmp_path)


@pytest.fixture
def food_task() -> Task:
    return make_task()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the tiny model with a short inner loop (3 steps, top layer adapted)."""
    directory = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(directory)
    config = CheckpointConfig(
        algorithm="none",
        encoder=model.config,
        inner_loop=InnerLoopConfig(steps=3, lr=0.1, adapted_layers=1),
    )
    return save_checkpoint(directory / "checkpoint", model, config)


@pytest.fixture
def modified_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """The tiny checkpoint with a 2-step inner loop: same weights, another hash."""
    copy = Path(shutil.copytree(tiny_checkpoint, tmp_path / "modified"))
    config = CheckpointConfig.model_validate_json((copy / "metasent.json").read_text())
    config.inner_loop.steps = 2
    (copy / "metasent.json").write_text(config.model_dump_json(indent=2))
    return copy
