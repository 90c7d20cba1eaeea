#!/usr/bin/env bash
# Builds the shipped binaries and Debian packages for one architecture, on a
# Debian machine, into target/dist/:
#
#   deploy/build-release.sh aarch64|armv7|x86_64 [--no-build]
#
# --no-build packages the binaries already in target/dist/ again (after a
# change under deploy/debian/).
#
#   guantong-gateway-<arch>               all protocols, stripped (profile `edge`)
#   guantong-gateway-<arch>-modbus-only   --no-default-features, stripped
#   guantong-gateway_<version>_<debarch>.deb
#   guantong-ingest-<arch>, guantong-ingest_<version>_<debarch>.deb   (aarch64, x86_64)
#
# Needs: rustup targets (added here), Debian's cross compilers and dpkg-deb:
#   apt-get install gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf
# (.cargo/config.toml names them as linkers and as ring's C compilers.)
#
# libc: glibc, dynamically linked. The boxes run Debian-family systems with
# glibc; the gateway's footprint settings (gateway/src/malloc.rs: one arena,
# fixed mmap threshold, malloc_trim) are glibc's and measured there, where
# musl's allocator has neither knob. The binary needs the glibc of the build
# machine or newer; the package declares it (Depends: libc6 (>= x)).
set -euo pipefail
cd "$(dirname "$0")/.."

arch="${1:-}"
no_build="${2:-}"
case "$arch" in
  aarch64) triple=aarch64-unknown-linux-gnu; debarch=arm64; tools=aarch64-linux-gnu-; gcc_pkg=gcc-aarch64-linux-gnu; ingest=1 ;;
  armv7) triple=armv7-unknown-linux-gnueabihf; debarch=armhf; tools=arm-linux-gnueabihf-; gcc_pkg=gcc-arm-linux-gnueabihf; ingest=0 ;;
  x86_64) triple=x86_64-unknown-linux-gnu; debarch=amd64; tools=""; gcc_pkg=gcc; ingest=1 ;;
  *) echo "usage: $0 aarch64|armv7|x86_64" >&2; exit 64 ;;
esac
command -v "${tools}gcc" >/dev/null || { echo "${tools}gcc is missing: apt-get install $gcc_pkg" >&2; exit 1; }
command -v dpkg-deb >/dev/null || { echo "dpkg-deb is missing: apt-get install dpkg" >&2; exit 1; }
rustup target list --installed | grep -qx "$triple" || rustup target add "$triple"

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
dist=target/dist
mkdir -p "$dist"
# Release builds are long: share the machine.
build() { nice -n 10 cargo build --locked --target "$triple" "$@"; }

if [ "$no_build" != --no-build ]; then
  build --profile edge -p guantong-gateway --bin guantong-gateway
  cp "target/$triple/edge/guantong-gateway" "$dist/guantong-gateway-$arch"
  build --profile edge -p guantong-gateway --bin guantong-gateway --no-default-features
  cp "target/$triple/edge/guantong-gateway" "$dist/guantong-gateway-$arch-modbus-only"
  if [ "$ingest" = 1 ]; then
    # Ingest is a server: the release profile (unwinding, so a panicking
    # request handler does not stop the service), stripped here.
    build --release -p guantong-ingest --bin guantong-ingest
    "${tools}strip" -o "$dist/guantong-ingest-$arch" "target/$triple/release/guantong-ingest"
  fi
fi

# Depends: from the binary's own needs (NEEDED entries, newest GLIBC_ symbol).
depends() {
  local bin="$1" glibc libs
  glibc="$("${tools}objdump" -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)"
  libs="libc6 (>= $glibc)"
  for needed in $("${tools}readelf" -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'); do
    case "$needed" in
      libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | ld-linux*) ;;
      libgcc_s.so.1) libs="$libs, libgcc-s1" ;;
      *) echo "$bin needs $needed: add its package to deploy/build-release.sh" >&2; exit 1 ;;
    esac
  done
  echo "$libs"
}

# package NAME BINARY: a .deb from deploy/debian/NAME.{control,postinst,prerm,postrm}.
package() {
  local name="$1" bin="$2" root
  root="$(mktemp -d)"
  chmod 0755 "$root"
  install -D -m 0755 "$bin" "$root/usr/bin/$name"
  sed 's#/usr/local/bin/#/usr/bin/#' "deploy/$name.service" | install -D -m 0644 /dev/stdin "$root/lib/systemd/system/$name.service"
  install -d "$root/DEBIAN"
  if [ "$name" = guantong-gateway ]; then
    install -d "$root/usr/share/guantong/examples" "$root/etc/guantong/templates"
    install -m 0644 configs/gateway*.toml "$root/usr/share/guantong/examples/"
    # Templates are conffiles: dpkg keeps a site's edits on upgrade.
    install -m 0644 configs/templates/*.toml "$root/etc/guantong/templates/"
    (cd "$root" && find etc -type f -printf '/%p\n') > "$root/DEBIAN/conffiles"
  fi
  for script in postinst prerm postrm; do
    install -m 0755 "deploy/debian/$name.$script" "$root/DEBIAN/$script"
  done
  sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$debarch/" -e "s/@DEPENDS@/$(depends "$bin")/" \
    -e "s/@SIZE@/$(du -k -s "$root" | cut -f1)/" "deploy/debian/$name.control" > "$root/DEBIAN/control"
  dpkg-deb --root-owner-group -Zxz --build "$root" "$dist/${name}_${version}_${debarch}.deb" >/dev/null
  rm -rf "$root"
  echo "$dist/${name}_${version}_${debarch}.deb"
}

package guantong-gateway "$dist/guantong-gateway-$arch"
if [ "$ingest" = 1 ] && [ -e "$dist/guantong-ingest-$arch" ]; then
  package guantong-ingest "$dist/guantong-ingest-$arch"
fi
ls -l "$dist"/guantong-*-"$arch"* "$dist"/*_"$debarch".deb
