"""Revision 0001: the ``domains`` table as ``create_all`` wrote it before migrations existed.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "domains",
        sa.Column("domain_id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("examples", sa.JSON(), nullable=True),  # nullable as create_all wrote it (a deferred column)
        sa.Column("num_examples", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("checkpoint_hash", sa.String(64), nullable=False),
        sa.Column("adaptation", sa.JSON(), nullable=False),
        sa.Column("params", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )
    op.create_index("ix_domains_tenant", "domains", ["tenant"])


def downgrade() -> None:
    op.drop_index("ix_domains_tenant", table_name="domains")
    op.drop_table("domains")
