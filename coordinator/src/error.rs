//! The coordinator's errors, what an operator can do about each, and the one table
//! that maps them to gRPC codes.

use shoal_spec::SpecError;

use shoal_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the input has no data rows ({objects} object(s) under `{pattern}`)")]
    EmptyInput { pattern: String, objects: usize },
    #[error(
        "no rows are left after cleaning: read {read} rows, dropped {dropped}; check input.columns and input.clean"
    )]
    NothingKept { read: u64, dropped: String },
    #[error(
        "one customer would be read as two: the user column of {numeric} holds numbers (read \
         as integers, `17850`), while {fractional} user ids in {text} are integers written with \
         a fraction (such as `{example}`), which stay that text; set input.user_as_integer = \
         true so that both read as the same integer"
    )]
    MixedIdForms {
        numeric: String,
        fractional: u64,
        text: String,
        example: String,
    },
    #[error(
        "{field} `{path}` is outside the locations this coordinator lets jobs use ({allowed}); \
         use one of those, or allow it with --allow-path (of `shoal coordinator` or `shoal run`)"
    )]
    PathNotAllowed {
        field: &'static str,
        path: String,
        allowed: String,
    },
    #[error(
        "segments.k = {k} asks for up to {largest} segments but the input has only {users} users: lower k or add data"
    )]
    TooFewUsers { k: String, largest: u32, users: u64 },
    #[error("output.path `{url}` is a file; it must be a folder (or a prefix in an object store)")]
    OutputIsFile { url: String },
    #[error("{object}: cannot read the Parquet footer: {source}")]
    ParquetFooter {
        object: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error(
        "{object}: cannot tell the format from the name; set input.format to \"csv\" or \"parquet\""
    )]
    UnknownFormat { object: String },
    #[error("writing {file}: {reason}")]
    Write { file: String, reason: String },
    #[error(
        "no worker registered within {seconds} s; start workers with `shoal worker --coordinator URL`"
    )]
    NoWorkers { seconds: u64 },
    #[error("worker {worker} ({address}) failed in {step}: {}", status.message())]
    Worker {
        worker: String,
        address: String,
        step: &'static str,
        status: tonic::Status,
    },
    #[error(
        "worker {worker} ({address}) was lost in {step}: no heartbeat for {}s, it was dropped",
        timeout.as_secs()
    )]
    WorkerLost {
        worker: String,
        address: String,
        step: &'static str,
        timeout: std::time::Duration,
    },
    #[error(
        "{step} failed {attempts} time(s), as many as cluster.max_attempts = {max} allows{lost}; the last time: {cause}"
    )]
    StepFailed {
        step: String,
        attempts: u32,
        max: u32,
        /// ", losing worker-1 (shards 0, 3)" or empty.
        lost: String,
        cause: Box<CoordinatorError>,
    },
    #[error("cannot connect to worker {worker} at {address}: {source}")]
    Connect {
        worker: String,
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("worker {worker} answered {step} inconsistently: {detail}")]
    Protocol {
        worker: String,
        step: &'static str,
        detail: String,
    },
    #[error(
        "the job needs about {need} of memory ({detail}) and its workers have {have}: add workers, give them more memory (shoal worker --memory-limit), or raise cluster.shards so that smaller shards spread better"
    )]
    OverBudget {
        need: String,
        have: String,
        detail: String,
    },
    #[error("the job was cancelled")]
    Cancelled,
    #[error(
        "the coordinator stopped while the job ran; it resumes when the coordinator starts again with the same --state"
    )]
    Suspended,
    #[error("no job {0}")]
    UnknownJob(String),
    #[error(
        "worker speaks protocol version {worker}; this coordinator speaks version {coordinator}: run the same shoal version on both"
    )]
    ProtocolVersion { worker: u32, coordinator: u32 },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    #[error("{which}: {reason}")]
    BadToken { which: &'static str, reason: String },
    #[error(transparent)]
    Tls(#[from] shoal_net::tls::TlsError),
    #[error(
        "the coordinator's state {object} cannot be read: {reason}; move it aside to start without it (its jobs are then forgotten)"
    )]
    State { object: String, reason: String },
    #[error("model {url} cannot be used: {reason}")]
    Model { url: String, reason: String },
    #[error("segments.previous {url} cannot be used: {reason}")]
    Previous { url: String, reason: String },
    #[error("features.extra: {reason}")]
    ExtraTable { reason: String },
}

impl CoordinatorError {
    /// Whether the same step may succeed when tried again.
    pub fn is_retryable(&self) -> bool {
        match self {
            CoordinatorError::Store(e) => e.is_retryable(),
            CoordinatorError::Worker { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Aborted
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::DeadlineExceeded
            ),
            CoordinatorError::Connect { .. } | CoordinatorError::WorkerLost { .. } => true,
            _ => false,
        }
    }

    /// The one table from errors to gRPC codes.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            CoordinatorError::Spec(_)
            | CoordinatorError::EmptyInput { .. }
            | CoordinatorError::NothingKept { .. }
            | CoordinatorError::MixedIdForms { .. }
            | CoordinatorError::PathNotAllowed { .. }
            | CoordinatorError::TooFewUsers { .. }
            | CoordinatorError::OutputIsFile { .. }
            | CoordinatorError::ParquetFooter { .. }
            | CoordinatorError::UnknownFormat { .. }
            | CoordinatorError::Model { .. }
            | CoordinatorError::Previous { .. }
            | CoordinatorError::ExtraTable { .. } => Code::InvalidArgument,
            CoordinatorError::Store(StoreError::Io { .. }) => Code::Unavailable,
            CoordinatorError::Store(_) => Code::InvalidArgument,
            CoordinatorError::Write { .. } | CoordinatorError::Protocol { .. } => Code::Internal,
            CoordinatorError::NoWorkers { .. }
            | CoordinatorError::Connect { .. }
            | CoordinatorError::WorkerLost { .. } => Code::Unavailable,
            CoordinatorError::Worker { status, .. } => status.code(),
            CoordinatorError::StepFailed { cause, .. } => cause.code(),
            CoordinatorError::Cancelled => Code::Cancelled,
            CoordinatorError::Suspended => Code::Unavailable,
            CoordinatorError::OverBudget { .. } => Code::ResourceExhausted,
            CoordinatorError::UnknownJob(_) => Code::NotFound,
            CoordinatorError::ProtocolVersion { .. } => Code::FailedPrecondition,
            CoordinatorError::Bind { .. }
            | CoordinatorError::Serve(_)
            | CoordinatorError::BadToken { .. }
            | CoordinatorError::Tls(_)
            | CoordinatorError::State { .. } => Code::Internal,
            CoordinatorError::ShuttingDown => Code::Unavailable,
        }
    }
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}
