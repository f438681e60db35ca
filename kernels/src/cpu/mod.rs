//! The CPU backend: data stays in host memory ([`host`]), work is spread over
//! rayon. Each idea has its module: distances and partial sums ([`assign`], with
//! the AVX-512 kernel in [`lanes`]), Lloyd rounds with distance bounds
//! ([`bounds`]), the Gram matrix and the implicit-ALS solver ([`als`], its AVX-512
//! kernels in `als_avx512`, its AVX2 ones in `als_avx2`), and top-N
//! recommendations ([`topn`]). This module only opens the residents and calls them.

mod als;
#[cfg(target_arch = "x86_64")]
mod als_avx2;
#[cfg(target_arch = "x86_64")]
mod als_avx512;
mod assign;
mod bounds;
pub(crate) mod host;
#[cfg(target_arch = "x86_64")]
mod lanes;
#[cfg(test)]
pub(crate) mod testing;
mod topn;

use rayon::prelude::*;
use std::sync::Arc;

use crate::{
    Backend, CgParams, Csr, KernelError, LabelStats, Nearest, PartialSums, Resident, TopN, check,
};
use assign::{SUM_CHUNK_ROWS, assign_rows, chunk_sums, merge_chunk_sums};
use host::{HostPoints, NAME, storage, storage_mut};

use als::Isa;

/// The CPU implementation of [`Backend`]: host memory and rayon's thread pool (the
/// one the calls are made from).
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend {
    /// The ALS kernel set every solve uses; `None`: the fastest for each call.
    als: Option<Isa>,
}

/// Which kernel set the CPU backend's ALS solves use. They round differently, so
/// factors differ at rounding level between them; forcing one makes runs on
/// different CPUs comparable.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum CpuKernels {
    /// The fastest this CPU runs (AVX-512, else AVX2 + FMA, else portable).
    #[default]
    Auto,
    /// AVX-512F kernels (x86-64 with AVX-512F; rows of up to 128 factors).
    Avx512,
    /// Fused multiply-add kernels: AVX2 + FMA on x86-64, `mul_add` on aarch64.
    Avx2,
    /// Plain Rust, one rounding per operation: the same on every CPU.
    Portable,
}

impl std::fmt::Display for CpuKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CpuKernels::Auto => "auto",
            CpuKernels::Avx512 => "avx512",
            CpuKernels::Avx2 => "avx2",
            CpuKernels::Portable => "portable",
        })
    }
}

impl std::str::FromStr for CpuKernels {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(CpuKernels::Auto),
            "avx512" | "avx-512" => Ok(CpuKernels::Avx512),
            "avx2" | "fma" => Ok(CpuKernels::Avx2),
            "portable" => Ok(CpuKernels::Portable),
            other => Err(format!(
                "unknown CPU kernel set `{other}`: auto, avx512, avx2 or portable"
            )),
        }
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend { als: None }
    }

    /// A backend whose ALS solves use `kernels`; an error when this CPU cannot run
    /// them.
    pub fn with_kernels(kernels: CpuKernels) -> Result<Self, KernelError> {
        let isa = match kernels {
            CpuKernels::Auto => return Ok(CpuBackend::new()),
            CpuKernels::Portable => Isa::Portable,
            CpuKernels::Avx2 => Isa::Fma,
            #[cfg(target_arch = "x86_64")]
            CpuKernels::Avx512 => Isa::Avx512,
            #[cfg(not(target_arch = "x86_64"))]
            CpuKernels::Avx512 => {
                return Err(KernelError::Unsupported {
                    backend: NAME,
                    what: "the avx512 kernel set on this CPU architecture".into(),
                });
            }
        };
        // every set this CPU has at all (for the smallest rows)
        if !Isa::available(1).contains(&isa) {
            return Err(KernelError::Unsupported {
                backend: NAME,
                what: format!(
                    "the {kernels} kernel set: this CPU lacks its instructions (use auto, or portable to match other machines)"
                ),
            });
        }
        Ok(CpuBackend { als: Some(isa) })
    }

    /// The ALS kernel set for rows of `d` factors.
    fn als_isa(&self, d: usize) -> Result<Isa, KernelError> {
        match self.als {
            None => Ok(Isa::best(d)),
            Some(isa) if Isa::available(d).contains(&isa) => Ok(isa),
            Some(isa) => Err(KernelError::Unsupported {
                backend: NAME,
                what: format!(
                    "rows of {d} factors with the forced {isa:?} kernel set (the AVX-512 kernels take at most 128): lower als.factors, or use --cpu-kernels avx2 or auto"
                ),
            }),
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn upload(&self, points: &[f32], d: usize) -> Result<Resident, KernelError> {
        check::points(points, d)?;
        let n = points.len() / d;
        tracing::trace!(n, d, "uploading points to the cpu backend");
        let host = HostPoints {
            d,
            values: Arc::new(host::host_copy(points)),
        };
        Ok(Resident::new(n, d, NAME, Box::new(host)))
    }

    fn zeros(&self, n: usize, d: usize) -> Result<Resident, KernelError> {
        check::points(&[], d)?;
        let host = HostPoints {
            d,
            values: Arc::new(host::host_zeros(n * d)),
        };
        Ok(Resident::new(n, d, NAME, Box::new(host)))
    }

    fn download_shared(&self, points: &Resident) -> Result<Arc<Vec<f32>>, KernelError> {
        let host = storage::<HostPoints>(points, NAME, "the points of download_shared", "dense")?;
        Ok(host.values.clone())
    }

    fn download_rows(&self, points: &Resident, rows: &[u32]) -> Result<Vec<f32>, KernelError> {
        let host = points.downcast::<HostPoints>(NAME)?;
        let (n, d) = (host.n(), host.d);
        if let Some(&row) = rows.iter().find(|&&r| r as usize >= n) {
            return Err(KernelError::Shape(format!(
                "row {row} was requested but only {n} points are uploaded"
            )));
        }
        let mut out = Vec::with_capacity(rows.len() * d);
        for &row in rows {
            let start = row as usize * d;
            out.extend_from_slice(&host.values[start..start + d]);
        }
        Ok(out)
    }

    fn assign(
        &self,
        points: &Resident,
        centroids: &[f32],
        k: usize,
        out: &mut [Nearest],
    ) -> Result<(), KernelError> {
        let host = points.downcast::<HostPoints>(NAME)?;
        let (n, d) = (host.n(), host.d);
        check::centroids(centroids, k, d)?;
        check::results(out.len(), n)?;
        tracing::trace!(n, d, k, "assigning points on the cpu backend");
        assign_rows(&host.values, d, centroids, k, out);
        Ok(())
    }

    fn lloyd_bounds(&self, points: &Resident) -> Result<Resident, KernelError> {
        let host = storage::<HostPoints>(points, NAME, "the points of lloyd_bounds", "dense")?;
        let n = host.n();
        Ok(Resident::new(n, 1, NAME, Box::new(bounds::Bounds::new(n))))
    }

    fn assign_labels(
        &self,
        points: &Resident,
        bounds: &mut Resident,
        centroids: &[f32],
        k: usize,
        labels: &mut [u32],
    ) -> Result<LabelStats, KernelError> {
        bounds::assign_labels(points, bounds, centroids, k, labels)
    }

    fn lloyd_round(
        &self,
        points: &Resident,
        bounds: &mut Resident,
        centroids: &[f32],
        k: usize,
        labels: &mut [u32],
    ) -> Result<(LabelStats, PartialSums), KernelError> {
        bounds::lloyd_round(points, bounds, centroids, k, labels)
    }

    fn far_points(
        &self,
        points: &Resident,
        bounds: &Resident,
        centroids: &[f32],
        k: usize,
        m: usize,
    ) -> Result<Vec<(u32, f32)>, KernelError> {
        bounds::far_points(points, bounds, centroids, k, m)
    }

    fn partial_sums(
        &self,
        points: &Resident,
        labels: &[u32],
        k: usize,
    ) -> Result<PartialSums, KernelError> {
        let host = points.downcast::<HostPoints>(NAME)?;
        let (n, d) = (host.n(), host.d);
        if k == 0 {
            return Err(KernelError::EmptyCentroids);
        }
        if labels.len() != n {
            return Err(KernelError::Shape(format!(
                "{} labels for {n} uploaded points",
                labels.len()
            )));
        }
        // A plain scan per chunk (vectorised) first; the position only on error.
        let bad = |l: &u32| *l as usize >= k;
        if labels.par_chunks(1 << 16).any(|c| c.iter().any(bad))
            && let Some(row) = labels.iter().position(bad)
        {
            return Err(KernelError::Shape(format!(
                "point {row} has label {} but there are only k = {k} centroids",
                labels[row]
            )));
        }
        tracing::trace!(n, d, k, "partial sums on the cpu backend");

        let mut items = vec![(); n.div_ceil(SUM_CHUNK_ROWS)];
        Ok(merge_chunk_sums(k, d, &mut items, |c, _| {
            let rows = c * SUM_CHUNK_ROWS..((c + 1) * SUM_CHUNK_ROWS).min(n);
            chunk_sums(
                &host.values[rows.start * d..rows.end * d],
                d,
                &labels[rows],
                k,
            )
        }))
    }

    fn upload_sparse(&self, m: &Csr) -> Result<Resident, KernelError> {
        host::validate_csr(m)?;
        tracing::trace!(
            rows = m.rows,
            cols = m.cols,
            nnz = m.values.len(),
            "uploading a sparse matrix to the cpu backend"
        );
        Ok(Resident::new(
            m.rows,
            m.cols,
            NAME,
            Box::new(Arc::new(m.clone())),
        ))
    }

    fn upload_sparse_shared(&self, m: Arc<Csr>) -> Result<Resident, KernelError> {
        host::validate_csr(&m)?;
        // host memory already: share it
        Ok(Resident::new(m.rows, m.cols, NAME, Box::new(m)))
    }

    fn write_rows(
        &self,
        target: &mut Resident,
        rows: &[u32],
        values: &[f32],
    ) -> Result<(), KernelError> {
        let host = storage_mut::<HostPoints>(target, NAME, "the target of write_rows", "dense")?;
        let d = host.d;
        host::write_rows(host.values_mut(), d, rows, values)
    }

    fn gram(&self, a: &Resident) -> Result<Vec<f64>, KernelError> {
        let host = storage::<HostPoints>(a, NAME, "the matrix of gram", "dense")?;
        tracing::trace!(n = host.n(), d = host.d, "gram matrix on the cpu backend");
        Ok(als::gram(&host.values, host.d))
    }

    fn als_solve(
        &self,
        x: &mut Resident,
        y: &Resident,
        yty: &[f64],
        confidence: &Resident,
        params: CgParams,
    ) -> Result<Option<f64>, KernelError> {
        let y = storage::<HostPoints>(y, NAME, "the fixed factors (y)", "dense")?;
        let confidence = storage::<Arc<Csr>>(confidence, NAME, "the confidences", "sparse")?;
        let x = storage_mut::<HostPoints>(x, NAME, "the factors being solved (x)", "dense")?;
        let d = x.d;
        als::als_solve(
            self.als_isa(d)?,
            x.values_mut(),
            &y.values,
            d,
            y.d,
            yty,
            confidence,
            params,
        )
    }

    fn top_n(
        &self,
        queries: &Resident,
        items: &Resident,
        n: usize,
        exclude: Option<&Resident>,
    ) -> Result<TopN, KernelError> {
        let queries = storage::<HostPoints>(queries, NAME, "the queries of top_n", "dense")?;
        let items = storage::<HostPoints>(items, NAME, "the items of top_n", "dense")?;
        let exclude = exclude
            .map(|e| {
                storage::<Arc<Csr>>(e, NAME, "the exclusions of top_n", "sparse").map(|m| &**m)
            })
            .transpose()?;
        topn::top_n(
            &queries.values,
            &items.values,
            queries.d,
            items.d,
            n,
            exclude,
        )
    }
}
