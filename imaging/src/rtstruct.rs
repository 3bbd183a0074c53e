//! RTSTRUCT ROI → a label mask on an image series' grid.
//!
//! Closed planar contours are rasterised slice by slice with the even-odd rule, sampled at
//! pixel centres: a pixel is inside when a ray from its centre crosses the contours an odd
//! number of times, so holes (a contour inside another) and several contours per slice work.

use crate::ImagingError;
use crate::grid::{Geometry, Volume};
use amicus_index::values::{floats, items, text};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use std::path::Path;

/// ROI names in an RTSTRUCT object.
pub fn roi_names(obj: &InMemDicomObject) -> Vec<String> {
    items(obj, tags::STRUCTURE_SET_ROI_SEQUENCE)
        .iter()
        .filter_map(|i| text(i, tags::ROI_NAME))
        .collect()
}

/// Fill (XOR) one polygon, in continuous pixel coordinates, into a slice of `nx` × `ny`.
pub(crate) fn xor_polygon(points: &[(f64, f64)], nx: usize, ny: usize, slice: &mut [u8]) {
    if points.len() < 3 {
        return;
    }
    let mut crossings: Vec<f64> = Vec::new();
    for j in 0..ny {
        let y = j as f64;
        crossings.clear();
        for k in 0..points.len() {
            let (x0, y0) = points[k];
            let (x1, y1) = points[(k + 1) % points.len()];
            // Half-open rule: an edge counts when y is in [min, max).
            if (y0 <= y && y < y1) || (y1 <= y && y < y0) {
                crossings.push(x0 + (y - y0) * (x1 - x0) / (y1 - y0));
            }
        }
        crossings.sort_by(f64::total_cmp);
        for pair in crossings.chunks_exact(2) {
            // Pixel centres i with a <= i < b.
            let from = pair[0].ceil().max(0.0);
            let to = pair[1].ceil().min(nx as f64);
            if from >= to {
                continue;
            }
            let row = &mut slice[j * nx..(j + 1) * nx];
            for v in &mut row[from as usize..to as usize] {
                *v ^= 1;
            }
        }
    }
}

/// The mask of ROI `name` of the RTSTRUCT at `path` on `geometry`.
pub fn load_roi_mask(path: &Path, name: &str, geometry: &Geometry) -> Result<Volume, ImagingError> {
    let bad = |reason: String| ImagingError::BadFile {
        path: path.display().to_string(),
        reason,
    };
    let (obj, _) = amicus_index::header::read_header(path).map_err(|e| bad(e.to_string()))?;
    let number = items(&obj, tags::STRUCTURE_SET_ROI_SEQUENCE)
        .iter()
        .find(|i| text(i, tags::ROI_NAME).as_deref() == Some(name))
        .and_then(|i| text(i, tags::ROI_NUMBER))
        .ok_or_else(|| {
            ImagingError::NoLabel(format!(
                "{name:?} in the RTSTRUCT (it has {:?})",
                roi_names(&obj)
            ))
        })?;
    let roi = items(&obj, tags::ROI_CONTOUR_SEQUENCE)
        .iter()
        .find(|i| text(i, tags::REFERENCED_ROI_NUMBER).as_deref() == Some(number.as_str()))
        .ok_or_else(|| bad(format!("ROI {name:?} has no contours")))?;
    let [nx, ny, nz] = geometry.size;
    let plane = nx * ny;
    let mut parity = vec![0u8; plane * nz];
    let mut slice = vec![0u8; plane];
    for contour in items(roi, tags::CONTOUR_SEQUENCE) {
        let kind = text(contour, tags::CONTOUR_GEOMETRIC_TYPE).unwrap_or_default();
        if kind != "CLOSED_PLANAR" {
            // POINT and OPEN contours enclose nothing.
            continue;
        }
        let data = floats(contour, tags::CONTOUR_DATA)
            .ok_or_else(|| bad(format!("ROI {name:?}: unreadable Contour Data")))?;
        if data.len() % 3 != 0 || data.len() < 9 {
            return Err(bad(format!(
                "ROI {name:?}: Contour Data of {} numbers",
                data.len()
            )));
        }
        let voxels: Vec<[f64; 3]> = data
            .chunks_exact(3)
            .map(|p| geometry.to_voxel([p[0], p[1], p[2]]))
            .collect();
        let z = voxels.iter().map(|v| v[2]).sum::<f64>() / voxels.len() as f64;
        if voxels.iter().any(|v| (v[2] - z).abs() > 0.05) {
            return Err(ImagingError::Unsupported(format!(
                "ROI {name:?}: a contour is not parallel to the image slices"
            )));
        }
        let k = z.round();
        if (z - k).abs() > 0.25 || k < 0.0 || k >= nz as f64 {
            return Err(ImagingError::Inconsistent(format!(
                "ROI {name:?}: a contour at slice position {z:.2} does not lie on a slice of the series"
            )));
        }
        let k = k as usize;
        slice.fill(0);
        let points: Vec<(f64, f64)> = voxels.iter().map(|v| (v[0], v[1])).collect();
        xor_polygon(&points, nx, ny, &mut slice);
        for (p, s) in parity[k * plane..(k + 1) * plane].iter_mut().zip(&slice) {
            *p ^= s;
        }
    }
    Ok(Volume {
        data: parity.into_iter().map(f32::from).collect(),
        geometry: geometry.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::xor_polygon;

    fn count(m: &[u8]) -> usize {
        m.iter().filter(|v| **v == 1).count()
    }

    #[test]
    fn squares_holes_and_two_contours() {
        let (nx, ny) = (20, 20);
        let square =
            |x0: f64, y0: f64, x1: f64, y1: f64| vec![(x0, y0), (x1, y0), (x1, y1), (x0, y1)];
        // Pixel centres 2..=11 in x and y: a 10 × 10 block.
        let mut m = vec![0u8; nx * ny];
        xor_polygon(&square(1.5, 1.5, 11.5, 11.5), nx, ny, &mut m);
        assert_eq!(count(&m), 100);
        assert_eq!(m[2 * nx + 2], 1);
        assert_eq!(m[nx + 1], 0);
        // A hole: XOR a 4 × 4 block inside.
        let mut hole = vec![0u8; nx * ny];
        xor_polygon(&square(4.5, 4.5, 8.5, 8.5), nx, ny, &mut hole);
        for (a, b) in m.iter_mut().zip(&hole) {
            *a ^= b;
        }
        assert_eq!(count(&m), 84);
        // A second, disjoint contour adds its own pixels.
        let mut other = vec![0u8; nx * ny];
        xor_polygon(&square(13.5, 13.5, 15.5, 15.5), nx, ny, &mut other);
        assert_eq!(count(&other), 4);
        // Winding direction does not matter; outside the grid is clipped.
        let mut clipped = vec![0u8; nx * ny];
        let mut reversed = square(-5.0, -5.0, 2.5, 2.5);
        reversed.reverse();
        xor_polygon(&reversed, nx, ny, &mut clipped);
        assert_eq!(count(&clipped), 9);
    }
}
