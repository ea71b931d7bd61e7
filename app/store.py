"""Durable domains: metadata, support set and adapted tensors in one database row.

The database (SQLite by default, PostgreSQL for several replicas) is the source of truth. Each
domain is one row of ``domains``: its metadata, its support set (a JSON column) and its adapted
tensors as safetensors bytes (a blob column), so one transaction writes a domain atomically: a
crash leaves either the old row or the new one, never half of it. An in-memory LRU cache keeps
the hot domains' tensors, keyed by domain, version and checkpoint hash, so a change made by
another replica is never served from a stale cache entry.

Every method is blocking (database I/O): call it from a worker thread, not the event loop.
:class:`SqlDomainStore` implements :class:`app.storage.DomainStore`; the SQLAlchemy errors that
mean the database is unreachable or read-only leave it as :class:`app.storage.StoreUnavailableError`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace as replace_fields
from datetime import datetime, timezone
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from sqlalchemy import (
    JSON,
    Connection,
    Engine,
    Float,
    Integer,
    LargeBinary,
    String,
    create_engine,
    event,
    false,
    func,
    select,
    text,
    update,
)
from sqlalchemy import delete as delete_rows
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import IntegrityError, InterfaceError, InternalError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, deferred, mapped_column, sessionmaker
from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential
from torch import Tensor

from . import migrations
from .storage import (
    DomainKeys,
    DomainLimitError,
    DomainNotFoundError,
    DomainWrite,
    IdempotencyKey,
    IdempotencyMismatchError,
    IdempotentReplayError,
    StoredDomain,
    StoreUnavailableError,
    VersionConflictError,
)

logger = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


class DomainRow(Base):
    """One adapted domain: metadata, support set and adapted tensors (safetensors bytes)."""

    __tablename__ = "domains"

    domain_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    labels: Mapped[list[str]] = mapped_column(JSON)
    examples: Mapped[list[list[str]]] = deferred(mapped_column(JSON))  # [[text, label], ...]
    num_examples: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer)
    checkpoint_hash: Mapped[str] = mapped_column(String(64))
    adaptation: Mapped[dict[str, Any]] = mapped_column(JSON)
    params: Mapped[bytes] = deferred(mapped_column(LargeBinary))
    created_at: Mapped[str] = mapped_column(String(40))
    updated_at: Mapped[str] = mapped_column(String(40))


class IdempotencyRow(Base):
    """The answer to a write sent with an ``Idempotency-Key``, kept until ``expires_at``."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))  # sha256 of method, path and canonical body
    status: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)  # unix seconds
    expires_at: Mapped[float] = mapped_column(Float, index=True)


# SQLAlchemy errors that mean the database does not answer or takes no writes (connection lost,
# locked past its busy timeout, pool exhausted, read-only): StoreUnavailableError outside the store
_UNAVAILABLE = (OperationalError, InterfaceError, InternalError, PoolTimeoutError)
P = ParamSpec("P")
R = TypeVar("R")


def _translated(method: Callable[P, R]) -> Callable[P, R]:
    """``method`` with the database's unavailability raised as :class:`StoreUnavailableError`
    (the SQLAlchemy error, whose message has no SQL parameters, is its cause and message)."""

    @wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except _UNAVAILABLE as error:
            raise StoreUnavailableError(str(error)) from error

    return wrapper


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _serialise(params: dict[str, Tensor]) -> bytes:
    return save_tensors({name: t.detach().cpu().contiguous() for name, t in params.items()})


def _domain(row: DomainRow, with_examples: bool = False) -> StoredDomain:
    return StoredDomain(
        domain_id=row.domain_id,
        tenant=row.tenant,
        name=row.name,
        labels=tuple(row.labels),
        num_examples=row.num_examples,
        version=row.version,
        checkpoint_hash=row.checkpoint_hash,
        adaptation=dict(row.adaptation),
        created_at=row.created_at,
        updated_at=row.updated_at,
        examples=[(t, lab) for t, lab in row.examples] if with_examples else None,
    )


@retry(
    retry=retry_if_exception(lambda error: "database is locked" in str(error)),
    wait=wait_exponential(multiplier=0.01, max=0.5),
    stop=stop_after_delay(10),  # as long as busy_timeout waits for any other lock
    reraise=True,
)
def _switch_to_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds the lock: SQLite can
    answer "database is locked" at once, without waiting out the busy timeout, while another
    connection is switching the same new file (replicas opening one new database together)."""
    cursor.execute("PRAGMA journal_mode=WAL")


def check_shared_memory(database: str | None) -> None:
    """Refuse to use a SQLite database whose ``-shm`` file cannot be written.

    In WAL mode SQLite memory-maps ``<database>-shm`` and writes to it on every transaction, reads
    included; when the file stops taking writes (``chattr +i``, a read-only remount) the next write
    to the mapping kills the process with SIGBUS, which no Python code can catch. Checked before
    every transaction and connection, such a file is an ``OperationalError`` instead (503
    ``store_unavailable``, ``/readyz`` not ready) until it is repaired. A file that changes between
    this check and SQLite's write still ends the process (logged by :mod:`faulthandler`; see
    docs/operations.md).

    Args:
        database (`str`, *optional*): the database file's path (``None`` or ``:memory:``: nothing to check).

    Raises:
        sqlalchemy.exc.OperationalError: when ``<database>-shm`` exists and is not writable.
    """
    if not database or database == ":memory:":
        return
    shm = f"{database}-shm"
    if os.path.exists(shm) and not os.access(shm, os.W_OK):
        error = sqlite3.OperationalError(f"{shm} is not writable (SQLite's WAL index): refusing to use the database")
        logger.error("%s", error)
        raise OperationalError("BEGIN", None, error)


def _sqlite_connect(dbapi_connection: Any, _: Any) -> None:
    check_shared_memory(_database_file(dbapi_connection))
    dbapi_connection.isolation_level = None  # the driver begins nothing itself: see _sqlite_begin
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=10000")
    _switch_to_wal(cursor)  # readers never block the writer
    cursor.execute("PRAGMA synchronous=FULL")  # a commit is on disk before it is acknowledged
    cursor.close()


def _database_file(dbapi_connection: Any) -> str | None:
    """The main database file of a ``sqlite3`` connection (``PRAGMA database_list``), or ``None``."""
    rows = dbapi_connection.execute("PRAGMA database_list").fetchall()
    return next((row[2] for row in rows if row[1] == "main" and row[2]), None)


def _sqlite_begin(connection: Connection) -> None:
    """``BEGIN IMMEDIATE`` (the write lock first) for a connection with the ``sqlite_immediate``
    execution option (every write transaction), a plain ``BEGIN`` otherwise: a write transaction
    that reads first (the quota count) can then never fail to upgrade its lock."""
    check_shared_memory(connection.engine.url.database)
    immediate = connection.get_execution_options().get("sqlite_immediate", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


# SQLite errors after which a pooled connection cannot write again (it was opened read-only, or its
# file went away): the pool is discarded, so connections opened after the fault is repaired write.
_SQLITE_BROKEN = ("readonly", "read-only", "unable to open database", "disk i/o error")


_PG_READ_ONLY = "25006"  # read_only_sql_transaction: a standby, or default_transaction_read_only


def _broken_connection(context: ExceptionContext) -> None:
    error = context.original_exception
    message = str(error).lower()
    sqlite = context.dialect is not None and context.dialect.name == "sqlite"
    if (sqlite and any(broken in message for broken in _SQLITE_BROKEN)) or getattr(
        error, "sqlstate", None
    ) == _PG_READ_ONLY:
        context.is_disconnect = True  # SQLAlchemy invalidates this connection and the whole pool


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, ``synchronous=FULL`` and SQLAlchemy-controlled
    transactions (``BEGIN IMMEDIATE`` for writes) on every connection, and a pool that is discarded
    after a read-only or missing-file error. SQL parameters (users' texts) never appear in error
    messages or logs (``hide_parameters``)."""
    engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"), hide_parameters=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    event.listen(engine, "handle_error", _broken_connection)
    return engine


class _ParamsCache:
    """LRU of adapted tensors by domain id, valid for one (version, checkpoint hash)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, tuple[tuple[int, str], dict[str, Tensor]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, domain_id: str, key: tuple[int, str]) -> dict[str, Tensor] | None:
        with self._lock:
            item = self._items.get(domain_id)
            if item is None or item[0] != key:
                return None
            self._items.move_to_end(domain_id)
            return item[1]

    def put(self, domain_id: str, key: tuple[int, str], params: dict[str, Tensor]) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[domain_id] = (key, params)
            self._items.move_to_end(domain_id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def drop(self, domain_id: str) -> None:
        with self._lock:
            self._items.pop(domain_id, None)

    def __len__(self) -> int:
        return len(self._items)


class SqlDomainStore:
    """Adapted domains of every tenant in a SQL database, with an LRU cache of their tensors: the
    :class:`app.storage.DomainStore` of the app.

    Args:
        url (`str`): SQLAlchemy database URL, e.g. ``sqlite:///metasent-data/metasent.db`` or
            ``postgresql+psycopg://user:pass@host/metasent``.
        device (`str`, defaults to ``"cpu"``): where loaded tensors are placed.
        cache_size (`int`, defaults to 256): domains whose tensors stay in memory.
        migrate (`bool`, defaults to `True`): bring the schema to the newest revision first
            (:func:`metasent.app.migrations.upgrade`); with `False` the database must be there
            already (``metasent db upgrade``).

    Raises:
        RuntimeError: with ``migrate=False``, when the database is not at the newest revision.
    """

    def __init__(self, url: str, device: str = "cpu", cache_size: int = 256, migrate: bool = True) -> None:
        self.engine = make_engine(url)
        database = self.engine.url.database
        if self.engine.dialect.name == "sqlite" and database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        self.device = device
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._cache = _ParamsCache(cache_size)
        if migrate:
            migrations.upgrade(self.engine)
        else:
            self._check_revision()

    def _check_revision(self) -> None:
        with self.engine.connect() as connection:
            revision = migrations.current(connection)
        if revision != migrations.head():
            raise RuntimeError(
                f"the database is at schema revision {revision}, not {migrations.head()}: run `metasent db upgrade` "
                "(or start the server with METASENT_MIGRATE_ON_START=true)"
            )

    @property
    def location(self) -> str:
        """The database URL, without its password."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    @_translated
    def ping(self) -> None:
        """Check that the database takes writes: a write transaction (``BEGIN IMMEDIATE`` on
        SQLite) with a write that matches no row, rolled back. A read-only database (file
        permissions, a PostgreSQL standby) fails it, not only an unreachable one.

        Raises:
            StoreUnavailableError: when the database is unreachable or read-only.
        """
        with self._sessions() as session:
            session.connection(execution_options={"sqlite_immediate": True})
            session.execute(delete_rows(IdempotencyRow).where(false()))
            session.rollback()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A write transaction, committed as one (SQLAlchemy ``Session.begin``)."""
        with self._sessions() as session, session.begin():
            session.connection(execution_options={"sqlite_immediate": True})
            yield session

    @_translated
    def __len__(self) -> int:
        """Domains of every tenant."""
        with self._sessions() as session:
            return int(session.scalar(select(func.count()).select_from(DomainRow)) or 0)

    @_translated
    def count(self, tenant: str) -> int:
        """Domains of ``tenant``."""
        with self._sessions() as session:
            return self._count(session, tenant)

    @staticmethod
    def _count(session: Session, tenant: str) -> int:
        query = select(func.count()).select_from(DomainRow).where(DomainRow.tenant == tenant)
        return int(session.scalar(query) or 0)

    @_translated
    def add(
        self,
        tenant: str,
        name: str,
        write: DomainWrite,
        *,
        limit: int | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> StoredDomain:
        """Store a new domain (version 1) in one transaction, under the tenant's write lock (so
        concurrent creates, on any replica, never pass ``limit``).

        Args:
            tenant (`str`): owner.
            name (`str`): the domain's name.
            write (`DomainWrite`): its labels, adapted tensors, figures, support set and checkpoint hash.
            limit (`int`, *optional*): most domains ``tenant`` may keep.
            idempotency (`IdempotencyKey`, *optional*): the request's key; its answer (the
                domain's :meth:`StoredDomain.public`) is stored in the same transaction.

        Returns:
            `StoredDomain`: the stored domain.

        Raises:
            DomainLimitError: when ``tenant`` already keeps ``limit`` domains.
            IdempotentReplayError: when the key's write is stored already (nothing written).
            IdempotencyMismatchError: when the key was used with another request.
        """
        now = _now()
        checkpoint_hash = write.checkpoint_hash
        row = DomainRow(
            domain_id=uuid.uuid4().hex,
            tenant=tenant,
            name=name,
            labels=list(write.labels),
            examples=[list(ex) for ex in write.examples],
            num_examples=len(write.examples),
            version=1,
            checkpoint_hash=checkpoint_hash,
            adaptation=dict(write.info),
            params=_serialise(write.tensors),
            created_at=now,
            updated_at=now,
        )
        stored = _domain(row, with_examples=True)
        with self._idempotent_write(tenant, idempotency, stored.public(checkpoint_hash)) as session:
            if limit is not None and self._count(session, tenant) >= limit:
                raise DomainLimitError(f"{tenant} keeps {limit} domains")
            session.add(row)
        self._cache.put(row.domain_id, (1, checkpoint_hash), write.tensors)
        return stored

    @contextmanager
    def _idempotent_write(
        self, tenant: str, idempotency: IdempotencyKey | None, body: dict[str, Any]
    ) -> Iterator[Session]:
        """A write transaction under ``tenant``'s lock that also stores ``idempotency``'s answer
        ``body`` (first, so a key stored meanwhile by a concurrent request or another replica
        makes this write a replay, never a second write)."""
        try:
            with self._write() as session:
                self._lock_tenant(session, tenant)
                if idempotency is not None:
                    self._claim(session, tenant, idempotency, body)
                yield session
        except IntegrityError:  # the same key inserted concurrently (a store without the lock)
            if idempotency is None:
                raise
            answer = self.answer(tenant, idempotency)
            if answer is None:
                raise
            raise IdempotentReplayError(*answer) from None

    @staticmethod
    def _lock_tenant(session: Session, tenant: str) -> None:
        """Serialise the tenant's writes until the transaction ends: a PostgreSQL advisory lock
        (every replica); SQLite's ``BEGIN IMMEDIATE`` holds the database's write lock already."""
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(1, hashtext(:tenant))"), {"tenant": tenant})

    def _claim(self, session: Session, tenant: str, idempotency: IdempotencyKey, body: dict[str, Any]) -> None:
        """Insert the key's row (expired keys of ``tenant`` are dropped first).

        Raises:
            IdempotentReplayError: when the key's answer is stored already.
            IdempotencyMismatchError: when the key was used with another request.
        """
        now = time.time()
        expired = IdempotencyRow.expires_at <= now
        session.execute(delete_rows(IdempotencyRow).where(IdempotencyRow.tenant == tenant, expired))
        existing = session.get(IdempotencyRow, (tenant, idempotency.key))
        if existing is not None:
            raise self._replay(existing, idempotency)
        session.add(
            IdempotencyRow(
                tenant=tenant,
                key=idempotency.key,
                request_hash=idempotency.request_hash,
                status=idempotency.status,
                body=body,
                created_at=now,
                expires_at=now + idempotency.ttl_s,
            )
        )
        session.flush()

    @staticmethod
    def _replay(row: IdempotencyRow, idempotency: IdempotencyKey) -> Exception:
        if row.request_hash != idempotency.request_hash:
            return IdempotencyMismatchError(idempotency.key)
        return IdempotentReplayError(row.status, dict(row.body))

    @_translated
    def answer(self, tenant: str, idempotency: IdempotencyKey) -> tuple[int, dict[str, Any]] | None:
        """The stored answer ``(status, body)`` of ``tenant``'s key, or ``None`` (never used, or
        expired).

        Raises:
            IdempotencyMismatchError: when the key was used with another request.
        """
        with self._sessions() as session:
            row = session.get(IdempotencyRow, (tenant, idempotency.key))
            if row is None or row.expires_at <= time.time():
                return None
            replay = self._replay(row, idempotency)
        if isinstance(replay, IdempotentReplayError):
            return replay.status, replay.body
        raise replay

    @_translated
    def get(self, tenant: str, domain_id: str, with_examples: bool = False) -> StoredDomain | None:
        """``tenant``'s domain ``domain_id``, or ``None`` (also when another tenant owns it)."""
        with self._sessions() as session:
            row = session.get(DomainRow, domain_id)
            if row is None or row.tenant != tenant:
                return None
            return _domain(row, with_examples)

    @_translated
    def list(self, tenant: str) -> list[StoredDomain]:
        """``tenant``'s domains, oldest first."""
        with self._sessions() as session:
            query = select(DomainRow).where(DomainRow.tenant == tenant).order_by(DomainRow.created_at)
            return [_domain(row) for row in session.scalars(query)]

    @_translated
    def stale(self, checkpoint_hash: str) -> DomainKeys:
        """``(tenant, domain_id)`` of every domain adapted with another checkpoint."""
        with self._sessions() as session:
            query = select(DomainRow.tenant, DomainRow.domain_id).where(DomainRow.checkpoint_hash != checkpoint_hash)
            return [(tenant, domain_id) for tenant, domain_id in session.execute(query)]

    @_translated
    def delete(self, tenant: str, domain_id: str) -> bool:
        """Forget ``tenant``'s domain; ``False`` when there is none."""
        self._cache.drop(domain_id)
        with self._write() as session:
            row = session.get(DomainRow, domain_id)
            if row is None or row.tenant != tenant:
                return False
            session.delete(row)
        return True

    @_translated
    def replace(
        self,
        domain: StoredDomain,
        write: DomainWrite,
        *,
        bump_version: bool = True,
        idempotency: IdempotencyKey | None = None,
    ) -> StoredDomain:
        """Write a new adaptation of ``domain`` if it is still at ``domain.version``.

        Args:
            domain (`StoredDomain`): the domain as read before adapting.
            write (`DomainWrite`): the new adaptation: labels, tensors, figures, the (new) support
                set and the checkpoint hash.
            bump_version (`bool`, defaults to `True`): add 1 to the version (a new support set);
                `False` for a re-adaptation of the same support set with a new checkpoint.
            idempotency (`IdempotencyKey`, *optional*): the request's key; its answer is stored
                in the same transaction (only when the write succeeds).

        Returns:
            `StoredDomain`: the domain as now stored.

        Raises:
            VersionConflictError: when another write changed the domain in the meantime.
            DomainNotFoundError: when the domain was deleted in the meantime.
            IdempotentReplayError: when the key's write is stored already (nothing written).
            IdempotencyMismatchError: when the key was used with another request.
        """
        labels, examples, checkpoint_hash = write.labels, write.examples, write.checkpoint_hash
        version = domain.version + (1 if bump_version else 0)
        values = {
            "labels": list(labels),
            "examples": [list(ex) for ex in examples],
            "num_examples": len(examples),
            "version": version,
            "checkpoint_hash": checkpoint_hash,
            "adaptation": dict(write.info),
            "params": _serialise(write.tensors),
            "updated_at": _now(),
        }
        query = (
            update(DomainRow)
            .where(DomainRow.domain_id == domain.domain_id, DomainRow.tenant == domain.tenant)
            .where(DomainRow.version == domain.version)
            .values(**values)
        )
        if not bump_version:  # a re-adaptation only replaces the adaptation it was based on
            query = query.where(DomainRow.checkpoint_hash == domain.checkpoint_hash)
        stored = replace_fields(
            domain,
            labels=tuple(labels),
            num_examples=len(examples),
            version=version,
            checkpoint_hash=checkpoint_hash,
            adaptation=dict(write.info),
            updated_at=str(values["updated_at"]),
            examples=list(examples),
        )
        with self._idempotent_write(domain.tenant, idempotency, stored.public(checkpoint_hash)) as session:
            if session.execute(query).rowcount != 1:  # type: ignore[attr-defined]
                current = session.get(DomainRow, domain.domain_id)
                if current is None or current.tenant != domain.tenant:
                    raise DomainNotFoundError(domain.domain_id)
                raise VersionConflictError(current.version)
        self._cache.put(domain.domain_id, (version, checkpoint_hash), write.tensors)
        return stored

    @_translated
    def params(self, domain: StoredDomain) -> dict[str, Tensor]:
        """The adapted tensors of ``domain`` (as read), from the cache or the database.

        Raises:
            DomainNotFoundError: when the domain is gone or changed since ``domain`` was read.
        """
        key = (domain.version, domain.checkpoint_hash)
        cached = self._cache.get(domain.domain_id, key)
        if cached is not None:
            return cached
        with self._sessions() as session:
            query = select(DomainRow.params).where(
                DomainRow.domain_id == domain.domain_id,
                DomainRow.version == domain.version,
                DomainRow.checkpoint_hash == domain.checkpoint_hash,
            )
            blob = session.scalar(query)
        if blob is None:
            raise DomainNotFoundError(domain.domain_id)
        params = {name: t.to(self.device) for name, t in load_tensors(blob).items()}
        self._cache.put(domain.domain_id, key, params)
        return params


__all__ = [
    "DomainLimitError",
    "DomainNotFoundError",
    "DomainRow",
    "DomainWrite",
    "IdempotencyKey",
    "IdempotencyMismatchError",
    "IdempotencyRow",
    "IdempotentReplayError",
    "SqlDomainStore",
    "StoreUnavailableError",
    "StoredDomain",
    "VersionConflictError",
    "make_engine",
]
