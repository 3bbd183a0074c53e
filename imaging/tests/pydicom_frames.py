"""Reference decoder for the corpus test: every frame of each file as float32 real-world
values, computed by pydicom (pixel_array, then the modality transform) -- independent of
amicus and of dicom-rs.

Usage: pydicom_frames.py OUT_DIR FILE...
Writes OUT_DIR/<n>.f32 (little-endian float32, frames x rows x columns) for each file pydicom
can decode and OUT_DIR/index.json: [{"file", "ok", "shape" | "error"}].
"""
import json
import pathlib
import sys

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut


def rescale_of(ds, group):
    """(slope, intercept) from a frame's functional groups, the shared ones, or the top level."""
    for g in (group, ds.get("SharedFunctionalGroupsSequence", [None])[0]):
        if g is not None and "PixelValueTransformationSequence" in g:
            t = g.PixelValueTransformationSequence[0]
            return float(t.get("RescaleSlope", 1)), float(t.get("RescaleIntercept", 0))
    return None


def real_values(ds):
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = arr.reshape((frames, int(ds.Rows), int(ds.Columns)))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and rescale_of(ds, per_frame[0]) is not None:
        out = np.empty(arr.shape, dtype=np.float64)
        for f in range(frames):
            slope, intercept = rescale_of(ds, per_frame[f])
            out[f] = arr[f].astype(np.float64) * slope + intercept
    else:
        out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if "DoseGridScaling" in ds:
        out = out * float(ds.DoseGridScaling)
    return out.astype("<f4")


def main():
    out_dir = pathlib.Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    index = []
    for n, name in enumerate(sys.argv[2:]):
        entry = {"file": name}
        try:
            ds = pydicom.dcmread(name, force=True)
            values = real_values(ds)
            (out_dir / f"{n}.f32").write_bytes(values.tobytes())
            entry.update(ok=True, shape=list(values.shape))
        except Exception as e:  # noqa: BLE001 -- every failure is a data point
            entry.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        index.append(entry)
    (out_dir / "index.json").write_text(json.dumps(index))


if __name__ == "__main__":
    main()
