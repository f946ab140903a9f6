"""open line indexes: the indexes on (batch_id, state, ...) become partial indexes over the queued lines (for the
lease) and the open ones (how far a batch has got), so that leasing and finishing a line rewrite fewer index
entries (BENCHMARKS.md, "Fewer index entries a line")

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_QUEUED = sa.text("state = 'queued'")
_OPEN = sa.text("state IN ('queued', 'leased')")


def upgrade() -> None:
    op.create_index(
        op.f("ix_requests_batch_id_prefix_group_line_no"),
        "requests",
        ["batch_id", "prefix_group", "line_no"],
        sqlite_where=_QUEUED,
        postgresql_where=_QUEUED,
    )
    op.create_index(
        op.f("ix_requests_batch_id_line_no"),
        "requests",
        ["batch_id", "line_no"],
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    )
    op.drop_index(op.f("ix_requests_batch_id_state_prefix_group_line_no"), table_name="requests")
    op.drop_index(op.f("ix_requests_batch_id_state_line_no"), table_name="requests")


def downgrade() -> None:
    op.create_index(op.f("ix_requests_batch_id_state_line_no"), "requests", ["batch_id", "state", "line_no"])
    op.create_index(
        op.f("ix_requests_batch_id_state_prefix_group_line_no"),
        "requests",
        ["batch_id", "state", "prefix_group", "line_no"],
    )
    op.drop_index(op.f("ix_requests_batch_id_line_no"), table_name="requests")
    op.drop_index(op.f("ix_requests_batch_id_prefix_group_line_no"), table_name="requests")
