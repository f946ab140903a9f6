"""proxy ttft: the interactive time-to-first-token samples each API replica's proxy measured per backend, so that
workers in other processes harvest on them as a worker in the proxy's own process does

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 16:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "proxy_ttft",
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("backend", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("owner", "backend", name=op.f("pk_proxy_ttft")),
    )


def downgrade() -> None:
    op.drop_table("proxy_ttft")
