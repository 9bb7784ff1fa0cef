"""`gateway` command line: serve, demo-model, check-config."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from gateway.core.worker import WORKERS_ENV
from gateway.settings import ConfigError, load_settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.http.server import HTTP_PROTOCOL

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server_cfg = settings.server
    common: dict[str, Any] = {"host": host, "port": port, "log_level": "info",
              "timeout_graceful_shutdown": max(1, round(server_cfg.shutdown_grace_s)),
              "timeout_keep_alive": server_cfg.keep_alive_timeout_s}
    # uvicorn's access log: one INFO line per request, off unless asked (README "Performance")
    common["access_log"] = args.access_log
    common["http"] = HTTP_PROTOCOL  # bounded request heads; the generation fast path
    os.environ[WORKERS_ENV] = str(args.workers)  # the process count until Redis tells one
    if args.workers > 1:
        os.environ["GATEWAY_CONFIG"] = str(Path(args.config).resolve())
        _multiprocess_metrics_dir()
        from gateway.workers import Supervisor

        return Supervisor(str(Path(args.config).resolve()), args.workers, common).run()
    else:
        from gateway.app import create_app
        from gateway.http.server import DrainingServer

        app = create_app(settings)
        config = uvicorn.Config(app, **common)
        server = DrainingServer(config, app.state.gateway.drain)
        server.run_until_signalled()
    return 0


def _multiprocess_metrics_dir() -> None:
    """Before workers start: a fresh directory where each worker writes its metric values, so
    that /metrics on any worker reports all of them (prometheus_client multiprocess mode)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        for old in Path(path).glob("*.db"):
            old.unlink()
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")


def _demo_model(args: argparse.Namespace) -> int:
    from gateway.demo import write_demo

    write_demo(Path(args.dir), steps=args.steps, force=args.force)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: ok ({len(settings.backends)} backends, {len(settings.models)} models, "
          f"{len(settings.tenants)} tenants)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from backends.local.memory_plan import PlanError, plan_for_config

    try:
        settings = load_settings(args.config)
        for name, spec in settings.backends.items():
            if spec.kind != "local":
                print(f"== {name} ({spec.kind}): no local memory plan")
                continue
            print(f"== {name} (local)\n{plan_for_config(spec.config).render()}")
    except (ConfigError, PlanError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from backends.local.quantize import QuantizeError
    from backends.local.tools.quantize import quantize_checkpoint

    try:
        out = quantize_checkpoint(args.src, args.dst)
    except (QuantizeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote int8 checkpoint to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument("--config", required=True, help="YAML config file")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--workers", type=int, default=1, help="worker processes")
    serve.add_argument("--access-log", action="store_true",
                       help="log one line per request (off by default: it costs on the hot path)")
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo-model", help="write the demo checkpoint and tenant adapters")
    demo.add_argument("dir")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the full run)")
    demo.add_argument("--force", action="store_true", help="rewrite even if DIR exists")
    demo.set_defaults(func=_demo_model)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config")
    check.set_defaults(func=_check_config)

    plan = sub.add_parser("plan", help="print the memory plan without loading weights")
    plan.add_argument("--config", required=True, help="YAML config file")
    plan.set_defaults(func=_plan)

    quant = sub.add_parser("quantize", help="write an int8 weight-only copy of a checkpoint")
    quant.add_argument("src")
    quant.add_argument("dst")
    quant.set_defaults(func=_quantize)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
