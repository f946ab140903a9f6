"""Test doubles that ship with backfill: fakes for its ports and a scriptable fake upstream server."""
