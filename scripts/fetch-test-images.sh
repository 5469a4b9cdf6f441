#!/usr/bin/env bash
# Fetches the real photographs the tests and benchmarks use, idempotently,
# into stages/tests/data/ (not committed), from the scikit-image wheel on
# PyPI: astronaut.png (a public domain NASA portrait of Eileen Collins), and
# for `image-queue bench images` a few more colour photographs of its data
# set in stages/tests/data/photos/ (a cat, a coffee cup, a rocket, a
# motorcycle; see scikit-image's data/README for their licences).
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=stages/tests/data
WHEEL_PIN=scikit-image==0.24.0
PHOTOS=(astronaut.png chelsea.png coffee.png rocket.jpg motorcycle_left.png)

mkdir -p "$DEST/photos"
missing=
[ -s "$DEST/astronaut.png" ] || missing=1
for p in "${PHOTOS[@]}"; do [ -s "$DEST/photos/$p" ] || missing=1; done
if [ -n "$missing" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.11 --platform manylinux2014_x86_64 "$WHEEL_PIN" -d "$tmp"
  python3 - "$tmp" "$DEST" "${PHOTOS[@]}" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
dest = sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name, target in [("astronaut.png", dest + "/astronaut.png")] + [
        (p, f"{dest}/photos/{p}") for p in sys.argv[3:]
    ]:
        with open(target + ".part", "wb") as out:
            out.write(z.read("skimage/data/" + name))
        os.replace(target + ".part", target)
PY
fi
echo "test images in $DEST"
