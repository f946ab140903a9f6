"""Thin routes: parse, call a use case, render."""
