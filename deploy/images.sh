#!/usr/bin/env bash
# Builds amicus's two OCI images from this checkout, FROM scratch (no base image, no image
# registry needed), and saves each as an OCI archive a hospital can import offline:
#   localhost/amicus-station:VERSION   `amicus` (station, worker, CLI), ONNX Runtime's library,
#                                      and the C/C++ runtime libraries they link
#   localhost/amicus-registry:VERSION  `amicus-registry` only: no WebAssembly engine, ONNX
#                                      Runtime, RDF store or DICOM code
#   target/images/amicus-{station,registry}-VERSION.oci.tar   (`podman load -i FILE`)
# Both run as user 10001 and work with a read-only root filesystem and no capabilities.
# Needs podman (scripts/setup.sh --deploy installs it) and ONNX Runtime (scripts/setup.sh).
# Usage: bash deploy/images.sh [--no-save]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export CONTAINERS_CONF="${CONTAINERS_CONF:-$root/deploy/containers.conf}"
save=1
[ "${1:-}" = "--no-save" ] && save=0

command -v podman >/dev/null || { echo "images: podman not found (bash scripts/setup.sh --deploy)" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ort_version=$(sed -n 's/^ORT_VERSION="\(.*\)"/\1/p' scripts/setup.sh)
ort_lib="${HOME}/.cache/amicus/onnxruntime/libonnxruntime.so.${ort_version}"
[ -f "$ort_lib" ] || { echo "images: $ort_lib missing (bash scripts/setup.sh)" >&2; exit 1; }

# The registry image must not carry station code: refuse to build it if its binary would.
tree=$(cargo tree --offline -q -e normal -p amicus-registryd --prefix none) \
  || { echo "images: cargo tree failed for amicus-registryd" >&2; exit 1; }
if grep -E '^(amicus-runtime|amicus-daemon|amicus-kernels|amicus-index|amicus-imaging|wasmtime|ort|oxigraph|dicom-[a-z-]+) ' <<<"$tree"; then
  echo "images: amicus-registryd depends on station code (above); the registry image must not" >&2
  exit 1
fi

echo "images: building the release binaries"
cargo build --release -q -p amicus-cli -p amicus-registryd --bins

work="$root/target/images/work"
rm -rf "$work"
mkdir -p "$work" "$root/target/images"

# stage NAME BINARY [EXTRA_LIB]: a root filesystem with the binary at /usr/local/bin, the
# shared libraries it (and the extra library) load, a passwd entry for user 10001, and the
# writable mount points the images document.
stage() {
  local name=$1 bin=$2 extra=${3:-}
  local fs="$work/$name/rootfs"
  mkdir -p "$fs/usr/local/bin" "$fs/etc" "$fs/tmp" "$fs/var/lib/amicus" "$fs/archive" "$fs/proc" "$fs/dev" "$fs/sys"
  chmod 1777 "$fs/tmp"
  cp "$bin" "$fs/usr/local/bin/"
  strip "$fs/usr/local/bin/$(basename "$bin")"
  local objs=("$bin")
  if [ -n "$extra" ]; then
    mkdir -p "$fs/usr/lib/amicus"
    cp "$extra" "$fs/usr/lib/amicus/"
    strip --strip-unneeded "$fs/usr/lib/amicus/$(basename "$extra")"
    objs+=("$extra")
  fi
  # Every library the dynamic loader resolves for them, at the same path, and the loader.
  for lib in $(ldd "${objs[@]}" | awk '/=> \//{print $3} /^\t\/lib/{print $1}' | sort -u); do
    mkdir -p "$fs$(dirname "$lib")"
    cp -L "$lib" "$fs$lib"
  done
  printf 'root:x:0:0:root:/:/nonexistent\namicus:x:10001:10001:amicus:/var/lib/amicus:/nonexistent\n' >"$fs/etc/passwd"
  printf 'root:x:0:\namicus:x:10001:\n' >"$fs/etc/group"
  chown -R 10001:10001 "$fs/var/lib/amicus" 2>/dev/null || true
}

stage station "$root/target/release/amicus" "$ort_lib"
cat >"$work/station/Containerfile" <<CONTAINERFILE
FROM scratch
COPY rootfs/ /
USER 10001:10001
WORKDIR /var/lib/amicus
ENV HOME=/var/lib/amicus AMICUS_ORT_LIB=/usr/lib/amicus/libonnxruntime.so.${ort_version}
LABEL org.opencontainers.image.title="amicus-station" org.opencontainers.image.version="${version}" org.opencontainers.image.description="amicus station: runs signed WebAssembly trains on the hospital's data; outbound connections only"
VOLUME ["/var/lib/amicus"]
ENTRYPOINT ["/usr/local/bin/amicus"]
CMD ["station", "serve", "--dir", "/var/lib/amicus/station"]
CONTAINERFILE

stage registry "$root/target/release/amicus-registry"
cat >"$work/registry/Containerfile" <<CONTAINERFILE
FROM scratch
COPY rootfs/ /
USER 10001:10001
WORKDIR /var/lib/amicus
ENV HOME=/var/lib/amicus AMICUS_LISTEN=0.0.0.0:7700
LABEL org.opencontainers.image.title="amicus-registry" org.opencontainers.image.version="${version}" org.opencontainers.image.description="amicus registry: the HTTP API stations pull work from (database: AMICUS_DB_URL)"
EXPOSE 7700
ENTRYPOINT ["/usr/local/bin/amicus-registry"]
CMD ["serve"]
CONTAINERFILE

for name in station registry; do
  tag="localhost/amicus-$name:$version"
  echo "images: building $tag"
  podman build -q --no-cache -t "$tag" "$work/$name" >/dev/null
  size=$(podman image inspect --format '{{.Size}}' "$tag")
  echo "images: $tag $((size / 1000000)) MB"
  if [ "$save" = 1 ]; then
    out="$root/target/images/amicus-$name-$version.oci.tar"
    rm -f "$out"
    podman save -q --format oci-archive -o "$out" "$tag"
    echo "images: saved $out ($(( $(stat -c %s "$out") / 1000000 )) MB)"
  fi
done
rm -rf "$work"
