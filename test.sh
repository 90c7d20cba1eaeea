#!/usr/bin/env bash
# Runs every test of Guantong: formatting, lints, unit tests and the
# end-to-end suites against real peers (simulated Modbus devices started by
# the tests, Mosquitto on 127.0.0.1:1883, headless Chromium for the report
# pages).
#
# On a fresh Debian/Ubuntu machine it first installs what is missing (a C
# compiler, Mosquitto, Rust) and starts the services the tests need.
set -euo pipefail
cd "$(dirname "$0")"

# Each step says when it starts (minutes:seconds since the script began).
log() { printf '\n==> [%d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
as_postgres() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v curl >/dev/null 2>&1 || missing+=(curl ca-certificates)
command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto mosquitto-clients)
# The MQTT TLS test makes its CA and certificates with the openssl command.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# The third-party peers (pysparkplug) go into a virtualenv.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# The acceptance test opens the report pages in headless Chromium.
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
# The report-page tests drive it over WebDriver, print to PDF and read the
# PDF back (poppler-utils), with a CJK font (fonts-wqy-microhei, 1.6 MB;
# without one every Chinese character is a box).
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v pdftotext >/dev/null 2>&1 || missing+=(poppler-utils)
fc-list :lang=zh 2>/dev/null | grep -q . || missing+=(fonts-wqy-microhei)
# The DL/T 645 serial test links a pty pair with socat (tests/tests/dlt645.rs).
command -v socat >/dev/null 2>&1 || missing+=(socat)
# The cross-built gateways (aarch64, armv7) run under qemu-user in the tests
# (tests/tests/cross.rs): Debian's cross compilers and qemu. GUANTONG_SKIP_CROSS=1
# leaves them out (the tests then say SKIPPED).
if [ "${GUANTONG_SKIP_CROSS:-0}" != 1 ]; then
  command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu)
  command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 || missing+=(gcc-arm-linux-gnueabihf)
  command -v qemu-aarch64-static >/dev/null 2>&1 || missing+=(qemu-user-static)
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    log "installing Rust (rustup, stable toolchain)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

# The PostgreSQL store's tests (the store suite, the replica and backup
# tests) run against a real server: Debian's, started where none runs. They
# use databases of their own (guantong_*), created and dropped by the tests;
# GUANTONG_TEST_DATABASE_URL names another server.
if [ -z "${GUANTONG_TEST_DATABASE_URL:-}" ] && ! port_open 5432; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    log "installing PostgreSQL"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
  fi
  log "starting PostgreSQL on 127.0.0.1:5432"
  cluster="$(pg_lsclusters -h 2>/dev/null | awk 'NR==1 {print $1" "$2}')"
  if [ -z "$cluster" ]; then
    version="$(ls /usr/lib/postgresql | sort -V | tail -n1)"
    as_root pg_createcluster "$version" main
    cluster="$version main"
  fi
  # shellcheck disable=SC2086
  as_root pg_ctlcluster $cluster start || true
  for _ in $(seq 100); do port_open 5432 && break; sleep 0.1; done
  port_open 5432 || { echo "PostgreSQL did not start on 127.0.0.1:5432: start it (pg_ctlcluster <version> main start) and run again" >&2; exit 1; }
  # The tests connect as postgres without a password from this machine only.
  hba="$(as_postgres psql -tAc 'SHOW hba_file' 2>/dev/null || true)"
  if [ -n "$hba" ] && ! as_root grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    as_root sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    as_postgres psql -qc 'SELECT pg_reload_conf()' >/dev/null
  fi
fi
command -v pg_dump >/dev/null 2>&1 || { as_root apt-get update -q; as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-client; }

if ! port_open 1883; then
  log "starting Mosquitto on 127.0.0.1:1883"
  if [ -f /etc/mosquitto/mosquitto.conf ]; then
    as_root mosquitto -d -c /etc/mosquitto/mosquitto.conf
  else
    as_root mosquitto -d -p 1883
  fi
  for _ in $(seq 50); do port_open 1883 && break; sleep 0.1; done
  port_open 1883 || { echo "Mosquitto did not start on 127.0.0.1:1883: start it with 'mosquitto -d' and run again" >&2; exit 1; }
fi

# Third-party peers the e2e tests run against, in .venv-peers/ (the tests
# find it there, or through GUANTONG_PEERS_PYTHON). Versions pinned; pip
# only runs when one is missing.
# asyncua: a second OPC UA stack (tests/peers/opcua_server.py); python-snap7:
# an S7comm server (tests/peers/s7_server.py); dlt645: DL/T 645-2007 meters
# over TCP and serial (tests/peers/dlt645_meter.py; brings pyserial, loguru).
PEERS=(pysparkplug==0.6.1 asyncua==1.1.5 python-snap7==3.3.0 dlt645==3.2.0)
if ! .venv-peers/bin/python -c 'import sys, importlib.metadata as m; sys.exit(any(m.version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))' "${PEERS[@]}" >/dev/null 2>&1; then
  log "installing ${PEERS[*]} into .venv-peers/"
  python3 -m venv .venv-peers
  .venv-peers/bin/pip install -q "${PEERS[@]}"
fi

if cargo fmt --version >/dev/null 2>&1; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
fi
if cargo clippy --version >/dev/null 2>&1; then
  log "cargo clippy"
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi

# The Modbus-only gateway (no MQTT, no OPC UA) for small boxes: lints (a
# check build only). It is built and run as the armv7 gateway below, where
# `check` must name the protocols it leaves out.
log "Modbus-only gateway: clippy (--no-default-features)"
cargo clippy -p guantong-gateway --no-default-features --all-targets --locked -- -D warnings

# The end-to-end tests run the real binaries: build them first.
log "building binaries and tests"
cargo build --workspace --bins --tests --locked

if [ "${GUANTONG_SKIP_CROSS:-0}" != 1 ]; then
  # Debug builds: release cross builds (deploy/build-release.sh) take far
  # longer, and the tests only need the code to run on the target. armv7 is
  # the Modbus-only build (the smallest boxes) unless GUANTONG_CROSS_ARMV7=all.
  log "cross gateways under qemu: building aarch64 (all protocols) and armv7 (${GUANTONG_CROSS_ARMV7:-Modbus-only}) (tests/tests/cross.rs runs them)"
  for triple in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
    rustup target list --installed | grep -qx "$triple" || rustup target add "$triple"
  done
  cargo build -p guantong-gateway --bin guantong-gateway --target aarch64-unknown-linux-gnu --locked
  armv7_features=(--no-default-features)
  [ "${GUANTONG_CROSS_ARMV7:-}" = all ] && armv7_features=()
  cargo build -p guantong-gateway --bin guantong-gateway --target armv7-unknown-linux-gnueabihf "${armv7_features[@]}" --locked
fi

log "running tests"
cargo test --workspace --locked

# A short smoke run of every fuzz target: its regression inputs first (every
# crash ever found), then ~20 s of fresh inputs. Long runs: SECURITY.md.
# cargo-fuzz wants nightly flags; RUSTC_BOOTSTRAP lets stable take them.
if [ "${GUANTONG_SKIP_FUZZ:-0}" != 1 ]; then
  if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
  fi
  root="$PWD"
  fuzz_smoke() { # crate-dir target
    local corpus
    corpus="$(mktemp -d)"
    log "fuzz smoke: $1 $2"
    # One target directory for both fuzz crates: their sanitizer-built
    # dependencies compile once.
    (cd "$1/fuzz" && RUSTC_BOOTSTRAP=1 cargo fuzz run -O --target-dir "$root/gateway/fuzz/target" \
      "$2" "$corpus" "regressions/$2" -- \
      -max_total_time="${GUANTONG_FUZZ_SECONDS:-20}" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 12)
    rm -rf "$corpus"
  }
  for t in modbus_response mqtt_json sparkplug_payload config_parse salvage_file s7_response dlt645_frame; do fuzz_smoke gateway "$t"; done
  fuzz_smoke ingest batch_validate
fi

log "every test passed"
