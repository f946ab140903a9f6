"""anthropic message batches: which API a batch belongs to, and when its results were archived

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("api", sa.String(length=16), server_default="openai", nullable=False))
        batch_op.add_column(sa.Column("archived_at", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("archived_at")
        batch_op.drop_column("api")
