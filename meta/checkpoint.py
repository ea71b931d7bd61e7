"""Checkpoint directories: meta-parameters in safetensors, the tokenizer, and one JSON config.

Layout::

    <dir>/metasent.json       CheckpointConfig (encoder, inner loop, training run, metrics)
    <dir>/model.safetensors   every meta-parameter ("encoder.*", "logit_scale")
    <dir>/config.json         the encoder architecture (Hugging Face AutoConfig)
    <dir>/tokenizer*.json ... the tokenizer (Hugging Face AutoTokenizer)
    <dir>/training_state.pt   optimiser, scheduler and RNG state, for `metasent train --resume`

A directory is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written checkpoint under the final name. :func:`model_fingerprint` hashes what a model was
loaded from, so that adapted domains know which model adapted them.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import CheckpointConfig
from .model import OPTIONAL_PARAMETERS, MetaLearner

logger = logging.getLogger(__name__)

CONFIG_FILE = "metasent.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
_ENCODER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def save_checkpoint(
    directory: str | Path,
    model: MetaLearner,
    config: CheckpointConfig,
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` and ``config`` to ``directory`` atomically (replacing what was there).

    Returns:
        `Path`: the checkpoint directory.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.encoder.config.save_pretrained(str(tmp))
        model.tokenizer.save_pretrained(str(tmp))
        if training_state is not None:
            torch.save(training_state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s (step %d)", directory, config.step)
    return directory


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a metasent checkpoint directory."""
    return (Path(path) / CONFIG_FILE).is_file()


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[MetaLearner, CheckpointConfig]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Returns:
        `(MetaLearner, CheckpointConfig)`: the model on ``device`` in eval mode, and its config.

    Raises:
        FileNotFoundError: when ``directory`` is not a metasent checkpoint.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    directory = Path(directory)
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a metasent checkpoint (no {CONFIG_FILE})")
    config = CheckpointConfig.model_validate_json((directory / CONFIG_FILE).read_text())
    encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(directory)))
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = MetaLearner(encoder, tokenizer, config.encoder)
    missing, unexpected = model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=False)
    if unexpected or [m for m in missing if ".pooler." not in m and m not in OPTIONAL_PARAMETERS]:
        raise ValueError(f"{directory}: weights do not match the encoder: missing {missing}, unexpected {unexpected}")
    model.to(device).eval()
    return model, config


def load_training_state(directory: str | Path) -> dict[str, Any] | None:
    """The optimiser/scheduler/RNG state saved with a checkpoint, or ``None``."""
    path = Path(directory) / STATE_FILE
    return torch.load(path, weights_only=False) if path.is_file() else None


def load_model(
    checkpoint: str | Path | None,
    encoder: str | None = None,
    device: str | torch.device = "cpu",
    algorithm: str = "none",
) -> tuple[MetaLearner, CheckpointConfig]:
    """Load a checkpoint, or with ``checkpoint=None`` the un-meta-trained ``encoder`` (default:
    all-MiniLM-L6-v2) with ``algorithm``'s inner loop (``"none"``: head only; ``"finetune"``:
    every tensor), so both go through one code path.

    Raises:
        ValueError: for an unknown algorithm (:class:`meta.algorithms.UnknownAlgorithmError`,
            naming the registered ones) or one that needs a meta-trained checkpoint.
    """
    if checkpoint is not None:
        return load_checkpoint(checkpoint, device)
    from .algorithms import get, names
    from .config import EncoderConfig

    spec = get(algorithm)
    if spec.meta_trained:
        baselines = [name for name in names() if not get(name).meta_trained]
        raise ValueError(
            f"algorithm {algorithm!r} needs a meta-trained checkpoint; without one choose from {', '.join(baselines)}"
        )
    config = CheckpointConfig(algorithm=algorithm, inner_loop=spec.default_inner_loop())
    if encoder is not None:
        config.encoder = EncoderConfig(name_or_path=encoder)
    model = MetaLearner.from_pretrained(config.encoder).to(device).eval()
    return model, config


def _hash_file(digest: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)


def model_fingerprint(checkpoint: Path | None, config: CheckpointConfig, encoder_path: str | None = None) -> str:
    """The hash a domain records to know which model adapted it (computed once at load).

    Args:
        checkpoint (`Path | None`): a checkpoint directory: sha256 over its ``metasent.json`` and
            ``model.safetensors``.
        config (`CheckpointConfig`): without a checkpoint, the loaded config (encoder name and
            inner loop) goes into the hash.
        encoder_path (`str`, *optional*): without a checkpoint, the encoder's folder: its weight
            file goes into the hash when there is one.

    Returns:
        `str`: 64 hex digits.
    """
    digest = hashlib.sha256()
    if checkpoint is not None:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            digest.update(name.encode())
            _hash_file(digest, Path(checkpoint) / name)
        return digest.hexdigest()
    digest.update(config.model_dump_json(include={"algorithm", "encoder", "inner_loop"}).encode())
    folder = Path(encoder_path) if encoder_path else None
    weights = [folder / name for name in _ENCODER_WEIGHT_FILES if folder is not None and (folder / name).is_file()]
    if weights:
        _hash_file(digest, weights[0])
    return digest.hexdigest()
