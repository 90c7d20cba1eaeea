#!/usr/bin/env bash
# Installs a gateway .deb into a clean Debian chroot of its architecture and
# runs it there: the package's promises, checked on a system that never saw
# a build. Foreign architectures run under qemu-user (binfmt).
#
#   sudo deploy/test-deb-chroot.sh target/dist/guantong-gateway_0.1.0_arm64.deb [CHROOT_DIR]
#
# Needs: apt-get install debootstrap qemu-user-static binfmt-support. The
# chroot (Debian 12 minbase, from deb.debian.org) is made once and reused.
# Checks: install (user, 0640 config, state dir, unit), `check` and a run as
# the `guantong` user until its status page answers, upgrade (reinstall)
# keeps config and buffer, remove keeps them, purge deletes them.
set -euo pipefail
deb="$(realpath "$1")"
debarch="$(dpkg-deb -f "$deb" Architecture)"
root="${2:-/var/tmp/guantong-chroot-$debarch}"
case "$debarch" in
  arm64) qemu=aarch64 ;;
  armhf) qemu=arm ;;
  amd64) qemu= ;;
  *) echo "no chroot recipe for $debarch" >&2; exit 1 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "run as root (chroot, mounts)" >&2; exit 1; }
step() { printf '\n==> %s\n' "$*"; }
in_root() { chroot "$root" "$@"; }

if [ ! -x "$root/usr/bin/dpkg" ]; then
  step "debootstrap bookworm $debarch into $root"
  if [ -n "$qemu" ]; then
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    update-binfmts --enable "qemu-$qemu" || true
    debootstrap --arch="$debarch" --foreign --variant=minbase bookworm "$root" http://deb.debian.org/debian
    install -m 0755 "/usr/bin/qemu-$qemu-static" "$root/usr/bin/"
    # binfmt-support registers the interpreter under this path, resolved in the chroot.
    mkdir -p "$root/usr/libexec/qemu-binfmt"
    ln -sf "../../bin/qemu-$qemu-static" "$root/usr/libexec/qemu-binfmt/$qemu-binfmt-P"
    in_root /debootstrap/debootstrap --second-stage
  else
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian
  fi
fi
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
trap 'umount "$root/proc" 2>/dev/null || true' EXIT
cp "$deb" "$root/tmp/gateway.deb"

step "install: dpkg -i $(basename "$deb") on $(in_root uname -m) (Debian $(cat "$root/etc/debian_version"))"
in_root dpkg -i /tmp/gateway.deb
in_root sh -c 'id guantong; stat -c "%a %U:%G %n" /etc/guantong /etc/guantong/gateway.toml /var/lib/guantong /usr/bin/guantong-gateway; ls /lib/systemd/system/guantong-gateway.service /etc/guantong/templates /usr/share/guantong/examples'
[ "$(in_root stat -c '%a %U:%G' /etc/guantong/gateway.toml)" = "640 root:guantong" ]

step "start: check, then run as guantong until /readyz answers"
in_root runuser -u guantong -- guantong-gateway check --config /etc/guantong/gateway.toml
in_root runuser -u guantong -- sh -c 'guantong-gateway run --config /etc/guantong/gateway.toml >/tmp/gateway.log 2>&1 & echo $! > /tmp/gateway.pid'
up=0
for _ in $(seq 60); do
  if in_root bash -c 'exec 3<>/dev/tcp/127.0.0.1/7700 && printf "GET /healthz HTTP/1.0\r\n\r\n" >&3 && head -n 1 <&3' 2>/dev/null | grep -q ' 200'; then up=1; break; fi
  sleep 1
done
in_root sh -c 'kill -TERM "$(cat /tmp/gateway.pid)"; sleep 5; grep -E "gateway starting|gateway stopped" /tmp/gateway.log | cut -c1-200'
[ "$up" = 1 ] || { in_root cat /tmp/gateway.log; echo "FAILED: the status page never answered" >&2; exit 1; }
echo "status page answered /healthz 200"
in_root ls /var/lib/guantong/buffer

step "upgrade (reinstall): config and buffer stay"
echo "# edited on site" >> "$root/etc/guantong/gateway.toml"
before="$(in_root sha256sum /etc/guantong/gateway.toml /var/lib/guantong/buffer/buffer.redb)"
in_root dpkg -i /tmp/gateway.deb
[ "$before" = "$(in_root sha256sum /etc/guantong/gateway.toml /var/lib/guantong/buffer/buffer.redb)" ]
echo "config and buffer unchanged"

step "remove: buffer and config stay"
in_root dpkg -r guantong-gateway
in_root ls /var/lib/guantong/buffer /etc/guantong/gateway.toml
[ ! -e "$root/usr/bin/guantong-gateway" ]

step "purge: both deleted"
in_root dpkg -P guantong-gateway
[ ! -e "$root/var/lib/guantong" ] && [ ! -e "$root/etc/guantong/gateway.toml" ]
echo "PASS: $(basename "$deb") on $debarch"
