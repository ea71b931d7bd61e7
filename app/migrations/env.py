"""Alembic environment: runs on the connection :func:`metasent.app.migrations.upgrade` passes in
``config.attributes["connection"]`` (inside its transaction); no ``alembic.ini``, no URL here."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
