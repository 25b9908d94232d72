"""Route handlers; each takes the Starlette request and the shared ServerState."""
