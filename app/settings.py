"""Service settings, from ``METASENT_*`` environment variables and a ``.env`` file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings of the metasent server.

    Every field can be set as ``METASENT_<NAME>`` (e.g. ``METASENT_CHECKPOINT=runs/arsc/best``)
    or in a ``.env`` file; ``metasent serve --host --port --checkpoint`` override them.
    """

    model_config = SettingsConfigDict(env_prefix="METASENT_", env_file=".env", extra="ignore")

    checkpoint: Path | str | None = Field(
        default="default",
        description="the model: 'default', the meta-trained model shipped in the package (FOMAML with Meta-SGD "
        "over LoRA adapters); 'none', the un-meta-trained encoder; or a checkpoint directory",
    )
    encoder: str | None = Field(default=None, description="encoder name or path served with METASENT_CHECKPOINT=none")
    device: str = Field(default="auto", description="auto (CUDA when available), cpu, cuda, cuda:N")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (default: torch's choice)")
    max_examples: int = Field(default=256, ge=2, description="support examples per domain")
    max_texts: int = Field(default=512, ge=1, description="texts per classify request")
    max_domains_per_tenant: int = Field(default=200, ge=1, description="adapted domains each tenant may keep")
    max_text_chars: int = Field(
        default=20_000,
        ge=1,
        description="characters of a text: a longer support text (stored with its domain) answers 422; "
        "a longer text to classify is cut to it before the tokenizer (the encoder truncates to its token "
        "limit anyway) and its prediction says truncated",
    )
    batch_size: int = Field(default=32, ge=1, description="texts per encoder forward pass")
    estimate: bool = Field(
        default=True,
        description="estimate each domain's accuracy on new texts at adaptation (adaptation.estimated_accuracy); "
        "false leaves it null and saves its cost when the inner loop takes steps",
    )
    estimate_folds: int = Field(
        default=5,
        ge=2,
        le=20,
        description="folds of the held-out accuracy estimate at adaptation when the inner loop takes steps "
        "(each costs about one adaptation); with no inner step it is exact leave-one-out, at almost no cost",
    )
    batch_window_ms: float = Field(
        default=5.0, ge=0, description="how long a classify request waits for concurrent ones to share its batch"
    )
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one JSON object per log line (with request_id); text: plain lines"
    )
    data_dir: Path = Field(
        default=Path("metasent-data"), description="directory of the default SQLite database (created if missing)"
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the domain store, e.g. postgresql+psycopg://user:pass@host/metasent "
        "(default: sqlite:///<data_dir>/metasent.db)",
    )
    migrate_on_start: bool = Field(
        default=True,
        description="bring the database schema to the newest revision at start-up (Alembic; replicas take turns); "
        "false: the database must be upgraded already (metasent db upgrade), else the server does not start",
    )
    idempotency_ttl_s: float = Field(
        default=24 * 3600,
        gt=0,
        description="seconds the answer of a write sent with an Idempotency-Key is kept (a retry within it gets "
        "the same answer; later the key can be used again)",
    )
    api_keys: SecretStr | None = Field(
        default=None,
        description="comma-separated bearer tokens, each its own tenant; none: one open tenant 'default'",
    )
    ops_access: Literal["key", "open"] = Field(
        default="key",
        description="who may read /metrics, /docs, /redoc and /openapi.json: 'key', a client with an API key "
        "from METASENT_API_KEYS (anyone when none is set: the whole API is open then); 'open', anyone. "
        "/healthz and /readyz are always open (they show no tenant figures or file paths)",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="serve /metrics on this port instead (prometheus-client's HTTP server, no key: for a scraper "
        "on a private network); the API port then has no /metrics",
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="address the METASENT_METRICS_PORT server listens on (0.0.0.0: every one)"
    )
    cache_domains: int = Field(default=256, ge=0, description="domains whose adapted tensors stay in memory (LRU)")
    readapt_on_load: bool = Field(
        default=False, description="re-adapt every domain adapted with another checkpoint at start-up"
    )
    adapt_queue_size: int = Field(
        default=8,
        ge=1,
        description="adaptations waiting or running at once (one runs at a time); more answer 429 with Retry-After",
    )
    max_request_chars: int = Field(
        default=2_000_000,
        ge=1,
        description="characters of text (texts and support texts together) one classify or suggest request may "
        "send; more answer 413. Bounds the memory a request holds while it is tokenized and encoded",
    )
    max_inflight_chars: int = Field(
        default=8_000_000,
        ge=1,
        description="characters of text all classify and suggest requests being served may hold together "
        "(at least METASENT_MAX_REQUEST_CHARS); a request that would pass it answers 503 with Retry-After",
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="seconds a request may take before it answers 503 with Retry-After"
    )
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="bytes of a request body; larger bodies answer 413"
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="seconds to receive a whole request body once its headers arrived; a slower (or stalled) "
        "body answers 408 and the connection is closed",
    )
    max_header_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        description="bytes of a request's line and headers: metasent serve's HTTP parser (h11) refuses more "
        "with 400 and closes the connection; the app answers 431 behind any other server",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="seconds a connection has to send a whole request line and headers (from connecting, or "
        "from the first byte of a later request on a keep-alive connection); slower ones answer 408 and are "
        "closed (metasent serve)",
    )
    max_connections: int | None = Field(
        default=256,
        ge=1,
        description="concurrent connections (and requests) metasent serve accepts; more answer 503 at once "
        "(uvicorn's limit_concurrency); none: unlimited",
    )
    keep_alive_s: int = Field(
        default=5, ge=1, description="seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive)"
    )

    @model_validator(mode="after")
    def _budget_fits_a_request(self) -> Settings:
        if self.max_inflight_chars < self.max_request_chars:
            raise ValueError(
                f"METASENT_MAX_INFLIGHT_CHARS ({self.max_inflight_chars}) must be at least METASENT_MAX_REQUEST_CHARS "
                f"({self.max_request_chars}), else no request of the largest size is ever admitted"
            )
        return self

    def database(self) -> str:
        """The database URL: ``database_url``, or a SQLite file in ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'metasent.db'}"

    def key_list(self) -> list[str]:
        """The API keys, stripped, empty entries dropped."""
        raw = self.api_keys.get_secret_value() if self.api_keys else ""
        return [key.strip() for key in raw.split(",") if key.strip()]


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    return Settings()
