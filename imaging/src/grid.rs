//! A volume on a patient-space grid: data (z, y, x) in row-major f32, and where each voxel is.

/// Patient coordinate system (LPS, millimetres) of a voxel grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    /// Centre of voxel (0, 0, 0).
    pub origin: [f64; 3],
    /// Spacing along x (columns), y (rows) and z (slices).
    pub spacing: [f64; 3],
    /// Rows of the matrix are the x axis (Image Orientation row direction), the y axis
    /// (column direction) and the z axis (slice normal, increasing slice index).
    pub direction: [[f64; 3]; 3],
    /// Size along x, y, z.
    pub size: [usize; 3],
}

impl Geometry {
    /// Continuous voxel coordinates (x, y, z) of a patient-space point.
    pub fn to_voxel(&self, p: [f64; 3]) -> [f64; 3] {
        let d = [
            p[0] - self.origin[0],
            p[1] - self.origin[1],
            p[2] - self.origin[2],
        ];
        std::array::from_fn(|axis| dot(d, self.direction[axis]) / self.spacing[axis])
    }

    /// Patient-space position of continuous voxel coordinates (x, y, z).
    pub fn to_patient(&self, v: [f64; 3]) -> [f64; 3] {
        let mut p = self.origin;
        for ((steps, spacing), direction) in v.iter().zip(self.spacing).zip(self.direction) {
            for (value, d) in p.iter_mut().zip(direction) {
                *value += steps * spacing * d;
            }
        }
        p
    }

    pub fn voxels(&self) -> usize {
        self.size.iter().product()
    }

    pub fn voxel_volume_mm3(&self) -> f64 {
        self.spacing.iter().product()
    }
}

/// Values on a grid, (z, y, x) row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    pub data: Vec<f32>,
    pub geometry: Geometry,
}

impl Volume {
    /// Shape (z, y, x).
    pub fn shape(&self) -> [usize; 3] {
        let [x, y, z] = self.geometry.size;
        [z, y, x]
    }
}

/// Dot product.
pub(crate) fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Cross product.
pub(crate) fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voxel_and_patient_coordinates_round_trip() {
        let g = Geometry {
            origin: [-100.0, -50.0, 20.0],
            spacing: [0.5, 0.7, 2.0],
            direction: [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]],
            size: [10, 10, 10],
        };
        let v = [3.0, 4.5, 7.0];
        let p = g.to_patient(v);
        let back = g.to_voxel(p);
        for i in 0..3 {
            assert!((back[i] - v[i]).abs() < 1e-9);
        }
        assert_eq!(cross([1.0, 0.0, 0.0], [0.0, 1.0, 0.0]), [0.0, 0.0, 1.0]);
    }
}
