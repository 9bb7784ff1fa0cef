"""HTTP for `gateway serve`: the connection protocol (bounded heads, timeouts, refusals), the
fast writer the generation routes are answered through on it, the ASGI writer for every
other way in, and the uvicorn server that drains at SIGTERM."""
