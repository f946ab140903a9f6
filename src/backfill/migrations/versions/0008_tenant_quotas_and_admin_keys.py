"""tenants: batch quotas; api_keys: admin flag and last use

Revision ID: 0008
Revises: 0007
Create Date: 2027-01-20 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_QUOTAS = ("max_batches_in_progress", "batch_creates_per_minute", "batch_tokens_per_minute")


def upgrade() -> None:
    with op.batch_alter_table("tenants") as tenants:
        for name in _QUOTAS:
            tenants.add_column(sa.Column(name, sa.BigInteger(), nullable=True))
    with op.batch_alter_table("api_keys") as keys:
        keys.add_column(sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.false()))
        keys.add_column(sa.Column("last_used_at", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as keys:
        keys.drop_column("last_used_at")
        keys.drop_column("is_admin")
    with op.batch_alter_table("tenants") as tenants:
        for name in reversed(_QUOTAS):
            tenants.drop_column(name)
