"""Offline tools behind `gateway` subcommands (the mid-size bench model, pruning). Installed with
the package, imported only by the CLI, never by serving code."""
