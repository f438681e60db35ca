//! The job spec: what an operator submits. TOML, serde with `deny_unknown_fields`;
//! [`JobSpec::parse`] parses and validates, and every error names the field.

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
    #[serde(default = "default_k")]
    pub k: u32,
    #[serde(default = "default_max_iter")]
    pub max_iter: u32,
    /// Convergence when the squared centroid shift is at most `tol` times the mean
    /// feature variance (scikit-learn's meaning).
    #[serde(default = "default_tol")]
    pub tol: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_k() -> u32 {
    6
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
    }

    /// Checks every field; the first problem is returned, naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.input.interactions.trim().is_empty() {
            return Err(invalid(
                "input.interactions",
                "must name a path, file:// or s3:// URL, folder or glob",
            ));
        }
        if self.output.path.trim().is_empty() {
            return Err(invalid("output.path", "must name a folder or URL"));
        }
        let cols = &self.input.columns;
        if cols.user().is_empty() {
            return Err(invalid(
                "input.columns.user",
                "is required: the column that identifies the customer",
            ));
        }
        if let Some(fmt) = &self.input.time_format {
            if fmt.trim().is_empty() {
                return Err(invalid(
                    "input.time_format",
                    "must be a strftime format such as \"%d/%m/%Y %H:%M\", or left out for ISO-8601",
                ));
            }
            if chrono::format::StrftimeItems::new(fmt)
                .any(|item| matches!(item, chrono::format::Item::Error))
            {
                return Err(invalid(
                    "input.time_format",
                    format!("`{fmt}` is not a valid strftime format"),
                ));
            }
        }
        if !self.features.rfm {
            return Err(invalid(
                "features.rfm",
                "must be true: RFM is the only feature block in this version",
            ));
        }
        if self.features.rfm {
            if cols.time().is_none() {
                return Err(invalid(
                    "input.columns.time",
                    "is required when features.rfm = true (recency needs event times)",
                ));
            }
            if cols.amount().is_none() && cols.price().is_none() {
                return Err(invalid(
                    "input.columns.price",
                    "features.rfm needs a monetary value: set input.columns.price (monetary = sum(quantity * price)) or input.columns.amount (monetary = sum(amount))",
                ));
            }
        }
        if cols.amount().is_some() && cols.price().is_some() {
            return Err(invalid(
                "input.columns.amount",
                "set either amount (monetary = sum(amount)) or price (monetary = sum(quantity * price)), not both",
            ));
        }
        if self.features.als && cols.item().is_none() {
            return Err(invalid(
                "input.columns.item",
                "is required when features.als = true: ALS learns from (user, item) pairs",
            ));
        }
        let aw = self.features.als_weight;
        if !aw.is_finite() || aw < 0.0 {
            return Err(invalid(
                "features.als_weight",
                format!("must be a finite number >= 0, got {aw}"),
            ));
        }
        let features = &self.features;
        if features.extra.trim() != features.extra {
            return Err(invalid(
                "features.extra",
                "has leading or trailing spaces; give the path or URL exactly",
            ));
        }
        if features.extra().is_none() {
            for (field, set) in [
                ("features.extra_user", !features.extra_user.is_empty()),
                ("features.extra_columns", !features.extra_columns.is_empty()),
            ] {
                if set {
                    return Err(invalid(
                        field,
                        "is set but features.extra names no table; set features.extra or leave this out",
                    ));
                }
            }
        }
        let ew = features.extra_weight;
        if !ew.is_finite() || ew < 0.0 {
            return Err(invalid(
                "features.extra_weight",
                format!("must be a finite number >= 0, got {ew}"),
            ));
        }
        if features.extra_user.trim() != features.extra_user {
            return Err(invalid(
                "features.extra_user",
                "has leading or trailing spaces; give the column name exactly",
            ));
        }
        let extra_user = self.extra_user_column();
        let mut seen = std::collections::BTreeSet::new();
        for c in &features.extra_columns {
            if c.trim().is_empty() {
                return Err(invalid(
                    "features.extra_columns",
                    "holds an empty column name",
                ));
            }
            if !seen.insert(c.as_str()) {
                return Err(invalid(
                    "features.extra_columns",
                    format!("names column `{c}` twice"),
                ));
            }
            if c == extra_user {
                return Err(invalid(
                    "features.extra_columns",
                    format!("names `{c}`, the user column of the table; list feature columns only"),
                ));
            }
        }
        if !self.input.events.is_empty() && cols.event().is_none() {
            return Err(invalid(
                "input.events",
                "needs input.columns.event: the weights are looked up by the value of the event column",
            ));
        }
        for (event, &weight) in &self.input.events {
            if event.trim().is_empty() || event.trim() != event {
                return Err(invalid(
                    "input.events",
                    format!(
                        "event type {event:?} is blank or has leading/trailing spaces; event values are matched trimmed, so it would never match"
                    ),
                ));
            }
            if !weight.is_finite() || weight < 0.0 {
                return Err(invalid(
                    "input.events",
                    format!(
                        "the weight of event type `{event}` must be a finite number >= 0, got {weight}"
                    ),
                ));
            }
        }
        let clean = &self.input.clean;
        if !clean.drop_order_prefixes.is_empty() && cols.order().is_none() {
            return Err(invalid(
                "input.clean.drop_order_prefixes",
                "needs input.columns.order: the prefixes are matched against the order id",
            ));
        }
        if clean.drop_order_prefixes.iter().any(|p| p.is_empty()) {
            return Err(invalid(
                "input.clean.drop_order_prefixes",
                "an empty prefix would drop every row",
            ));
        }
        if let Some(q) = clean.min_quantity {
            if !q.is_finite() {
                return Err(invalid(
                    "input.clean.min_quantity",
                    "must be a finite number",
                ));
            }
            if cols.quantity().is_none() {
                return Err(invalid(
                    "input.clean.min_quantity",
                    "needs input.columns.quantity",
                ));
            }
        }
        if let Some(p) = clean.min_price {
            if !p.is_finite() {
                return Err(invalid("input.clean.min_price", "must be a finite number"));
            }
            if cols.price().is_none() {
                return Err(invalid(
                    "input.clean.min_price",
                    "needs input.columns.price",
                ));
            }
        }
        let seg = &self.segments;
        if seg.k == 0 || seg.k > MAX_K {
            return Err(invalid(
                "segments.k",
                format!("must be between 1 and {MAX_K}, got {}", seg.k),
            ));
        }
        if seg.max_iter == 0 {
            return Err(invalid("segments.max_iter", "must be at least 1"));
        }
        if !seg.tol.is_finite() || seg.tol < 0.0 {
            return Err(invalid(
                "segments.tol",
                format!("must be a finite number >= 0, got {}", seg.tol),
            ));
        }
        let als = &self.als;
        if als.factors == 0 || als.factors > MAX_FACTORS {
            return Err(invalid(
                "als.factors",
                format!("must be between 1 and {MAX_FACTORS}, got {}", als.factors),
            ));
        }
        if als.iterations == 0 || als.iterations > MAX_ALS_ITERATIONS {
            return Err(invalid(
                "als.iterations",
                format!(
                    "must be between 1 and {MAX_ALS_ITERATIONS}, got {}",
                    als.iterations
                ),
            ));
        }
        if !als.regularization.is_finite() || als.regularization < 0.0 {
            return Err(invalid(
                "als.regularization",
                format!("must be a finite number >= 0, got {}", als.regularization),
            ));
        }
        if !als.alpha.is_finite() || als.alpha <= 0.0 {
            return Err(invalid(
                "als.alpha",
                format!("must be a finite number > 0, got {}", als.alpha),
            ));
        }
        if als.cg_steps == 0 || als.cg_steps > MAX_CG_STEPS {
            return Err(invalid(
                "als.cg_steps",
                format!("must be between 1 and {MAX_CG_STEPS}, got {}", als.cg_steps),
            ));
        }
        if als.checkpoint_every == 0 || als.checkpoint_every > MAX_ALS_ITERATIONS {
            return Err(invalid(
                "als.checkpoint_every",
                format!(
                    "must be between 1 and {MAX_ALS_ITERATIONS}, got {}",
                    als.checkpoint_every
                ),
            ));
        }
        if self.recommend.top_n > MAX_TOP_N {
            return Err(invalid(
                "recommend.top_n",
                format!(
                    "must be at most {MAX_TOP_N} (0 = no recommendations), got {}",
                    self.recommend.top_n
                ),
            ));
        }
        if self.recommend.users().is_some() && self.recommend.top_n == 0 {
            return Err(invalid(
                "recommend.users",
                "limits the recommendations, but recommend.top_n = 0 makes none: set top_n or remove users",
            ));
        }
        if self.recommend.users().is_none() && !self.recommend.users_column.trim().is_empty() {
            return Err(invalid(
                "recommend.users_column",
                "names the id column of recommend.users, which is not set",
            ));
        }
        let ev = &self.evaluate;
        if !(0.0..1.0).contains(&ev.holdout) {
            return Err(invalid(
                "evaluate.holdout",
                format!(
                    "must be a fraction in [0, 1) (0 = no evaluation), got {}",
                    ev.holdout
                ),
            ));
        }
        if ev.holdout > 0.0 && !self.features.als {
            return Err(invalid(
                "evaluate.holdout",
                "needs features.als = true: evaluation measures the ALS recommendations; set features.als = true or evaluate.holdout = 0",
            ));
        }
        if ev.k == 0 || ev.k > MAX_TOP_N {
            return Err(invalid(
                "evaluate.k",
                format!("must be between 1 and {MAX_TOP_N}, got {}", ev.k),
            ));
        }
        let cl = &self.cluster;
        if cl.shards == 0 || cl.shards > MAX_SHARDS {
            return Err(invalid(
                "cluster.shards",
                format!("must be between 1 and {MAX_SHARDS}, got {}", cl.shards),
            ));
        }
        if cl.workers == 0 {
            return Err(invalid("cluster.workers", "must be at least 1"));
        }
        if cl.max_attempts == 0 || cl.max_attempts > 100 {
            return Err(invalid(
                "cluster.max_attempts",
                format!("must be between 1 and 100, got {}", cl.max_attempts),
            ));
        }
        if let Some(staging) = &cl.staging
            && staging.trim().is_empty()
        {
            return Err(invalid(
                "cluster.staging",
                "must name a folder or URL, or be left out",
            ));
        }
        if let Some(model) = &self.model {
            if model.path.trim().is_empty() {
                return Err(invalid(
                    "model.path",
                    "must name a finished job's output folder (path, file:// or s3:// URL)",
                ));
            }
            if self.evaluate.holdout > 0.0 {
                return Err(invalid(
                    "evaluate.holdout",
                    "must be 0 when scoring against a model: nothing is trained, so nothing is evaluated",
                ));
            }
        }
        Ok(())
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
mod tests {
    use super::*;

    #[test]
    fn the_shipped_nightly_spec_is_valid() {
        let spec = JobSpec::parse(include_str!("../../deploy/k8s/base/job.toml"))
            .expect("deploy/k8s/base/job.toml parses and validates");
        assert!(spec.features.als);
        assert_eq!(spec.input.columns.item(), Some("sku"));
    }

    fn demo() -> JobSpec {
        JobSpec::parse(DEMO_SPEC).expect("demo spec is valid")
    }

    fn err_of(text: &str) -> String {
        JobSpec::parse(text)
            .expect_err("must be rejected")
            .to_string()
    }

    fn with(replace: &str, by: &str) -> String {
        assert!(
            DEMO_SPEC.contains(replace),
            "test edits a line that exists: {replace}"
        );
        DEMO_SPEC.replacen(replace, by, 1)
    }

    #[test]
    fn demo_spec_parses_with_its_values() {
        let s = demo();
        assert_eq!(s.name, "online-retail");
        assert_eq!(s.input.format, Some(Format::Csv));
        assert_eq!(s.input.columns.user(), "CustomerID");
        assert_eq!(s.input.columns.amount(), None);
        assert_eq!(s.input.clean.drop_order_prefixes, vec!["C".to_string()]);
        assert_eq!(s.input.clean.min_quantity, Some(1.0));
        assert_eq!(s.segments.k, 6);
        assert_eq!(s.cluster.shards, 8);
        assert_eq!(
            JobSpec::parse(&s.to_toml()).unwrap(),
            s,
            "round-trips through TOML"
        );
    }

    #[test]
    fn defaults_fill_optional_sections() {
        let s = JobSpec::parse(
            r#"name = "x"
[input]
interactions = "a.csv"
[input.columns]
user = "u"
time = "t"
amount = "a"
[output]
path = "out"
"#,
        )
        .unwrap();
        assert_eq!(s.segments, SegmentsSpec::default());
        assert_eq!(s.cluster, ClusterSpec::default());
        assert_eq!(s.input.clean.on_bad_rows, OnBadRows::Skip);
        assert_eq!(s.input.format, None);
        assert_eq!(s.features, FeaturesSpec::default());
        assert!(s.features.rfm && !s.features.als);
        assert_eq!(s.features.als_weight, 1.0);
        assert_eq!(s.features.extra, "");
        assert_eq!(
            s.als,
            AlsSpec {
                factors: 64,
                iterations: 15,
                regularization: 0.01,
                alpha: 40.0,
                confidence: Confidence::Linear,
                cg_steps: 3,
                checkpoint_every: 5,
            }
        );
        assert_eq!(
            s.recommend,
            RecommendSpec {
                top_n: 10,
                exclude_seen: true,
                ..RecommendSpec::default()
            }
        );
        assert_eq!(
            s.evaluate,
            EvaluateSpec {
                holdout: 0.0,
                k: 10
            }
        );
        assert_eq!(s.input.columns.event(), None);
        assert_eq!(s.input.columns.item_label(), None);
        assert!(s.input.events.is_empty());
        assert_eq!(s.feature_names(), ["recency_days", "frequency", "monetary"]);
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases: Vec<(String, &str)> = vec![
            (with("name = \"online-retail\"", "name = \"\""), "`name`"),
            (with("format = \"csv\"", "format = \"xml\""), "csv"),
            (
                with("user = \"CustomerID\"", "user = \"\""),
                "input.columns.user",
            ),
            (
                with("time = \"InvoiceDate\"", "time = \"\""),
                "input.columns.time",
            ),
            (
                with("price = \"UnitPrice\"", "price = \"\""),
                "input.columns.price",
            ),
            (
                with(
                    "price = \"UnitPrice\"",
                    "price = \"UnitPrice\"\namount = \"Total\"",
                ),
                "input.columns.amount",
            ),
            (
                with("order = \"InvoiceNo\"", "order = \"\""),
                "input.clean.drop_order_prefixes",
            ),
            (
                with(
                    "drop_order_prefixes = [\"C\"]",
                    "drop_order_prefixes = [\"\"]",
                ),
                "input.clean.drop_order_prefixes",
            ),
            (
                with("quantity = \"Quantity\"", "quantity = \"\""),
                "input.clean.min_quantity",
            ),
            (
                with("min_quantity = 1", "min_quantity = nan"),
                "input.clean.min_quantity",
            ),
            (
                with("min_price = 0.0", "min_price = inf"),
                "input.clean.min_price",
            ),
            (
                with("on_bad_rows = \"skip\"", "on_bad_rows = \"ignore\""),
                "skip",
            ),
            (
                with("path = \"out/online-retail\"", "path = \"\""),
                "output.path",
            ),
            (with("rfm = true", "rfm = false"), "features.rfm"),
            (with("k = 6", "k = 0"), "segments.k"),
            (with("k = 6", "k = 100000"), "segments.k"),
            (with("k = 6", "k = -1"), "k"),
            (with("max_iter = 300", "max_iter = 0"), "segments.max_iter"),
            (with("tol = 1e-4", "tol = -1.0"), "segments.tol"),
            (with("seed = 42", "seed = \"x\""), "seed"),
            (with("shards = 8", "shards = 0"), "cluster.shards"),
            (with("shards = 8", "shards = 65536"), "between 1 and 4096"),
            (
                with("shards = 8", "shards = 8\nmax_attempts = 0"),
                "cluster.max_attempts",
            ),
            (
                with("cg_steps = 3", "cg_steps = 3\ncheckpoint_every = 0"),
                "als.checkpoint_every",
            ),
            (with("workers = 2", "workers = 0"), "cluster.workers"),
            (
                with("workers = 2", "workers = 2\nstaging = \" \""),
                "cluster.staging",
            ),
            (with("[cluster]", "[cluster]\nnodes = 3"), "nodes"),
            (with("device = \"auto\"", "device = \"tpu\""), "cuda"),
            (
                with("[input.clean]", "[input.clean]\nmax_price = 3"),
                "max_price",
            ),
            (
                with(
                    "interactions = \"data/online-retail/online_retail.csv.gz\"",
                    "interactions = \"\"",
                ),
                "input.interactions",
            ),
            (
                with("format = \"csv\"", "format = \"csv\"\ntime_format = \"%Q\""),
                "input.time_format",
            ),
        ];
        for (text, needle) in cases {
            let err = err_of(&text);
            assert!(
                err.contains(needle),
                "error `{err}` should mention `{needle}`"
            );
        }
    }

    #[test]
    fn demo_spec_has_als_recommend_and_evaluate() {
        let s = demo();
        assert_eq!(s.input.columns.item_label(), Some("Description"));
        assert_eq!(s.input.columns.event(), None);
        assert!(s.input.events.is_empty());
        assert!(s.features.rfm && s.features.als);
        assert_eq!(s.features.als_weight, 1.0);
        assert_eq!(
            s.als,
            AlsSpec {
                factors: 32,
                ..AlsSpec::default()
            }
        );
        assert_eq!(s.recommend, RecommendSpec::default());
        assert_eq!(s.evaluate, EvaluateSpec::default());
        let names = s.feature_names();
        assert_eq!(names.len(), 32 + 3);
        assert_eq!(names[0], "als_0");
        assert_eq!(names[31], "als_31");
        assert_eq!(&names[32..], ["recency_days", "frequency", "monetary"]);
    }

    /// The demo spec with an event column and `[input.events]`.
    fn with_events(events: &str) -> String {
        with(
            "item_label = \"Description\"",
            &format!("item_label = \"Description\"\nevent = \"Event\"\n\n[input.events]\n{events}"),
        )
    }

    #[test]
    fn every_new_bad_field_is_named() {
        let no_als = |text: String| text.replacen("als = true", "als = false", 1);
        let cases: Vec<(String, &str, &str)> = vec![
            (
                with("item = \"StockCode\"", "item = \"\""),
                "input.columns.item",
                "(user, item) pairs",
            ),
            (with("factors = 32", "factors = 0"), "als.factors", "1024"),
            (
                with("factors = 32", "factors = 1025"),
                "als.factors",
                "1025",
            ),
            (
                with("iterations = 15", "iterations = 0"),
                "als.iterations",
                "between 1 and 1000",
            ),
            (
                with("iterations = 15", "iterations = 1001"),
                "als.iterations",
                "between 1 and 1000",
            ),
            (
                with("regularization = 0.01", "regularization = -0.1"),
                "als.regularization",
                ">= 0",
            ),
            (
                with("regularization = 0.01", "regularization = nan"),
                "als.regularization",
                "finite",
            ),
            (with("alpha = 40.0", "alpha = 0.0"), "als.alpha", "> 0"),
            (with("alpha = 40.0", "alpha = inf"), "als.alpha", "finite"),
            (
                with("cg_steps = 3", "cg_steps = 0"),
                "als.cg_steps",
                "between 1 and 64",
            ),
            (
                with("cg_steps = 3", "cg_steps = 65"),
                "als.cg_steps",
                "between 1 and 64",
            ),
            (
                with("confidence = \"linear\"", "confidence = \"square\""),
                "confidence",
                "log",
            ),
            (
                with("als_weight = 1.0", "als_weight = -1.0"),
                "features.als_weight",
                ">= 0",
            ),
            (
                with("als_weight = 1.0", "als_weight = nan"),
                "features.als_weight",
                "finite",
            ),
            (
                with(
                    "als_weight = 1.0",
                    "als_weight = 1.0\nextra = \" s3://b/t.parquet\"",
                ),
                "features.extra",
                "spaces",
            ),
            (
                with("als_weight = 1.0", "als_weight = 1.0\nextra_weight = -2.0"),
                "features.extra_weight",
                ">= 0",
            ),
            (
                with("als_weight = 1.0", "als_weight = 1.0\nextra_user = \"id\""),
                "features.extra_user",
                "names no table",
            ),
            (
                with(
                    "als_weight = 1.0",
                    "als_weight = 1.0\nextra = \"t.csv\"\nextra_columns = [\"age\", \"age\"]",
                ),
                "features.extra_columns",
                "`age` twice",
            ),
            (
                with(
                    "als_weight = 1.0",
                    "als_weight = 1.0\nextra = \"t.csv\"\nextra_columns = [\"CustomerID\"]",
                ),
                "features.extra_columns",
                "user column",
            ),
            (
                with(
                    "[input.clean]",
                    "[input.events]\npurchase = 2.0\n\n[input.clean]",
                ),
                "input.events",
                "input.columns.event",
            ),
            (
                with_events("view = 0.5\npurchase = -1.0\n"),
                "input.events",
                "`purchase`",
            ),
            (with_events("view = nan\n"), "input.events", "`view`"),
            (
                with_events("\" view\" = 1.0\n"),
                "input.events",
                "\" view\"",
            ),
            (
                with("top_n = 10", "top_n = 1001"),
                "recommend.top_n",
                "at most 1000",
            ),
            (
                with("top_n = 10", "top_n = 0\nusers = \"list.txt\""),
                "recommend.users",
                "top_n = 0",
            ),
            (
                with("top_n = 10", "top_n = 10\nusers_column = \"id\""),
                "recommend.users_column",
                "not set",
            ),
            (
                with("holdout = 0.0", "holdout = 1.0"),
                "evaluate.holdout",
                "[0, 1)",
            ),
            (
                with("holdout = 0.0", "holdout = -0.1"),
                "evaluate.holdout",
                "[0, 1)",
            ),
            (
                with("holdout = 0.0", "holdout = nan"),
                "evaluate.holdout",
                "[0, 1)",
            ),
            (
                no_als(with("holdout = 0.0", "holdout = 0.2")),
                "evaluate.holdout",
                "needs features.als = true",
            ),
            (with("k = 10", "k = 0"), "evaluate.k", "between 1 and 1000"),
            (
                with("k = 10", "k = 1001"),
                "evaluate.k",
                "between 1 and 1000",
            ),
            (
                with("exclude_seen = true", "exclude_seen = true\nmax = 3"),
                "max",
                "exclude_seen",
            ),
            (
                with("cg_steps = 3", "cg_steps = 3\nrank = 3"),
                "rank",
                "factors",
            ),
            (
                with("k = 10", "k = 10\nmetric = \"ndcg\""),
                "metric",
                "holdout",
            ),
        ];
        for (text, field, detail) in cases {
            let err = err_of(&text);
            assert!(
                err.contains(field) && err.contains(detail),
                "error `{err}` should mention `{field}` and `{detail}`"
            );
        }
    }

    #[test]
    fn als_related_settings_that_are_allowed() {
        // Recommendations without ALS are allowed (skipped), holdout 0 too.
        let s = JobSpec::parse(&with("als = true", "als = false")).unwrap();
        assert!(!s.features.als && s.recommend.top_n == 10);
        assert_eq!(s.feature_names(), ["recency_days", "frequency", "monetary"]);
        // Without ALS the item column is optional.
        JobSpec::parse(&with("als = true", "als = false").replacen(
            "item = \"StockCode\"",
            "item = \"\"",
            1,
        ))
        .unwrap();
        // Bounds are inclusive; zero weights are allowed.
        for (a, b) in [
            ("factors = 32", "factors = 1024"),
            ("factors = 32", "factors = 1"),
            ("iterations = 15", "iterations = 1000"),
            ("regularization = 0.01", "regularization = 0.0"),
            ("cg_steps = 3", "cg_steps = 64"),
            ("als_weight = 1.0", "als_weight = 0.0"),
            ("top_n = 10", "top_n = 0"),
            ("top_n = 10", "top_n = 1000"),
            ("holdout = 0.0", "holdout = 0.999"),
            ("k = 10", "k = 1000"),
            ("confidence = \"linear\"", "confidence = \"log\""),
        ] {
            JobSpec::parse(&with(a, b)).unwrap_or_else(|e| panic!("{b}: {e}"));
        }
        let s = JobSpec::parse(&with_events("view = 0.0\npurchase = 3\n")).unwrap();
        assert_eq!(s.input.events.get("view"), Some(&0.0));
        assert_eq!(s.input.events.get("purchase"), Some(&3.0));
    }

    #[test]
    fn event_weights_match_the_trimmed_value_exactly() {
        let mut s = JobSpec::parse(&with_events(
            "view = 0.25\npurchase = 3.0\n\"add to cart\" = 0.0\n",
        ))
        .unwrap();
        let input = &s.input;
        assert_eq!(input.event_weight(Some("purchase")), 3.0);
        assert_eq!(input.event_weight(Some("  purchase\t")), 3.0);
        assert_eq!(input.event_weight(Some("view")), 0.25);
        assert_eq!(input.event_weight(Some("add to cart")), 0.0);
        assert_eq!(input.event_weight(Some("Purchase")), 1.0, "exact case");
        assert_eq!(input.event_weight(Some("refund")), 1.0, "not listed");
        assert_eq!(input.event_weight(Some("")), 1.0);
        assert_eq!(input.event_weight(Some("   ")), 1.0);
        assert_eq!(input.event_weight(None), 1.0);
        // Without an event column every interaction weighs 1.0.
        s.input.columns.event = " ".into();
        assert_eq!(s.input.event_weight(Some("purchase")), 1.0);
    }

    #[test]
    fn confidence_follows_hu_koren_volinsky() {
        let mut als = AlsSpec {
            alpha: 40.0,
            ..AlsSpec::default()
        };
        assert_eq!(als.confidence, Confidence::Linear);
        assert_eq!(als.confidence_of(0.0), 1.0);
        assert_eq!(als.confidence_of(1.0), 41.0);
        assert_eq!(als.confidence_of(2.5), 101.0);
        als.confidence = Confidence::Log;
        als.alpha = 2.0;
        assert_eq!(als.confidence_of(0.0), 1.0);
        for r in [1e-9, 0.5, 1.0, std::f64::consts::E - 1.0, 10.0, 1e6] {
            let want = 1.0 + 2.0 * (1.0 + r).ln();
            let got = als.confidence_of(r);
            assert!(
                (got - want).abs() <= 1e-12 * want,
                "log confidence of {r}: {got} vs {want}"
            );
        }
        assert!((als.confidence_of(std::f64::consts::E - 1.0) - 3.0).abs() < 1e-12);
    }

    #[test]
    fn every_new_field_round_trips_through_toml() {
        let text = with_events("view = 0.1\n\"add to cart\" = 0.5\npurchase = 3.0\n")
            .replacen(
                "als_weight = 1.0",
                "als_weight = 0.75\nextra = \"s3://b/profiles/\"\nextra_user = \"id\"\nextra_columns = [\"age\", \"emb\"]\nextra_weight = 0.5",
                1,
            )
            .replacen("factors = 32", "factors = 8", 1)
            .replacen("iterations = 15", "iterations = 4", 1)
            .replacen("regularization = 0.01", "regularization = 0.125", 1)
            .replacen("alpha = 40.0", "alpha = 12.5", 1)
            .replacen("confidence = \"linear\"", "confidence = \"log\"", 1)
            .replacen("cg_steps = 3", "cg_steps = 5", 1)
            .replacen("top_n = 10", "top_n = 25", 1)
            .replacen("exclude_seen = true", "exclude_seen = false", 1)
            .replacen("holdout = 0.0", "holdout = 0.2", 1)
            .replacen("k = 10", "k = 20", 1);
        let s = JobSpec::parse(&text).unwrap();
        assert_eq!(s.input.columns.event(), Some("Event"));
        assert_eq!(s.input.columns.item_label(), Some("Description"));
        assert_eq!(s.input.events.len(), 3);
        assert_eq!(s.input.events["add to cart"], 0.5);
        assert_eq!(s.features.als_weight, 0.75);
        assert_eq!(s.features.extra(), Some("s3://b/profiles/"));
        assert_eq!(s.extra_user_column(), "id");
        assert_eq!(s.features.extra_columns, ["age", "emb"]);
        assert_eq!(s.features.extra_weight, 0.5);
        assert_eq!(
            s.als,
            AlsSpec {
                factors: 8,
                iterations: 4,
                regularization: 0.125,
                alpha: 12.5,
                confidence: Confidence::Log,
                cg_steps: 5,
                checkpoint_every: 5,
            }
        );
        assert_eq!(
            s.recommend,
            RecommendSpec {
                top_n: 25,
                exclude_seen: false,
                ..RecommendSpec::default()
            }
        );
        assert_eq!(
            s.evaluate,
            EvaluateSpec {
                holdout: 0.2,
                k: 20
            }
        );
        let toml = s.to_toml();
        assert!(toml.contains("confidence = \"log\""), "{toml}");
        assert_eq!(JobSpec::parse(&toml).unwrap(), s, "round-trips: {toml}");
    }

    #[test]
    fn unknown_variant_lists_allowed_values() {
        let err = err_of(&with("on_bad_rows = \"skip\"", "on_bad_rows = \"ignore\""));
        assert!(err.contains("skip") && err.contains("fail"), "{err}");
        let err = err_of(&with("format = \"csv\"", "format = \"xml\""));
        assert!(err.contains("csv") && err.contains("parquet"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_base() {
        let mut s = demo();
        s.resolve_paths(Path::new("/srv/shoal"));
        assert_eq!(
            s.input.interactions,
            "/srv/shoal/data/online-retail/online_retail.csv.gz"
        );
        assert_eq!(s.output.path, "/srv/shoal/out/online-retail");
        let mut u = demo();
        u.output.path = "file:///tmp/x".into();
        u.features.extra = "profiles/*.parquet".into();
        u.resolve_paths(Path::new("/srv"));
        assert_eq!(u.output.path, "file:///tmp/x");
        assert_eq!(u.features.extra, "/srv/profiles/*.parquet");
        // `.` and `..` are taken out (object stores refuse them), globs kept.
        let mut r = demo();
        r.input.interactions = "../logs/./2024/**/*.csv".into();
        r.output.path = "/data/../../out".into();
        r.resolve_paths(Path::new("/srv/shoal/specs"));
        assert_eq!(r.input.interactions, "/srv/shoal/logs/2024/**/*.csv");
        assert_eq!(r.output.path, "/out");
        // Without a table nothing is made up, and the table's users default to
        // the interactions' user column.
        let d = demo();
        assert_eq!(d.features.extra(), None);
        assert_eq!(d.extra_user_column(), d.input.columns.user());
    }

    #[test]
    fn format_from_names() {
        assert_eq!(Format::from_name("a/b.csv.gz"), Some((Format::Csv, true)));
        assert_eq!(Format::from_name("a/b.CSV"), Some((Format::Csv, false)));
        assert_eq!(
            Format::from_name("b.parquet"),
            Some((Format::Parquet, false))
        );
        assert_eq!(Format::from_name("b.json"), None);
    }
}
