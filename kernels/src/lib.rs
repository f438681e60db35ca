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

mod cpu;
pub mod reference;

pub use cpu::CpuBackend;

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

    /// Nearest and second-nearest of every point among `k` centroids (row-major
    /// `k x d`); `out.len()` must be `n`. Never materialises the n x k matrix.
    fn assign(
        &self,
        points: &Resident,
        centroids: &[f32],
        k: usize,
        out: &mut [Nearest],
    ) -> Result<(), KernelError>;

    /// Sums (f64) and counts of the points per label; labels must be `< k`.
    fn partial_sums(
        &self,
        points: &Resident,
        labels: &[u32],
        k: usize,
    ) -> Result<PartialSums, KernelError>;
}
