"""`gateway` command line: serve, demo-model, check-config, plan, usage, quantize."""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from gateway.core.worker import WORKERS_ENV
from gateway.logs import log_config
from gateway.settings import ConfigError, load_settings


def _serve(args: argparse.Namespace) -> int:

    from gateway.http.server import HTTP_PROTOCOL

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1 and settings.shared_state is None and any(
            m.rollout is not None for m in settings.models):  # each worker would move it alone
        print(f"error: {args.config}: models[].rollout: with --workers above 1 a rollout needs "
              "shared_state (every worker must read the same stage)", file=sys.stderr)
        return 2
    os.environ["MEMGATE_TORCH_THREADS"] = str(settings.server.torch_threads)  # read by engines
    # tokenizers' own thread pool would run a large prompt's encoding at normal priority,
    # beside the engine: it runs on the calling thread, the CPU pool's (gateway/core/cpu.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ[WORKERS_ENV] = str(args.workers)  # the process count until Redis tells one
    from backends.local.placement import prepare_process

    prepare_process()  # before torch loads: one thread for every thread but the engines'
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    server_cfg = settings.server
    logging_config = log_config(server_cfg.log_format)  # the gateway's and uvicorn's, per worker
    logging.config.dictConfig(logging_config)
    common: dict[str, Any] = {"host": host, "port": port, "log_level": "info",
              "timeout_graceful_shutdown": max(1, round(server_cfg.shutdown_grace_s)),
              "timeout_keep_alive": server_cfg.keep_alive_timeout_s,
              "log_config": logging_config}
    # uvicorn's access log: one INFO line per request, off unless asked (docs/performance.md "Performance")
    common["access_log"] = args.access_log
    common["http"] = HTTP_PROTOCOL  # bounded request heads; the generation fast path
    if args.workers > 1:
        from gateway.reload import SUPERVISOR_ENV

        os.environ["GATEWAY_CONFIG"] = str(Path(args.config).resolve())
        os.environ[SUPERVISOR_ENV] = str(os.getpid())  # /admin/reload asks it to reload all
        _multiprocess_metrics_dir()
        from gateway.workers import Supervisor

        return Supervisor(str(Path(args.config).resolve()), args.workers, common).run()
    else:
        from gateway.app import create_app
        from gateway.http.server import DrainingServer, app_config
        from gateway.reload import arm_sighup

        arm_sighup()  # a SIGHUP while the backends load is a reload once started, not an exit
        app = create_app(settings)
        config = app_config(app, **common)
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
    if args.size == "big":
        from backends.local.commands.big_model import write_big

        write_big(Path(args.dir), force=args.force)
        return 0
    if args.size == "mid":
        from backends.local.commands.mid_model import write_mid

        write_mid(Path(args.dir), force=args.force)
        return 0
    from backends.local.commands.demo import write_demo

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


def _config_schema(args: argparse.Namespace) -> int:
    from gateway.config_schema import reference_markdown, schema_text

    sys.stdout.write(reference_markdown() if args.markdown else schema_text())
    return 0


def _plan(args: argparse.Namespace) -> int:
    from backends.hf.safetensors import SafetensorsError
    from backends.local.memory_plan import plan_for_config, plan_formats

    try:
        settings = load_settings(args.config)
        for name, spec in settings.backends.items():
            if spec.kind != "local":
                print(f"== {name} ({spec.kind}): no local memory plan")
                continue
            print(f"== {name} (local)\n{plan_for_config(spec.config).render()}")
            print(plan_formats(spec.config))
    except (ConfigError, SafetensorsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _usage(args: argparse.Namespace) -> int:
    from gateway.usage_report import UsageError, report

    try:
        print(report(args.paths, args.by, args.since, as_json=args.json, period=args.period))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from backends.local.commands.quantize import quantize_checkpoint
    from backends.local.quantize import QuantizeError

    try:
        out = quantize_checkpoint(args.src, args.dst)
    except (QuantizeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote int8 checkpoint to {out}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from backends.local.commands.prune import PruneError, prune_checkpoint

    try:
        record = prune_checkpoint(args.src, args.dst, args.drop_layers, args.ffn_keep,
                                  args.calibration, adapters=args.adapters)
    except (PruneError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {record['name']} to {args.dst}")
    return 0


def _rollout_report(args: argparse.Namespace) -> int:
    from gateway.rollout.report import ReportError, fetch_report

    try:
        print(fetch_report(args.url, args.model, os.environ.get(args.admin_key_env, "")))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    demo.add_argument("--size", choices=("demo", "mid", "big"), default="demo",
                      help="mid: a random 24.6M-parameter Llama with 8 adapters, for benchmarks; "
                      "big: a random 360M Qwen2-layout one in bfloat16")
    demo.set_defaults(func=_demo_model)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config")
    check.set_defaults(func=_check_config)

    plan = sub.add_parser("plan", help="print the memory plan without loading weights")
    plan.add_argument("--config", required=True, help="YAML config file")
    plan.set_defaults(func=_plan)

    usage = sub.add_parser("usage", help="sum the usage records of server.usage_log")
    usage.add_argument("paths", nargs="+", metavar="PATH",
                       help="usage log files or directories (a worker's and rotated files too)")
    usage.add_argument("--by", default="tenant",
                       help="group by these fields, comma-separated (tenant, model, "
                            "served_model, adapter, backend, user, status, worker, day, hour)")
    usage.add_argument("--since", default=None, help="only records of the last 1h, 30m, 7d...")
    usage.add_argument("--period", choices=("day", "week", "month"), default=None,
                       help="only the current calendar period (UTC), as limits.budget counts it")
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    usage.set_defaults(func=_usage)

    quant = sub.add_parser("quantize", help="write an int8 weight-only copy of a checkpoint")
    quant.add_argument("src")
    quant.add_argument("dst")
    quant.set_defaults(func=_quantize)

    prune = sub.add_parser("prune", help="write a smaller checkpoint: fewer layers, narrower FFN")
    prune.add_argument("src")
    prune.add_argument("dst")
    prune.add_argument("--drop-layers", type=int, default=0,
                       help="how many layers to drop (the least important, as measured)")
    prune.add_argument("--ffn-keep", type=float, default=1.0,
                       help="share of FFN channels each layer keeps (the most important)")
    prune.add_argument("--calibration", type=Path, default=None,
                       help="text to measure importance on (default: the model's own samples)")
    prune.add_argument("--adapters", action="store_true",
                       help="also write SRC's attention-only adapters remapped to the kept layers")
    prune.set_defaults(func=_prune)

    rollout = sub.add_parser("rollout", help="a rollout's state and comparison")
    rollout_sub = rollout.add_subparsers(dest="rollout_command", required=True)
    report = rollout_sub.add_parser("report", help="print a rollout's comparison table")
    report.add_argument("model")
    report.add_argument("--url", default="http://127.0.0.1:8000",
                        help="the gateway's base URL (its GET /admin/rollouts)")
    report.add_argument("--admin-key-env", default="GATEWAY_ADMIN_KEY",
                        help="the environment variable holding the admin API key")
    report.set_defaults(func=_rollout_report)

    schema = sub.add_parser("config-schema", help="print the config file's JSON Schema")
    schema.add_argument("--markdown", action="store_true",
                        help="print the configuration reference page instead")
    schema.set_defaults(func=_config_schema)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
