#!/usr/bin/env bash
# Side-by-side DICOMweb benchmark: the same load (bench/dicomweb_bench.py) against Orthanc (Debian
# packages) and fedgate on this machine, one after the other in one run, then a Markdown table.
# Usage: bench/dicomweb_vs_orthanc.sh [N=2000] [--write]   (--write appends the table to bench/RESULTS.md)
# fedgate runs with one server process per core; $FEDGATE_BENCH_PROCESSES overrides: a number, or a list
# ("1 2": fedgate is benchmarked once per count, fresh data dir each, one column "fedgate-pN" per count).
# fedgate runs from this checkout (python -m gateway: a worktree with PYTHONPATH=<worktree> runs its own code).
# $FEDGATE_BENCH_ROUNDS (default 1): the whole sequence (Orthanc, then fedgate per process count) is run that
# many times, each server on a fresh data dir every round; the table shows each metric's median (min-max)
# and the ratio table the median of the per-round fedgate/Orthanc ratios (this VM's speed drifts by up to 2×
# between minutes, so a ratio is only meaningful within one round).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # python -m gateway runs this checkout, whatever the venv installed
N=${1:-2000}
WRITE=${2:-}
PY=.venv/bin/python
FPROCS=${FEDGATE_BENCH_PROCESSES:-$(nproc)}
OUT=$(mktemp -d /tmp/dwbench.XXXX)
PORT_O=$($PY -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
PORT_F=$($PY -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
bash scripts/setup.d/20-orthanc.sh
cat > "$OUT/orthanc.json" <<JSON
{"Name": "bench-orthanc", "StorageDirectory": "$OUT/orthanc-db", "IndexDirectory": "$OUT/orthanc-db",
 "StorageCompression": false, "OverwriteInstances": false, "SaveJobs": false,
 "StorageAccessOnFind": "Always", "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
 "HttpServerEnabled": true, "HttpPort": $PORT_O, "RemoteAccessAllowed": false, "AuthenticationEnabled": false,
 "HttpThreadsCount": 50, "KeepAlive": true, "TcpNoDelay": true, "HttpCompressionEnabled": false,
 "DicomServerEnabled": false, "DicomWeb": {"Enable": true, "Root": "/dicom-web/"}}
JSON
cleanup() { [ -n "${OPID:-}" ] && kill "$OPID" 2>/dev/null || true; [ -n "${FPID:-}" ] && kill "$FPID" 2>/dev/null || true; }
trap cleanup EXIT
$PY bench/dicomweb_bench.py generate --n "$N" >/dev/null

RESULTS=()
for ROUND in $(seq 1 "${FEDGATE_BENCH_ROUNDS:-1}"); do
  sed "s#$OUT/orthanc-db#$OUT/orthanc-db-$ROUND#g" "$OUT/orthanc.json" > "$OUT/orthanc-$ROUND.json"
  Orthanc "$OUT/orthanc-$ROUND.json" > "$OUT/orthanc-$ROUND.log" 2>&1 & OPID=$!
  for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$PORT_O/system" >/dev/null 2>&1 && break; sleep 0.2; done
  $PY bench/dicomweb_bench.py run --n "$N" --base-url "http://127.0.0.1:$PORT_O/dicom-web" --label orthanc \
      --server-pid "$OPID" --server-info "Orthanc $(Orthanc --version 2>&1 | head -1)" --out "$OUT/orthanc-$ROUND.json.result"
  kill "$OPID"; wait "$OPID" 2>/dev/null || true; OPID=
  RESULTS+=("$OUT/orthanc-$ROUND.json.result")
  for P in $FPROCS; do
    LABEL=fedgate; [ "$(echo $FPROCS | wc -w)" -gt 1 ] && LABEL="fedgate-p$P"
    FEDGATE_LOG_LEVEL=WARNING $PY -m gateway serve --data-dir "$OUT/$LABEL-$ROUND" --port "$PORT_F" --processes "$P" & FPID=$!
    for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$PORT_F/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
    sleep 2  # every server process up (readyz answers as soon as the first one does)
    TOKEN=$($PY -m gateway token --data-dir "$OUT/$LABEL-$ROUND" --role pacs)
    $PY bench/dicomweb_bench.py run --n "$N" --base-url "http://127.0.0.1:$PORT_F/dicomweb" --label "$LABEL" \
        --server-pid "$FPID" --server-info "fedgate $(git rev-parse --short HEAD), SQLite, $P server processes" \
        --header "Authorization: Bearer $TOKEN" --out "$OUT/$LABEL-$ROUND.json.result"
    kill "$FPID"; wait "$FPID" 2>/dev/null || true; FPID=
    RESULTS+=("$OUT/$LABEL-$ROUND.json.result")
  done
done

$PY bench/summarize.py "${RESULTS[@]}" | tee "$OUT/table.md"
if [ "$WRITE" = "--write" ]; then
  {
    echo  # (a blank line: the file's last section may end without one)
    echo "## DICOMweb: fedgate vs Orthanc (issue 3) — $(date -u +'%Y-%m-%d %H:%M') UTC"
    echo
    echo "Machine: $(hostname) ($(nproc) cores), both servers on loopback, run one after the other."
    echo "Command: \`FEDGATE_BENCH_PROCESSES=\"$FPROCS\" FEDGATE_BENCH_ROUNDS=${FEDGATE_BENCH_ROUNDS:-1} bench/dicomweb_vs_orthanc.sh $N --write\` (harness: bench/dicomweb_bench.py; fedgate on SQLite, \"pN\" = N server processes)"
    echo
    cat "$OUT/table.md"
    echo
  } >> bench/RESULTS.md
fi
