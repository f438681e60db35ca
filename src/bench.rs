//! `shoal bench`: synthetic benchmarks of the compute backends. The logic lives in
//! `shoal_kernels_bench`; this is argument parsing and output.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use shoal_kernels::CpuKernels;
use shoal_kernels::device::{DeviceChoice, select};
use shoal_kernels_bench::als::{self, AlsProblem, AlsSettings};
use shoal_kernels_bench::{Blobs, Labelling, in_thread_pool, lloyd, write_npy_f32};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Lloyd iterations on seeded Gaussian blobs; prints one JSON line.
    Kmeans(KmeansArgs),
    /// Implicit-ALS iterations on a seeded interaction matrix; prints one JSON line.
    Als(AlsArgs),
}

#[derive(Args, Debug)]
struct AlsArgs {
    /// Users (rows of the interaction matrix).
    #[arg(long, env = "SHOAL_BENCH_USERS", default_value_t = 100_000)]
    users: usize,
    /// Items (columns).
    #[arg(long, env = "SHOAL_BENCH_ITEMS", default_value_t = 20_000)]
    items: usize,
    /// Interactions drawn (duplicates are summed into one pair).
    #[arg(long, env = "SHOAL_BENCH_PAIRS", default_value_t = 2_000_000)]
    pairs: usize,
    /// Factors per user and item.
    #[arg(long, env = "SHOAL_BENCH_FACTORS", default_value_t = 64)]
    factors: usize,
    /// ALS iterations to time.
    #[arg(long, env = "SHOAL_BENCH_ITERS", default_value_t = 10)]
    iters: usize,
    /// Conjugate-gradient steps per row and half-step.
    #[arg(long, env = "SHOAL_BENCH_CG_STEPS", default_value_t = 3)]
    cg_steps: u32,
    /// λ.
    #[arg(long, env = "SHOAL_BENCH_REGULARIZATION", default_value_t = 0.01)]
    regularization: f32,
    /// Confidence = 1 + alpha × count.
    #[arg(long, env = "SHOAL_BENCH_ALPHA", default_value_t = 40.0)]
    alpha: f32,
    /// Seed of the data and of the initial factors.
    #[arg(long, env = "SHOAL_BENCH_SEED", default_value_t = 0)]
    seed: u64,
    /// Backend to run on: auto, cpu or cuda.
    #[arg(long, env = "SHOAL_BENCH_DEVICE", default_value_t = DeviceChoice::Cpu)]
    device: DeviceChoice,
    /// Threads of the CPU work (default: one per core).
    #[arg(long, env = "SHOAL_BENCH_THREADS")]
    threads: Option<usize>,
}

#[derive(Args, Debug)]
struct KmeansArgs {
    /// Points.
    #[arg(long, env = "SHOAL_BENCH_N")]
    n: usize,
    /// Features per point.
    #[arg(long, env = "SHOAL_BENCH_D")]
    d: usize,
    /// Clusters (and true blobs).
    #[arg(long, env = "SHOAL_BENCH_K")]
    k: usize,
    /// Lloyd iterations to time.
    #[arg(long, env = "SHOAL_BENCH_ITERS", default_value_t = 10)]
    iters: usize,
    /// Seed of the data and of the initial centroids.
    #[arg(long, env = "SHOAL_BENCH_SEED", default_value_t = 0)]
    seed: u64,
    /// Backend to run on: auto, cpu or cuda.
    #[arg(long, env = "SHOAL_BENCH_DEVICE", default_value_t = DeviceChoice::Cpu)]
    device: DeviceChoice,
    /// Compute every distance in every iteration (a full `assign` pass), instead
    /// of the workers' bounded labelling: measures the distance kernel itself.
    #[arg(long, env = "SHOAL_BENCH_FULL_PASSES")]
    full_passes: bool,
    /// Threads of the CPU work (default: one per core).
    #[arg(long, env = "SHOAL_BENCH_THREADS")]
    threads: Option<usize>,
    /// Write the points (n x d float32, .npy) here.
    #[arg(long, env = "SHOAL_BENCH_WRITE_NPY")]
    write_npy: Option<PathBuf>,
    /// Write the initial centroids (k x d float32, .npy) here.
    #[arg(long, env = "SHOAL_BENCH_WRITE_INIT_NPY")]
    write_init_npy: Option<PathBuf>,
    /// Write the final centroids (k x d float32, .npy) here.
    #[arg(long, env = "SHOAL_BENCH_WRITE_CENTROIDS_NPY")]
    write_centroids_npy: Option<PathBuf>,
}

/// Runs the benchmark `args` names; the CPU backend with the ALS kernel set
/// `kernels` (`--cpu-kernels`).
pub fn run(args: BenchArgs, kernels: CpuKernels) -> Result<ExitCode, BoxError> {
    match args.what {
        BenchCommand::Kmeans(a) => kmeans(a, kernels),
        BenchCommand::Als(a) => als(a, kernels),
    }
}

/// `--threads`, or one per core.
fn threads_of(threads: Option<usize>) -> Result<usize, BoxError> {
    match threads {
        Some(0) => Err("--threads must be at least 1".into()),
        Some(t) => Ok(t),
        None => Ok(std::thread::available_parallelism().map_or(1, |p| p.get())),
    }
}

fn als(a: AlsArgs, kernels: CpuKernels) -> Result<ExitCode, BoxError> {
    if a.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    if !(1..=1024).contains(&a.factors) {
        return Err(format!("--factors must be in 1..=1024, not {}", a.factors).into());
    }
    let threads = threads_of(a.threads)?;
    let (backend, _why) = select(a.device, kernels)?;
    let device = backend.name();
    in_thread_pool(threads, || -> Result<ExitCode, BoxError> {
        tracing::info!(
            users = a.users,
            items = a.items,
            pairs = a.pairs,
            seed = a.seed,
            "generating interactions"
        );
        let problem = AlsProblem::generate(a.users, a.items, a.pairs, a.alpha, a.seed)?;
        tracing::info!(iters = a.iters, device, threads, "running ALS iterations");
        let settings = AlsSettings {
            factors: a.factors,
            iters: a.iters,
            regularization: a.regularization,
            cg_steps: a.cg_steps,
            seed: a.seed,
        };
        let r = als::run(backend.as_ref(), &problem, settings)?;
        let line = serde_json::json!({
            "users": a.users,
            "items": a.items,
            "pairs": problem.nnz(),
            "factors": a.factors,
            "iters": a.iters,
            "cg_steps": a.cg_steps,
            "seed": a.seed,
            "device": device,
            "threads": threads,
            "secs_per_iter": r.secs_per_iter(),
            "user_secs_per_iter": r.user_secs_per_iter(),
            "item_secs_per_iter": r.item_secs_per_iter(),
            "loss": r.loss,
        });
        println!("{line}");
        Ok(ExitCode::SUCCESS)
    })
    .map_err(|e| format!("cannot start {threads} threads: {e}"))?
}

fn kmeans(a: KmeansArgs, kernels: CpuKernels) -> Result<ExitCode, BoxError> {
    if a.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    let threads = threads_of(a.threads)?;
    let (backend, _why) = select(a.device, kernels)?;
    let device = backend.name();

    in_thread_pool(threads, || -> Result<ExitCode, BoxError> {
        tracing::info!(n = a.n, d = a.d, k = a.k, seed = a.seed, "generating blobs");
        let blobs = Blobs::generate(a.n, a.d, a.k, a.seed)?;
        write(&a.write_npy, &blobs.points, a.n, a.d)?;
        write(&a.write_init_npy, &blobs.init, a.k, a.d)?;
        let resident = backend.upload(&blobs.points, a.d)?;
        drop(blobs.points);
        tracing::info!(iters = a.iters, device, threads, "running Lloyd iterations");
        let labelling = if a.full_passes {
            Labelling::FullPass
        } else {
            Labelling::Bounded
        };
        let r = lloyd(
            backend.as_ref(),
            &resident,
            &blobs.init,
            a.k,
            a.iters,
            labelling,
        )?;
        write(&a.write_centroids_npy, &r.centroids, a.k, a.d)?;
        let line = serde_json::json!({
            "n": a.n,
            "d": a.d,
            "k": a.k,
            "iters": a.iters,
            "seed": a.seed,
            "device": device,
            "threads": threads,
            "labelling": if a.full_passes { "full-pass" } else { "bounded" },
            "secs_per_iter": r.secs_per_iter(),
            "inertia": r.inertia,
            "gflops": r.gflops(),
            "assign_secs_per_iter": r.assign_secs_per_iter(),
            "assign_gflops": r.assign_gflops(),
            "iter_secs": r.iter_secs,
            "iter_recomputed": r.recomputed,
            "iter_inertia": r.iter_inertia,
            "empty_clusters": r.empty_clusters,
        });
        println!("{line}");
        Ok(ExitCode::SUCCESS)
    })
    .map_err(|e| format!("cannot start {threads} threads: {e}"))?
}

fn write(path: &Option<PathBuf>, values: &[f32], rows: usize, cols: usize) -> Result<(), BoxError> {
    if let Some(path) = path {
        write_npy_f32(path, values, rows, cols)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}
