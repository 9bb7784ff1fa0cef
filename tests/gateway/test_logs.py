"""`server.log_format: json`: one JSON object a line, for the gateway's and uvicorn's loggers."""

from __future__ import annotations

import io
import json
import logging
import logging.config

from gateway.logs import JsonFormatter, log_config


def test_a_record_is_one_json_line() -> None:
    formatter = JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("gateway.reload", logging.ERROR, __file__, 1,
                                   "reload %s refused", ("api",), sys.exc_info())
    record.request_id = "r-1"  # an `extra` field
    record.obj = object()  # not a plain value: left out
    line = formatter.format(record)
    assert "\n" not in line  # the traceback too stays on its line (escaped)
    out = json.loads(line)
    assert out["level"] == "error" and out["logger"] == "gateway.reload"
    assert out["message"] == "reload api refused" and out["request_id"] == "r-1"
    assert "ValueError: boom" in out["exception"] and "obj" not in out
    assert out["time"].endswith("Z") and isinstance(out["pid"], int)


def test_log_config_routes_uvicorn_and_gateway_loggers_through_it() -> None:
    stream = io.StringIO()
    cfg = log_config("json")
    cfg["handlers"]["stderr"]["stream"] = stream
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logging.config.dictConfig(cfg)
        logging.getLogger("uvicorn.error").info("Started server process [%d]", 7)
        logging.getLogger("gateway.usage").warning("disk full")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["logger"], x["message"]) for x in lines] == [
        ("uvicorn.error", "Started server process [7]"), ("gateway.usage", "disk full")]
    assert log_config("text")["formatters"]["gateway"]["format"].startswith("%(asctime)s")
