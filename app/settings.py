"""Service settings, from ``METASENT_*`` environment variables and a ``.env`` file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings of the metasent server.

    Every field can be set as ``METASENT_<NAME>`` (e.g. ``METASENT_CHECKPOINT=runs/arsc/best``)
    or in a ``.env`` file; ``metasent serve --host --port --checkpoint`` override them.
    """

    model_config = SettingsConfigDict(env_prefix="METASENT_", env_file=".env", extra="ignore")

    checkpoint: Path | None = Field(
        default=None, description="metasent checkpoint directory; none: the un-meta-trained encoder"
    )
    encoder: str | None = Field(default=None, description="encoder name or path used when no checkpoint is given")
    device: str = Field(default="auto", description="auto (CUDA when available), cpu, cuda, cuda:N")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (default: torch's choice)")
    max_examples: int = Field(default=256, ge=2, description="support examples per domain")
    max_texts: int = Field(default=512, ge=1, description="texts per classify request")
    max_domains: int = Field(default=200, ge=1, description="adapted domains kept in memory")
    max_text_chars: int = Field(
        default=20_000,
        ge=1,
        description="characters of a text passed to the tokenizer; the rest is dropped "
        "(the encoder truncates to its token limit anyway)",
    )
    batch_size: int = Field(default=32, ge=1, description="texts per encoder forward pass")
    batch_window_ms: float = Field(
        default=5.0, ge=0, description="how long a classify request waits for concurrent ones to share its batch"
    )
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one JSON object per log line (with request_id); text: plain lines"
    )
    adapt_queue_size: int = Field(
        default=8,
        ge=1,
        description="adaptations waiting or running at once (one runs at a time); more answer 429 with Retry-After",
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="seconds a request may take before it answers 503 with Retry-After"
    )
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="bytes of a request body; larger bodies answer 413"
    )


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    return Settings()
