//! `shoal`: the one command-line tool. It parses arguments, sets up tracing and
//! calls into the crates; everything else lives in them.

mod assign;
mod bench;
mod client;
mod watch;

use clap::{Args, Parser, Subcommand, ValueEnum};
use shoal_coordinator::{AllowList, CoordinatorConfig, StateConfig, spawn_coordinator};
use shoal_kernels::Backend;
use shoal_kernels::CpuKernels;
use shoal_kernels::device::DeviceChoice;
use shoal_net::tls::ServerIdentity;
use shoal_spec::JobSpec;
use shoal_spec::spec::{DEMO_SPEC, Device};
use shoal_worker::{WorkerConfig, spawn_worker};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Large blocks on pages of their own (rows on cache lines): the kernels read
/// factor rows at random.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: shoal_kernels::alloc::LineAligned = shoal_kernels::alloc::LineAligned;

#[derive(Parser, Debug)]
#[command(
    name = "shoal",
    version,
    about = "Customer segmentation from behaviour, at cluster scale"
)]
struct Cli {
    /// Log format: human-readable text, or JSON lines for log collectors.
    #[arg(long, global = true, env = "SHOAL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `shoal_worker=debug`.
    #[arg(long, global = true, env = "SHOAL_LOG", default_value = "warn")]
    log: String,
    /// The CPU backend's ALS kernel set: auto (the fastest this CPU runs) | avx512
    /// | avx2 | portable. The sets round differently; force one to compare runs
    /// across machines.
    #[arg(long, global = true, env = "SHOAL_CPU_KERNELS", default_value = "auto")]
    cpu_kernels: CpuKernels,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Segment the bundled Online Retail log with in-process workers over loopback gRPC.
    Demo {
        /// Workers to start.
        #[arg(long, env = "SHOAL_WORKERS", default_value_t = 2, value_parser = at_least_one())]
        workers: u32,
        /// Output folder (default: out/online-retail).
        #[arg(long, env = "SHOAL_OUTPUT")]
        output: Option<String>,
        /// Compute device: auto (CUDA when present, else CPU) | cpu | cuda.
        #[arg(long, env = "SHOAL_DEVICE", default_value = "auto")]
        device: Device,
        /// Memory each worker may use (e.g. 2G); default: this machine's (or
        /// container's) memory shared between the workers.
        #[arg(long, env = "SHOAL_MEMORY_LIMIT", value_parser = memory_size)]
        memory_limit: Option<u64>,
    },
    /// Run a job spec with a coordinator and workers in this process (loopback gRPC).
    Run {
        /// The job spec (TOML).
        #[arg(env = "SHOAL_SPEC")]
        spec: PathBuf,
        /// Workers to start (default: the spec's cluster.workers).
        #[arg(long, env = "SHOAL_WORKERS", value_parser = at_least_one())]
        workers: Option<u32>,
        /// Compute device, overriding the spec's cluster.device: auto | cpu | cuda.
        #[arg(long, env = "SHOAL_DEVICE")]
        device: Option<Device>,
        /// Memory each worker may use (e.g. 2G); default: this machine's (or
        /// container's) memory shared between the workers.
        #[arg(long, env = "SHOAL_MEMORY_LIMIT", value_parser = memory_size)]
        memory_limit: Option<u64>,
        /// A folder the job may read and write besides the current one and the
        /// system's temporary folder; repeat for more.
        #[arg(long = "allow-path", env = "SHOAL_ALLOW_PATH", value_delimiter = ',')]
        allow_path: Vec<PathBuf>,
    },
    /// Score the users of a new interaction log against a finished job's model
    /// (fold-in): their factors solved with the model's item factors fixed, RFM
    /// with the model's scaling, each user assigned to the nearest of its frozen
    /// centroids. With a features.extra table, its users without interactions
    /// are assigned from its features alone (cold start). Writes the same
    /// outputs as a full run, with _SUCCESS.
    Assign {
        /// The finished job's output folder (path, file:// or s3:// URL).
        #[arg(long, env = "SHOAL_MODEL")]
        model: String,
        /// A job spec (`.toml`: its [input] is used) or the interaction log itself
        /// (path, URL, folder or glob; read with the model's input settings).
        #[arg(long, env = "SHOAL_INPUT")]
        input: String,
        /// Today's features.extra table, with the model's columns (default: the
        /// model's own table, when it was trained with one; a `.toml` --input's
        /// features.extra, when it names one).
        #[arg(long, env = "SHOAL_EXTRA")]
        extra: Option<String>,
        /// Output folder.
        #[arg(long, env = "SHOAL_OUTPUT")]
        output: String,
        /// Workers to start (default: the model's cluster.workers).
        #[arg(long, env = "SHOAL_WORKERS", value_parser = at_least_one())]
        workers: Option<u32>,
        /// Compute device: auto | cpu | cuda.
        #[arg(long, env = "SHOAL_DEVICE")]
        device: Option<Device>,
    },
    /// Run a standing coordinator that operators submit jobs to and workers register with.
    Coordinator {
        #[arg(long, env = "SHOAL_LISTEN", default_value = "0.0.0.0:7070")]
        listen: SocketAddr,
        /// Jobs running at once; the others queue (FIFO).
        #[arg(long, env = "SHOAL_MAX_RUNNING_JOBS", default_value_t = 1)]
        max_running_jobs: usize,
        /// Seconds without a heartbeat after which a worker is dropped.
        #[arg(long, env = "SHOAL_WORKER_TIMEOUT_SECS", default_value_t = 10)]
        worker_timeout_secs: u64,
        /// Seconds a job waits for its first worker.
        #[arg(long, env = "SHOAL_WORKER_WAIT_SECS", default_value_t = 60)]
        worker_wait_secs: u64,
        /// Bearer token every operator call (submit, status, ...) must carry.
        #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Bearer token of the workers (default: the operators' token).
        #[arg(long, env = "SHOAL_WORKER_TOKEN", hide_env_values = true)]
        worker_token: Option<String>,
        /// A folder or object-store prefix (s3://bucket/prefix) jobs may read and
        /// write; repeat for more. Without one, no local path is allowed; without
        /// an object-store one, every object store is (its credentials decide).
        #[arg(long = "allow-path", env = "SHOAL_ALLOW_PATH", value_delimiter = ',')]
        allow_path: Vec<String>,
        /// Where the coordinator keeps its jobs (a folder or s3://bucket/prefix):
        /// restarted with the same state, it takes its jobs back, queued ones in
        /// their order, running ones resumed from their last finished step.
        /// Without it, jobs live in memory only.
        #[arg(long, env = "SHOAL_STATE")]
        state: Option<String>,
        #[command(flatten)]
        serving: Serving,
    },
    /// Run a worker that registers with a coordinator and does what it is told.
    Worker {
        /// The coordinator's URL, e.g. http://coordinator:7070
        #[arg(long, env = "SHOAL_COORDINATOR")]
        coordinator: String,
        #[arg(long, env = "SHOAL_LISTEN", default_value = "0.0.0.0:7071")]
        listen: SocketAddr,
        /// URL the coordinator reaches this worker at (default: http://<listen address>).
        #[arg(long, env = "SHOAL_ADVERTISE")]
        advertise: Option<String>,
        /// Compute device: auto (CUDA when present, else CPU) | cpu | cuda.
        #[arg(long, env = "SHOAL_DEVICE", default_value = "auto")]
        device: Device,
        /// The workers' bearer token (the coordinator's SHOAL_WORKER_TOKEN).
        #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Memory this worker may use for jobs (e.g. 12G, 512M): the coordinator
        /// places shards within it. Default: the container's memory limit
        /// (cgroup), else the machine's memory.
        #[arg(long, env = "SHOAL_MEMORY_LIMIT", value_parser = memory_size)]
        memory_limit: Option<u64>,
        #[command(flatten)]
        serving: Serving,
    },
    /// List the compute backends of this machine: CUDA devices, or why there are none.
    Devices,
    /// Write a seeded synthetic interaction log with planted customer groups: Parquet
    /// files, a truth table (every user's group) and a spec that segments the log.
    Synth(SynthArgs),
    /// Submit a job spec to a standing coordinator.
    Submit {
        #[arg(env = "SHOAL_SPEC")]
        spec: PathBuf,
        #[arg(long, env = "SHOAL_COORDINATOR")]
        coordinator: String,
        /// Wait for the job to finish, showing its progress; exit 0 only on success.
        #[arg(long, env = "SHOAL_WAIT")]
        wait: bool,
        /// Write this run below PREFIX (a folder or s3:// prefix), in a folder named
        /// by the time of submission (UTC, e.g. 2026-12-06T020000Z), instead of the
        /// spec's output.path.
        #[arg(long, env = "SHOAL_OUTPUT_UNDER", value_name = "PREFIX")]
        output_under: Option<String>,
        /// With --output-under: keep the segment ids of the newest earlier run below
        /// PREFIX that finished (has a _SUCCESS manifest) as segments.previous; the
        /// first run, with none, starts the ids.
        #[arg(long, env = "SHOAL_PREVIOUS_LATEST", requires = "output_under")]
        previous_latest: bool,
        /// The operators' bearer token (what the coordinator was given as SHOAL_TOKEN).
        #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(flatten)]
        tls: ClientTls,
    },
    /// Benchmark a compute backend on synthetic data (prints JSON lines).
    Bench(bench::BenchArgs),
    /// Show a job's status.
    Status {
        #[arg(env = "SHOAL_JOB")]
        job: String,
        #[arg(long, env = "SHOAL_COORDINATOR")]
        coordinator: String,
        /// The operators' bearer token (what the coordinator was given as SHOAL_TOKEN).
        #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(flatten)]
        tls: ClientTls,
    },
    /// Follow a job until it ends: a bar per phase on a terminal, a line per change
    /// otherwise. Exit 0 only if it succeeded (1 failed, 3 cancelled).
    Watch {
        /// The job id, as `shoal submit` printed it.
        #[arg(env = "SHOAL_JOB")]
        job: String,
        #[command(flatten)]
        to: Operator,
    },
    /// Cancel a job: a queued job never starts; a running one stops on every worker,
    /// its staging is removed and its output gets no _SUCCESS. Exit 0 once it is
    /// cancelled (or if it had already finished).
    Cancel {
        /// The job id, as `shoal submit` printed it.
        #[arg(env = "SHOAL_JOB")]
        job: String,
        /// Seconds to wait for a running job to stop.
        #[arg(long, env = "SHOAL_CANCEL_WAIT_SECS", default_value_t = 60)]
        wait_secs: u64,
        #[command(flatten)]
        to: Operator,
    },
    /// List the coordinator's jobs: id, name, state, phase, submitted, duration, error.
    Jobs {
        #[command(flatten)]
        to: Operator,
    },
}

/// What `shoal synth` writes.
#[derive(Args, Debug, Clone)]
struct SynthArgs {
    /// Output folder (created; must not hold files).
    #[arg(long, env = "SHOAL_OUTPUT")]
    output: PathBuf,
    /// Users (customers).
    #[arg(long, env = "SHOAL_SYNTH_USERS", default_value_t = 100_000)]
    users: u64,
    /// Items in the catalogue.
    #[arg(long, env = "SHOAL_SYNTH_ITEMS", default_value_t = 10_000)]
    items: u64,
    /// Rows (order lines) wanted; the log holds about this many.
    #[arg(long, env = "SHOAL_SYNTH_INTERACTIONS", default_value_t = 2_000_000)]
    interactions: u64,
    /// Planted groups.
    #[arg(long, env = "SHOAL_SYNTH_GROUPS", default_value_t = 6)]
    groups: u32,
    /// Parquet files of the log (consecutive time windows).
    #[arg(long, env = "SHOAL_SYNTH_FILES", default_value_t = 8)]
    files: u32,
    /// Days the log spans (ending 2026-01-01).
    #[arg(long, env = "SHOAL_SYNTH_DAYS", default_value_t = 730)]
    days: u32,
    #[arg(long, env = "SHOAL_SYNTH_SEED", default_value_t = 42)]
    seed: u64,
}

/// The coordinator an operator's command talks to, and how.
#[derive(Args, Debug, Clone)]
struct Operator {
    /// The coordinator's URL, e.g. http://coordinator:7070
    #[arg(long, env = "SHOAL_COORDINATOR")]
    coordinator: String,
    /// The operators' bearer token (what the coordinator was given as SHOAL_TOKEN).
    #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: ClientTls,
}

impl Operator {
    async fn connect(&self) -> Result<client::Client, BoxError> {
        client::Client::connect(
            &self.coordinator,
            self.token.as_deref(),
            self.tls.tls_ca.as_deref(),
        )
        .await
    }
}

/// TLS of a gRPC server that also calls other servers, and its HTTP endpoints.
#[derive(Args, Debug, Clone)]
struct Serving {
    /// Certificate chain (PEM) to serve TLS with (with --tls-key); clients then use https://.
    #[arg(long, env = "SHOAL_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "SHOAL_TLS_KEY")]
    tls_key: Option<PathBuf>,
    #[command(flatten)]
    client: ClientTls,
    /// Address for the HTTP endpoints /healthz, /readyz and /metrics (e.g. 0.0.0.0:8080).
    #[arg(long, env = "SHOAL_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
}

impl Serving {
    fn identity(&self) -> Result<Option<ServerIdentity>, BoxError> {
        Ok(ServerIdentity::from_paths(
            self.tls_cert.clone(),
            self.tls_key.clone(),
        )?)
    }
}

/// TLS of a gRPC client.
#[derive(Args, Debug, Clone)]
struct ClientTls {
    /// CA certificate (PEM) that signs the servers' certificates, for https:// URLs
    /// (the system's roots are trusted too).
    #[arg(long, env = "SHOAL_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

fn init_tracing(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// A command whose output is piped into another that stops reading (`shoal jobs |
/// head -1`) ends quietly, as other command-line tools do (killed by SIGPIPE),
/// rather than failing on its next line of output. Only a write to the closed
/// standard output or error does that: SIGPIPE itself stays ignored (Rust's
/// default), so a write to any other closed pipe or socket (the in-process
/// workers' connections while they shut down) is an error the code handles, not
/// the end of the process. The servers keep the default panic.
#[cfg(unix)]
fn end_quietly_on_a_closed_pipe(command: &Command) {
    if matches!(
        command,
        Command::Coordinator { .. } | Command::Worker { .. }
    ) {
        return;
    }
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        let printing = message.starts_with("failed printing to std");
        if printing && message.contains("Broken pipe") {
            // SAFETY: setting SIGPIPE's default disposition and raising it ends
            // the process as a closed pipe ends other tools; no Rust state is
            // touched, and nothing runs after it.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(unix)]
    end_quietly_on_a_closed_pipe(&cli.command);
    init_tracing(cli.log_format, &cli.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, cli.cpu_kernels)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `--workers`: a count of at least one, as `cluster.workers` in a spec.
fn at_least_one() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..)
}

/// A memory size as `--memory-limit` takes it.
fn memory_size(text: &str) -> Result<u64, String> {
    shoal_worker::memory::parse_size(text)
}

fn cwd() -> Result<PathBuf, BoxError> {
    Ok(std::env::current_dir().map_err(|e| format!("cannot read the working directory: {e}"))?)
}

async fn run(command: Command, kernels: CpuKernels) -> Result<ExitCode, BoxError> {
    match command {
        Command::Devices => {
            println!(
                "cpu: {} threads",
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            );
            match shoal_kernels::device::cuda_devices() {
                Ok(devices) => devices.iter().for_each(|d| println!("{d}")),
                Err(e) => println!("cuda: unavailable: {e}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            workers,
            output,
            device,
            memory_limit,
        } => {
            // The bundled data lives in the repository, found from anywhere; the
            // output goes under the current folder (or to --output).
            let here = cwd()?;
            let data = if here.join("data/online-retail").is_dir() {
                here.clone()
            } else {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            };
            let mut spec = JobSpec::parse(DEMO_SPEC)?;
            spec.input.interactions = data.join(&spec.input.interactions).display().to_string();
            if let Some(out) = output {
                spec.output.path = out;
            }
            spec.resolve_paths(&here);
            spec.cluster.device = device;
            run_in_process(spec, workers, memory_limit, &[data], kernels).await
        }
        Command::Run {
            spec,
            workers,
            device,
            memory_limit,
            allow_path,
        } => {
            let mut spec = JobSpec::from_file(&spec, &cwd()?)?;
            if let Some(device) = device {
                spec.cluster.device = device;
            }
            let workers = workers.unwrap_or(spec.cluster.workers);
            run_in_process(spec, workers, memory_limit, &allow_path, kernels).await
        }
        Command::Assign {
            model,
            input,
            extra,
            output,
            workers,
            device,
        } => {
            let mut spec =
                assign::assign_spec(&model, &input, extra.as_deref(), &output, &cwd()?).await?;
            if let Some(device) = device {
                spec.cluster.device = device;
            }
            let workers = workers.unwrap_or(spec.cluster.workers);
            run_in_process(spec, workers, None, &[], kernels).await
        }
        Command::Coordinator {
            listen,
            max_running_jobs,
            worker_timeout_secs,
            worker_wait_secs,
            token,
            worker_token,
            allow_path,
            state,
            serving,
        } => {
            let shutdown = CancellationToken::new();
            let journal = match state {
                // a relative folder is the current folder's
                Some(url) if !url.contains("://") && std::path::Path::new(&url).is_relative() => {
                    let at = cwd()?.join(&url).display().to_string();
                    Some(shoal_coordinator::journal::Journal::open(&at)?)
                }
                Some(url) => Some(shoal_coordinator::journal::Journal::open(&url)?),
                None => None,
            };
            let config = CoordinatorConfig {
                listen,
                state: StateConfig {
                    max_running_jobs,
                    worker_timeout: Duration::from_secs(worker_timeout_secs),
                    worker_wait: Duration::from_secs(worker_wait_secs),
                    worker_token: worker_token.or_else(|| token.clone()),
                    tls_ca: serving.client.tls_ca.clone(),
                    allow: AllowList::of(&allow_path, &cwd()?),
                    journal,
                    ..StateConfig::default()
                },
                operator_token: token,
                tls: serving.identity()?,
                http_listen: serving.http_listen,
            };
            let handle = spawn_coordinator(config, shutdown.clone()).await?;
            eprintln!("shoal coordinator listening on {}", handle.url());
            stop_on_signal(shutdown);
            handle.wait().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker {
            coordinator,
            listen,
            advertise,
            device,
            token,
            memory_limit,
            serving,
        } => {
            let shutdown = CancellationToken::new();
            let config = WorkerConfig {
                listen,
                coordinator,
                advertise,
                token,
                tls: serving.identity()?,
                tls_ca: serving.client.tls_ca,
                http_listen: serving.http_listen,
                memory_limit,
                ..WorkerConfig::default()
            };
            let (backend, why) = backend(device, kernels)?;
            eprintln!("{why}");
            let handle = spawn_worker(config, backend, shutdown.clone()).await?;
            eprintln!("shoal worker listening on {}", handle.addr);
            stop_on_signal(shutdown);
            handle.wait().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit {
            spec,
            coordinator,
            wait,
            output_under,
            previous_latest,
            token,
            tls,
        } => {
            let mut spec = JobSpec::from_file(&spec, &cwd()?)?;
            if let Some(prefix) = output_under {
                client::dated_output(&mut spec, &prefix, previous_latest).await?;
                println!("output {}", spec.output.path);
                if !spec.segments.previous.is_empty() {
                    println!("keeping the segment ids of {}", spec.segments.previous);
                }
            }
            let mut client =
                client::Client::connect(&coordinator, token.as_deref(), tls.tls_ca.as_deref())
                    .await?;
            let job = client.submit(&spec).await?;
            println!("{job}");
            if !wait {
                return Ok(ExitCode::SUCCESS);
            }
            let status = client.watch(&job).await?;
            client::finish(&status).await
        }
        Command::Bench(args) => bench::run(args, kernels),
        Command::Synth(args) => synth(args),
        Command::Status {
            job,
            coordinator,
            token,
            tls,
        } => {
            let mut client =
                client::Client::connect(&coordinator, token.as_deref(), tls.tls_ca.as_deref())
                    .await?;
            let status = client.status(&job).await?;
            println!("{}", client::describe(&status));
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { job, to } => {
            let mut client = to.connect().await?;
            let status = client.watch(&job).await?;
            client::finish(&status).await
        }
        Command::Cancel { job, wait_secs, to } => {
            let mut client = to.connect().await?;
            client
                .cancel_and_wait(&job, Duration::from_secs(wait_secs))
                .await
        }
        Command::Jobs { to } => {
            let mut client = to.connect().await?;
            let jobs = client.jobs().await?;
            if jobs.is_empty() {
                println!("no jobs");
            } else {
                println!("{}", watch::jobs_table(&jobs, watch::now_ms()));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn synth(args: SynthArgs) -> Result<ExitCode, BoxError> {
    let config = shoal_synth::SynthConfig {
        users: args.users,
        items: args.items,
        interactions: args.interactions,
        groups: args.groups,
        files: args.files,
        seed: args.seed,
        days: args.days,
        output: args.output,
        ..shoal_synth::SynthConfig::default()
    };
    let started = std::time::Instant::now();
    let s = shoal_synth::generate(&config)?;
    let dir = s.spec.parent().unwrap_or(Path::new("."));
    println!(
        "{}: {} rows ({} orders) of {} users and {} items in {} Parquet files, {:.1} MB, {:.1} s",
        dir.join("log").display(),
        s.rows(),
        s.orders,
        config.users,
        config.items,
        s.log.len(),
        s.bytes() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    println!(
        "{}: every user's planted group (sizes {:?})",
        s.truth.path.display(),
        s.group_sizes
    );
    println!("{}: a spec that segments it; run it with", s.spec.display());
    println!("  shoal run {}", s.spec.display());
    Ok(ExitCode::SUCCESS)
}

/// The worker's backend for `device`, and a sentence saying what was picked and why.
fn backend(device: Device, kernels: CpuKernels) -> Result<(Arc<dyn Backend>, String), BoxError> {
    let choice = match device {
        Device::Auto => DeviceChoice::Auto,
        Device::Cpu => DeviceChoice::Cpu,
        Device::Cuda => DeviceChoice::Cuda,
    };
    Ok(shoal_kernels::device::select(choice, kernels)?)
}

fn stop_on_signal(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        shutdown.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        shutdown.cancel();
    });
}

/// A coordinator and `workers` workers in this process, on loopback ports, talking
/// real gRPC; the job is submitted and watched through the operators' API.
///
/// Jobs may use the current folder, the system's temporary folder, the folders
/// in `also` and any object store.
async fn run_in_process(
    spec: JobSpec,
    workers: u32,
    memory_limit: Option<u64>,
    also: &[PathBuf],
    kernels: CpuKernels,
) -> Result<ExitCode, BoxError> {
    let shutdown = CancellationToken::new();
    let here = cwd()?;
    let allowed: Vec<String> = [here.clone(), std::env::temp_dir()]
        .iter()
        .chain(also)
        .map(|p| p.display().to_string())
        .collect();
    let config = CoordinatorConfig {
        state: StateConfig {
            allow: AllowList::of(&allowed, &here),
            ..StateConfig::default()
        },
        ..CoordinatorConfig::default()
    };
    let coordinator = spawn_coordinator(config, shutdown.clone()).await?;
    let url = coordinator.url();
    // One backend shared by the in-process workers (one device, one set of kernels).
    let (backend, why) = backend(spec.cluster.device, kernels)?;
    eprintln!("{why}");
    let mut handles = Vec::new();
    // The workers share this process: each gets its share of the memory.
    let memory_limit = memory_limit
        .unwrap_or_else(|| shoal_worker::memory::detected_limit().0 / u64::from(workers.max(1)));
    for _ in 0..workers.max(1) {
        let config = WorkerConfig {
            coordinator: url.clone(),
            memory_limit: Some(memory_limit),
            ..WorkerConfig::default()
        };
        handles.push(spawn_worker(config, backend.clone(), shutdown.clone()).await?);
    }
    stop_on_signal(shutdown.clone());
    let mut client = client::Client::connect(&url, None, None).await?;
    client
        .wait_for_workers(workers.max(1) as usize, Duration::from_secs(30))
        .await?;
    let job = client.submit(&spec).await?;
    let status = client.watch(&job).await?;
    let code = client::finish(&status).await;
    shutdown.cancel();
    for h in handles {
        let _ = h.wait().await;
    }
    let _ = coordinator.wait().await;
    code
}
