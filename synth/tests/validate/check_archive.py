"""Third-party check of an amicus-synth archive with pydicom.

Reads every DICOM file, decodes all pixel data, and cross-checks the SEG against the
ground truth: each lesion segment's voxel volume must be close to the ellipsoid's volume.
Prints one JSON object; exits non-zero on any failure.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pydicom

root = Path(sys.argv[1])
gt = json.loads((root / "ground-truth.json").read_text())
problems = []
counts = {"CT": 0, "RTSTRUCT": 0, "SEG": 0}
lesions_checked = 0

for patient in gt["patients"]:
    folder = root / patient["folder"]
    for f in sorted((folder / "ct").glob("*.dcm")):
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        if hu.shape != (ds.Rows, ds.Columns) or hu.min() < -1024 or hu.max() > 3071:
            problems.append(f"{f}: bad pixel data {hu.shape} {hu.min()} {hu.max()}")
        counts["CT"] += 1
    rt = pydicom.dcmread(folder / "rtstruct.dcm")
    names = [r.ROIName for r in rt.StructureSetROISequence]
    expected = [l["name"] for l in patient["phantom"]["lesions"]] + ["Lung_L", "Lung_R"]
    if names != expected:
        problems.append(f"{folder}: RTSTRUCT ROIs {names} != {expected}")
    counts["RTSTRUCT"] += 1

    seg = pydicom.dcmread(folder / "seg.dcm")
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    voxel = patient["pixel_spacing_mm"] ** 2 * patient["slice_thickness_mm"]
    per_segment = {}
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        n = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        per_segment[n] = per_segment.get(n, 0) + int(frames[i].sum())
    for lesion in patient["phantom"]["lesions"]:
        number = [k for k, v in labels.items() if v == lesion["name"]][0]
        measured = per_segment.get(number, 0) * voxel
        exact = 4.0 / 3.0 * math.pi * math.prod(lesion["radii"])
        # Thick slices sample a small sphere coarsely: allow more error when few slices cut it.
        slices_through = 2 * lesion["radii"][2] / patient["slice_thickness_mm"]
        tolerance = 0.1 if slices_through >= 8 else 0.5
        if abs(measured - exact) > tolerance * exact:
            problems.append(f"{folder}: {lesion['name']} SEG volume {measured:.0f} vs {exact:.0f} mm3")
        lesions_checked += 1
    counts["SEG"] += 1

print(json.dumps({"counts": counts, "lesions_checked": lesions_checked, "problems": problems}))
sys.exit(1 if problems else 0)
