#!/usr/bin/env bash
# PostgreSQL must answer on 127.0.0.1:5432 for the test suite (both engines are always tested).
set -euo pipefail
if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then exit 0; fi
if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
  echo "setup: starting the local PostgreSQL cluster" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && exit 0; sleep 1; done
echo "setup: PostgreSQL is not answering on 127.0.0.1:5432 (set FEDGATE_TEST_PG to another server)" >&2
exit 1
