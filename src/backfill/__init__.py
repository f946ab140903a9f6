"""backfill: a self-hosted Batch API for LLM inference."""

__version__ = "0.1.0"
