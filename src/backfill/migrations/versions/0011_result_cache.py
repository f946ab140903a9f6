"""result_cache: answers of deterministic lines kept across batches (docs/evals.md); where a line's answer came from

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 12:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TOKENS = ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens")


def upgrade() -> None:
    op.create_table(
        "result_cache",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("result_id", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in _TOKENS),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("used_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "key", name="pk_result_cache"),
    )
    op.create_index("ix_result_cache_tenant_id_used_at", "result_cache", ["tenant_id", "used_at"])
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("cached_from", sa.String(64), nullable=True))
    with op.batch_alter_table("usage_minutes") as batch:
        batch.add_column(sa.Column("result_cache_hits", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("result_cache_tokens", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage_minutes") as batch:
        batch.drop_column("result_cache_tokens")
        batch.drop_column("result_cache_hits")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("cached_from")
    op.drop_index("ix_result_cache_tenant_id_used_at", "result_cache")
    op.drop_table("result_cache")
