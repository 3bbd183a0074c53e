#!/usr/bin/env bash
# Installs what amicus needs, idempotently:
# - the wasm32-wasip2 Rust target (trains are WebAssembly components);
# - CMake and a C++ compiler (the JPEG-LS and JPEG 2000 codecs build from C/C++ sources);
# and with --test, what the test suite needs besides:
# - dicom3tools (Debian: dciodvfy validates the synthetic DICOM in the tests);
# - pydicom (with the pylibjpeg/pyjpegls decoders), numpy and rdflib in a venv at
#   ~/.cache/amicus/venv (independent readers of the DICOM, pixel data and PROV-O the tests
#   check);
# - a real-world DICOM corpus at ~/.cache/amicus/corpus: pydicom's own test files and the
#   pydicom-data wheel's files (both from PyPI), which the index must read or quarantine.
# Later parts add the ONNX Runtime library (from the PyPI wheel) here.
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

[ "${1:-}" = "--test" ] || exit 0

if ! command -v dciodvfy >/dev/null; then
  echo "setup: installing dicom3tools (dciodvfy)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dicom3tools >/dev/null
fi

VENV="${HOME}/.cache/amicus/venv"
if ! "$VENV/bin/python" -c "import pydicom, numpy, rdflib, pylibjpeg, libjpeg, openjpeg, jpeg_ls" 2>/dev/null; then
  echo "setup: creating $VENV with pydicom (and its JPEG, JPEG 2000, JPEG-LS decoders), numpy and rdflib"
  if [ ! -x "$VENV/bin/pip" ] && ! python3 -m venv "$VENV" 2>/dev/null; then
    # Debian's system Python keeps venv in a separate package.
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check "pydicom==3.*" "numpy<3" "rdflib==7.*" \
    "pylibjpeg==2.1.0" "pylibjpeg-libjpeg==2.5.0" "pylibjpeg-openjpeg==2.6.0" "pyjpegls==1.5.1"
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
