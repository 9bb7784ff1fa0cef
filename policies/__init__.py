"""Policy modules: each request passes them in the configured order before dispatch."""
