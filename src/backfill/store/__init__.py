"""Persistence: SQLAlchemy tables and the SqlStore (every SQL statement lives here, named)."""
