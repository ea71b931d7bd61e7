"""Schema migrations (Alembic, inside the package): a database written by the code before
migrations (``create_all``, no ``alembic_version``) is recognised as revision 0001 and upgraded to
head with every domain intact, by the store at start-up and by ``metasent db upgrade``; the
models match the migrations; on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from safetensors.torch import save as save_tensors
from sqlalchemy import insert, inspect
from typer.testing import CliRunner

from metasent.app import migrations
from metasent.app.store import Base, DomainRow, DomainWrite, SqlDomainStore, make_engine
from metasent.cli import cli


def _legacy_database(url: str) -> list[dict[str, Any]]:
    """The schema and rows the code before migrations wrote (``create_all`` of ``domains``): three
    domains of two tenants, one at version 3; returns the rows written."""
    engine = make_engine(url)
    rows = []
    for i, (tenant, version) in enumerate([("t1", 1), ("t1", 3), ("t2", 1)]):
        tensors = {"head.weight": torch.full((2, 3), float(i)), "head.bias": torch.arange(2.0)}
        rows.append(
            {
                "domain_id": uuid.uuid4().hex,
                "tenant": tenant,
                "name": f"domain {i}",
                "labels": ["good", "bad"],
                "examples": [[f"text {i} great", "good"], [f"text {i} awful", "bad"]],
                "num_examples": 2,
                "version": version,
                "checkpoint_hash": "c" * 64,
                "adaptation": {"steps": 3, "seconds": 0.1, "device": "cpu"},
                "params": save_tensors(tensors),
                "created_at": f"2025-01-0{i + 1}T00:00:00+00:00",
                "updated_at": f"2025-01-0{i + 1}T00:00:00+00:00",
            }
        )
    with engine.begin() as connection:
        DomainRow.__table__.create(connection)  # what Base.metadata.create_all wrote: one table
        connection.execute(insert(DomainRow.__table__), rows)
    engine.dispose()
    return rows


def _assert_intact(store: SqlDomainStore, rows: list[dict[str, Any]]) -> None:
    assert len(store) == len(rows)
    for row in rows:
        domain = store.get(row["tenant"], row["domain_id"], with_examples=True)
        assert domain is not None
        assert (domain.name, list(domain.labels), domain.version) == (row["name"], row["labels"], row["version"])
        assert [list(e) for e in domain.examples or []] == row["examples"]
        assert (domain.created_at, domain.adaptation) == (row["created_at"], row["adaptation"])
        tensors = store.params(domain)
        assert float(tensors["head.weight"][0, 0]) == float(rows.index(row))
        assert torch.equal(tensors["head.bias"], torch.arange(2.0))


def _revision(store: SqlDomainStore) -> str | None:
    with store.engine.connect() as connection:
        return migrations.current(connection)


def test_store_upgrades_a_database_written_before_migrations(database_url: str) -> None:
    rows = _legacy_database(database_url)
    with pytest.raises(RuntimeError, match="metasent db upgrade"):  # the server refuses an old schema
        SqlDomainStore(database_url, migrate=False)
    store = SqlDomainStore(database_url)  # stamps 0001, upgrades to head
    assert _revision(store) == migrations.head() != migrations.LEGACY_REVISION
    _assert_intact(store, rows)
    write = DomainWrite(("a", "b"), {"head.bias": torch.zeros(2)}, {}, [("x", "a"), ("y", "b")], "h")
    added = store.add("t1", "new", write)
    assert store.count("t1") == 3 and added.version == 1
    assert store.delete("t1", added.domain_id)
    store.close()
    reopened = SqlDomainStore(database_url, migrate=False)  # at head: opens without migrating
    _assert_intact(reopened, rows)
    reopened.close()


def test_db_upgrade_command(database_url: str) -> None:
    rows = _legacy_database(database_url)
    runner = CliRunner()
    result = runner.invoke(cli, ["db", "upgrade", "--database-url", database_url])
    assert result.exit_code == 0, result.output
    assert f"schema revision {migrations.LEGACY_REVISION} -> {migrations.head()}" in result.output
    again = runner.invoke(cli, ["db", "upgrade", "--database-url", database_url])
    assert again.exit_code == 0 and f"{migrations.head()} -> {migrations.head()}" in again.output
    store = SqlDomainStore(database_url, migrate=False)
    _assert_intact(store, rows)
    store.close()


def test_db_upgrade_creates_an_empty_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'metasent.db'}"
    result = CliRunner().invoke(cli, ["db", "upgrade", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert f"schema revision None -> {migrations.head()}" in result.output


def test_models_match_the_migrations(database_url: str) -> None:
    store = SqlDomainStore(database_url)
    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        assert set(inspect(connection).get_table_names()) == {*Base.metadata.tables, "alembic_version"}
    store.close()


def test_replicas_starting_together_migrate_once(database_url: str) -> None:
    """Several stores opening one new database at once: each waits for the one migrator."""
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            SqlDomainStore(database_url).close()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    store = SqlDomainStore(database_url, migrate=False)
    assert _revision(store) == migrations.head() != migrations.LEGACY_REVISION
    store.close()


def test_the_wal_switch_waits_out_a_locked_new_database() -> None:
    """SQLite can refuse ``journal_mode=WAL`` at once while another connection switches the same new
    file: the store retries that refusal, and no other error."""
    import sqlite3

    from metasent.app.store import _switch_to_wal

    class Cursor:
        def __init__(self, failures: list[str]) -> None:
            self.failures, self.calls = failures, 0

        def execute(self, sql: str) -> None:
            self.calls += 1
            if self.failures:
                raise sqlite3.OperationalError(self.failures.pop(0))

    locked = Cursor(["database is locked", "database is locked"])
    _switch_to_wal(locked)
    assert locked.calls == 3
    broken = Cursor(["disk I/O error"])
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        _switch_to_wal(broken)
    assert broken.calls == 1
