//! Test fixtures for whole-system tests: an in-process cluster on loopback ports,
//! job submission over the real JobService, output readers, a planted-groups
//! interaction log generator, and the adjusted Rand index.
#![allow(dead_code)]

use arrow::array::{Array, Float64Array, StringArray, UInt32Array, UInt64Array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use shoal_coordinator::{CoordinatorConfig, CoordinatorHandle, spawn_coordinator};
use shoal_kernels::CpuBackend;
use shoal_proto::JobSpec;
use shoal_proto::pb::job_service_client::JobServiceClient;
use shoal_proto::pb::{GetJobRequest, JobState, JobStatus, ListWorkersRequest, SubmitJobRequest};
use shoal_worker::{WorkerConfig, WorkerHandle, spawn_worker};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

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
        let shutdown = CancellationToken::new();
        let coordinator = spawn_coordinator(CoordinatorConfig::default(), shutdown.clone())
            .await
            .expect("coordinator starts");
        let url = coordinator.url();
        let mut handles = Vec::new();
        for _ in 0..workers {
            let cfg = WorkerConfig {
                coordinator: url.clone(),
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
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(mut c) = JobServiceClient::connect(url.to_string()).await
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
    let mut c = JobServiceClient::connect(url.to_string())
        .await
        .expect("connect");
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
    pub recency_days: f64,
    pub frequency: u64,
    pub monetary: f64,
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
        let file = std::fs::File::open(&part).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
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
            for i in 0..b.num_rows() {
                let prev = rows.insert(
                    user.value(i).to_string(),
                    Assigned {
                        segment: seg.value(i),
                        distance: dist.value(i),
                        recency_days: r.value(i),
                        frequency: f.value(i),
                        monetary: m.value(i),
                    },
                );
                assert!(prev.is_none(), "user {} appears twice", user.value(i));
            }
        }
    }
    rows
}

pub fn read_report(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json"))
        .expect("valid JSON")
}

pub fn read_manifest(out: &Path) -> shoal_proto::manifest::Manifest {
    let text = std::fs::read_to_string(out.join("_SUCCESS")).expect("_SUCCESS");
    shoal_proto::manifest::Manifest::from_json(&text).expect("valid manifest")
}

/// The repository's bundled data.
pub fn demo_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/online-retail/online_retail.csv.gz")
}

pub fn demo_spec(out: &Path, shards: u32) -> JobSpec {
    let mut spec = JobSpec::parse(shoal_proto::spec::DEMO_SPEC).unwrap();
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
    let mut rng = Rng::new(seed);
    let mut truth = HashMap::new();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "order_id,customer,ts,sku,qty,unit_price").unwrap();
    // 2024-06-30T12:00:00Z; every group has users active up to about then
    let end = chrono_free_epoch_days(2024, 6, 30) as f64 + 0.5;
    let mut order_no = 100_000u64;
    let groups = planted_groups();
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
fn iso(days: f64) -> String {
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
