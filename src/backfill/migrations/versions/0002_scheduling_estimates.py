"""scheduling estimates: expected output per line and batch, prompt-prefix keys

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 00:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("est_output_tokens", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("eta_at", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("schedule_state", sa.String(length=16), nullable=True))
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_output_tokens", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("prefix_group", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.create_index(
            batch_op.f("ix_requests_batch_id_state_prefix_group_line_no"),
            ["batch_id", "state", "prefix_group", "line_no"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_requests_batch_id_state_prefix_group_line_no"))
        batch_op.drop_column("prefix_group")
        batch_op.drop_column("max_output_tokens")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("schedule_state")
        batch_op.drop_column("eta_at")
        batch_op.drop_column("est_output_tokens")
