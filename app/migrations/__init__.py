"""The domain store's schema migrations (Alembic), shipped inside the package.

``env.py`` and ``versions/`` live next to this module, so the migrations run the same from a
checkout, a wheel and the Docker image: :func:`upgrade` builds Alembic's ``Config``
programmatically with ``script_location`` pointing here. Revision ``0001`` is the schema that
``create_all`` wrote before migrations existed; a database without an ``alembic_version`` table
but with a ``domains`` table is recognised as revision ``0001`` (stamped) and then upgraded.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

logger = logging.getLogger(__name__)
LEGACY_REVISION = "0001"  # the schema of create_all, before Alembic
_LOCK_ID = 0x6D657461  # pg_advisory_xact_lock key: one migrator at a time across replicas


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).resolve().parent))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision these migrations know."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).resolve().parent))
    revision = ScriptDirectory.from_config(config).get_current_head()
    assert revision is not None
    return revision


def current(connection: Connection) -> str | None:
    """The database's revision (``None``: no ``alembic_version`` table, or an empty one)."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the database to ``revision`` in one transaction, one migrator at a time.

    PostgreSQL serialises concurrent migrators (replicas starting together) with an advisory
    transaction lock; SQLite with the write lock of ``BEGIN IMMEDIATE`` (see
    :func:`metasent.app.store.make_engine`). A database written by ``create_all`` before
    migrations existed (a ``domains`` table, no ``alembic_version``) is stamped ``0001`` first.

    Args:
        engine (`Engine`): the store's engine.
        revision (`str`, defaults to ``"head"``): the target revision.

    Returns:
        `tuple[str | None, str | None]`: the revision before and after.
    """
    with engine.connect().execution_options(sqlite_immediate=True) as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        before = current(connection)
        config = _config(connection)
        if before is None and inspect(connection).has_table("domains"):
            logger.info("database without migrations: stamping it as revision %s (create_all schema)", LEGACY_REVISION)
            command.stamp(config, LEGACY_REVISION)
            before = LEGACY_REVISION
        command.upgrade(config, revision)
        after = current(connection)
    if before != after:
        logger.info("database schema upgraded: %s -> %s", before, after)
    return before, after


__all__ = ["LEGACY_REVISION", "current", "head", "upgrade"]
