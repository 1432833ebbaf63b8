#!/usr/bin/env bash
# MLServer (KServe v2 over gRPC + HTTP) in its own venv .venv-mlserver: its pins conflict with ours.
# The inference tests start it on loopback ports with inference/mlserver_runtime.py (TorchScript runtime).
set -euo pipefail
cd "$(dirname "$0")/../.."
V=.venv-mlserver
stamp=$V/.fedgate-mlserver-1.7.1
[ -f "$stamp" ] && exit 0
if [ ! -x $V/bin/python ]; then
  python3 -m venv $V
fi
echo "setup: installing MLServer 1.7.1 + torch 2.13.0 (CPU) into $V" >&2
$V/bin/pip install -q "torch==2.13.0" "mlserver==1.7.1"
touch "$stamp"
