"""What the app needs of a domain store: the :class:`DomainStore` protocol, the values it takes and
returns, and its own exceptions. No database library is named here: the SQL implementation
(:class:`app.store.SqlDomainStore`) translates its driver's errors into these exceptions, so the
handlers, the error mapping and the probes depend on this module only.

A new backend implements :class:`DomainStore`'s methods, raises these exceptions, and is
constructed in :func:`app.main.create_app`'s lifespan (``_open_store``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import Tensor

Examples = list[tuple[str, str]]  # a support set, (text, label) pairs
DomainKeys = list[tuple[str, str]]  # (tenant, domain_id) pairs


@dataclass
class StoredDomain:
    """A domain's metadata as stored (its tensors come from :meth:`DomainStore.params`)."""

    domain_id: str
    tenant: str
    name: str
    labels: tuple[str, ...]
    num_examples: int
    version: int
    checkpoint_hash: str
    adaptation: dict[str, Any]
    created_at: str
    updated_at: str
    examples: Examples | None = field(default=None, repr=False)

    def public(self, current_hash: str | None = None) -> dict[str, Any]:
        """The fields the API shows; ``stale`` when ``current_hash`` differs from the domain's. The
        support set's ``warnings`` are stored with the adaptation's figures and shown beside them."""
        return {
            "domain_id": self.domain_id,
            "name": self.name,
            "labels": list(self.labels),
            "num_examples": self.num_examples,
            "version": self.version,
            "checkpoint_hash": self.checkpoint_hash,
            "stale": current_hash is not None and current_hash != self.checkpoint_hash,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "adaptation": {k: v for k, v in self.adaptation.items() if k != "warnings"},
            "warnings": list(self.adaptation.get("warnings", [])),  # kept with the adaptation's figures
        }


@dataclass(frozen=True)
class DomainWrite:
    """One adaptation to store: what :meth:`DomainStore.add` and :meth:`DomainStore.replace` write.

    Args:
        labels (`Sequence[str]`): the class names, in class-id order.
        tensors (`dict[str, Tensor]`): the adapted tensors by name (an adapted state's
            ``to_tensors()``), from the inner loop on ``examples``.
        info (`dict[str, Any]`): the adaptation's figures, shown in the domain's metadata.
        examples (`list[tuple[str, str]]`): the support set, ``(text, label)``.
        checkpoint_hash (`str`): hash of the model it was adapted with.
    """

    labels: Sequence[str]
    tensors: dict[str, Tensor]
    info: dict[str, Any]
    examples: Examples
    checkpoint_hash: str


@dataclass(frozen=True)
class IdempotencyKey:
    """A write's ``Idempotency-Key``: its answer is stored with the write, in one transaction.

    Args:
        key (`str`): the client's key (unique per tenant).
        request_hash (`str`): sha256 hex of the request (method, path, canonical body).
        status (`int`): the HTTP status the write answers.
        ttl_s (`float`): seconds the answer is kept.
    """

    key: str
    request_hash: str
    status: int
    ttl_s: float


class StoreError(Exception):
    """Base of the domain store's exceptions."""


class StoreUnavailableError(StoreError):
    """The store does not answer or takes no writes (connection lost, locked past its timeout, pool
    exhausted, read-only); nothing was written. The message is the driver's, without SQL
    parameters (users' texts)."""


class DomainNotFoundError(StoreError, KeyError):
    """The domain is gone (deleted), or changed since it was read (:meth:`DomainStore.params`)."""

    def __init__(self, domain_id: str) -> None:
        super().__init__(domain_id)
        self.domain_id = domain_id


class IdempotencyMismatchError(StoreError):
    """The key was used before with another request (another hash)."""


class IdempotentReplayError(StoreError):
    """The key's write is stored already: answer ``status`` and ``body`` again, write nothing."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"stored answer {status}")
        self.status, self.body = status, body


class DomainLimitError(StoreError):
    """The tenant already keeps its maximum number of domains."""


class VersionConflictError(StoreError):
    """The domain's version is not the one the write was based on."""

    def __init__(self, current: int) -> None:
        super().__init__(f"the domain is at version {current}")
        self.current = current


class DomainStore(Protocol):
    """Adapted domains of every tenant. Every method is blocking (I/O): call it from a worker
    thread, not the event loop. Any method may raise :class:`StoreUnavailableError`."""

    @property
    def location(self) -> str:
        """Where the domains are kept, for the log (no password)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...

    def ping(self) -> None:
        """Check that the store takes writes (``/readyz``); raises when it does not."""
        ...

    def __len__(self) -> int:
        """Domains of every tenant."""
        ...

    def count(self, tenant: str) -> int:
        """Domains of ``tenant``."""
        ...

    def add(
        self,
        tenant: str,
        name: str,
        write: DomainWrite,
        *,
        limit: int | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> StoredDomain:
        """Store a new domain (version 1) in one transaction, never passing ``limit`` domains per
        tenant; with ``idempotency``, its answer (the domain's :meth:`StoredDomain.public`) is
        stored in the same transaction.

        Raises:
            DomainLimitError: when ``tenant`` already keeps ``limit`` domains.
            IdempotentReplayError: when the key's write is stored already (nothing written).
            IdempotencyMismatchError: when the key was used with another request.
        """
        ...

    def replace(
        self,
        domain: StoredDomain,
        write: DomainWrite,
        *,
        bump_version: bool = True,
        idempotency: IdempotencyKey | None = None,
    ) -> StoredDomain:
        """Write a new adaptation of ``domain`` if it is still at ``domain.version`` (and, without
        ``bump_version``, still adapted with ``domain.checkpoint_hash``).

        Raises:
            VersionConflictError: when another write changed the domain in the meantime.
            DomainNotFoundError: when the domain was deleted in the meantime.
            IdempotentReplayError: when the key's write is stored already (nothing written).
            IdempotencyMismatchError: when the key was used with another request.
        """
        ...

    def answer(self, tenant: str, idempotency: IdempotencyKey) -> tuple[int, dict[str, Any]] | None:
        """The stored answer ``(status, body)`` of ``tenant``'s key, or ``None``.

        Raises:
            IdempotencyMismatchError: when the key was used with another request.
        """
        ...

    def get(self, tenant: str, domain_id: str, with_examples: bool = False) -> StoredDomain | None:
        """``tenant``'s domain ``domain_id``, or ``None`` (also when another tenant owns it)."""
        ...

    def stale(self, checkpoint_hash: str) -> DomainKeys:
        """``(tenant, domain_id)`` of every domain adapted with another checkpoint."""
        ...

    def delete(self, tenant: str, domain_id: str) -> bool:
        """Forget ``tenant``'s domain; ``False`` when there is none."""
        ...

    def params(self, domain: StoredDomain) -> dict[str, Tensor]:
        """The adapted tensors of ``domain`` (as read).

        Raises:
            DomainNotFoundError: when the domain is gone or changed since ``domain`` was read.
        """
        ...

    def list(self, tenant: str) -> list[StoredDomain]:
        """``tenant``'s domains, oldest first."""
        ...


__all__ = [
    "DomainKeys",
    "DomainLimitError",
    "DomainNotFoundError",
    "DomainStore",
    "DomainWrite",
    "Examples",
    "IdempotencyKey",
    "IdempotencyMismatchError",
    "IdempotentReplayError",
    "StoreError",
    "StoreUnavailableError",
    "StoredDomain",
    "VersionConflictError",
]
