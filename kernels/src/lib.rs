//! shoal's compute engine. [`Backend`] is the seam between the distributed
//! algorithms and the hardware: points are uploaded once and stay resident in the
//! backend across rounds; per round only centroids go in and small results come out.
//!
//! Contract shared by every backend (and checked against the plain twin in
//! [`reference`]):
//! - distances are squared Euclidean, computed in f32, never negative;
//! - ties go to the lowest centroid index;
//! - with k = 1 the second-best is `NO_SECOND` at `f32::INFINITY`;
//! - results for a point depend only on that point and the centroids (never on the
//!   other points uploaded with it), and partial sums are reduced in a fixed order
//!   that does not depend on the number of threads, so results are bit-identical
//!   however the data is split across workers and threads.

#[cfg(target_os = "linux")]
pub mod alloc;
mod check;
mod cpu;
pub mod cuda;
pub mod device;
pub mod reference;

pub use cpu::{CpuBackend, CpuKernels};

/// Index of "no second-best centroid" (k = 1).
pub const NO_SECOND: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "point {row}, feature {col} is {value}: features must be finite numbers (check the input for NaN or infinite values)"
    )]
    NonFinitePoint { row: usize, col: usize, value: f32 },
    #[error("centroid {row}, feature {col} is {value}: centroids must be finite")]
    NonFiniteCentroid { row: usize, col: usize, value: f32 },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("k must be at least 1")]
    EmptyCentroids,
    #[error("the points were uploaded to another backend ({0})")]
    ForeignPoints(&'static str),
    #[error("CUDA is not available: {0}")]
    CudaUnavailable(String),
    #[error("NVRTC could not compile kernel source {kernel}:\n{log}")]
    Compile { kernel: String, log: String },
    #[error("CUDA driver error while {op}: {message}")]
    Driver { op: String, message: String },
    #[error("the {backend} backend cannot do this: {what}")]
    Unsupported { backend: &'static str, what: String },
}

#[cfg(test)]
mod csr_tests {
    use super::*;

    #[test]
    fn validate_rejects_bad_offsets_without_panicking() {
        let m = Csr {
            rows: 3,
            cols: 4,
            indptr: vec![0, 5, 2, 3],
            indices: vec![0, 1, 2],
            values: vec![1.0; 3],
        };
        assert!(matches!(m.validate(), Err(KernelError::Shape(_))));
        let ok = Csr {
            rows: 2,
            cols: 4,
            indptr: vec![0, 2, 3],
            indices: vec![0, 3, 1],
            values: vec![1.0; 3],
        };
        ok.validate().unwrap();
        assert_eq!(ok.row(0), (&[0u32, 3][..], &[1.0f32, 1.0][..]));
        let unsorted = Csr {
            indices: vec![3, 0, 1],
            ..ok.clone()
        };
        assert!(unsorted.validate().is_err());
        let nan = Csr {
            values: vec![1.0, f32::NAN, 1.0],
            ..ok
        };
        assert!(matches!(
            nan.validate(),
            Err(KernelError::NonFinitePoint { row: 0, col: 3, .. })
        ));
    }
}

impl KernelError {
    /// Whether the input is at fault (bad values or shapes), rather than the device.
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            KernelError::NonFinitePoint { .. }
                | KernelError::NonFiniteCentroid { .. }
                | KernelError::Shape(_)
                | KernelError::EmptyCentroids
                | KernelError::Unsupported { .. }
        )
    }
}

/// Nearest and second-nearest centroid of one point.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct Nearest {
    pub best: u32,
    pub best_dist: f32,
    pub second: u32,
    pub second_dist: f32,
}

impl Default for Nearest {
    fn default() -> Self {
        Nearest {
            best: 0,
            best_dist: f32::INFINITY,
            second: NO_SECOND,
            second_dist: f32::INFINITY,
        }
    }
}

/// Per-centroid partial sums (f64, row-major k x d) and counts of an assignment.
#[derive(Debug, Clone, PartialEq)]
pub struct PartialSums {
    pub k: usize,
    pub d: usize,
    pub sums: Vec<f64>,
    pub counts: Vec<u64>,
}

impl PartialSums {
    pub fn zeros(k: usize, d: usize) -> Self {
        PartialSums {
            k,
            d,
            sums: vec![0.0; k * d],
            counts: vec![0; k],
        }
    }

    /// Adds `other` into `self` (the caller fixes the order of merges).
    pub fn merge(&mut self, other: &PartialSums) {
        assert_eq!(
            (self.k, self.d),
            (other.k, other.d),
            "merging partial sums of different shapes"
        );
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            *a += *b;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += *b;
        }
    }
}

/// Points resident in a backend (host memory for the CPU, device memory for CUDA).
pub struct Resident {
    n: usize,
    d: usize,
    backend: &'static str,
    inner: Box<dyn std::any::Any + Send + Sync>,
}

impl Resident {
    pub fn new(
        n: usize,
        d: usize,
        backend: &'static str,
        inner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Self {
        Resident {
            n,
            d,
            backend,
            inner,
        }
    }
    pub fn n(&self) -> usize {
        self.n
    }
    pub fn d(&self) -> usize {
        self.d
    }
    /// The backend-specific storage, mutably (see [`Resident::downcast`]).
    pub fn downcast_mut<T: 'static>(
        &mut self,
        backend: &'static str,
    ) -> Result<&mut T, KernelError> {
        if self.backend != backend {
            return Err(KernelError::ForeignPoints(self.backend));
        }
        let owner = self.backend;
        self.inner
            .downcast_mut::<T>()
            .ok_or(KernelError::ForeignPoints(owner))
    }

    /// The backend-specific storage, if it is of type `T` and belongs to `backend`.
    pub fn downcast<T: 'static>(&self, backend: &'static str) -> Result<&T, KernelError> {
        if self.backend != backend {
            return Err(KernelError::ForeignPoints(self.backend));
        }
        self.inner
            .downcast_ref::<T>()
            .ok_or(KernelError::ForeignPoints(self.backend))
    }
}

impl std::fmt::Debug for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Resident({} x {} on {})", self.n, self.d, self.backend)
    }
}

/// The hot operations of shoal, implemented once per kind of hardware.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// e.g. "cpu" or "cuda:0".
    fn name(&self) -> &'static str;

    /// Copies `n x d` row-major points into the backend. Rejects NaN / infinity,
    /// naming the row and column.
    fn upload(&self, points: &[f32], d: usize) -> Result<Resident, KernelError>;

    /// Copies the given rows back out (row-major).
    fn download_rows(&self, points: &Resident, rows: &[u32]) -> Result<Vec<f32>, KernelError>;

    /// `n x d` zeros, resident (a buffer to write rows into).
    fn zeros(&self, n: usize, d: usize) -> Result<Resident, KernelError> {
        self.upload(&vec![0.0; n * d], d)
    }

    /// Every row (row-major). A backend that computes in host memory may share
    /// its own buffer instead of copying it: a later write to `points` then
    /// copies the buffer first while the caller still holds it, so what the
    /// caller holds never changes; a caller that lets go before the next write
    /// saves the copy.
    fn download_shared(&self, points: &Resident) -> Result<std::sync::Arc<Vec<f32>>, KernelError> {
        let all: Vec<u32> = (0..points.n() as u32).collect();
        Ok(std::sync::Arc::new(self.download_rows(points, &all)?))
    }

    /// Nearest and second-nearest of every point among `k` centroids (row-major
    /// `k x d`); `out.len()` must be `n`. Never materialises the n x k matrix.
    fn assign(
        &self,
        points: &Resident,
        centroids: &[f32],
        k: usize,
        out: &mut [Nearest],
    ) -> Result<(), KernelError>;

    /// Empty per-point state for [`Backend::assign_labels`] on `points`.
    fn lloyd_bounds(&self, points: &Resident) -> Result<Resident, KernelError>;

    /// For one Lloyd round: the label [`Backend::assign`] would give every point
    /// (its nearest centroid, ties to the lowest index), exactly, written to
    /// `labels`. `bounds` (from [`Backend::lloyd_bounds`] for these points) carries
    /// state from one call to the next, which a backend may use to skip points
    /// whose label provably cannot have changed; any centroids may be passed at
    /// any call (a different `k` starts over). Returns how many points had their
    /// distances computed.
    fn assign_labels(
        &self,
        points: &Resident,
        bounds: &mut Resident,
        centroids: &[f32],
        k: usize,
        labels: &mut [u32],
    ) -> Result<LabelStats, KernelError>;

    /// One Lloyd round: [`Backend::assign_labels`], then [`Backend::partial_sums`]
    /// of the new labels, with the results of those two calls (bit for bit); a
    /// backend may get both from one pass over the points.
    fn lloyd_round(
        &self,
        points: &Resident,
        bounds: &mut Resident,
        centroids: &[f32],
        k: usize,
        labels: &mut [u32],
    ) -> Result<(LabelStats, PartialSums), KernelError> {
        let stats = self.assign_labels(points, bounds, centroids, k, labels)?;
        Ok((stats, self.partial_sums(points, labels, k)?))
    }

    /// The `m` points farthest from their nearest of the `k` centroids, by the
    /// distance [`Backend::assign`] gives (`best_dist`), farthest first, ties to
    /// the lower row; with those distances. `bounds` is the state of the last
    /// [`Backend::lloyd_round`] (or [`Backend::assign_labels`]) on these points:
    /// when it was made with these centroids, a backend may use it to compute
    /// only the distances that could be among the `m` largest.
    fn far_points(
        &self,
        points: &Resident,
        bounds: &Resident,
        centroids: &[f32],
        k: usize,
        m: usize,
    ) -> Result<Vec<(u32, f32)>, KernelError> {
        let _ = bounds;
        let mut near = vec![Nearest::default(); points.n()];
        self.assign(points, centroids, k, &mut near)?;
        Ok(farthest(near.iter().map(|n| n.best_dist).enumerate(), m))
    }

    /// Sums (f64) and counts of the points per label; labels must be `< k`.
    fn partial_sums(
        &self,
        points: &Resident,
        labels: &[u32],
        k: usize,
    ) -> Result<PartialSums, KernelError>;

    /// Copies a sparse matrix into the backend (for the ALS solve and the top-N
    /// exclusion lists). Values must be finite.
    fn upload_sparse(&self, m: &Csr) -> Result<Resident, KernelError>;

    /// [`Backend::upload_sparse`] of a matrix the caller keeps too: a backend
    /// that computes in host memory shares it instead of copying it.
    fn upload_sparse_shared(&self, m: std::sync::Arc<Csr>) -> Result<Resident, KernelError> {
        self.upload_sparse(&m)
    }

    /// Overwrites the given rows of resident dense `target` with `values`
    /// (row-major, `rows.len() x d`), e.g. factor rows fetched from other workers.
    fn write_rows(
        &self,
        target: &mut Resident,
        rows: &[u32],
        values: &[f32],
    ) -> Result<(), KernelError>;

    /// The Gram matrix `AᵀA` (`d x d`, row-major) of resident dense `a`, accumulated
    /// in f64 in an order that does not depend on the number of threads.
    fn gram(&self, a: &Resident) -> Result<Vec<f64>, KernelError>;

    /// One implicit-ALS half-step (Hu, Koren, Volinsky 2008) with the conjugate-
    /// gradient solver of Takács et al. 2011, warm-started from the current rows of
    /// `x`: for every row `u` of `confidence` (`x.n()` rows, `y.n()` columns; value
    /// `c_ui >= 1` is the confidence that `u` prefers item `i`; absent = 1 with
    /// preference 0) it runs `params.cg_steps` CG steps on
    /// `(YᵀY + λI + Yᵀ(C_u − I)Y) x_u = Yᵀ C_u p_u`, with `p_ui = 1` where present,
    /// and writes `x_u` back. `yty` is the plain Gram `YᵀY` (`d x d`, from
    /// [`Backend::gram`], reduced over workers); λ is `params.regularization`.
    /// Rows are independent: a row's result does not depend on the other rows.
    ///
    /// With `params.pair_loss` it also returns, for the new rows, the stored pairs'
    /// part of the objective, `Σ_u Σ_{i ∈ u} c_ui (1 − s)² − s²` with
    /// `s = x_u · y_i` (the rest of the data term is `Σ (YᵀY) ∘ (XᵀX)`), summed in
    /// an order that does not depend on the number of threads; `None` otherwise.
    fn als_solve(
        &self,
        x: &mut Resident,
        y: &Resident,
        yty: &[f64],
        confidence: &Resident,
        params: CgParams,
    ) -> Result<Option<f64>, KernelError>;

    /// For every row `q` of `queries`, the `n` items `j` (rows of `items`) with the
    /// highest score `q · items[j]`, best first (ties: lower index first), skipping
    /// the columns of row `q` of `exclude` (a sparse matrix of `queries.n()` rows
    /// and `items.n()` columns). Slots left when fewer than `n` items remain hold
    /// [`NO_ITEM`] with score `-inf`.
    fn top_n(
        &self,
        queries: &Resident,
        items: &Resident,
        n: usize,
        exclude: Option<&Resident>,
    ) -> Result<TopN, KernelError>;
}

/// The `m` largest of `(row, distance)` (ties: lower row first), largest first.
pub fn farthest(values: impl Iterator<Item = (usize, f32)>, m: usize) -> Vec<(u32, f32)> {
    if m == 0 {
        return Vec::new();
    }
    let mut all: Vec<(u32, f32)> = values.map(|(r, v)| (r as u32, v)).collect();
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if m < all.len() {
        all.select_nth_unstable_by(m - 1, order);
        all.truncate(m);
    }
    all.sort_by(order);
    all
}

/// What one [`Backend::assign_labels`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelStats {
    /// Points whose distances were computed (the others kept a certified label).
    pub recomputed: usize,
}

/// Index of an empty top-N slot.
pub const NO_ITEM: u32 = u32::MAX;

/// Settings of one implicit-ALS half-step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgParams {
    /// λ, added to the diagonal of `YᵀY`.
    pub regularization: f32,
    /// Conjugate-gradient steps per row (implicit's default is 3).
    pub cg_steps: u32,
    /// Also return the pair loss of the solved rows (see [`Backend::als_solve`]).
    pub pair_loss: bool,
}

/// Top-N results: `n` slots per query row, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TopN {
    pub n: usize,
    pub items: Vec<u32>,
    pub scores: Vec<f32>,
}

/// A sparse matrix in compressed sparse row form.
#[derive(Debug, Clone, PartialEq)]
pub struct Csr {
    pub rows: usize,
    pub cols: usize,
    /// `rows + 1` offsets into `indices` / `values`.
    pub indptr: Vec<u64>,
    /// Column of every stored value; within a row strictly increasing.
    pub indices: Vec<u32>,
    pub values: Vec<f32>,
}

impl Csr {
    /// Checks the structure: offsets, column bounds and order, finite values.
    pub fn validate(&self) -> Result<(), KernelError> {
        if self.indptr.len() != self.rows + 1 || self.indptr.first() != Some(&0) {
            return Err(KernelError::Shape(format!(
                "CSR offsets: {} for {} rows (need rows + 1, starting at 0)",
                self.indptr.len(),
                self.rows
            )));
        }
        let nnz = *self.indptr.last().unwrap_or(&0) as usize;
        if nnz != self.indices.len() || nnz != self.values.len() {
            return Err(KernelError::Shape(format!(
                "CSR holds {} indices and {} values, offsets end at {nnz}",
                self.indices.len(),
                self.values.len()
            )));
        }
        for r in 0..self.rows {
            let (a, b) = (self.indptr[r] as usize, self.indptr[r + 1] as usize);
            if a > b || b > nnz {
                return Err(KernelError::Shape(format!(
                    "CSR row {r}: offsets {a}..{b} decrease or pass the end ({nnz} values)"
                )));
            }
            let cols = &self.indices[a..b];
            if let Some(c) = cols.iter().find(|c| **c as usize >= self.cols) {
                return Err(KernelError::Shape(format!(
                    "CSR row {r}: column {c} >= {}",
                    self.cols
                )));
            }
            if cols.windows(2).any(|w| w[0] >= w[1]) {
                return Err(KernelError::Shape(format!(
                    "CSR row {r}: columns are not strictly increasing"
                )));
            }
            if let Some(i) = self.values[a..b].iter().position(|v| !v.is_finite()) {
                return Err(KernelError::NonFinitePoint {
                    row: r,
                    col: cols[i] as usize,
                    value: self.values[a + i],
                });
            }
        }
        Ok(())
    }

    /// The matrix of rows `rows` (in that order).
    pub fn select_rows(&self, rows: &[u32]) -> Csr {
        let mut out = Csr {
            rows: rows.len(),
            cols: self.cols,
            indptr: Vec::with_capacity(rows.len() + 1),
            indices: Vec::new(),
            values: Vec::new(),
        };
        out.indptr.push(0);
        for &r in rows {
            let (c, v) = self.row(r as usize);
            out.indices.extend_from_slice(c);
            out.values.extend_from_slice(v);
            out.indptr.push(out.indices.len() as u64);
        }
        out
    }

    /// Columns and values of row `r`.
    pub fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.indptr[r] as usize, self.indptr[r + 1] as usize);
        (&self.indices[a..b], &self.values[a..b])
    }
}
