"""Issue 20: schemathesis against openapi/fedgate.yaml — no 5xx, and every answer as the document says.

A real ``fedgate serve`` process, once per engine (SQLite and PostgreSQL: a value one engine stores and
the other refuses, such as a NUL character, is a contract difference only this test sees), gets, for
every documented operation, a bounded number of schemathesis cases (positive and negative data,
hypothesis derandomized so each CI run sends the same requests). The token rotates over every role and "no token", so each operation
is seen as admin, ehr-system, pacs, clinician, analyst, site and anonymous (401).

Checks: not_a_server_error, status_code_conformance, content_type_conformance,
response_headers_conformance, response_schema_conformance, allow_header_conformance. Every operation but EXCLUDED (below).

``FEDGATE_SCHEMATHESIS_EXAMPLES`` raises the examples per operation (default 4) for a longer local run.

Time bound: schemathesis's coverage phase (run as hypothesis explicit examples) derives every boundary and
negative variant of a request body; for the recursive cohort definitions of /federation/* that is ~3,000
requests per operation, most of the module's time. On SQLite all of them run; on PostgreSQL the first
``COVERAGE_FULL`` of an operation run and after that one in ``COVERAGE_STRIDE``, picked by a digest of the
request (the same cases on every run). ``FEDGATE_SCHEMATHESIS_STRIDE=1`` runs them all.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import GenerationMode
from schemathesis.checks import (allow_header_conformance, content_type_conformance, not_a_server_error,
                                 response_headers_conformance, response_schema_conformance,
                                 status_code_conformance)
from schemathesis.generation.meta import TestPhase

from gateway.handlers.health import OPENAPI_PATH
from tests.conftest import ENGINES, PG_ADMIN, create_pg_database, drop_pg_database
from tests.procs import FEDGATE, REPO, free_port

EXAMPLES = int(os.environ.get("FEDGATE_SCHEMATHESIS_EXAMPLES", "4"))
COVERAGE_FULL = 300
COVERAGE_STRIDE = int(os.environ.get("FEDGATE_SCHEMATHESIS_STRIDE", "8"))
ROLES = ["admin", "ehr-system", "pacs", "clinician", "analyst", "site", None]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, allow_header_conformance]

#: Left out, on purpose: /viewer (issue 22's OHIF static files: 503 "not installed" in a tree without
#: scripts/setup.d/40-ohif.sh, and its GET catch-all /viewer/{tail} makes Allow of /viewer/dev-token list GET).
EXCLUDED = r"^/viewer"
schema = schemathesis.openapi.from_path(OPENAPI_PATH).exclude(path_regex=EXCLUDED)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@pytest.fixture(scope="module", params=ENGINES)
def server(request):
    tmp = Path(tempfile.mkdtemp(prefix="fedgate-schemathesis-"))
    port = free_port()
    pg_name = asyncio.run(create_pg_database()) if request.param == "postgresql" else None
    db_args = ["--database-url", f"{PG_ADMIN}/{pg_name}"] if pg_name else []
    proc = subprocess.Popen([*FEDGATE, "serve", "--data-dir", str(tmp), "--port", str(port), *db_args], cwd=REPO,
                            env=dict(os.environ, FEDGATE_LOG_LEVEL="WARNING"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        import time

        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if requests.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "fedgate serve not ready"
            time.sleep(0.2)
        tokens = {role: subprocess.check_output([*FEDGATE, "token", "--data-dir", str(tmp), "--role", role], cwd=REPO,
                                                text=True).strip() for role in ROLES if role}
        yield url, tokens, itertools.cycle(ROLES), request.param, collections.Counter()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        if pg_name:
            asyncio.run(drop_pg_database(pg_name))


def _digest(case) -> int:
    """A digest of what the case sends (stable across runs, unlike ``hash``)."""
    def plain(v):
        return v if isinstance(v, (dict, list, str, bytes, int, float, bool, type(None))) else type(v).__name__

    parts = (case.method, case.path, plain(case.path_parameters), plain(case.query), plain(case.body))
    return int.from_bytes(hashlib.sha1(repr(parts).encode()).digest()[:8], "big")


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_api_contract(case, server):
    url, tokens, roles, engine, seen = server
    if engine != "sqlite" and case.meta is not None and case.meta.phase.name == TestPhase.COVERAGE:
        seen[case.operation.label] += 1
        if seen[case.operation.label] > COVERAGE_FULL and _digest(case) % COVERAGE_STRIDE:
            return
    role = next(roles)
    headers = {"Authorization": f"Bearer {tokens[role]}"} if role else {}
    if case.headers and "Authorization" in case.headers:
        case.headers.pop("Authorization")
    case.call_and_validate(base_url=url, headers=headers, checks=CHECKS, timeout=20)
