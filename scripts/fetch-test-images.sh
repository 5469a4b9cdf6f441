#!/usr/bin/env bash
# Fetches the real photographs the tests use, idempotently, into
# stages/tests/data/ (not committed): scikit-image's astronaut.png (a public
# domain NASA portrait of Eileen Collins), taken from the scikit-image wheel
# on PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=stages/tests/data
WHEEL_PIN=scikit-image==0.24.0

mkdir -p "$DEST"
if [ ! -s "$DEST/astronaut.png" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.11 --platform manylinux2014_x86_64 "$WHEEL_PIN" -d "$tmp"
  python3 - "$tmp" "$DEST/astronaut.png" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2] + ".part", "wb") as out:
    out.write(z.read("skimage/data/astronaut.png"))
PY
  mv "$DEST/astronaut.png.part" "$DEST/astronaut.png"
fi
echo "test images in $DEST"
