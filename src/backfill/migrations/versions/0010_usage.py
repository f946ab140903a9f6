"""usage_minutes: tokens per tenant, model, minute and kind (docs/usage.md)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 05:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COUNTS = (
    "requests",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "harvested_tokens",
    "off_peak_tokens",
    "promoted_tokens",
    "dedicated_tokens",
)


def upgrade() -> None:
    op.create_table(
        "usage_minutes",
        sa.Column("start_time", sa.BigInteger(), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in _COUNTS),
        sa.PrimaryKeyConstraint("start_time", "tenant_id", "model", "kind", name="pk_usage_minutes"),
    )


def downgrade() -> None:
    op.drop_table("usage_minutes")
