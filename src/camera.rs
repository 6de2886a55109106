//! Pinhole camera geometry: from a defect's pixel coordinates to a 3-D point in the camera's
//! optical frame (x right, y down, z forward), so a robot can reach the defect. Uses nalgebra.
use nalgebra::{Matrix3, Point3, Vector3, Vector4};

use crate::error::{Error, Result};

/// Intrinsics of an undistorted (rectified) pinhole camera.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PinholeCamera {
    /// Row-major 3x3 camera matrix K = [fx 0 cx; 0 fy cy; 0 0 1].
    pub k: Matrix3<f64>,
}

impl PinholeCamera {
    /// From the 9 values of sensor_msgs/CameraInfo `k` (row-major). Refuses a zero focal length.
    pub fn from_k(k: &[f64]) -> Result<Self> {
        if k.len() != 9 {
            return Err(Error::Config(format!("camera matrix needs 9 values, got {}", k.len())));
        }
        let k = Matrix3::from_row_slice(k);
        if !(k[(0, 0)].abs() > 1e-9 && k[(1, 1)].abs() > 1e-9) || k.iter().any(|v| !v.is_finite()) {
            return Err(Error::Config("camera matrix has zero or non-finite focal length (uncalibrated camera?)".into()));
        }
        Ok(Self { k })
    }

    /// Direction of the ray through pixel (u, v), not normalised (z = 1).
    pub fn ray(&self, u: f64, v: f64) -> Vector3<f64> {
        let (fx, fy, cx, cy) = (self.k[(0, 0)], self.k[(1, 1)], self.k[(0, 2)], self.k[(1, 2)]);
        Vector3::new((u - cx) / fx, (v - cy) / fy, 1.0)
    }

    /// Where the ray through pixel (u, v) meets `plane`; None when it runs parallel to the
    /// plane or meets it behind the camera.
    pub fn intersect(&self, u: f64, v: f64, plane: &Plane) -> Option<Point3<f64>> {
        let d = self.ray(u, v);
        let n = plane.normal();
        let denom = n.dot(&d);
        if denom.abs() < 1e-12 {
            return None;
        }
        let t = plane.offset() / denom;
        (t > 0.0).then(|| Point3::from(d * t))
    }
}

/// A plane n·p = offset in the camera's optical frame (the surface the parts lie on).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plane(Vector4<f64>);

impl Plane {
    /// The fronto-parallel plane at `distance` metres in front of the camera (z = distance).
    pub fn at_distance(distance: f64) -> Result<Self> {
        Self::new([0.0, 0.0, 1.0, distance])
    }

    /// From [a, b, c, d] meaning a x + b y + c z = d; the normal is normalised.
    pub fn new(abcd: [f64; 4]) -> Result<Self> {
        let n = Vector3::new(abcd[0], abcd[1], abcd[2]);
        let len = n.norm();
        if !(len > 1e-12) || !abcd[3].is_finite() {
            return Err(Error::Config(format!("plane {abcd:?}: the normal (a, b, c) must be non-zero")));
        }
        Ok(Self(Vector4::new(abcd[0] / len, abcd[1] / len, abcd[2] / len, abcd[3] / len)))
    }

    /// Unit normal.
    pub fn normal(&self) -> Vector3<f64> {
        self.0.xyz()
    }

    /// Offset along the normal.
    pub fn offset(&self) -> f64 {
        self.0.w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cam() -> PinholeCamera {
        PinholeCamera::from_k(&[500.0, 0.0, 320.0, 0.0, 500.0, 240.0, 0.0, 0.0, 1.0]).unwrap()
    }

    #[test]
    fn principal_point_projects_straight_ahead() {
        let p = cam().intersect(320.0, 240.0, &Plane::at_distance(0.4).unwrap()).unwrap();
        assert!((p - Point3::new(0.0, 0.0, 0.4)).norm() < 1e-12);
    }

    #[test]
    fn offset_pixel_scales_with_distance() {
        // 100 px right of centre at f = 500 px and 0.5 m: 0.1 m right.
        let p = cam().intersect(420.0, 240.0, &Plane::at_distance(0.5).unwrap()).unwrap();
        assert!((p.x - 0.1).abs() < 1e-12 && p.y.abs() < 1e-12 && (p.z - 0.5).abs() < 1e-12);
        let q = cam().intersect(320.0, 140.0, &Plane::at_distance(1.0).unwrap()).unwrap();
        assert!((q.y + 0.2).abs() < 1e-12, "up in the image is -y in the optical frame");
    }

    #[test]
    fn tilted_plane_and_degenerate_cases() {
        // Plane x = 1 (a wall to the right): the centre ray never meets it.
        let wall = Plane::new([1.0, 0.0, 0.0, 1.0]).unwrap();
        assert!(cam().intersect(320.0, 240.0, &wall).is_none());
        // A ray to the right meets it at x = 1.
        let p = cam().intersect(820.0, 240.0, &wall).unwrap();
        assert!((p.x - 1.0).abs() < 1e-12 && (p.z - 1.0).abs() < 1e-12);
        // Plane behind the camera.
        assert!(cam().intersect(320.0, 240.0, &Plane::at_distance(-1.0).unwrap()).is_none());
        assert!(Plane::new([0.0, 0.0, 0.0, 1.0]).is_err());
        assert!(PinholeCamera::from_k(&[0.0; 9]).is_err());
        assert!(PinholeCamera::from_k(&[1.0; 4]).is_err());
    }
}
