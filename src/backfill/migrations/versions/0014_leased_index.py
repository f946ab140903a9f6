"""leased index: one partial index over leased lines replaces the indexes on (state, lease_expires_at) and on
lease_owner, so that inserting, leasing and finishing a line rewrite fewer index entries (BENCHMARKS.md,
"Per-line costs cut")

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 23:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LEASED = sa.text("state = 'leased'")


def upgrade() -> None:
    op.create_index(
        op.f("ix_requests_lease_expires_at"),
        "requests",
        ["lease_expires_at"],
        sqlite_where=_LEASED,
        postgresql_where=_LEASED,
    )
    op.drop_index(op.f("ix_requests_state_lease_expires_at"), table_name="requests")
    op.drop_index(op.f("ix_requests_lease_owner"), table_name="requests")


def downgrade() -> None:
    op.create_index(op.f("ix_requests_lease_owner"), "requests", ["lease_owner"])
    op.create_index(op.f("ix_requests_state_lease_expires_at"), "requests", ["state", "lease_expires_at"])
    op.drop_index(op.f("ix_requests_lease_expires_at"), table_name="requests")
