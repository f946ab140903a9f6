"""Use cases: what the HTTP routes and the CLI call. They speak domain objects and `errors.*`."""
