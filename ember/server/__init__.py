"""The OpenAI-compatible HTTP server (FastAPI): `build_app(engine, args)` in api_server."""
