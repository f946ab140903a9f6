"""Alembic environment: runs migrations on a plain synchronous connection."""

from alembic import context
from sqlalchemy import create_engine, pool, text

from backfill.store.tables import metadata

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "sqlalchemy.url must be set by backfill.store.engine.alembic_config"
engine = create_engine(url, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Replicas and workers that start together migrate one at a time: the lock is taken before Alembic
            # reads the schema's version, so a process that waited finds it at head and does nothing. (SQLite:
            # backfill.store.engine.migrate holds a file lock instead.)
            connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('backfill.migrate'))"))
        context.run_migrations()
engine.dispose()
