//! The job spec: what an operator submits. TOML, serde with `deny_unknown_fields`;
//! [`JobSpec::parse`] parses and validates, and every error names the field.

mod count;
mod validate;

pub use count::SegmentCount;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Errors in a job spec. Each names the field and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("job spec is not valid TOML or has an unknown or mistyped field: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("job spec field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("cannot read job spec {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field,
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A name for people: it appears in logs, the report and the job list.
    pub name: String,
    pub input: InputSpec,
    pub output: OutputSpec,
    #[serde(default)]
    pub features: FeaturesSpec,
    /// `[als]`: the implicit-feedback matrix factorisation (used when
    /// `features.als = true`).
    #[serde(default)]
    pub als: AlsSpec,
    #[serde(default)]
    pub segments: SegmentsSpec,
    /// `[recommend]`: top-N items per user. Needs `features.als = true`; skipped
    /// otherwise.
    #[serde(default)]
    pub recommend: RecommendSpec,
    /// `[evaluate]`: held-out ranking quality of the recommendations. Needs
    /// `features.als = true`; skipped otherwise (a `holdout > 0` without ALS is an
    /// error).
    #[serde(default)]
    pub evaluate: EvaluateSpec,
    #[serde(default)]
    pub cluster: ClusterSpec,
    /// `[model]`: score against a finished job's model instead of training one
    /// (fold-in: user factors solved with the model's item factors fixed, RFM
    /// scaled with the model's scaling, users assigned to its frozen centroids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
}

/// A finished job's output folder used as a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The folder (path, `file://` or `s3://` URL) holding the job's `_SUCCESS`.
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Parquet,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Parquet => "parquet",
        }
    }

    /// The format an object name implies (`.csv`, `.csv.gz`, `.parquet`, `.pq`),
    /// and whether it is gzip-compressed.
    pub fn from_name(name: &str) -> Option<(Format, bool)> {
        let lower = name.to_ascii_lowercase();
        let (stem, gz) = match lower.strip_suffix(".gz") {
            Some(stem) => (stem, true),
            None => (lower.as_str(), false),
        };
        if stem.ends_with(".csv") || stem.ends_with(".tsv") || stem.ends_with(".txt") {
            Some((Format::Csv, gz))
        } else if !gz && (stem.ends_with(".parquet") || stem.ends_with(".pq")) {
            Some((Format::Parquet, false))
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// A path, `file://` or `s3://bucket/prefix` URL, folder (prefix) or glob of
    /// interaction files.
    pub interactions: String,
    /// csv | parquet. Default: from each object's extension; `.gz` is read transparently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// strftime format of the time column; default ISO-8601 / RFC 3339 date or date-time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_format: Option<String>,
    /// Read user ids as integers (`17850.0` -> `17850`); rows that are not are bad rows.
    #[serde(default)]
    pub user_as_integer: bool,
    pub columns: Columns,
    #[serde(default)]
    pub clean: CleanSpec,
    /// `[input.events]`: event type (the value of `input.columns.event`, trimmed,
    /// exact case) -> weight of the interaction. Types not listed weigh 1.0. Needs
    /// `input.columns.event`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub events: BTreeMap<String, f64>,
}

impl InputSpec {
    /// The weight of an interaction whose event column holds `event`: the weight
    /// listed in `[input.events]` for the trimmed value (exact case), else 1.0 (also
    /// without an event column, and for a missing or blank value).
    pub fn event_weight(&self, event: Option<&str>) -> f64 {
        if self.columns.event().is_none() {
            return 1.0;
        }
        match event.map(str::trim) {
            None | Some("") => 1.0,
            Some(e) => self.events.get(e).copied().unwrap_or(1.0),
        }
    }
}

/// Column names in the input. An empty string means "not present".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Columns {
    pub user: String,
    #[serde(default)]
    pub time: String,
    #[serde(default)]
    pub item: String,
    #[serde(default)]
    pub order: String,
    #[serde(default)]
    pub quantity: String,
    #[serde(default)]
    pub price: String,
    #[serde(default)]
    pub amount: String,
    /// The event type of each interaction (e.g. view, cart, purchase); weighted by
    /// `[input.events]`.
    #[serde(default)]
    pub event: String,
    /// A human-readable item label (e.g. "Description"), carried along for reports.
    #[serde(default)]
    pub item_label: String,
}

/// The features of the RFM block: recency, frequency, monetary.
pub const RFM_DIMS: usize = 3;

fn non_empty(s: &str) -> Option<&str> {
    let s = s.trim();
    (!s.is_empty()).then_some(s)
}

impl Columns {
    pub fn user(&self) -> &str {
        self.user.trim()
    }
    pub fn time(&self) -> Option<&str> {
        non_empty(&self.time)
    }
    pub fn item(&self) -> Option<&str> {
        non_empty(&self.item)
    }
    pub fn order(&self) -> Option<&str> {
        non_empty(&self.order)
    }
    pub fn quantity(&self) -> Option<&str> {
        non_empty(&self.quantity)
    }
    pub fn price(&self) -> Option<&str> {
        non_empty(&self.price)
    }
    pub fn amount(&self) -> Option<&str> {
        non_empty(&self.amount)
    }
    pub fn event(&self) -> Option<&str> {
        non_empty(&self.event)
    }
    pub fn item_label(&self) -> Option<&str> {
        non_empty(&self.item_label)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRows {
    /// Drop the row and count it under its reason.
    #[default]
    Skip,
    /// Fail the job, naming the file and row.
    Fail,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanSpec {
    /// Rows whose order id starts with one of these are dropped (cancellations).
    #[serde(default)]
    pub drop_order_prefixes: Vec<String>,
    /// Rows with quantity below this are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_quantity: Option<f64>,
    /// Rows with price at or below this are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_price: Option<f64>,
    #[serde(default)]
    pub on_bad_rows: OnBadRows,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Folder (path, `file://` URL or `s3://bucket/prefix`) the job's outputs are
    /// written to.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeaturesSpec {
    /// Recency / frequency / monetary, log1p then standardised.
    #[serde(default = "yes")]
    pub rfm: bool,
    /// ALS user factors (see `[als]`), placed before the RFM features. Needs
    /// `input.columns.item`.
    #[serde(default)]
    pub als: bool,
    /// How much the ALS block weighs against the RFM block in the distance.
    #[serde(default = "one")]
    pub als_weight: f64,
    /// A table of per-user features to segment on beside the others: a path,
    /// `file://` or `s3://` URL, folder or glob of CSV or Parquet files with a
    /// user column and numeric columns (Parquet also list<number> columns, each
    /// a vector of one fixed length). Standardised like RFM and placed after it;
    /// a user without a row (or a missing value) gets the column's mean. Empty:
    /// none.
    #[serde(default)]
    pub extra: String,
    /// The user column of `extra`; default: `input.columns.user`. Its ids are
    /// read like the interactions' (`input.user_as_integer` applies).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub extra_user: String,
    /// The feature columns of `extra`; default: every column but the user's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_columns: Vec<String>,
    /// How much the `extra` block weighs against the RFM block in the distance.
    #[serde(default = "one")]
    pub extra_weight: f64,
}

impl FeaturesSpec {
    /// The `extra` table, when there is one.
    pub fn extra(&self) -> Option<&str> {
        non_empty(&self.extra)
    }
}

fn yes() -> bool {
    true
}

fn one() -> f64 {
    1.0
}

impl Default for FeaturesSpec {
    fn default() -> Self {
        FeaturesSpec {
            rfm: true,
            als: false,
            als_weight: one(),
            extra: String::new(),
            extra_user: String::new(),
            extra_columns: Vec::new(),
            extra_weight: one(),
        }
    }
}

/// How an interaction's strength `r` (event weight * quantity) becomes the
/// confidence of implicit-feedback ALS (Hu, Koren & Volinsky, 2008).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Confidence {
    /// `1 + alpha * r`
    #[default]
    Linear,
    /// `1 + alpha * ln(1 + r)` (the paper's log scaling with epsilon = 1)
    Log,
}

impl Confidence {
    pub fn as_str(self) -> &'static str {
        match self {
            Confidence::Linear => "linear",
            Confidence::Log => "log",
        }
    }
}

/// `[als]`: implicit-feedback alternating least squares on the (user, item)
/// strengths. Used when `features.als = true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlsSpec {
    /// Latent factors per user and item (1..=[`MAX_FACTORS`]).
    #[serde(default = "default_factors")]
    pub factors: u32,
    /// Alternating sweeps (users, then items), 1..=1000.
    #[serde(default = "default_als_iterations")]
    pub iterations: u32,
    /// L2 regularisation (lambda), >= 0.
    #[serde(default = "default_regularization")]
    pub regularization: f64,
    /// Confidence scale (alpha), > 0.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// linear | log: see [`Confidence`].
    #[serde(default)]
    pub confidence: Confidence,
    /// Conjugate-gradient steps per factor solve, 1..=64.
    #[serde(default = "default_cg_steps")]
    pub cg_steps: u32,
    /// The factors are written to staging every this many iterations and after
    /// the last one (1..=1000): a job that loses a worker resumes ALS there.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u32,
}

fn default_factors() -> u32 {
    64
}
fn default_als_iterations() -> u32 {
    15
}
fn default_regularization() -> f64 {
    0.01
}
fn default_alpha() -> f64 {
    40.0
}
fn default_checkpoint_every() -> u32 {
    5
}
fn default_cg_steps() -> u32 {
    3
}

impl Default for AlsSpec {
    fn default() -> Self {
        AlsSpec {
            factors: default_factors(),
            iterations: default_als_iterations(),
            regularization: default_regularization(),
            alpha: default_alpha(),
            confidence: Confidence::default(),
            cg_steps: default_cg_steps(),
            checkpoint_every: default_checkpoint_every(),
        }
    }
}

impl AlsSpec {
    /// The confidence of an observed interaction of strength `strength`:
    /// `1 + alpha * r` (linear) or `1 + alpha * ln(1 + r)` (log).
    pub fn confidence_of(&self, strength: f64) -> f64 {
        match self.confidence {
            Confidence::Linear => 1.0 + self.alpha * strength,
            Confidence::Log => 1.0 + self.alpha * strength.ln_1p(),
        }
    }
}

/// `[recommend]`: the top items per user, from the ALS factors. Needs
/// `features.als = true`; skipped otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecommendSpec {
    /// Items recommended per user, at most 1000; 0 = none.
    #[serde(default = "default_top_n")]
    pub top_n: u32,
    /// Leave out items the user already interacted with.
    #[serde(default = "yes")]
    pub exclude_seen: bool,
    /// Recommend only to these customers: a file, folder or glob (local or
    /// `s3://`) of `.txt` lists (one id per line) or CSV / Parquet tables (the ids
    /// in column `users_column`). Empty: every customer.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub users: String,
    /// The id column of a `users` table (default: `input.columns.user`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub users_column: String,
}

fn default_top_n() -> u32 {
    10
}

impl Default for RecommendSpec {
    fn default() -> Self {
        RecommendSpec {
            top_n: default_top_n(),
            exclude_seen: true,
            users: String::new(),
            users_column: String::new(),
        }
    }
}

impl RecommendSpec {
    /// The customers to recommend to, when limited.
    pub fn users(&self) -> Option<&str> {
        non_empty(&self.users)
    }
}

/// `[evaluate]`: hold out a share of each user's interactions and measure how well
/// the recommendations rank them. Needs `features.als = true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateSpec {
    /// Share of interactions held out, in [0, 1); 0 = no evaluation.
    #[serde(default)]
    pub holdout: f64,
    /// Ranking cut-off of the metrics (e.g. precision@k), 1..=1000.
    #[serde(default = "default_eval_k")]
    pub k: u32,
}

fn default_eval_k() -> u32 {
    10
}

impl Default for EvaluateSpec {
    fn default() -> Self {
        EvaluateSpec {
            holdout: 0.0,
            k: default_eval_k(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentsSpec {
    /// Segments: a number (`k = 6`), a range (`k = { min = 3, max = 12 }`) or a
    /// list (`k = [4, 6, 8]`) of candidates, each fitted after one ingest and
    /// one ALS, the one the choosing rule picks kept.
    #[serde(default = "default_k")]
    pub k: SegmentCount,
    /// Seeded k-means starts per candidate k (k-means++ over the k-means||
    /// candidates, each refined by Lloyd rounds in the same distributed rounds);
    /// the one with the lowest inertia is kept.
    #[serde(default = "default_starts")]
    pub starts: u32,
    /// An earlier output of a job with the same features: this run's segments
    /// take the ids of the nearest of its segments (optimal assignment on
    /// centroid distance), the report shows how customers moved. Empty: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub previous: String,
    #[serde(default = "default_max_iter")]
    pub max_iter: u32,
    /// Convergence when the squared centroid shift is at most `tol` times the mean
    /// feature variance (scikit-learn's meaning).
    #[serde(default = "default_tol")]
    pub tol: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_k() -> SegmentCount {
    SegmentCount::One(6)
}
fn default_starts() -> u32 {
    4
}

fn default_max_iter() -> u32 {
    300
}
fn default_tol() -> f64 {
    1e-4
}
fn default_seed() -> u64 {
    42
}

impl Default for SegmentsSpec {
    fn default() -> Self {
        SegmentsSpec {
            k: default_k(),
            starts: default_starts(),
            previous: String::new(),
            max_iter: default_max_iter(),
            tol: default_tol(),
            seed: default_seed(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// User shards. Fixed by the spec: results do not depend on the number of workers.
    #[serde(default = "default_shards")]
    pub shards: u32,
    /// Workers `shoal run` starts (a standing coordinator uses those registered).
    #[serde(default = "default_workers")]
    pub workers: u32,
    /// Where routed rows are staged (path, `file://` or `s3://` URL). Default:
    /// `<output.path>/_staging`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging: Option<String>,
    /// Compute device of the workers: auto (CUDA when a driver and a device exist,
    /// else CPU) | cpu | cuda (fails where there is no CUDA device).
    #[serde(default)]
    pub device: Device,
    /// How many times a step is tried (1..=100) when workers are lost or fail
    /// in a way a retry can mend; then the job fails naming the step.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Auto => "auto",
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            other => Err(format!(
                "unknown device `{other}`: expected auto, cpu or cuda"
            )),
        }
    }
}

fn default_shards() -> u32 {
    8
}
fn default_workers() -> u32 {
    2
}
fn default_max_attempts() -> u32 {
    3
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            shards: default_shards(),
            workers: default_workers(),
            staging: None,
            device: Device::Auto,
            max_attempts: default_max_attempts(),
        }
    }
}

/// Largest k shoal accepts.
pub const MAX_K: u32 = 4096;
/// Most candidates of a range or list of k.
pub const MAX_K_CANDIDATES: usize = 32;
/// Most k-means starts per candidate.
pub const MAX_STARTS: u32 = 64;
/// Most centroids one Lloyd round carries (starts times k): every start's sums
/// and far points travel back from every shard.
pub const MAX_ROUND_CENTROIDS: u64 = 16_384;
/// Largest shard count shoal accepts: a job runs with it (400 rows on 2 workers:
/// 17 s of per-shard overhead). At 65,536 the ALS Gram partials of one worker's
/// shards pass the gRPC message limit (537 MB), and at 16,384 finalize's
/// fetches of the item shards' ids broke off; shards beyond a few per core
/// bring nothing.
pub const MAX_SHARDS: u32 = 4096;
/// Largest `als.factors` shoal accepts.
pub const MAX_FACTORS: u32 = 1024;
/// Largest `als.iterations`.
const MAX_ALS_ITERATIONS: u32 = 1000;
/// Largest `als.cg_steps`.
const MAX_CG_STEPS: u32 = 64;
/// Largest `recommend.top_n` and `evaluate.k`.
const MAX_TOP_N: u32 = 1000;

impl JobSpec {
    /// Parses and validates a spec.
    pub fn parse(text: &str) -> Result<JobSpec, SpecError> {
        let spec: JobSpec = toml::from_str(text)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Reads, parses and validates a spec file, resolving relative local paths in it
    /// against `base` (the directory the operator ran shoal from).
    pub fn from_file(path: &Path, base: &Path) -> Result<JobSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut spec = JobSpec::parse(&text)?;
        spec.resolve_paths(base);
        Ok(spec)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a JobSpec always serialises")
    }

    /// Makes every relative local path absolute against `base`. URLs are left alone.
    pub fn resolve_paths(&mut self, base: &Path) {
        fn fix(s: &mut String, base: &Path) {
            if !s.contains("://") {
                *s = lexical(&base.join(s.as_str())).display().to_string();
            }
        }
        fix(&mut self.input.interactions, base);
        fix(&mut self.output.path, base);
        if !self.features.extra.is_empty() {
            fix(&mut self.features.extra, base);
        }
        if let Some(staging) = self.cluster.staging.as_mut() {
            fix(staging, base);
        }
        if let Some(model) = self.model.as_mut() {
            fix(&mut model.path, base);
        }
        if !self.recommend.users.trim().is_empty() {
            fix(&mut self.recommend.users, base);
        }
        if !self.segments.previous.trim().is_empty() {
            fix(&mut self.segments.previous, base);
        }
    }

    /// The names of the features the spec fixes, in the order of the feature
    /// vector: with ALS the factors first (`als_0` .. `als_{F-1}`), then
    /// recency_days, frequency, monetary. A `features.extra` table's features
    /// come after them, named by its columns.
    pub fn feature_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if self.features.als {
            names.extend((0..self.als.factors).map(|i| format!("als_{i}")));
        }
        if self.features.rfm {
            names.extend(["recency_days", "frequency", "monetary"].map(String::from));
        }
        names
    }

    /// Features of the RFM block: 3 with `features.rfm`, else 0.
    pub fn rfm_dims(&self) -> usize {
        if self.features.rfm { RFM_DIMS } else { 0 }
    }

    /// The user column of the `features.extra` table.
    pub fn extra_user_column(&self) -> &str {
        if self.features.extra_user.is_empty() {
            self.input.columns.user()
        } else {
            &self.features.extra_user
        }
    }

    /// Where jobs of this spec stage rows: `cluster.staging`, or `<output.path>/_staging`.
    pub fn staging_base(&self) -> String {
        self.cluster
            .staging
            .clone()
            .unwrap_or_else(|| format!("{}/_staging", self.output.path.trim_end_matches('/')))
    }

    /// The staging prefix of a job.
    pub fn staging_for(&self, job: &crate::JobId) -> String {
        format!("{}/{}", self.staging_base().trim_end_matches('/'), job)
    }
}

/// `path` without `.` and `..` components, taken lexically (`logs/../in/*.csv`
/// is `in/*.csv`): object stores take no `..`, and a spec's relative paths may
/// climb out of its folder. A `..` above the root stays at the root.
fn lexical(path: &Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() && !out.has_root() {
                    out.push(part);
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// The spec `shoal demo` runs: the bundled Online Retail log.
pub const DEMO_SPEC: &str = r#"name = "online-retail"

[input]
interactions = "data/online-retail/online_retail.csv.gz"
format = "csv"

[input.columns]
user = "CustomerID"
time = "InvoiceDate"
item = "StockCode"
order = "InvoiceNo"
quantity = "Quantity"
price = "UnitPrice"
item_label = "Description"

[input.clean]
drop_order_prefixes = ["C"]
min_quantity = 1
min_price = 0.0
on_bad_rows = "skip"

[output]
path = "out/online-retail"

[features]
rfm = true
als = true
als_weight = 1.0

[als]
factors = 32
iterations = 15
regularization = 0.01
alpha = 40.0
confidence = "linear"
cg_steps = 3

[segments]
k = 6
max_iter = 300
tol = 1e-4
seed = 42

[recommend]
top_n = 10
exclude_seen = true

[evaluate]
holdout = 0.0
k = 10

[cluster]
shards = 8
workers = 2
device = "auto"
"#;

#[cfg(test)]
mod tests;
