"""Test scaffolding shared by the suites."""
