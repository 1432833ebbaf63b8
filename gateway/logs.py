"""Structured logging (JSON lines) with no PHI and no tokens.

Only whitelisted ``extra`` fields are emitted; request logs carry the route *template*
(``/fhir/{type}/{id}``), never the concrete path or query string, which can hold names or ids.

Error paths too: an exception is logged as its type and the frames it was raised through
(``file:line function``), never its message — aiohttp's "line too long" quotes the request line (a query
``name=...``) or a header (a token's claims), a database error quotes its SQL parameters, a DICOM parse
error a value.  Third-party loggers' messages are emitted as their template (``"Error handling request from
%s"``), never with their arguments; ``aiohttp.access`` (a pre-formatted request line) as ``access`` only.
"""

from __future__ import annotations

import json
import logging
import sys
import time

SAFE_FIELDS = (
    "route", "method", "status", "duration_ms", "component", "version", "engine", "count", "site",
    "request_id", "role", "interaction", "res_type", "phase", "job", "model", "state", "error_type",
    "instances", "bytes", "port", "host", "seconds", "processes", "worker", "exit_code", "where",
    "settings_source", "url", "in_flight", "metric",
)


#: Loggers of our own code: their messages are interpolated (our call sites pass counts, type names, never
#: request values); every other logger's message is emitted as its template only.
OWN_LOGGERS = ("gateway", "mappings", "inference", "ontologies", "fedgate", "__main__")


def safe_message(record: logging.LogRecord) -> str:
    if record.name == "aiohttp.access":
        return "access"  # pre-formatted request line (path, query string, referer, user agent): nothing of it
    if record.name.split(".", 1)[0] in OWN_LOGGERS:
        return record.getMessage()
    return str(record.msg)


def safe_exception(exc_info) -> str:
    """An exception without its message or values: its type and the frames it was raised through."""
    import traceback

    etype, exc, tb = exc_info
    frames = traceback.extract_tb(tb)[-12:]
    where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames))
    chain = []
    cause = exc.__cause__ or exc.__context__ if exc is not None else None
    while cause is not None and len(chain) < 5:
        chain.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    out = f"{getattr(etype, '__name__', etype)} at {where or '?'}"
    return out + (f" (from {' <- '.join(chain)})" if chain else "")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": safe_message(record),
            "pid": record.process,
        }
        for key in SAFE_FIELDS:
            if key in record.__dict__:
                doc[key] = record.__dict__[key]
        if record.exc_info:
            doc["exc"] = safe_exception(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """``log_format = "text"``: one line, the same sanitising as :class:`JsonFormatter`."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        extras = " ".join(f"{k}={record.__dict__[k]}" for k in SAFE_FIELDS if k in record.__dict__)
        line = f"{ts} {record.levelname} {record.name}: {safe_message(record)}" + (f" {extras}" if extras else "")
        if record.exc_info:
            line += f" exc={safe_exception(record.exc_info)}"
        return line


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
