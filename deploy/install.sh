#!/usr/bin/env bash
# Installs Guantong from this source tree as systemd services.
#
#   sudo deploy/install.sh            # gateway: binary, /etc/guantong/gateway.toml, unit
#   sudo deploy/install.sh --ingest   # ingest: binary, data directory, unit
#
# Build the release binaries first, as a normal user (cargo never runs as
# root here): `cargo build --release --locked`. Under sudo, a missing binary is
# built as the invoking user. The gateway's config is copied from
# configs/gateway.example.toml only when none exists; print its identity,
# register it with ingest, put the token in, then
# `guantong-gateway check --config /etc/guantong/gateway.toml` and
# `systemctl enable --now guantong-gateway`. Ingest serves its API over TLS.
set -euo pipefail
cd "$(dirname "$0")/.."
role=gateway
[ "${1:-}" = "--ingest" ] && role=ingest
[ "$(id -u)" -eq 0 ] || { echo "run as root (sudo $0 $*)" >&2; exit 1; }

bin="target/release/guantong-$role"
if [ ! -x "$bin" ]; then
  if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    echo "building $bin as $SUDO_USER"
    sudo -u "$SUDO_USER" -H cargo build --release --locked -p "guantong-$role"
  else
    echo "$bin is missing: build it as a normal user first: cargo build --release --locked -p guantong-$role" >&2
    exit 1
  fi
fi
id guantong >/dev/null 2>&1 || useradd --system --home /var/lib/guantong --shell /usr/sbin/nologin guantong
install -m 0755 "$bin" "/usr/local/bin/guantong-$role"
install -m 0644 "deploy/guantong-$role.service" "/etc/systemd/system/guantong-$role.service"

if [ "$role" = gateway ]; then
  install -d -m 0750 -o root -g guantong /etc/guantong
  if [ ! -f /etc/guantong/gateway.toml ]; then
    sed 's#^dir = .*#dir = "/var/lib/guantong/buffer"#' configs/gateway.example.toml > /etc/guantong/gateway.toml
    chown root:guantong /etc/guantong/gateway.toml
    chmod 0640 /etc/guantong/gateway.toml   # holds the uplink token
    echo "wrote /etc/guantong/gateway.toml: set [gateway] id, [uplink] endpoint and token, and the devices"
  fi
  echo "print its signing key (needs only [gateway] and [buffer], not the token yet):"
  echo "  sudo -u guantong guantong-gateway identity --config /etc/guantong/gateway.toml"
  echo "register it on ingest with the printed register-gateway line, put the token in [uplink], then:"
  echo "  guantong-gateway check --config /etc/guantong/gateway.toml && systemctl enable --now guantong-gateway"
else
  install -d -m 0700 -o guantong -g guantong /var/lib/guantong-ingest
  echo "register each gateway (while ingest is stopped) with the key its 'guantong-gateway identity' prints:"
  echo "  sudo -u guantong guantong-ingest register-gateway --data /var/lib/guantong-ingest <gateway-id> --key-algorithm <ed25519|sm2> --public-key <hex>"
  echo "then: systemctl enable --now guantong-ingest"
  echo "the API and pages are served over HTTPS on :7601 with the operator CA in /var/lib/guantong-ingest/tls/ca.pem"
fi
systemctl daemon-reload 2>/dev/null || true
