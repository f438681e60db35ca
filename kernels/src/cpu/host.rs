//! Host memory: what the CPU backend keeps for a resident (dense points, or a
//! sparse matrix), how a resident is opened as such, and the checked writes into
//! it.

use std::sync::Arc;

use crate::{Csr, KernelError, Resident};

pub(crate) const NAME: &str = "cpu";

/// Points as uploaded to the CPU backend. The buffer may be shared with the
/// caller ([`crate::Backend::download_shared`]); a write then copies it first.
pub(crate) struct HostPoints {
    pub(crate) d: usize,
    /// Row-major `n x d`.
    pub(crate) values: Arc<Vec<f32>>,
}

/// Buffers at least this large (bytes) ask the kernel for huge pages: rows read
/// at random from a large matrix (the ALS half-steps' gathers) otherwise miss the
/// TLB on almost every row.
const HUGE_PAGES_FROM: usize = 8 << 20;

/// A copy of `values` in a buffer that, when large, is backed by transparent huge
/// pages where the kernel allows it (Linux, `madvise` mode or `always`).
pub(crate) fn host_copy(values: &[f32]) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(values.len());
    advise_huge_pages(&mut v);
    v.extend_from_slice(values);
    v
}

/// `len` zeros, in a buffer backed as [`host_copy`]'s.
pub(crate) fn host_zeros(len: usize) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    advise_huge_pages(&mut v);
    v.resize(len, 0.0);
    v
}

/// Asks for huge pages over the whole 2 MiB pages inside `v`'s allocation, before
/// anything is written to it (the first touch then maps huge pages).
fn advise_huge_pages(v: &mut Vec<f32>) {
    let bytes = v.capacity() * 4;
    if bytes < HUGE_PAGES_FROM {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_mut_ptr() as usize;
        let first = start.next_multiple_of(HUGE);
        let end = (start + bytes) / HUGE * HUGE;
        if end > first {
            // SAFETY: [first, end) lies inside the allocation of `v` (rounded
            // inwards to whole huge pages), which this function owns mutably;
            // MADV_HUGEPAGE changes how the kernel backs the range, not its
            // contents or validity. A failure (e.g. THP disabled) is harmless.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
            }
        }
    }
}

impl HostPoints {
    pub(crate) fn n(&self) -> usize {
        self.values.len() / self.d
    }

    /// The values to write to: copied first while a caller still shares them.
    pub(crate) fn values_mut(&mut self) -> &mut Vec<f32> {
        Arc::make_mut(&mut self.values)
    }
}

/// The storage of `r` as a `T` of the cpu backend, or an error saying that `what`
/// must be a `kind` matrix (when it is cpu storage of another type) or that it
/// lives on another backend.
pub(crate) fn storage<'a, T: 'static>(
    r: &'a Resident,
    backend: &'static str,
    what: &str,
    kind: &str,
) -> Result<&'a T, KernelError> {
    let shape = (r.n(), r.d());
    r.downcast::<T>(backend)
        .map_err(|e| kind_error(e, backend, what, kind, shape))
}

/// As [`storage`], mutably.
pub(crate) fn storage_mut<'a, T: 'static>(
    r: &'a mut Resident,
    backend: &'static str,
    what: &str,
    kind: &str,
) -> Result<&'a mut T, KernelError> {
    let shape = (r.n(), r.d());
    r.downcast_mut::<T>(backend)
        .map_err(|e| kind_error(e, backend, what, kind, shape))
}

fn kind_error(
    e: KernelError,
    backend: &'static str,
    what: &str,
    kind: &str,
    (n, d): (usize, usize),
) -> KernelError {
    match e {
        KernelError::ForeignPoints(owner) if owner == backend => KernelError::Shape(format!(
            "{what} ({n} x {d}) must be a {kind} matrix; it was uploaded as another kind"
        )),
        other => other,
    }
}

/// Checks `m` as [`Csr::validate`] does, first making sure the offsets never
/// decrease (so that the validation itself cannot index out of bounds).
pub(crate) fn validate_csr(m: &Csr) -> Result<(), KernelError> {
    if let Some(r) = m.indptr.windows(2).position(|w| w[0] > w[1]) {
        return Err(KernelError::Shape(format!("CSR row {r}: offsets decrease")));
    }
    m.validate()
}

/// Overwrites rows `rows` of the row-major `target` (`d` features per row) with
/// `values` (`rows.len() x d`). Checks everything before writing anything; when a
/// row is listed twice, the last values win. A non-finite value is reported at
/// its target row (`rows[k]`), not at its position in `values`.
pub(crate) fn write_rows(
    target: &mut [f32],
    d: usize,
    rows: &[u32],
    values: &[f32],
) -> Result<(), KernelError> {
    let n = target.len() / d;
    if rows.len().checked_mul(d) != Some(values.len()) {
        return Err(KernelError::Shape(format!(
            "{} values are not {} rows of {d} features",
            values.len(),
            rows.len()
        )));
    }
    if let Some(&row) = rows.iter().find(|&&r| r as usize >= n) {
        return Err(KernelError::Shape(format!(
            "row {row} was written but the matrix has only {n} rows"
        )));
    }
    if let Some(pos) = values.iter().position(|v| !v.is_finite()) {
        return Err(KernelError::NonFinitePoint {
            row: rows[pos / d] as usize,
            col: pos % d,
            value: values[pos],
        });
    }
    for (&row, src) in rows.iter().zip(values.chunks_exact(d)) {
        let start = row as usize * d;
        target[start..start + d].copy_from_slice(src);
    }
    Ok(())
}
