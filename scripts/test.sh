#!/usr/bin/env bash
# Runs the whole test suite on this machine: installs what the tests need
# when it is missing (on Debian or Ubuntu), starts the services they talk
# to (MariaDB and PostgreSQL on 127.0.0.1, password-less `root` and
# `postgres`, each with a `test` database), then runs the TypeScript
# client's tests and `cargo test --workspace`, and closes with one line
# counting every test.
#
# With --ci it also checks formatting and clippy first (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."

ci=
[ "${1:-}" = "--ci" ] && ci=1
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

if ! command -v apt-get >/dev/null; then
  for tool in redis-server mariadbd psql promtool chromium npm python3; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || [ -x "/usr/bin/$tool" ] \
      || echo "missing: $tool (the tests need redis-server, MariaDB, PostgreSQL, Prometheus' promtool, Chromium, Node.js with npm, python3 with venv)" >&2
  done
fi
apt_updated=
apt_install() {
  command -v apt-get >/dev/null || { echo "please install: $*" >&2; exit 1; }
  if [ -z "$apt_updated" ]; then $sudo apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

command -v redis-server >/dev/null || apt_install redis-server
command -v cc >/dev/null || apt_install build-essential
command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || apt_install mariadb-server
command -v psql >/dev/null || apt_install postgresql
# promtool checks /metrics; Chromium and Node drive the pages (tests/e2e.rs).
command -v promtool >/dev/null || apt_install prometheus
[ -x /usr/bin/chromium ] || apt_install chromium
command -v npm >/dev/null || apt_install nodejs npm
[ -d e2e/node_modules/playwright-core ] || (cd e2e && npm ci --no-audit --no-fund)

# The databases the tests use: start them when they are not running.
mysql_ok() { mysql --protocol=tcp -h 127.0.0.1 -u root -e 'SELECT 1' >/dev/null 2>&1; }
if ! mysqladmin --protocol=tcp -h 127.0.0.1 -u root ping >/dev/null 2>&1; then
  $sudo start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
  for _ in $(seq 60); do mysqladmin --protocol=tcp -h 127.0.0.1 -u root ping >/dev/null 2>&1 && break; sleep 1; done
fi
if ! mysql_ok; then
  # A fresh Debian MariaDB lets root in through its socket only.
  echo "letting MariaDB's root in over TCP without a password (a test machine's setting)" >&2
  $sudo mysql -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD(''); FLUSH PRIVILEGES"
fi
mysql --protocol=tcp -h 127.0.0.1 -u root -e 'CREATE DATABASE IF NOT EXISTS test'
pg_version="$(ls /etc/postgresql | head -n1)"
if ! pg_isready -h 127.0.0.1 -q 2>/dev/null; then
  $sudo pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start || true
  for _ in $(seq 60); do pg_isready -h 127.0.0.1 -q && break; sleep 1; done
fi
if ! psql -h 127.0.0.1 -U postgres -w -tc 'SELECT 1' >/dev/null 2>&1; then
  # A fresh cluster asks TCP clients for a password.
  echo "trusting local TCP connections to PostgreSQL (a test machine's setting)" >&2
  hba="/etc/postgresql/$pg_version/main/pg_hba.conf"
  $sudo sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  $sudo pg_ctlcluster --skip-systemctl-redirect "$pg_version" main reload
fi
psql -h 127.0.0.1 -U postgres -tc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -c 'CREATE DATABASE test'

# rembg (the bg-removal tests start real rembg servers) with the u2netp
# model, and the photographs the face-crop tests use.
python3 -c 'import ensurepip' >/dev/null 2>&1 || apt_install python3-venv
REMBG_VENV="${REMBG_VENV:-/opt/rembg-venv}"
if [ ! -x "$REMBG_VENV/bin/rembg" ] && [ ! -w "$(dirname "$REMBG_VENV")" ]; then
  $sudo mkdir -p "$REMBG_VENV" && $sudo chown "$(id -u):$(id -g)" "$REMBG_VENV"
fi
REMBG_VENV="$REMBG_VENV" bash scripts/install-rembg.sh
# ONNX Runtime's library, from the onnxruntime wheel rembg's venv holds:
# the in-process engine's onnxruntime runtime loads it (tests, and `up`).
ORT_DYLIB_PATH="$(ls "$REMBG_VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* | head -n1)"
export ORT_DYLIB_PATH
bash scripts/fetch-test-images.sh

rustup component add rustfmt clippy >/dev/null 2>&1 || true

# s3s-fs, the S3-protocol server the upload stage's s3 backend is tested
# against (stages/tests/s3.rs), from the crate registry.
command -v s3s-fs >/dev/null || cargo install s3s-fs --version 0.14.1 --features binary --locked

if [ -n "$ci" ]; then
  cargo fmt --check
  cargo clippy --workspace --all-targets -- -D warnings
fi

# The TypeScript client, against the real binary.
cargo build --bin image-queue
(cd clients/typescript && npm ci --silent --no-audit --no-fund && IQ_BINARY="$PWD/../../target/debug/image-queue" npm test)

# The Rust suite, then one closing line counting every test it ran
# (cargo's own last line is the doc-tests' count).
log=$(mktemp)
status=0
cargo test --workspace 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
