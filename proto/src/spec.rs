//! The job spec: what an operator submits. TOML, serde with `deny_unknown_fields`;
//! [`JobSpec::parse`] parses and validates, and every error names the field.

use serde::{Deserialize, Serialize};
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
    #[serde(default)]
    pub segments: SegmentsSpec,
    #[serde(default)]
    pub cluster: ClusterSpec,
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
}

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
}

fn yes() -> bool {
    true
}

impl Default for FeaturesSpec {
    fn default() -> Self {
        FeaturesSpec { rfm: true }
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

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            shards: default_shards(),
            workers: default_workers(),
            staging: None,
            device: Device::Auto,
        }
    }
}

/// Largest k shoal accepts.
pub const MAX_K: u32 = 4096;
/// Largest shard count shoal accepts.
pub const MAX_SHARDS: u32 = 65_536;

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
            if !s.contains("://") && !Path::new(s.as_str()).is_absolute() {
                *s = base.join(s.as_str()).display().to_string();
            }
        }
        fix(&mut self.input.interactions, base);
        fix(&mut self.output.path, base);
        if let Some(staging) = self.cluster.staging.as_mut() {
            fix(staging, base);
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
        if let Some(staging) = &cl.staging
            && staging.trim().is_empty()
        {
            return Err(invalid(
                "cluster.staging",
                "must name a folder or URL, or be left out",
            ));
        }
        Ok(())
    }

    /// The feature names, in the order of the feature vector.
    pub fn feature_names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.features.rfm {
            names.extend(["recency_days", "frequency", "monetary"]);
        }
        names
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

[input.clean]
drop_order_prefixes = ["C"]
min_quantity = 1
min_price = 0.0
on_bad_rows = "skip"

[output]
path = "out/online-retail"

[features]
rfm = true

[segments]
k = 6
max_iter = 300
tol = 1e-4
seed = 42

[cluster]
shards = 8
workers = 2
device = "auto"
"#;

#[cfg(test)]
mod tests {
    use super::*;

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
        u.resolve_paths(Path::new("/srv"));
        assert_eq!(u.output.path, "file:///tmp/x");
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
