"""The HTTP adapter: FastAPI app, routes, auth and the error envelope."""
