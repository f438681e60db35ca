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
