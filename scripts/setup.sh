#!/usr/bin/env bash
# Installs what amicus needs, idempotently:
# - the wasm32-wasip2 Rust target (trains are WebAssembly components);
# - CMake and a C++ compiler (the JPEG-LS and JPEG 2000 codecs build from C/C++ sources);
# - ONNX Runtime's shared library, from the pinned `onnxruntime` wheel on PyPI (hash-checked),
#   at ~/.cache/amicus/onnxruntime/ where the station finds it;
# with --deploy, podman and runc (to build and run the container images, deploy/images.sh);
# and with --test, those and what the test suite needs besides:
# - dicom3tools (Debian: dciodvfy validates the synthetic DICOM in the tests);
# - pydicom (with the pylibjpeg/pyjpegls decoders), numpy, rdflib, onnx, prometheus-client
#   (Prometheus' own parser of the metrics amicus serves) and PyYAML (reads the Kubernetes
#   manifests) in a venv at
#   ~/.cache/amicus/venv (independent readers and writers of the DICOM, pixel data, PROV-O
#   and ONNX models the tests check);
# - a real-world DICOM corpus at ~/.cache/amicus/corpus: pydicom's own test files and the
#   pydicom-data wheel's files (both from PyPI), which the index must read or quarantine.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi
if command -v rustup >/dev/null; then
  if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "setup: installing the wasm32-wasip2 target"
    rustup target add wasm32-wasip2
  fi
else
  echo "setup: rustup not found; make sure the wasm32-wasip2 target is installed" >&2
fi

# Building needs CMake (CharLS, the JPEG-LS codec, builds with it) and a C/C++ compiler.
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then
  echo "setup: installing cmake and a C++ compiler (pixel data codecs)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq cmake g++ >/dev/null
fi

VENV="${HOME}/.cache/amicus/venv"
ensure_venv() {
  if [ ! -x "$VENV/bin/pip" ]; then
    if ! python3 -m venv "$VENV" 2>/dev/null; then
      # Debian's system Python keeps venv in a separate package.
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$VENV"
    fi
  fi
}

# ONNX Runtime (CPU), the library only: the same pinned build on every machine.
ORT_VERSION="1.31.1"
ORT_WHEEL="onnxruntime-${ORT_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl"
ORT_SHA256="5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f"
ORT_DIR="${HOME}/.cache/amicus/onnxruntime"
if [ ! -f "$ORT_DIR/libonnxruntime.so.$ORT_VERSION" ]; then
  echo "setup: fetching ONNX Runtime $ORT_VERSION from PyPI into $ORT_DIR"
  ensure_venv
  tmp="$(mktemp -d)"
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.11 --platform manylinux_2_28_x86_64 "onnxruntime==$ORT_VERSION" -d "$tmp"
  echo "$ORT_SHA256  $tmp/$ORT_WHEEL" | sha256sum -c --quiet
  mkdir -p "$ORT_DIR"
  "$VENV/bin/python" -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2], "wb").write(z.read("onnxruntime/capi/libonnxruntime.so." + sys.argv[3]))' \
    "$tmp/$ORT_WHEEL" "$ORT_DIR/libonnxruntime.so.$ORT_VERSION.part" "$ORT_VERSION"
  mv "$ORT_DIR/libonnxruntime.so.$ORT_VERSION.part" "$ORT_DIR/libonnxruntime.so.$ORT_VERSION"
  rm -rf "$tmp"
fi

# Podman, runc and their helpers: `deploy/images.sh` builds the container images with them and
# the test suite runs the images (deploy/containers.conf picks runc; see README "Deploy").
install_podman() {
  if ! command -v podman >/dev/null || ! command -v runc >/dev/null \
      || ! dpkg -s catatonit containernetworking-plugins >/dev/null 2>&1; then
    echo "setup: installing podman, runc, catatonit and the container network plugins"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq podman runc catatonit \
      containernetworking-plugins >/dev/null
  fi
}

case "${1:-}" in
  --deploy) install_podman; exit 0 ;;
  --test) install_podman ;;
  *) exit 0 ;;
esac

if ! command -v dciodvfy >/dev/null; then
  echo "setup: installing dicom3tools (dciodvfy)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dicom3tools >/dev/null
fi

if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  echo "setup: installing PostgreSQL (the registry's tests run on it as well as on SQLite)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi

if ! "$VENV/bin/python" -c "import pydicom, numpy, rdflib, pylibjpeg, libjpeg, openjpeg, jpeg_ls, onnx, dp_accounting, prometheus_client, yaml" 2>/dev/null; then
  echo "setup: installing pydicom (and its JPEG, JPEG 2000, JPEG-LS decoders), numpy, rdflib, onnx, dp-accounting, prometheus-client and PyYAML into $VENV"
  ensure_venv
  "$VENV/bin/pip" install -q --disable-pip-version-check "pydicom==3.*" "numpy<3" "rdflib==7.*" \
    "pylibjpeg==2.1.0" "pylibjpeg-libjpeg==2.5.0" "pylibjpeg-openjpeg==2.6.0" "pyjpegls==1.5.1" \
    "onnx==1.23.2" "dp-accounting==0.6.0" "prometheus-client==0.21.1" "PyYAML==6.0.2"
fi

CORPUS="${HOME}/.cache/amicus/corpus"
if [ ! -f "$CORPUS/.complete" ]; then
  echo "setup: unpacking the real-world DICOM corpus into $CORPUS"
  rm -rf "$CORPUS"
  mkdir -p "$CORPUS/wheel"
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps \
    "pydicom-data==1.0.0" -d "$CORPUS/wheel"
  "$VENV/bin/python" - "$CORPUS" <<'PY'
import pathlib, shutil, sys, zipfile
import pydicom
corpus = pathlib.Path(sys.argv[1])
wheel = next((corpus / "wheel").glob("pydicom_data-*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("data_store/data/") and not name.endswith("/"):
            target = corpus / "pydicom-data" / pathlib.Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
tests = pathlib.Path(pydicom.__file__).parent / "data" / "test_files"
shutil.copytree(tests, corpus / "pydicom", symlinks=False)
PY
  rm -rf "$CORPUS/wheel"
  touch "$CORPUS/.complete"
fi
