//! The CUDA backend, through cudarc.
//!
//! [`CudaBackend::new`] probes for the driver before touching it (a machine
//! without CUDA gets [`KernelError::CudaUnavailable`], not a panic), creates a
//! context and a stream on the device, compiles every source under
//! `kernels/cuda/` with NVRTC for the device's own architecture and loads the
//! modules once. Points, factors and sparse matrices stay resident as device
//! buffers; per call only the small inputs (centroids, labels, YᵀY) go in and the
//! results come out.
//!
//! Agreement with the CPU twin (see `kernels/tests/backends.rs`):
//! - `assign`: up to 32 features distances are computed exactly as the reference
//!   (bit-identical); above, with the expanded form on shifted data, and the
//!   distances reported for the best and second best are recomputed directly, so
//!   only near-ties can pick a different index.
//! - `partial_sums`: the same chunks as the CPU backend, each element a sequence
//!   of f64 additions in the same order (bit-identical to the CPU backend).
//! - `gram`: exact f32 products summed in f64 in fixed row blocks (deterministic;
//!   equal to the reference within f64 rounding).
//! - `als_solve`: `implicit`'s CG in f32, the same algorithm and stopping rules as
//!   the reference; reductions in another fixed order, so within f32 rounding.
//! - `top_n`: f32 scores with FMA in feature order; only near-equal scores can
//!   order differently. `n` is limited to [`MAX_TOP_N`].

mod compile;

use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, DriverError,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use rayon::prelude::*;

use compile::{
    ALS_CHUNK, DIRECT_DS, DIRECT_THREADS, EXP_THREADS, EXP_TILE_POINTS, GRAM_ROWS, GRAM_THREADS,
    GRAM_TILE, SUM_CHUNK, SUM_SMALL_MAX, SUM_THREADS, TOPN_TILE,
};
pub use compile::{MAX_TOP_N, arch_for_device, compile_ptx, nvrtc_archs, sources};

use crate::cpu::host::{storage, storage_mut, validate_csr};
use crate::device::{DeviceInfo, device_info, init_driver};
use crate::{
    Backend, CgParams, Csr, KernelError, LabelStats, NO_ITEM, Nearest, PartialSums, Resident, TopN,
    check,
};

/// The state of [`Backend::assign_labels`] on CUDA, which keeps none.
struct FullPasses {
    n: usize,
}

// SAFETY: `Nearest` is `#[repr(C)]` with four 4-byte plain fields (u32, f32, u32,
// f32) and no padding: exactly the `Nearest` struct of assign.cu, which the
// kernels write as one 16-byte uint4.
unsafe impl DeviceRepr for Nearest {}
// SAFETY: all-zero bits are a valid `Nearest` (indices 0, distances +0.0).
unsafe impl ValidAsZeroBits for Nearest {}

/// Names of the backends on devices 0..16 (`Backend::name` is `&'static str`).
const NAMES: [&str; 16] = [
    "cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:4", "cuda:5", "cuda:6", "cuda:7", "cuda:8",
    "cuda:9", "cuda:10", "cuda:11", "cuda:12", "cuda:13", "cuda:14", "cuda:15",
];

/// Upper bound on the device memory held by per-chunk partials (partial sums,
/// Gram) waiting to be merged; only bounds memory, never changes the order.
const PARTIALS_BUDGET_BYTES: usize = 256 << 20;
/// Largest grid x dimension.
const MAX_GRID_X: u64 = (1 << 31) - 1;
/// Largest grid y dimension.
const MAX_GRID_Y: usize = 65_535;

/// Dense `n x d` row-major f32 matrix in device memory.
struct DeviceDense {
    n: usize,
    d: usize,
    /// `n * d` values (one zero value when empty: the driver allocates no 0 bytes).
    values: CudaSlice<f32>,
}

/// CSR matrix in device memory.
struct DeviceCsr {
    rows: usize,
    cols: usize,
    indptr: CudaSlice<u64>,
    indices: CudaSlice<u32>,
    values: CudaSlice<f32>,
    /// The first stored value below 1 (row, column, value), if any: such a matrix
    /// is no confidence matrix for the ALS solve (it may still be an exclusion list).
    /// Values are finite (checked at upload), so `c < 1` is the whole test.
    first_below_one: Option<(usize, u32, f32)>,
}

/// The loaded kernels of one device.
struct Kernels {
    /// `assign_direct_D` for every `D` of `DIRECT_DS`, in that order.
    assign_direct: Vec<CudaFunction>,
    assign_expanded: CudaFunction,
    sums_small: CudaFunction,
    sums_wide: CudaFunction,
    sums_merge: CudaFunction,
    gram_partial: CudaFunction,
    gram_merge: CudaFunction,
    als_cg: CudaFunction,
    top_n: CudaFunction,
    gather_rows: CudaFunction,
    scatter_rows: CudaFunction,
}

/// The CUDA implementation of [`Backend`] on one device.
pub struct CudaBackend {
    name: &'static str,
    info: DeviceInfo,
    /// The virtual architecture the kernels were compiled for (`compute_XY`).
    arch: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    multiprocessors: u32,
    /// Shared memory a block may use when the kernel opts in.
    shared_optin: usize,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.info)
            .field("arch", &self.arch)
            .finish()
    }
}

/// A driver error, saying what was being done.
fn driver(op: impl Into<String>) -> impl FnOnce(DriverError) -> KernelError {
    let op = op.into();
    move |e| KernelError::Driver {
        op,
        message: e.to_string(),
    }
}

/// Blocks of `per` items needed for `items`, as a grid dimension.
fn grid(items: u64, per: u64) -> Result<u32, KernelError> {
    let blocks = items.div_ceil(per).max(1);
    if blocks > MAX_GRID_X {
        return Err(KernelError::Unsupported {
            backend: "cuda",
            what: format!("{items} items need {blocks} blocks of {per}, above the grid limit"),
        });
    }
    Ok(blocks as u32)
}

fn cfg(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `v` as a u32 kernel argument.
fn to_u32(v: usize, what: &str) -> Result<u32, KernelError> {
    u32::try_from(v).map_err(|_| KernelError::Unsupported {
        backend: "cuda",
        what: format!("{what} = {v} does not fit the kernels' 32-bit sizes"),
    })
}

impl CudaBackend {
    /// The backend on device `ordinal`: probes the driver, creates a context and a
    /// stream, compiles and loads every kernel.
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        init_driver()?;
        let count =
            cudarc::driver::result::device::get_count().map_err(driver("counting devices"))?;
        if ordinal >= count.max(0) as usize {
            return Err(KernelError::CudaUnavailable(format!(
                "there is no CUDA device {ordinal}: the driver reports {count}"
            )));
        }
        let info = device_info(ordinal)?;
        let (major, minor) = info.compute_capability;
        let arch = compile::arch_for_device(major, minor)?;
        let ctx =
            CudaContext::new(ordinal).map_err(driver(format!("creating a context on {info}")))?;
        let stream = ctx.default_stream();
        let attr = |a: CUdevice_attribute| {
            ctx.attribute(a)
                .map(|v| v.max(0) as usize)
                .map_err(driver(format!("reading the attributes of {info}")))
        };
        let multiprocessors =
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let shared_optin =
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;

        let started = std::time::Instant::now();
        let mut modules = std::collections::HashMap::new();
        for (name, _) in sources() {
            let ptx = compile_ptx(name, &arch)?;
            let module = ctx
                .load_module(ptx.into())
                .map_err(|e| KernelError::Driver {
                    op: format!("loading kernel module {name}.cu ({arch}) on {info}"),
                    message: format!(
                        "{e}; CUDA_ERROR_UNSUPPORTED_PTX_VERSION means the driver is older than \
                     NVRTC: update the driver or use the NVRTC of the driver's CUDA version"
                    ),
                })?;
            modules.insert(*name, module);
        }
        let function = |module: &str, name: &str| -> Result<CudaFunction, KernelError> {
            let m: &Arc<CudaModule> = &modules[module];
            m.load_function(name)
                .map_err(driver(format!("loading kernel {name} of {module}.cu")))
        };
        let kernels = Kernels {
            assign_direct: DIRECT_DS
                .iter()
                .map(|dm| function("assign", &format!("assign_direct_{dm}")))
                .collect::<Result<_, _>>()?,
            assign_expanded: function("assign", "assign_expanded")?,
            sums_small: function("reduce", "partial_sums_small")?,
            sums_wide: function("reduce", "partial_sums_wide")?,
            sums_merge: function("reduce", "partial_sums_merge")?,
            gram_partial: function("gram", "gram_partial")?,
            gram_merge: function("gram", "gram_merge")?,
            als_cg: function("als", "als_cg")?,
            top_n: function("topn", "top_n")?,
            gather_rows: function("rows", "gather_rows")?,
            scatter_rows: function("rows", "scatter_rows")?,
        };
        // The ALS kernel keeps A = YᵀY + λI in dynamic shared memory when it fits
        // the opt-in limit; without the opt-in it may only use 48 KiB.
        let shared_optin = match kernels.als_cg.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared_optin as i32,
        ) {
            Ok(()) => shared_optin,
            Err(e) => {
                tracing::warn!(error = %e, "could not raise the ALS kernel's shared memory limit");
                48 << 10
            }
        };
        let name = NAMES
            .get(ordinal)
            .copied()
            .unwrap_or_else(|| Box::leak(format!("cuda:{ordinal}").into_boxed_str()));
        tracing::info!(
            device = %info,
            %arch,
            compile_ms = started.elapsed().as_millis() as u64,
            "cuda backend ready"
        );
        Ok(CudaBackend {
            name,
            info,
            arch,
            ctx,
            stream,
            kernels,
            multiprocessors,
            shared_optin,
        })
    }

    /// The device this backend runs on.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The virtual architecture the kernels were compiled for (`compute_XY`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// A copy of `v` in device memory (one zero element when `v` is empty).
    fn to_device<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        v: &[T],
    ) -> Result<CudaSlice<T>, KernelError> {
        if v.is_empty() {
            self.zeros(0)
        } else {
            self.stream
                .clone_htod(v)
                .map_err(driver("copying to the device"))
        }
    }

    /// `len` zeros in device memory (at least one element).
    fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, KernelError> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(driver(format!("allocating {len} values on {}", self.name)))
    }

    /// The first `out.len()` values of `src`, copied back; waits for the stream.
    fn download<T: DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        out: &mut [T],
    ) -> Result<(), KernelError> {
        if !out.is_empty() {
            self.stream
                .memcpy_dtoh(&src.slice(0..out.len()), out)
                .map_err(driver("copying results from the device"))?;
        }
        self.stream
            .synchronize()
            .map_err(driver("waiting for the device"))
    }

    fn dense<'a>(&self, r: &'a Resident, what: &str) -> Result<&'a DeviceDense, KernelError> {
        storage::<DeviceDense>(r, self.name, what, "dense")
    }

    fn sparse<'a>(&self, r: &'a Resident, what: &str) -> Result<&'a DeviceCsr, KernelError> {
        storage::<DeviceCsr>(r, self.name, what, "sparse")
    }

    /// Bytes of device memory for partials waiting to be merged.
    fn partials_budget(&self) -> usize {
        PARTIALS_BUDGET_BYTES
            .min((self.info.memory_bytes / 8) as usize)
            .max(1 << 20)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Let queued work finish before the modules and the context go.
        if let Err(e) = self.ctx.synchronize() {
            tracing::warn!(device = %self.info, error = %e, "cuda backend dropped with a device error");
        }
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    fn upload(&self, points: &[f32], d: usize) -> Result<Resident, KernelError> {
        check::points(points, d)?;
        to_u32(d, "d")?;
        let n = points.len() / d;
        tracing::trace!(
            n,
            d,
            device = self.name,
            "uploading points to the cuda backend"
        );
        let values = self.to_device(points)?;
        Ok(Resident::new(
            n,
            d,
            self.name,
            Box::new(DeviceDense { n, d, values }),
        ))
    }

    fn download_rows(&self, points: &Resident, rows: &[u32]) -> Result<Vec<f32>, KernelError> {
        let dense = self.dense(points, "the points of download_rows")?;
        let (n, d) = (dense.n, dense.d);
        if let Some(&row) = rows.iter().find(|&&r| r as usize >= n) {
            return Err(KernelError::Shape(format!(
                "row {row} was requested but only {n} points are uploaded"
            )));
        }
        let mut out = vec![0.0f32; rows.len() * d];
        if rows.is_empty() {
            return Ok(out);
        }
        let rows_dev = self.to_device(rows)?;
        let mut out_dev = self.zeros::<f32>(out.len())?;
        let count = rows.len() as u64;
        let d32 = d as u32;
        let blocks = grid(out.len() as u64, 256)?.min(65_535);
        let mut launch = self.stream.launch_builder(&self.kernels.gather_rows);
        launch
            .arg(&dense.values)
            .arg(&d32)
            .arg(&rows_dev)
            .arg(&count)
            .arg(&mut out_dev);
        // SAFETY: gather_rows(const float*, u32 d, const u32* rows, u64 count, float*
        // dst): the arguments match in order and type; every row is < n (checked),
        // so reads stay inside the n x d points and writes inside count x d values.
        unsafe { launch.launch(cfg(blocks, 256)) }.map_err(driver("launching gather_rows"))?;
        self.download(&out_dev, &mut out)?;
        Ok(out)
    }

    fn assign(
        &self,
        points: &Resident,
        centroids: &[f32],
        k: usize,
        out: &mut [Nearest],
    ) -> Result<(), KernelError> {
        let dense = self.dense(points, "the points of assign")?;
        let (n, d) = (dense.n, dense.d);
        check::centroids(centroids, k, d)?;
        check::results(out.len(), n)?;
        let direct = DIRECT_DS.iter().position(|&dm| d <= dm as usize);
        tracing::trace!(
            n,
            d,
            k,
            direct = direct.is_some(),
            device = self.name,
            "assigning points"
        );
        if n == 0 {
            return Ok(());
        }
        let (n64, d32, k32) = (n as u64, d as u32, k as u32);
        let c_dev = self.to_device(centroids)?;
        let mut out_dev = self.zeros::<Nearest>(n)?;
        match direct {
            Some(which) => {
                let mut launch = self
                    .stream
                    .launch_builder(&self.kernels.assign_direct[which]);
                launch
                    .arg(&dense.values)
                    .arg(&n64)
                    .arg(&d32)
                    .arg(&c_dev)
                    .arg(&k32)
                    .arg(&mut out_dev);
                // SAFETY: assign_direct_D(const float* points, u64 n, u32 d, const
                // float* centroids, u32 k, Nearest* out) with d <= D: the arguments
                // match in order and type; points hold n x d values, centroids k x d,
                // out n Nearest (the kernel reads and writes nothing else).
                unsafe { launch.launch(cfg(grid(n64, DIRECT_THREADS.into())?, DIRECT_THREADS)) }
                    .map_err(driver("launching assign_direct"))?;
            }
            None => {
                // Shift by the mean of the centroids; |c - shift|^2 once here.
                let mut mean = vec![0.0f64; d];
                for c in centroids.chunks_exact(d) {
                    for (m, &v) in mean.iter_mut().zip(c) {
                        *m += f64::from(v);
                    }
                }
                let shift: Vec<f32> = mean.iter().map(|&m| (m / k as f64) as f32).collect();
                let c_norms: Vec<f32> = centroids
                    .chunks_exact(d)
                    .map(|c| c.iter().zip(&shift).map(|(&v, &s)| (v - s) * (v - s)).sum())
                    .collect();
                let shift_dev = self.to_device(&shift)?;
                let norms_dev = self.to_device(&c_norms)?;
                let mut launch = self.stream.launch_builder(&self.kernels.assign_expanded);
                launch
                    .arg(&dense.values)
                    .arg(&n64)
                    .arg(&d32)
                    .arg(&c_dev)
                    .arg(&k32)
                    .arg(&shift_dev)
                    .arg(&norms_dev)
                    .arg(&mut out_dev);
                // SAFETY: assign_expanded(const float* points, u64 n, u32 d, const
                // float* centroids, u32 k, const float* shift, const float* c_norms,
                // Nearest* out): the arguments match in order and type; shift holds d
                // values, c_norms k, out n; points n x d and centroids k x d.
                unsafe { launch.launch(cfg(grid(n64, EXP_TILE_POINTS.into())?, EXP_THREADS)) }
                    .map_err(driver("launching assign_expanded"))?;
            }
        }
        self.download(&out_dev, out)
    }

    fn lloyd_bounds(&self, points: &Resident) -> Result<Resident, KernelError> {
        let n = self.dense(points, "the points of lloyd_bounds")?.n;
        Ok(Resident::new(n, 0, self.name, Box::new(FullPasses { n })))
    }

    /// Every round is a full `assign` pass: on a GPU the distances are cheap next
    /// to the bookkeeping of bounds.
    fn assign_labels(
        &self,
        points: &Resident,
        bounds: &mut Resident,
        centroids: &[f32],
        k: usize,
        labels: &mut [u32],
    ) -> Result<LabelStats, KernelError> {
        let n =
            storage::<FullPasses>(bounds, self.name, "the bounds of assign_labels", "bounds")?.n;
        check::results(labels.len(), n)?;
        let mut near = vec![Nearest::default(); n];
        self.assign(points, centroids, k, &mut near)?;
        for (l, s) in labels.iter_mut().zip(&near) {
            *l = s.best;
        }
        Ok(LabelStats { recomputed: n })
    }

    fn partial_sums(
        &self,
        points: &Resident,
        labels: &[u32],
        k: usize,
    ) -> Result<PartialSums, KernelError> {
        let dense = self.dense(points, "the points of partial_sums")?;
        let (n, d) = (dense.n, dense.d);
        if k == 0 {
            return Err(KernelError::EmptyCentroids);
        }
        if labels.len() != n {
            return Err(KernelError::Shape(format!(
                "{} labels for {n} uploaded points",
                labels.len()
            )));
        }
        if let Some(row) = labels.par_iter().position_first(|&l| l as usize >= k) {
            return Err(KernelError::Shape(format!(
                "point {row} has label {} but there are only k = {k} centroids",
                labels[row]
            )));
        }
        let k32 = to_u32(k, "k")?;
        tracing::trace!(n, d, k, device = self.name, "partial sums");
        if n == 0 {
            return Ok(PartialSums::zeros(k, d));
        }
        let kd = k * d;
        let small = kd <= SUM_SMALL_MAX;
        let chunks = (n as u64).div_ceil(SUM_CHUNK) as usize;
        let batch = (self.partials_budget() / ((kd + k) * 8))
            .clamp(1, chunks)
            .min(MAX_GRID_X as usize);
        let labels_dev = self.to_device(labels)?;
        let mut partials = self.zeros::<f64>(batch * kd)?;
        let mut counts = self.zeros::<u64>(batch * k)?;
        let mut total = self.zeros::<f64>(kd)?;
        let mut total_counts = self.zeros::<u64>(k)?;
        let (n64, d32) = (n as u64, d as u32);
        let chunk_kernel = if small {
            &self.kernels.sums_small
        } else {
            &self.kernels.sums_wide
        };
        let merge_blocks = grid(kd.max(k) as u64, 256)?;
        let mut first = 0usize;
        while first < chunks {
            let count = batch.min(chunks - first);
            let (first64, count32) = (first as u64, count as u32);
            let mut launch = self.stream.launch_builder(chunk_kernel);
            launch
                .arg(&dense.values)
                .arg(&labels_dev)
                .arg(&n64)
                .arg(&d32)
                .arg(&k32)
                .arg(&first64)
                .arg(&mut partials)
                .arg(&mut counts);
            // SAFETY: partial_sums_{small,wide}(const float* points, const u32*
            // labels, u64 n, u32 d, u32 k, u64 first_chunk, double* partials, u64*
            // counts): the arguments match in order and type. Block b reads the
            // points of chunk first + b (< chunks, so inside n) and writes slot b of
            // partials (batch x k x d) and counts (batch x k), b < count <= batch;
            // labels are < k (checked), and small is used only for k*d <= 1024.
            unsafe { launch.launch(cfg(count32, SUM_THREADS)) }
                .map_err(driver("launching the partial sums"))?;
            let mut launch = self.stream.launch_builder(&self.kernels.sums_merge);
            launch
                .arg(&partials)
                .arg(&counts)
                .arg(&count32)
                .arg(&d32)
                .arg(&k32)
                .arg(&mut total)
                .arg(&mut total_counts);
            // SAFETY: partial_sums_merge(const double*, const u64*, u32 chunks, u32
            // d, u32 k, double* total, u64* total_counts): the arguments match; it
            // reads count <= batch slots and writes k x d sums and k counts.
            unsafe { launch.launch(cfg(merge_blocks, 256)) }
                .map_err(driver("launching the partial sums merge"))?;
            first += count;
        }
        let mut out = PartialSums::zeros(k, d);
        self.download(&total, &mut out.sums)?;
        self.download(&total_counts, &mut out.counts)?;
        Ok(out)
    }

    fn upload_sparse(&self, m: &Csr) -> Result<Resident, KernelError> {
        validate_csr(m)?;
        tracing::trace!(
            rows = m.rows,
            cols = m.cols,
            nnz = m.values.len(),
            device = self.name,
            "uploading a sparse matrix to the cuda backend"
        );
        let first_below_one = m.values.par_iter().position_first(|&c| c < 1.0).map(|pos| {
            let row = m.indptr.partition_point(|&o| o as usize <= pos) - 1;
            (row, m.indices[pos], m.values[pos])
        });
        let csr = DeviceCsr {
            first_below_one,
            rows: m.rows,
            cols: m.cols,
            indptr: self.to_device(&m.indptr)?,
            indices: self.to_device(&m.indices)?,
            values: self.to_device(&m.values)?,
        };
        Ok(Resident::new(m.rows, m.cols, self.name, Box::new(csr)))
    }

    fn write_rows(
        &self,
        target: &mut Resident,
        rows: &[u32],
        values: &[f32],
    ) -> Result<(), KernelError> {
        let name = self.name;
        let dense = storage_mut::<DeviceDense>(target, name, "the target of write_rows", "dense")?;
        let (n, d) = (dense.n, dense.d);
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
        if rows.is_empty() {
            return Ok(());
        }
        // A row listed twice: the last values win, and the kernel sees each row once.
        let mut seen = std::collections::HashSet::with_capacity(rows.len());
        let (rows, values): (Vec<u32>, Vec<f32>) = if rows.iter().all(|r| seen.insert(*r)) {
            (rows.to_vec(), values.to_vec())
        } else {
            seen.clear();
            let mut keep: Vec<usize> = (0..rows.len())
                .rev()
                .filter(|&i| seen.insert(rows[i]))
                .collect();
            keep.reverse();
            let kept_values = keep
                .iter()
                .flat_map(|&i| values[i * d..(i + 1) * d].iter().copied())
                .collect();
            (keep.iter().map(|&i| rows[i]).collect(), kept_values)
        };
        let rows_dev = self.to_device(&rows)?;
        let values_dev = self.to_device(&values)?;
        let count = rows.len() as u64;
        let d32 = d as u32;
        let blocks = grid(values.len() as u64, 256)?.min(65_535);
        let mut launch = self.stream.launch_builder(&self.kernels.scatter_rows);
        launch
            .arg(&mut dense.values)
            .arg(&d32)
            .arg(&rows_dev)
            .arg(&count)
            .arg(&values_dev);
        // SAFETY: scatter_rows(float* dst, u32 d, const u32* rows, u64 count, const
        // float* src): the arguments match in order and type; rows are < n (checked)
        // and distinct, so every write is inside n x d and no two threads write the
        // same value; src holds count x d values.
        unsafe { launch.launch(cfg(blocks, 256)) }.map_err(driver("launching scatter_rows"))?;
        self.stream
            .synchronize()
            .map_err(driver("waiting for the device"))
    }

    fn gram(&self, a: &Resident) -> Result<Vec<f64>, KernelError> {
        let dense = self.dense(a, "the matrix of gram")?;
        let (n, d) = (dense.n, dense.d);
        tracing::trace!(n, d, device = self.name, "gram matrix");
        let mut out = vec![0.0f64; d * d];
        if n == 0 {
            return Ok(out);
        }
        let tiles = d.div_ceil(GRAM_TILE as usize);
        let blocks = (n as u64).div_ceil(GRAM_ROWS) as usize;
        let batch = (self.partials_budget() / (d * d * 8))
            .clamp(1, blocks)
            .min(MAX_GRID_Y);
        let mut partials = self.zeros::<f64>(batch * d * d)?;
        let mut total = self.zeros::<f64>(d * d)?;
        let (n64, d32, tiles32) = (n as u64, d as u32, tiles as u32);
        let merge_blocks = grid((d * d) as u64, 256)?;
        let mut first = 0usize;
        while first < blocks {
            let count = batch.min(blocks - first);
            let (first64, count32) = (first as u64, count as u32);
            let mut launch = self.stream.launch_builder(&self.kernels.gram_partial);
            launch
                .arg(&dense.values)
                .arg(&n64)
                .arg(&d32)
                .arg(&tiles32)
                .arg(&first64)
                .arg(&mut partials);
            let config = LaunchConfig {
                grid_dim: (tiles32 * tiles32, count32, 1),
                block_dim: (GRAM_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: gram_partial(const float* a, u64 n, u32 d, u32 tiles, u64
            // first_block, double* partials): the arguments match in order and
            // type; block (t, b) reads rows of row block first + b (< n) and writes
            // slot b < count <= batch of partials (batch x d x d).
            unsafe { launch.launch(config) }.map_err(driver("launching gram_partial"))?;
            let mut launch = self.stream.launch_builder(&self.kernels.gram_merge);
            launch
                .arg(&partials)
                .arg(&count32)
                .arg(&d32)
                .arg(&mut total);
            // SAFETY: gram_merge(const double* partials, u32 blocks, u32 d, double*
            // total): the arguments match; it reads count slots, writes d x d.
            unsafe { launch.launch(cfg(merge_blocks, 256)) }
                .map_err(driver("launching gram_merge"))?;
            first += count;
        }
        self.download(&total, &mut out)?;
        Ok(out)
    }

    fn als_solve(
        &self,
        x: &mut Resident,
        y: &Resident,
        yty: &[f64],
        confidence: &Resident,
        params: CgParams,
    ) -> Result<Option<f64>, KernelError> {
        let name = self.name;
        let y = self.dense(y, "the fixed factors (y)")?;
        let confidence = self.sparse(confidence, "the confidences")?;
        let x = storage_mut::<DeviceDense>(x, name, "the factors being solved (x)", "dense")?;
        let (d, x_n, y_n) = (x.d, x.n, y.n);
        check::als(
            (x_n, d),
            (y_n, y.d),
            (confidence.rows, confidence.cols),
            yty,
            params.regularization,
        )?;
        if d > 1024 {
            return Err(KernelError::Unsupported {
                backend: "cuda",
                what: format!("ALS with {d} factors (one thread per factor: at most 1024)"),
            });
        }
        tracing::trace!(
            rows = x_n,
            items = y_n,
            d,
            cg_steps = params.cg_steps,
            device = name,
            "implicit ALS half-step"
        );
        if x_n == 0 {
            return Ok(params.pair_loss.then_some(0.0));
        }
        if params.cg_steps == 0 && !params.pair_loss {
            return Ok(None);
        }
        if let Some((row, item, value)) = confidence.first_below_one {
            return Err(KernelError::Shape(format!(
                "confidence of row {row}, item {item} is {value}: implicit ALS needs confidences \
                 >= 1 (1 + alpha * weight, with weights >= 0)"
            )));
        }

        // Aᵀ with A = YᵀY + λI rounded once to f32, as the reference.
        let lambda = params.regularization;
        let at: Vec<f32> = (0..d * d)
            .map(|pos| {
                let (i, j) = (pos / d, pos % d);
                let diag = if i == j { f64::from(lambda) } else { 0.0 };
                (yty[j * d + i] + diag) as f32
            })
            .collect();
        let at_dev = self.to_device(&at)?;
        let threads = (d.div_ceil(32) * 32) as u32;
        let base = (threads as usize + 2 * ALS_CHUNK as usize + 32) * 4;
        let with_a = base + d * d * 4;
        let a_in_shared = with_a <= self.shared_optin;
        let shared = if a_in_shared { with_a } else { base };
        let blocks_per_sm = (2048 / threads).max(1);
        let blocks = (u64::from(self.multiprocessors.max(1)) * u64::from(blocks_per_sm))
            .min(x_n as u64)
            .min(MAX_GRID_X) as u32;
        let (rows64, d32, steps, in_shared, want_loss) = (
            x_n as u64,
            d as u32,
            params.cg_steps,
            u32::from(a_in_shared),
            u32::from(params.pair_loss),
        );
        let mut row_loss = self.zeros::<f64>(if params.pair_loss { x_n } else { 0 })?;
        let mut launch = self.stream.launch_builder(&self.kernels.als_cg);
        launch
            .arg(&mut x.values)
            .arg(&y.values)
            .arg(&at_dev)
            .arg(&confidence.indptr)
            .arg(&confidence.indices)
            .arg(&confidence.values)
            .arg(&rows64)
            .arg(&d32)
            .arg(&steps)
            .arg(&in_shared)
            .arg(&mut row_loss)
            .arg(&want_loss);
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        // SAFETY: als_cg(float* x, const float* y, const float* at, const u64*
        // indptr, const u32* indices, const float* values, u64 rows, u32 d, u32
        // cg_steps, u32 a_in_shared, double* row_loss, u32 want_loss): the
        // arguments match in order and type. x is rows x d, y is y_n x d, at is
        // d x d; the CSR has rows + 1 offsets and columns < y_n (validated at
        // upload, shapes checked above); row_loss holds rows values when
        // want_loss is set (it is only written then). Each row is written by one
        // block only. The dynamic shared memory holds exactly the
        // layout the kernel carves (A when a_in_shared, then v, coef, cols, red),
        // within the opt-in limit set at load.
        unsafe { launch.launch(config) }.map_err(driver("launching als_cg"))?;
        if !params.pair_loss {
            self.stream
                .synchronize()
                .map_err(driver("waiting for the ALS solve"))?;
            return Ok(None);
        }
        let mut losses = vec![0.0f64; x_n];
        self.download(&row_loss, &mut losses)?;
        Ok(Some(losses.iter().sum()))
    }

    fn top_n(
        &self,
        queries: &Resident,
        items: &Resident,
        n: usize,
        exclude: Option<&Resident>,
    ) -> Result<TopN, KernelError> {
        let queries = self.dense(queries, "the queries of top_n")?;
        let items = self.dense(items, "the items of top_n")?;
        let exclude = exclude
            .map(|e| self.sparse(e, "the exclusions of top_n"))
            .transpose()?;
        let (d, q_n, i_n) = (queries.d, queries.n, items.n);
        if items.d != d {
            return Err(KernelError::Shape(format!(
                "the queries have {d} features per row but the items have {}",
                items.d
            )));
        }
        if i_n >= NO_ITEM as usize {
            return Err(KernelError::Shape(format!(
                "{i_n} items do not fit 32-bit item indices"
            )));
        }
        if let Some(ex) = exclude
            && (ex.rows != q_n || ex.cols != i_n)
        {
            return Err(KernelError::Shape(format!(
                "the exclusion matrix is {} x {} but there are {q_n} queries and {i_n} items",
                ex.rows, ex.cols
            )));
        }
        let Some(slots) = q_n.checked_mul(n) else {
            return Err(KernelError::Shape(format!(
                "{q_n} queries x {n} results overflow"
            )));
        };
        if n > MAX_TOP_N {
            return Err(KernelError::Unsupported {
                backend: "cuda",
                what: format!("top-{n}: the CUDA top-n keeps at most {MAX_TOP_N} items per query"),
            });
        }
        tracing::trace!(
            queries = q_n,
            items = i_n,
            d,
            n,
            device = self.name,
            "top-n"
        );
        let mut out = TopN {
            n,
            items: vec![NO_ITEM; slots],
            scores: vec![f32::NEG_INFINITY; slots],
        };
        if slots == 0 {
            return Ok(out);
        }
        let mut items_dev = self.zeros::<u32>(slots)?;
        let mut scores_dev = self.zeros::<f32>(slots)?;
        let dummy_indptr;
        let dummy_indices;
        let (has_exclude, ex_indptr, ex_indices) = match exclude {
            Some(ex) => (1u32, &ex.indptr, &ex.indices),
            None => {
                dummy_indptr = self.zeros::<u64>(1)?;
                dummy_indices = self.zeros::<u32>(1)?;
                (0u32, &dummy_indptr, &dummy_indices)
            }
        };
        let (m64, d32, n32) = (i_n as u64, d as u32, n as u32);
        let mut launch = self.stream.launch_builder(&self.kernels.top_n);
        launch
            .arg(&queries.values)
            .arg(&items.values)
            .arg(&m64)
            .arg(&d32)
            .arg(&n32)
            .arg(&has_exclude)
            .arg(ex_indptr)
            .arg(ex_indices)
            .arg(&mut items_dev)
            .arg(&mut scores_dev);
        // SAFETY: top_n(const float* queries, const float* items, u64 m, u32 d, u32
        // n, u32 has_exclude, const u64* ex_indptr, const u32* ex_indices, u32*
        // out_items, float* out_scores): the arguments match in order and type.
        // Block q reads query row q (< q_n), item rows < m, and, with exclusions,
        // offsets q and q + 1 of a CSR of q_n rows whose columns are < m (checked
        // above and at upload); it writes slots q*n .. q*n + n of the q_n x n
        // outputs; 1 <= n <= TOPN_MAX.
        unsafe { launch.launch(cfg(grid(q_n as u64, 1)?, TOPN_TILE)) }
            .map_err(driver("launching top_n"))?;
        self.download(&items_dev, &mut out.items)?;
        self.download(&scores_dev, &mut out.scores)?;
        Ok(out)
    }
}
