"""worker endpoint reports: what each dispatcher process knows of each endpoint (harvest ceiling, the engine's
queue, up or down, the TTFT baseline), so that the dashboard of an API replica draws them with the workers elsewhere

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("worker_backends") as batch:
        batch.add_column(sa.Column("ceiling", sa.Float(), nullable=True))
        batch.add_column(sa.Column("engine_waiting", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("up", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("ttft_baseline_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("worker_backends") as batch:
        for column in ("ttft_baseline_s", "up", "engine_waiting", "ceiling"):
            batch.drop_column(column)
