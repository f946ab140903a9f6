"""worker rates and batch tokens: what each dispatcher process serves per model (for completion estimates) and
has sent to each harvested backend (for the harvest controllers)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "worker_rates",
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("rate", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("owner", "model", name=op.f("pk_worker_rates")),
    )
    op.create_table(
        "worker_backends",
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("backend", sa.Text(), nullable=False),
        sa.Column("batch_tokens", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("owner", "backend", name=op.f("pk_worker_backends")),
    )


def downgrade() -> None:
    op.drop_table("worker_backends")
    op.drop_table("worker_rates")
