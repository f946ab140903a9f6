"""Every module imports: no checker-unreachable code, no lazy import of something that is not there."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import backfill
from backfill.testing import InMemoryStore

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(backfill.__path__, prefix="backfill.")
    if not name.startswith("backfill.migrations")  # Alembic scripts run inside Alembic, not on import
)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name: str) -> None:
    assert importlib.import_module(name).__name__ == name


def test_pure_layers_import_no_frameworks() -> None:
    """domain/ and policy/ never import FastAPI, SQLAlchemy or httpx (STYLE.md)."""
    forbidden = ("fastapi", "sqlalchemy", "httpx", "starlette")
    for name in MODULES:
        if name.startswith(("backfill.domain", "backfill.policy")):
            source = importlib.import_module(name).__file__
            assert source is not None
            text = Path(source).read_text()
            for framework in forbidden:
                assert f"import {framework}" not in text, f"{name} imports {framework}"
                assert f"from {framework}" not in text, f"{name} imports {framework}"


def test_the_in_memory_store_is_public_and_pure() -> None:
    """`from backfill.testing import InMemoryStore` works, and the fake needs no database library."""
    assert "backfill.testing.memory_store" == InMemoryStore.__module__
    fake = [name for name in MODULES if name.startswith("backfill.testing.memory_")]
    expected = [
        "memory_blobs",
        "memory_idempotency",
        "memory_lines",
        "memory_store",
        "memory_tables",
        "memory_tenants",
        "memory_usage",
        "memory_webhooks",
        "memory_workers",
    ]
    assert expected == [name.split(".")[-1] for name in fake]
    for name in fake:
        source = importlib.import_module(name).__file__
        assert source is not None
        text = Path(source).read_text()
        assert "import sqlalchemy" not in text, f"{name} imports sqlalchemy"
        assert "from sqlalchemy" not in text, f"{name} imports sqlalchemy"
