"""Backends: where a line's request actually runs."""
