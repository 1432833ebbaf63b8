"""Structured logging (JSON lines) with no PHI and no tokens.

Only whitelisted ``extra`` fields are emitted; request logs carry the route *template*
(``/fhir/{type}/{id}``), never the concrete path or query string, which can hold names or ids.
"""

from __future__ import annotations

import json
import logging
import sys
import time

SAFE_FIELDS = (
    "route", "method", "status", "duration_ms", "component", "version", "engine", "count", "site",
    "request_id", "role", "interaction", "res_type", "phase", "job", "model", "state", "error_type",
    "instances", "bytes", "port", "host", "seconds", "processes", "worker", "exit_code",
    "settings_source", "url", "in_flight", "metric",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key in SAFE_FIELDS:
            if key in record.__dict__:
                doc[key] = record.__dict__[key]
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
