"""Blob stores: where file bytes live (input, output and error files)."""
