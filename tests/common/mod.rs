//! Test fixtures for whole-system tests: an in-process cluster on loopback ports,
//! job submission over the real JobService, `shoal` processes (coordinator, workers,
//! CLI commands) killed when dropped, output readers (local folders and any
//! object-store location), an S3-compatible server (moto) on a loopback port, a
//! planted-groups interaction log generator, and the adjusted Rand index.
#![allow(dead_code)]

use arrow::array::{Array, Float64Array, StringArray, UInt32Array, UInt64Array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::ChunkReader;
use shoal_coordinator::{CoordinatorConfig, CoordinatorHandle, spawn_coordinator};
use shoal_kernels::CpuBackend;
use shoal_net::auth::{AuthChannel, WithToken};
use shoal_proto::pb::job_service_client::JobServiceClient;
use shoal_proto::pb::{GetJobRequest, JobState, JobStatus, ListWorkersRequest, SubmitJobRequest};
use shoal_spec::JobSpec;
use shoal_store::Location;
use shoal_worker::{WorkerConfig, WorkerHandle, spawn_worker};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

pub const DEADLINE: Duration = Duration::from_secs(180);

/// A coordinator and workers in this process, each on 127.0.0.1 port 0.
pub struct Cluster {
    pub url: String,
    shutdown: CancellationToken,
    coordinator: Option<CoordinatorHandle>,
    workers: Vec<WorkerHandle>,
}

impl Cluster {
    pub async fn start(workers: usize) -> Cluster {
        Cluster::start_with(workers, None).await
    }

    /// `workers` workers that may use `memory_limit` bytes each (`None`: the
    /// machine's memory).
    pub async fn start_with(workers: usize, memory_limit: Option<u64>) -> Cluster {
        let shutdown = CancellationToken::new();
        let coordinator = spawn_coordinator(CoordinatorConfig::default(), shutdown.clone())
            .await
            .expect("coordinator starts");
        let url = coordinator.url();
        let mut handles = Vec::new();
        for _ in 0..workers {
            let cfg = WorkerConfig {
                coordinator: url.clone(),
                memory_limit,
                ..WorkerConfig::default()
            };
            handles.push(
                spawn_worker(cfg, Arc::new(CpuBackend::new()), shutdown.clone())
                    .await
                    .expect("worker starts"),
            );
        }
        wait_for_workers(&url, workers).await;
        Cluster {
            url,
            shutdown,
            coordinator: Some(coordinator),
            workers: handles,
        }
    }

    /// Stops everything and waits for it (bounded).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let workers = std::mem::take(&mut self.workers);
        let coordinator = self.coordinator.take();
        tokio::time::timeout(Duration::from_secs(20), async move {
            for w in workers {
                let _ = w.wait().await;
            }
            if let Some(c) = coordinator {
                let _ = c.wait().await;
            }
        })
        .await
        .expect("cluster shuts down within 20 s");
    }
}

pub async fn wait_for_workers(url: &str, n: usize) {
    wait_for_workers_with_token(url, n, None).await
}

/// A JobService client whose calls carry the operators' `token`.
pub async fn job_client(
    url: &str,
    token: Option<&str>,
) -> Result<JobServiceClient<AuthChannel>, tonic::transport::Error> {
    job_client_tls(url, token, None).await
}

/// As [`job_client`], checking an `https://` coordinator against the CA `ca`.
pub async fn job_client_tls(
    url: &str,
    token: Option<&str>,
    ca: Option<&Path>,
) -> Result<JobServiceClient<AuthChannel>, tonic::transport::Error> {
    let channel = shoal_net::tls::endpoint(url, ca)
        .expect("a valid URL")
        .connect()
        .await?;
    Ok(JobServiceClient::new(InterceptedService::new(
        channel,
        WithToken::new(token).expect("a valid token"),
    )))
}

/// Polls until `n` workers are registered, asking with the operators' `token`.
pub async fn wait_for_workers_with_token(url: &str, n: usize, token: Option<&str>) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(mut c) = job_client(url, token).await
            && let Ok(r) = c.list_workers(ListWorkersRequest {}).await
            && r.into_inner().workers.len() >= n
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} workers did not register in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Submits a spec and polls until the job ends.
pub async fn run_job(url: &str, spec: &JobSpec) -> JobStatus {
    let mut c = job_client(url, None).await.expect("connect");
    run_job_with(&mut c, spec).await
}

/// Submits a spec through `c` and polls until the job ends.
pub async fn run_job_with(c: &mut JobServiceClient<AuthChannel>, spec: &JobSpec) -> JobStatus {
    let id = c
        .submit_job(SubmitJobRequest {
            spec_toml: spec.to_toml(),
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = c
            .get_job(GetJobRequest { job_id: id.clone() })
            .await
            .expect("get")
            .into_inner();
        if [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
            .iter()
            .any(|t| *t as i32 == s.state)
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not finish in time: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn succeeded(s: &JobStatus) -> bool {
    s.state == JobState::Succeeded as i32
}

/// One row of assignments.parquet.
#[derive(Debug, Clone, PartialEq)]
pub struct Assigned {
    pub segment: u32,
    pub distance: f32,
    /// RFM; 0 for a cold-start user (null in the file).
    pub recency_days: f64,
    pub frequency: u64,
    pub monetary: f64,
    /// Assigned from the features.extra table alone (no interactions).
    pub cold_start: bool,
    /// RFM quintile scores (null: not scored) and the RFM map's name of the cell.
    pub scores: [Option<u8>; 3],
    pub rfm_cell: Option<String>,
}

/// Reads every part of `<out>/assignments.parquet/`, keyed by user id.
pub fn read_assignments(out: &Path) -> BTreeMap<String, Assigned> {
    let mut rows = BTreeMap::new();
    let dir = out.join("assignments.parquet");
    let mut parts: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    parts.sort();
    for part in parts {
        add_assignments(&mut rows, std::fs::File::open(&part).unwrap());
    }
    rows
}

/// [`read_assignments`] of an output folder in any store (`s3://`, `file://`).
pub async fn read_assignments_at(out: &Location) -> BTreeMap<String, Assigned> {
    let mut rows = BTreeMap::new();
    let dir = out.child("assignments.parquet");
    let parts = dir.list().await.expect("list assignments.parquet/");
    assert!(!parts.is_empty(), "no parts under {}", dir.url());
    for part in parts {
        add_assignments(&mut rows, dir.at(part.location).get().await.unwrap());
    }
    rows
}

/// Adds the rows of one assignments part; a user may appear only once.
fn add_assignments<R: ChunkReader + 'static>(rows: &mut BTreeMap<String, Assigned>, part: R) {
    let reader = ParquetRecordBatchReaderBuilder::try_new(part)
        .unwrap()
        .build()
        .unwrap();
    for batch in reader {
        let b = batch.unwrap();
        let col = |n: &str| {
            b.column_by_name(n)
                .unwrap_or_else(|| panic!("column {n}"))
                .clone()
        };
        let user = col("user_id");
        let user = user.as_any().downcast_ref::<StringArray>().unwrap();
        let seg = col("segment");
        let seg = seg.as_any().downcast_ref::<UInt32Array>().unwrap();
        let dist = col("distance");
        let dist = dist
            .as_any()
            .downcast_ref::<arrow::array::Float32Array>()
            .unwrap();
        let r = col("recency_days");
        let r = r.as_any().downcast_ref::<Float64Array>().unwrap();
        let f = col("frequency");
        let f = f.as_any().downcast_ref::<UInt64Array>().unwrap();
        let m = col("monetary");
        let m = m.as_any().downcast_ref::<Float64Array>().unwrap();
        let scores: Vec<arrow::array::ArrayRef> =
            ["r_score", "f_score", "m_score"].map(col).to_vec();
        let scores: Vec<&arrow::array::UInt8Array> = scores
            .iter()
            .map(|a| a.as_any().downcast_ref().unwrap())
            .collect();
        let cell = col("rfm_cell");
        let cell = cell.as_any().downcast_ref::<StringArray>().unwrap();
        let cold = col("cold_start");
        let cold = cold
            .as_any()
            .downcast_ref::<arrow::array::BooleanArray>()
            .unwrap();
        for i in 0..b.num_rows() {
            assert_eq!(
                r.is_null(i),
                cold.value(i),
                "user {}: RFM is null exactly for cold-start users",
                user.value(i)
            );
            let prev = rows.insert(
                user.value(i).to_string(),
                Assigned {
                    segment: seg.value(i),
                    distance: dist.value(i),
                    recency_days: if r.is_null(i) { 0.0 } else { r.value(i) },
                    frequency: if f.is_null(i) { 0 } else { f.value(i) },
                    monetary: if m.is_null(i) { 0.0 } else { m.value(i) },
                    cold_start: cold.value(i),
                    scores: [0, 1, 2].map(|j| scores[j].is_valid(i).then(|| scores[j].value(i))),
                    rfm_cell: cell.is_valid(i).then(|| cell.value(i).to_string()),
                },
            );
            assert!(prev.is_none(), "user {} appears twice", user.value(i));
        }
    }
}

/// (user, segment) pairs in user order.
pub fn segments_of(a: &BTreeMap<String, Assigned>) -> Vec<(String, u32)> {
    a.iter().map(|(u, r)| (u.clone(), r.segment)).collect()
}

pub fn read_report(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json"))
        .expect("valid JSON")
}

pub fn read_manifest(out: &Path) -> shoal_spec::manifest::Manifest {
    let text = std::fs::read_to_string(out.join("_SUCCESS")).expect("_SUCCESS");
    shoal_spec::manifest::Manifest::from_json(&text).expect("valid manifest")
}

/// [`read_report`] of an output folder in any store.
pub async fn read_report_at(out: &Location) -> serde_json::Value {
    let bytes = out.child("report.json").get().await.expect("report.json");
    serde_json::from_slice(&bytes).expect("valid JSON")
}

/// [`read_manifest`] of an output folder in any store.
pub async fn read_manifest_at(out: &Location) -> shoal_spec::manifest::Manifest {
    let bytes = out.child("_SUCCESS").get().await.expect("_SUCCESS");
    shoal_spec::manifest::Manifest::from_json(std::str::from_utf8(&bytes).unwrap())
        .expect("valid manifest")
}

/// Copies a local file to `url` (any store) through shoal's own writer.
pub async fn upload(local: &Path, url: &str) -> Location {
    let loc = shoal_store::resolve(url).unwrap();
    let bytes = std::fs::read(local).unwrap_or_else(|e| panic!("{}: {e}", local.display()));
    loc.put(bytes.into()).await.unwrap();
    loc
}

/// The repository's bundled data.
pub fn demo_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/online-retail/online_retail.csv.gz")
}

pub fn demo_spec(out: &Path, shards: u32) -> JobSpec {
    let mut spec = JobSpec::parse(shoal_spec::spec::DEMO_SPEC).unwrap();
    spec.input.interactions = demo_data().display().to_string();
    spec.output.path = out.display().to_string();
    spec.cluster.shards = shards;
    spec
}

/// splitmix64: a tiny deterministic generator for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(1e-12);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// A customer group with its typical behaviour.
pub struct Group {
    pub recency_days: f64,
    pub orders: f64,
    pub order_value: f64,
}

/// Four groups that differ in every RFM dimension (a factor of 4+ apart in at
/// least one), as a shop's champions, regulars, lapsed one-off buyers and big
/// occasional wholesalers would.
pub fn planted_groups() -> Vec<Group> {
    vec![
        Group {
            recency_days: 3.0,
            orders: 25.0,
            order_value: 400.0,
        },
        Group {
            recency_days: 40.0,
            orders: 6.0,
            order_value: 60.0,
        },
        Group {
            recency_days: 250.0,
            orders: 1.0,
            order_value: 25.0,
        },
        Group {
            recency_days: 120.0,
            orders: 3.0,
            order_value: 3000.0,
        },
    ]
}

/// Writes a CSV interaction log with `per_group` users in each planted group, and
/// `bad_rows` rows with an unparseable price. Returns the truth (user -> group).
pub fn write_planted_log(
    path: &Path,
    per_group: usize,
    seed: u64,
    bad_rows: usize,
) -> HashMap<String, usize> {
    write_planted_log_of(path, &planted_groups(), per_group, seed, bad_rows)
}

/// [`write_planted_log`] of the groups `groups` (the same seed gives the same
/// customers and rows for the groups two lists share at their start).
pub fn write_planted_log_of(
    path: &Path,
    groups: &[Group],
    per_group: usize,
    seed: u64,
    bad_rows: usize,
) -> HashMap<String, usize> {
    let mut rng = Rng::new(seed);
    let mut truth = HashMap::new();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "order_id,customer,ts,sku,qty,unit_price").unwrap();
    // 2024-06-30T12:00:00Z; every group has users active up to about then
    let end = chrono_free_epoch_days(2024, 6, 30) as f64 + 0.5;
    let mut order_no = 100_000u64;
    for (g, group) in groups.iter().enumerate() {
        for u in 0..per_group {
            let user = format!("c{g}{u:05}");
            truth.insert(user.clone(), g);
            let orders = (group.orders * (0.15 * rng.normal()).exp())
                .round()
                .max(1.0) as usize;
            let recency = group.recency_days * (0.15 * rng.normal()).exp();
            let last = end - recency;
            for o in 0..orders {
                // the last order at `last`, the others spread over the year before it
                let day = if o == 0 {
                    last
                } else {
                    last - 365.0 * rng.unit()
                };
                let value = group.order_value * (0.15 * rng.normal()).exp();
                let lines = 1 + (rng.next_u64() % 3) as usize;
                order_no += 1;
                for _ in 0..lines {
                    let qty = 1 + rng.next_u64() % 4;
                    let price = value / lines as f64 / qty as f64;
                    writeln!(
                        f,
                        "{order_no},{user},{},SKU{},{qty},{price:.4}",
                        iso(day),
                        rng.next_u64() % 500
                    )
                    .unwrap();
                }
            }
        }
    }
    for i in 0..bad_rows {
        writeln!(
            f,
            "999{i:03},c0{:05},{},SKU1,1,not-a-price",
            i % per_group.max(1),
            iso(end - 1.0)
        )
        .unwrap();
    }
    f.flush().unwrap();
    truth
}

/// Days since 1970-01-01 of a civil date.
fn chrono_free_epoch_days(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD HH:MM:SS` of fractional days since the epoch.
pub fn iso(days: f64) -> String {
    let secs = (days * 86_400.0).round() as i64;
    let day = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Writes the planted log of [`write_planted_log`] with its data rows repeated
/// `copies` times (one header): a large input that is cheap to write. Returns the
/// number of data rows.
pub fn write_repeated_log(path: &Path, per_group: usize, seed: u64, copies: usize) -> u64 {
    write_planted_log(path, per_group, seed, 0);
    let text = std::fs::read(path).unwrap();
    let body_at = text
        .iter()
        .position(|&b| b == b'\n')
        .expect("a header line")
        + 1;
    let body = &text[body_at..];
    let rows = body.iter().filter(|&&b| b == b'\n').count() as u64;
    let mut f =
        std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(path).unwrap());
    for _ in 1..copies {
        f.write_all(body).unwrap();
    }
    f.flush().unwrap();
    rows * copies.max(1) as u64
}

pub fn planted_spec(input: &Path, out: &Path, k: u32) -> JobSpec {
    let text = format!(
        r#"name = "planted"
[input]
interactions = "{}"
[input.columns]
user = "customer"
time = "ts"
item = "sku"
order = "order_id"
quantity = "qty"
price = "unit_price"
[input.clean]
min_quantity = 1
min_price = 0.0
[output]
path = "{}"
[segments]
k = {k}
seed = 7
[cluster]
shards = 6
"#,
        input.display(),
        out.display()
    );
    JobSpec::parse(&text).unwrap()
}

/// Rewrites a CSV log as Parquet with typed columns (Int64 quantity, Float64 price,
/// Timestamp time) in several row groups.
pub fn csv_to_parquet(csv: &Path, parquet_path: &Path) {
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use std::sync::Arc;
    let schema = Arc::new(Schema::new(vec![
        Field::new("order_id", DataType::Utf8, false),
        Field::new("customer", DataType::Utf8, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Second, None), false),
        Field::new("sku", DataType::Utf8, false),
        Field::new("qty", DataType::Int64, false),
        Field::new("unit_price", DataType::Float64, false),
    ]));
    let reader = arrow::csv::ReaderBuilder::new(schema.clone())
        .with_header(true)
        .with_batch_size(500)
        .build(std::fs::File::open(csv).unwrap())
        .unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(700))
        .build();
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(parquet_path).unwrap(),
        schema,
        Some(props),
    )
    .unwrap();
    for batch in reader {
        writer.write(&batch.unwrap()).unwrap();
    }
    writer.close().unwrap();
}

/// Adjusted Rand index of two labelings (Hubert & Arabie).
pub fn adjusted_rand_index(a: &[usize], b: &[usize]) -> f64 {
    assert_eq!(a.len(), b.len());
    let n = a.len() as f64;
    let mut table: HashMap<(usize, usize), f64> = HashMap::new();
    let mut rows: HashMap<usize, f64> = HashMap::new();
    let mut cols: HashMap<usize, f64> = HashMap::new();
    for (x, y) in a.iter().zip(b) {
        *table.entry((*x, *y)).or_default() += 1.0;
        *rows.entry(*x).or_default() += 1.0;
        *cols.entry(*y).or_default() += 1.0;
    }
    let c2 = |v: f64| v * (v - 1.0) / 2.0;
    let index: f64 = table.values().map(|v| c2(*v)).sum();
    let sa: f64 = rows.values().map(|v| c2(*v)).sum();
    let sb: f64 = cols.values().map(|v| c2(*v)).sum();
    let expected = sa * sb / c2(n);
    let max = (sa + sb) / 2.0;
    if max == expected {
        return 1.0;
    }
    (index - expected) / (max - expected)
}

#[test]
fn ari_of_known_labelings() {
    assert!((adjusted_rand_index(&[0, 0, 1, 1], &[1, 1, 0, 0]) - 1.0).abs() < 1e-12);
    // scikit-learn: adjusted_rand_score([0, 0, 1, 1], [0, 0, 1, 2]) = 0.5714285714285715
    assert!(
        (adjusted_rand_index(&[0, 0, 1, 1], &[0, 0, 1, 2]) - 0.571_428_571_428_571_5).abs() < 1e-12
    );
}

#[test]
fn iso_dates_round_trip() {
    assert_eq!(
        iso(chrono_free_epoch_days(2024, 6, 30) as f64 + 0.5),
        "2024-06-30 12:00:00"
    );
    assert_eq!(iso(0.0), "1970-01-01 00:00:00");
    assert_eq!(
        iso(chrono_free_epoch_days(2000, 2, 29) as f64),
        "2000-02-29 00:00:00"
    );
}

/// A child process, killed (and reaped) when dropped: a test that panics leaves
/// no process behind.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `shoal` binary of this build, logging at `info`.
pub fn shoal() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
    c.env("SHOAL_LOG", "info");
    // the operators' and workers' settings come from each test, not from the
    // environment the tests run in
    for var in [
        "SHOAL_TOKEN",
        "SHOAL_WORKER_TOKEN",
        "SHOAL_COORDINATOR",
        "SHOAL_JOB",
    ] {
        c.env_remove(var);
    }
    c
}

/// Starts `shoal coordinator` on 127.0.0.1 port 0 with `env` (e.g. its tokens) and
/// reads its URL from its log.
pub fn coordinator_process_with(env: &[(&str, &str)]) -> (Proc, String) {
    coordinator_process_at("127.0.0.1:0", &[], env)
}

/// [`coordinator_process_with`] listening on `listen`, with more `args`.
pub fn coordinator_process_at(listen: &str, args: &[&str], env: &[(&str, &str)]) -> (Proc, String) {
    use std::io::{BufRead, BufReader};
    let mut child = shoal()
        .args(["coordinator", "--listen", listen])
        .args(args)
        // the tests' folders and the bundled data
        .args(["--allow-path", &std::env::temp_dir().display().to_string()])
        .args(["--allow-path", env!("CARGO_MANIFEST_DIR")])
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start coordinator");
    let stderr = child.stderr.take().unwrap();
    let child = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && let Some(url) = line.strip_prefix("shoal coordinator listening on ") {
                let _ = tx.send(url.trim().to_string());
                sent = true;
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("coordinator prints its address");
    (child, url)
}

/// [`coordinator_process_with`] without tokens.
pub fn coordinator_process() -> (Proc, String) {
    coordinator_process_with(&[])
}

/// Starts `shoal worker` on 127.0.0.1 port 0 towards `coordinator`, with `env`.
pub fn worker_process(coordinator: &str, env: &[(&str, &str)]) -> Proc {
    Proc(
        shoal()
            .args([
                "worker",
                "--coordinator",
                coordinator,
                "--listen",
                "127.0.0.1:0",
            ])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start worker"),
    )
}

/// What a finished `shoal` command did.
#[derive(Debug)]
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Everything it printed, for assertion messages.
    pub fn text(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// `shoal assign` of `input` (and the features.extra table `extra`) against
/// `model`, with two CPU workers.
pub async fn shoal_assign(model: &str, input: &str, extra: Option<&str>, output: &str) -> Ran {
    let mut args = vec!["assign", "--model", model, "--input", input];
    if let Some(extra) = extra {
        args.extend(["--extra", extra]);
    }
    args.extend(["--output", output, "--workers", "2", "--device", "cpu"]);
    run_shoal(&args, &[]).await
}

/// Runs `shoal ARGS` with `env` to its end (off the async runtime's threads), its
/// standard output a pipe (not a terminal). Killed, and the test failed, if it
/// runs longer than [`DEADLINE`].
pub async fn run_shoal(args: &[&str], env: &[(&str, &str)]) -> Ran {
    run_shoal_in(None, args, env).await
}

/// [`run_shoal`] in the folder `dir` (else this process's).
pub async fn run_shoal_in(dir: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut cmd = shoal();
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("shoal {}", args.join(" "));
    tokio::task::spawn_blocking(move || {
        let mut child = Proc(cmd.spawn().expect("run shoal"));
        let read = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_string(&mut text);
                }
                text
            })
        };
        let stdout = read(
            child
                .0
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        );
        let stderr = read(
            child
                .0
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        );
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = child.0.try_wait().expect("poll shoal") {
                break status;
            }
            assert!(Instant::now() < deadline, "`{what}` did not end in time");
            std::thread::sleep(Duration::from_millis(20));
        };
        Ran {
            code: status.code(),
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        }
    })
    .await
    .unwrap()
}

/// The S3-compatible server of one test binary: moto on a free 127.0.0.1 port, with
/// one bucket. [`s3`] starts it once; it stops when the test process exits.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    /// A bucket that exists.
    pub bucket: String,
    /// moto's log (stdout and stderr).
    pub log: PathBuf,
    /// The watchdog's standard input: it is closed only when this process exits
    /// (however it exits), and then the watchdog stops moto.
    _watchdog: Mutex<(Child, ChildStdin)>,
}

/// Where moto's server is: `SHOAL_TEST_MOTO_SERVER`, else the venv scripts/test.sh
/// installs. Missing, it is an error (S3 tests never skip).
fn moto_server_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_TEST_MOTO_SERVER").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "SHOAL_TEST_MOTO_SERVER={} does not exist; run scripts/test.sh, which installs moto into target/s3-venv",
            p.display()
        );
        return p;
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/s3-venv/bin/moto_server");
    assert!(
        p.is_file(),
        "the S3 tests need moto's server: SHOAL_TEST_MOTO_SERVER is unset and {} does not exist; run scripts/test.sh (it installs moto[server] into target/s3-venv and sets SHOAL_TEST_MOTO_SERVER)",
        p.display()
    );
    p
}

/// Starts moto (once per test binary), creates the bucket and points this process's
/// S3 settings at it. Every S3 test calls this before it touches S3, so the
/// environment is set before any S3 client reads it.
pub fn s3() -> &'static S3Server {
    static SERVER: OnceLock<S3Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let moto = moto_server_path();
        let server = (1..=3)
            .find_map(|attempt| S3Server::start(&moto, attempt))
            .expect("moto did not start in 3 attempts (see the logs above)");
        server.create_bucket(&server.bucket);
        // SAFETY: set once, inside the OnceLock initialiser, before any S3 client of this
        // process exists; every test that uses S3 blocks on this initialiser first, and no
        // other thread of the test binary reads these variables.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", "shoal-test");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "shoal-test-secret");
            std::env::set_var("AWS_REGION", "us-east-1");
            std::env::remove_var("AWS_SESSION_TOKEN");
            std::env::remove_var("AWS_ENDPOINT");
            std::env::remove_var("AWS_ENDPOINT_URL");
            std::env::remove_var("AWS_ENDPOINT_URL_S3");
            std::env::set_var(shoal_store::ENDPOINT_VAR, &server.endpoint);
            let no_proxy = std::env::var("NO_PROXY").unwrap_or_default();
            let no_proxy = if no_proxy.is_empty() {
                "127.0.0.1,localhost".to_string()
            } else {
                format!("{no_proxy},127.0.0.1,localhost")
            };
            std::env::set_var("NO_PROXY", &no_proxy);
            std::env::set_var("no_proxy", &no_proxy);
        }
        server
    })
}

impl S3Server {
    /// One attempt: a free port, moto under a watchdog, and a wait until it answers.
    /// `None` when moto exited (e.g. the port was taken in between).
    fn start(moto: &Path, attempt: u32) -> Option<S3Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let log = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("moto-{}-{attempt}.log", std::process::id()));
        // The shell starts moto, then a watchdog that reads the shell's standard input
        // (a pipe from this process) to its end and stops moto. The pipe ends when this
        // process exits, normally or not, so moto never outlives the tests. The shell
        // itself waits for moto, so its exit says that moto exited.
        let script = r#"
            "$1" -H 127.0.0.1 -p "$2" >"$3" 2>&1 </dev/null &
            moto=$!
            exec 3<&0
            { cat <&3 >/dev/null; kill "$moto" 2>/dev/null; } &
            exec 3<&-
            wait "$moto"
        "#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("shoal-moto")
            .arg(moto)
            .arg(port.to_string())
            .arg(&log)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", moto.display()));
        let stdin = child.stdin.take().expect("piped stdin");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = child.try_wait().expect("poll moto") {
                eprintln!(
                    "moto on port {port} exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                return None;
            }
            if matches!(http(port, "GET", "/"), Ok((200, _))) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "moto on port {port} did not answer within 120 s; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: "shoal-test".to_string(),
            log,
            _watchdog: Mutex::new((child, stdin)),
        })
    }

    fn port(&self) -> u16 {
        self.endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("endpoint has a port")
    }

    /// Creates a bucket with a plain (unsigned) HTTP PUT; moto accepts those.
    pub fn create_bucket(&self, bucket: &str) {
        match http(self.port(), "PUT", &format!("/{bucket}")) {
            Ok((200, _)) => {}
            other => panic!(
                "creating bucket {bucket} on {}: {other:?}; moto's log: {}",
                self.endpoint,
                self.log.display()
            ),
        }
    }

    /// `s3://<bucket>/<key>`
    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, key.trim_start_matches('/'))
    }
}

/// One HTTP/1.1 request without a body to 127.0.0.1:`port`: status and body.
fn http(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The record batches of every part of `<out>/<table>/`, parts in name order.
pub fn read_parts(out: &Path, table: &str) -> Vec<arrow::record_batch::RecordBatch> {
    let dir = out.join(table);
    let mut parts: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    parts.sort();
    let mut out = Vec::new();
    for part in parts {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&part).unwrap())
            .unwrap()
            .build()
            .unwrap();
        out.extend(reader.map(|b| b.unwrap()));
    }
    out
}

/// `user_factors.parquet` or `item_factors.parquet`: id -> factors.
pub fn read_factors(out: &Path, table: &str, id: &str) -> BTreeMap<String, Vec<f32>> {
    let mut rows = BTreeMap::new();
    for b in read_parts(out, table) {
        let ids = b.column_by_name(id).unwrap();
        let ids = ids.as_any().downcast_ref::<StringArray>().unwrap();
        let lists = b.column_by_name("factors").unwrap();
        let lists = lists
            .as_any()
            .downcast_ref::<arrow::array::ListArray>()
            .unwrap();
        for i in 0..b.num_rows() {
            let v = lists.value(i);
            let v = v
                .as_any()
                .downcast_ref::<arrow::array::Float32Array>()
                .unwrap();
            let prev = rows.insert(ids.value(i).to_string(), v.values().to_vec());
            assert!(prev.is_none(), "{} appears twice in {table}", ids.value(i));
        }
    }
    rows
}

/// `recommendations.parquet`: user -> (item, score) by rank.
pub fn read_recommendations(out: &Path) -> BTreeMap<String, Vec<(String, f32)>> {
    let mut rows: BTreeMap<String, Vec<(String, f32)>> = BTreeMap::new();
    for b in read_parts(out, "recommendations.parquet") {
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let user = col("user_id");
        let user = user.as_any().downcast_ref::<StringArray>().unwrap();
        let rank = col("rank");
        let rank = rank.as_any().downcast_ref::<UInt32Array>().unwrap();
        let item = col("item_id");
        let item = item.as_any().downcast_ref::<StringArray>().unwrap();
        let score = col("score");
        let score = score
            .as_any()
            .downcast_ref::<arrow::array::Float32Array>()
            .unwrap();
        for i in 0..b.num_rows() {
            let list = rows.entry(user.value(i).to_string()).or_default();
            assert_eq!(
                rank.value(i) as usize,
                list.len() + 1,
                "ranks of {}",
                user.value(i)
            );
            list.push((item.value(i).to_string(), score.value(i)));
        }
    }
    rows
}
