#!/usr/bin/env bash
# Installs Guantong from this source tree as systemd services.
#
#   sudo deploy/install.sh            # gateway: binary, /etc/guantong/gateway.toml, unit
#   sudo deploy/install.sh --ingest   # ingest: binary, data directory, unit
#
# Builds the release binaries with cargo if they are not built yet. The
# gateway's config is copied from configs/gateway.example.toml only when none
# exists; edit it, then `guantong-gateway check --config /etc/guantong/gateway.toml`
# and `systemctl enable --now guantong-gateway`.
set -euo pipefail
cd "$(dirname "$0")/.."
role=gateway
[ "${1:-}" = "--ingest" ] && role=ingest
[ "$(id -u)" -eq 0 ] || { echo "run as root (sudo $0 $*)" >&2; exit 1; }

bin="target/release/guantong-$role"
if [ ! -x "$bin" ]; then
  echo "building $bin"
  cargo build --release --locked -p "guantong-$role"
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
  echo "then: guantong-gateway check --config /etc/guantong/gateway.toml && systemctl enable --now guantong-gateway"
else
  install -d -m 0750 -o guantong -g guantong /var/lib/guantong-ingest
  echo "register a gateway (while ingest is stopped):"
  echo "  sudo -u guantong guantong-ingest register-gateway --data /var/lib/guantong-ingest <gateway-id>"
  echo "then: systemctl enable --now guantong-ingest"
fi
systemctl daemon-reload 2>/dev/null || true
