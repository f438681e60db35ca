//! The worker's errors. Each says what went wrong and where, classifies itself as
//! retryable or not, and maps to a gRPC status in one table ([`WorkerError::code`]).

use shoal_kernels::KernelError;
use shoal_spec::SpecError;
use shoal_store::StoreError;

/// The columns a file has, for an error saying one is missing: their names when
/// they read as column names, else only how many there are. A file that is not
/// a table (a key file named by mistake or on purpose) must not have its first
/// line echoed into a job's error.
fn columns_text(present: &[String]) -> String {
    let name_like = |name: &String| {
        !name.is_empty()
            && name.chars().count() <= 64
            && name
                .chars()
                .all(|c| c.is_alphanumeric() || " _-.()#%&+".contains(c))
    };
    match present {
        [] => "it has no columns (is it empty, or without a header line?)".to_string(),
        names if names.iter().all(name_like) => format!("columns are: {}", names.join(", ")),
        names => format!(
            "its first line does not read as column names ({} field{}, not shown): is it the \
             table the spec means?",
            names.len(),
            if names.len() == 1 { "" } else { "s" }
        ),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(
        "column `{column}` (input.columns.{field}) not found in {file}; {}",
        columns_text(present)
    )]
    MissingColumn {
        file: String,
        field: &'static str,
        column: String,
        present: Vec<String>,
    },
    #[error(
        "{file}, row {row}: {reason}: {detail} (input.clean.on_bad_rows = \"fail\"; set it to \"skip\" to drop and count such rows)"
    )]
    BadRow {
        file: String,
        /// 1-based data row (the header is not counted).
        row: u64,
        reason: &'static str,
        detail: String,
    },
    #[error("{file}: column `{column}` has type {data_type}, which cannot hold {field} values")]
    ColumnType {
        file: String,
        field: &'static str,
        column: String,
        data_type: String,
    },
    #[error("{file}: cannot read CSV: {source}")]
    Csv {
        file: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error("{file}: cannot read gzip: {source}")]
    Gzip {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: cannot read or write Parquet: {source}")]
    Parquet {
        file: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{file}: {source}")]
    Arrow {
        file: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error(
        "this worker holds no state for job {job}: it was restarted or never loaded the job's shards"
    )]
    UnknownJob { job: String },
    #[error("this worker does not hold shard {shard} of job {job}")]
    UnknownShard { job: String, shard: u32 },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(
        "the job asks for cluster.device = \"{wanted}\" but this worker runs on {have}; start workers with --device {wanted} on machines that have it, or set cluster.device = \"auto\""
    )]
    DeviceUnavailable { wanted: &'static str, have: String },
    #[error("job {job} was cancelled (released on this worker); its work stopped")]
    Cancelled { job: String },
    #[error(
        "job {job}: attempt {attempt} was superseded by attempt {current} on this worker; its results are refused"
    )]
    StaleAttempt {
        job: String,
        attempt: u32,
        current: u32,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("coordinator {coordinator} refused this worker: {message}")]
    Refused {
        coordinator: String,
        message: String,
    },
    #[error("SHOAL_TOKEN: {0}")]
    BadToken(String),
    #[error("the coordinator URL is not usable ({0}); e.g. http://coordinator:7070")]
    BadCoordinatorUrl(String),
    #[error(transparent)]
    Tls(#[from] shoal_net::tls::TlsError),
    #[error("fetching {what} from worker {address} failed: {message}")]
    Peer {
        address: String,
        what: String,
        message: String,
    },
    #[error(
        "{what}: the owner holds version {have}, version {wanted} was asked for (the job's steps ran out of order, or its ALS is not linked there yet); re-run the job"
    )]
    StaleFactors {
        what: String,
        have: u32,
        wanted: u32,
    },
    #[error("the shards of job {job} do not agree: {detail}")]
    Inconsistent { job: String, detail: String },
    #[error(
        "column `{column}` ({field}) not found in the features.extra table {file}; {}",
        columns_text(present)
    )]
    ExtraMissingColumn {
        file: String,
        field: &'static str,
        column: String,
        present: Vec<String>,
    },
    #[error(
        "user `{user}` has more than one row in the features.extra table ({first} and {second}); give each user at most one row"
    )]
    DuplicateExtraUser {
        user: String,
        first: String,
        second: String,
    },
    #[error(
        "{what} ids `{first}` and `{second}` of {what} shard {shard} have the same 64-bit key ({key:#018x}); shoal cannot tell them apart: rename one of them"
    )]
    IdCollision {
        what: String,
        shard: u32,
        key: u64,
        first: String,
        second: String,
    },
    #[error(
        "{what} shard {shard} holds {detail}; raise cluster.shards so that each shard holds fewer"
    )]
    ShardTooLarge {
        what: String,
        shard: u32,
        detail: String,
    },
    #[error(
        "{url}: not a staged file of this shoal version: {detail}; the staging prefix holds files of another version or another program"
    )]
    Staged { url: String, detail: String },
    #[error(
        "the shards given to this worker need about {need_mib} MiB and its memory limit is {limit_mib} MiB ({detail}); give the job more workers or workers more memory (shoal worker --memory-limit)"
    )]
    OverBudget {
        need_mib: u64,
        limit_mib: u64,
        detail: String,
    },
}

impl WorkerError {
    /// Whether the coordinator may retry the step (on this or another worker).
    pub fn is_retryable(&self) -> bool {
        match self {
            WorkerError::Store(e) => e.is_retryable(),
            WorkerError::UnknownJob { .. }
            | WorkerError::UnknownShard { .. }
            | WorkerError::Peer { .. }
            | WorkerError::StaleFactors { .. } => true,
            _ => false,
        }
    }

    /// The one table from errors to gRPC codes.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            WorkerError::Spec(_)
            | WorkerError::MissingColumn { .. }
            | WorkerError::BadRow { .. }
            | WorkerError::ColumnType { .. }
            | WorkerError::Csv { .. }
            | WorkerError::Gzip { .. }
            | WorkerError::Parquet { .. }
            | WorkerError::Arrow { .. }
            | WorkerError::ExtraMissingColumn { .. }
            | WorkerError::DuplicateExtraUser { .. }
            | WorkerError::IdCollision { .. }
            | WorkerError::ShardTooLarge { .. }
            | WorkerError::InvalidRequest(_) => Code::InvalidArgument,
            WorkerError::Staged { .. } => Code::Internal,
            WorkerError::OverBudget { .. } => Code::ResourceExhausted,
            WorkerError::Kernel(e) if e.is_input_error() => Code::InvalidArgument,
            WorkerError::Kernel(_) => Code::Internal,
            WorkerError::DeviceUnavailable { .. } => Code::FailedPrecondition,
            WorkerError::Store(StoreError::Io { .. }) => Code::Unavailable,
            WorkerError::Store(_) => Code::InvalidArgument,
            WorkerError::UnknownJob { .. } | WorkerError::UnknownShard { .. } => {
                Code::FailedPrecondition
            }
            WorkerError::Cancelled { .. } => Code::Cancelled,
            WorkerError::StaleAttempt { .. } => Code::Aborted,
            WorkerError::Peer { .. } => Code::Unavailable,
            WorkerError::StaleFactors { .. } => Code::FailedPrecondition,
            WorkerError::Inconsistent { .. } => Code::Internal,
            WorkerError::Bind { .. }
            | WorkerError::Serve(_)
            | WorkerError::Refused { .. }
            | WorkerError::BadToken(_)
            | WorkerError::BadCoordinatorUrl(_)
            | WorkerError::Tls(_) => Code::Internal,
        }
    }
}

impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn codes_and_retries_follow_the_table() {
        let nan = WorkerError::Kernel(KernelError::NonFinitePoint {
            row: 3,
            col: 1,
            value: f32::NAN,
        });
        assert_eq!(nan.code(), Code::InvalidArgument);
        assert!(!nan.is_retryable());
        let driver = WorkerError::Kernel(KernelError::Driver {
            op: "launching assign".into(),
            message: "oops".into(),
        });
        assert_eq!(driver.code(), Code::Internal);
        let lost = WorkerError::UnknownJob {
            job: "job-1".into(),
        };
        assert_eq!(lost.code(), Code::FailedPrecondition);
        assert!(lost.is_retryable());
        let status: tonic::Status = WorkerError::BadRow {
            file: "file:///x.csv".into(),
            row: 7,
            reason: "bad_price",
            detail: "`abc`".into(),
        }
        .into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("file:///x.csv, row 7"),
            "{}",
            status.message()
        );
    }
}
