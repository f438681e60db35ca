//! Input checks shared by every backend, so that a bad call gets the same error,
//! worded the same way, whatever the hardware.

use crate::{KernelError, NO_SECOND};

/// `k` centroids of `d` features, row-major in `centroids`: at least one, indices
/// that fit 32 bits, the right number of values, every value finite.
pub(crate) fn centroids(centroids: &[f32], k: usize, d: usize) -> Result<(), KernelError> {
    if k == 0 {
        return Err(KernelError::EmptyCentroids);
    }
    if k >= NO_SECOND as usize {
        return Err(KernelError::Shape(format!(
            "k = {k} centroids do not fit 32-bit centroid indices"
        )));
    }
    if k.checked_mul(d) != Some(centroids.len()) {
        return Err(KernelError::Shape(format!(
            "{} centroid values are not k x d = {k} x {d}",
            centroids.len()
        )));
    }
    if let Some(pos) = centroids.iter().position(|v| !v.is_finite()) {
        return Err(KernelError::NonFiniteCentroid {
            row: pos / d,
            col: pos % d,
            value: centroids[pos],
        });
    }
    Ok(())
}

/// An output slice of `len` results for the `n` uploaded points.
pub(crate) fn results(len: usize, n: usize) -> Result<(), KernelError> {
    if len != n {
        return Err(KernelError::Shape(format!(
            "room for {len} results but {n} points are uploaded"
        )));
    }
    Ok(())
}

/// Row-major points of `d` features: at least one feature, whole rows, every value
/// finite (the first bad value is named by row and column).
pub(crate) fn points(points: &[f32], d: usize) -> Result<(), KernelError> {
    use rayon::prelude::*;
    if d == 0 {
        return Err(KernelError::Shape(
            "points need at least one feature (d = 0)".into(),
        ));
    }
    if !points.len().is_multiple_of(d) {
        return Err(KernelError::Shape(format!(
            "{} values are not a whole number of rows of {d} features",
            points.len()
        )));
    }
    // A plain scan of each chunk first (it vectorises; rayon's per-value
    // `position_first` costs tens of nanoseconds a value), the position only on
    // error.
    let bad = |v: &f32| !v.is_finite();
    if points.par_chunks(1 << 16).any(|c| c.iter().any(bad))
        && let Some(pos) = points.iter().position(bad)
    {
        return Err(KernelError::NonFinitePoint {
            row: pos / d,
            col: pos % d,
            value: points[pos],
        });
    }
    Ok(())
}

/// The shapes of an ALS half-step: `x_n x d` factors solved against `y_n x y_d`
/// fixed ones, `confidence` of `rows x cols`, a finite `d x d` Gram matrix and a
/// finite, non-negative regularization.
pub(crate) fn als(
    (x_n, d): (usize, usize),
    (y_n, y_d): (usize, usize),
    confidence: (usize, usize),
    yty: &[f64],
    lambda: f32,
) -> Result<(), KernelError> {
    if y_d != d {
        return Err(KernelError::Shape(format!(
            "the factors being solved have {d} features per row but the fixed factors have {y_d}"
        )));
    }
    if confidence != (x_n, y_n) {
        return Err(KernelError::Shape(format!(
            "the confidences are {} x {} but there are {x_n} rows to solve and {y_n} fixed rows",
            confidence.0, confidence.1
        )));
    }
    if yty.len() != d * d {
        return Err(KernelError::Shape(format!(
            "YᵀY holds {} values, expected d x d = {d} x {d}",
            yty.len()
        )));
    }
    if let Some(pos) = yty.iter().position(|v| !v.is_finite()) {
        return Err(KernelError::Shape(format!(
            "YᵀY entry ({}, {}) is {}: the Gram matrix must be finite",
            pos / d,
            pos % d,
            yty[pos]
        )));
    }
    if !(lambda.is_finite() && lambda >= 0.0) {
        return Err(KernelError::Shape(format!(
            "regularization is {lambda}: it must be a finite number >= 0"
        )));
    }
    Ok(())
}
