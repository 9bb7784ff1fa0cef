"""Gateway hot-path overhead, side by side: direct upstream, memgate, a pass-through floor
proxy and (with --peer litellm) the LiteLLM proxy. Run: python -m bench.overhead [--quick]."""
