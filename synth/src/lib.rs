//! Seeded synthetic interaction logs of any size, with planted customer groups and a
//! truth table beside the log: how shoal is tried at size, and how its scale
//! figures are reproduced.
//!
//! What is planted. Every user belongs to one of `groups` groups (sizes in the
//! ratios 1 : 1.25 : 1.5 : 1.75, repeating), and a group differs from the others in
//! four habits:
//!
//! - **items**: each group has its own slice of the catalogue (`items / groups`
//!   items); 80 % of its draws come from that slice, the rest from the whole
//!   catalogue; within either, popularity falls off like Zipf's law (rank r is
//!   drawn with probability ≈ ln((r + 2) / (r + 1)) / ln(n + 1)); half of a
//!   user's lines are one of 8 favourites drawn that way once per user (people
//!   buy the same things again);
//! - **recency**: groups are active over the whole span, only in its first 55 %
//!   (lapsed), or only in its last 30 % (new), in turn;
//! - **frequency**: orders per user and lines per order differ by group;
//! - **monetary**: quantities per line differ by group, and the price level of each
//!   slice of the catalogue differs too.
//!
//! Activity is heavy-tailed: a user's expected number of lines is the log's mean
//! times a log-normal draw (σ = 1) times the group's rate, and every user places at
//! least one order. Each order has a time (uniform within the group's window),
//! one or more lines, and an id; the log is cut into `files` Parquet files by time
//! (file `f` holds the orders of the `f`-th of `files` equal time windows), so a
//! user's orders are spread over the files as in a daily export. Within a file the
//! rows come in row groups of about 65,536 users, each sorted by time.
//!
//! Everything is a function of the seed: a user's group, activity and orders are
//! drawn from generators seeded by (seed, user) and (seed, user, order), so the
//! same config gives the same bytes whatever the number of threads.
//!
//! Layout of the output folder:
//!
//! ```text
//! log/part-00000.parquet …   user_id int64, item_id int64, time timestamp[ms, UTC],
//!                            order_id string, quantity int64, price float64
//! truth.parquet              user_id int64, group int32 (one row per user)
//! job.toml                   a shoal spec that segments the log (absolute paths)
//! ```

use arrow::array::{ArrayRef, Int32Array, Int64Array, StringBuilder, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, LogNormal, Poisson};
use rand_pcg::Pcg64Mcg;
use rayon::prelude::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Users per row group (each row group is sorted by time).
const CHUNK_USERS: u64 = 65_536;
/// Rows per Parquet row group at most.
const ROW_GROUP_ROWS: usize = 1 << 20;
/// Share of a group's lines drawn from its own slice of the catalogue.
const IN_SLICE: f64 = 0.8;
/// Items a user buys again and again, and the share of lines that are one of them.
const FAVOURITES: u64 = 8;
const FAVOURITE_SHARE: f64 = 0.5;
/// σ of the log-normal activity of a user.
const ACTIVITY_SIGMA: f64 = 1.0;
const MS_PER_DAY: i64 = 86_400_000;
/// 2026-01-01T00:00:00Z, the default end of the log.
pub const DEFAULT_END_MS: i64 = 1_767_225_600_000;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    pub users: u64,
    pub items: u64,
    /// Lines (rows) wanted; the log holds about this many (each user's count is
    /// a random draw around its expectation).
    pub interactions: u64,
    pub groups: u32,
    pub files: u32,
    pub seed: u64,
    /// Days the log spans, ending at `end_ms`.
    pub days: u32,
    pub end_ms: i64,
    /// The output folder (created; must be empty or not exist).
    pub output: PathBuf,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            users: 100_000,
            items: 10_000,
            interactions: 2_000_000,
            groups: 6,
            files: 8,
            seed: 42,
            days: 730,
            end_ms: DEFAULT_END_MS,
            output: PathBuf::from("synth"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("{field} {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(
        "the output folder {path} is not empty: choose a new folder (synth never writes over files)"
    )]
    NotEmpty { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("building a batch of {path}: {source}")]
    Arrow {
        path: PathBuf,
        source: arrow::error::ArrowError,
    },
}

/// One file written.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenFile {
    pub path: PathBuf,
    pub rows: u64,
    pub bytes: u64,
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub log: Vec<WrittenFile>,
    pub truth: WrittenFile,
    pub spec: PathBuf,
    /// Users per group.
    pub group_sizes: Vec<u64>,
    /// Orders in the log.
    pub orders: u64,
}

impl Summary {
    /// Rows (lines) of the log.
    pub fn rows(&self) -> u64 {
        self.log.iter().map(|f| f.rows).sum()
    }

    /// Bytes of the log's files.
    pub fn bytes(&self) -> u64 {
        self.log.iter().map(|f| f.bytes).sum()
    }
}

/// The habits of one group.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Relative size.
    pub share: f64,
    /// Active window, as fractions of the log's span.
    pub window: (f64, f64),
    /// Activity (lines) relative to the other groups.
    pub rate: f64,
    /// Mean lines per order (at least 1).
    pub lines_per_order: f64,
    /// Mean quantity per line (at least 1).
    pub quantity: f64,
    /// Price level of the group's slice of the catalogue.
    pub price_level: f64,
}

/// The planted habits of group `g` (a fixed table, cycled: every group differs from
/// its neighbours in several habits at once).
pub fn group(g: u32) -> Group {
    const WINDOWS: [(f64, f64); 3] = [(0.0, 1.0), (0.0, 0.55), (0.7, 1.0)];
    const RATES: [f64; 4] = [1.0, 3.0, 0.5, 1.8];
    const LINES: [f64; 5] = [2.0, 1.2, 4.0, 2.8, 1.6];
    const QUANTITY: [f64; 3] = [1.5, 6.0, 3.0];
    const PRICE: [f64; 5] = [1.0, 2.5, 0.6, 1.6, 4.0];
    let g = g as usize;
    Group {
        share: 1.0 + 0.25 * (g % 4) as f64,
        window: WINDOWS[g % 3],
        rate: RATES[(g / 3 + g) % 4],
        lines_per_order: LINES[g % 5],
        quantity: QUANTITY[(g / 2) % 3],
        price_level: PRICE[g % 5],
    }
}

/// A seeded key of a tuple of integers.
fn key(seed: u64, parts: &[u64]) -> u64 {
    let mut buf = [0u8; 32];
    for (i, p) in parts.iter().take(4).enumerate() {
        buf[i * 8..i * 8 + 8].copy_from_slice(&p.to_le_bytes());
    }
    xxh3_64_with_seed(&buf[..parts.len().min(4) * 8], seed)
}

/// A uniform number in [0, 1) from a key.
fn unit(key: u64) -> f64 {
    (key >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Streams of the seed.
const GROUP_STREAM: u64 = 1;
const USER_STREAM: u64 = 2;
const ORDER_STREAM: u64 = 3;
const PRICE_STREAM: u64 = 4;
const FAVOURITE_STREAM: u64 = 5;

/// A permutation of `0..n` (for n ≥ 1): rank -> position, so that popular ranks
/// are spread over the ids.
#[derive(Debug, Clone, Copy)]
struct Permutation {
    n: u64,
    a: u64,
    b: u64,
}

impl Permutation {
    fn new(n: u64, seed: u64) -> Permutation {
        const PRIMES: [u64; 4] = [1_000_003, 998_244_353, 2_147_483_647, 4_294_967_311];
        let a = PRIMES
            .iter()
            .copied()
            .find(|p| !n.is_multiple_of(*p))
            .expect("n is not a multiple of four distinct primes above 2^40");
        Permutation {
            n,
            a: a % n.max(1),
            b: seed % n.max(1),
        }
    }

    fn apply(&self, r: u64) -> u64 {
        if self.n <= 1 {
            return 0;
        }
        // a is coprime with n (a prime that does not divide n), so r -> a r + b is a
        // bijection of 0..n.
        ((u128::from(r) * u128::from(self.a) + u128::from(self.b)) % u128::from(self.n)) as u64
    }
}

/// A Zipf-like rank in `0..n` from a uniform `u`: ⌊(n + 1)^u⌋ − 1.
fn zipf_rank(n: u64, u: f64) -> u64 {
    let r = ((n as f64 + 1.0).powf(u)).floor() as u64;
    r.saturating_sub(1).min(n - 1)
}

/// The generator's view of a config: group table, slices, normalisation.
struct Model {
    config: SynthConfig,
    groups: Vec<Group>,
    /// Cumulative group shares, normalised to end at 1.
    cumulative: Vec<f64>,
    /// Expected lines of a user with activity 1 and rate 1.
    lines_scale: f64,
    span_ms: i64,
    start_ms: i64,
    global: Permutation,
    slices: Vec<(u64, Permutation)>,
}

impl Model {
    fn new(config: &SynthConfig) -> Model {
        let groups: Vec<Group> = (0..config.groups).map(group).collect();
        let total: f64 = groups.iter().map(|g| g.share).sum();
        let mut acc = 0.0;
        let cumulative = groups
            .iter()
            .map(|g| {
                acc += g.share / total;
                acc
            })
            .collect();
        let mean_rate: f64 = groups.iter().map(|g| g.share * g.rate).sum::<f64>() / total;
        let mean_activity = (ACTIVITY_SIGMA * ACTIVITY_SIGMA / 2.0).exp();
        let lines_scale =
            config.interactions as f64 / config.users as f64 / (mean_activity * mean_rate);
        let span_ms = i64::from(config.days) * MS_PER_DAY;
        let g = u64::from(config.groups);
        let slices = (0..g)
            .map(|s| {
                let (lo, hi) = slice_of(s, g, config.items);
                (lo, Permutation::new(hi - lo, key(config.seed, &[s, 7])))
            })
            .collect();
        Model {
            config: config.clone(),
            groups,
            cumulative,
            lines_scale,
            span_ms,
            start_ms: config.end_ms - span_ms,
            global: Permutation::new(config.items, key(config.seed, &[u64::MAX, 7])),
            slices,
        }
    }

    fn group_of(&self, user: u64) -> u32 {
        let u = unit(key(self.config.seed, &[GROUP_STREAM, user]));
        self.cumulative
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.groups.len() - 1) as u32
    }

    /// The user's orders as times (ms), in draw order; order `o` of the user is
    /// the `o`-th.
    fn order_times(&self, user: u64, g: &Group, out: &mut Vec<i64>) {
        out.clear();
        let mut rng = Pcg64Mcg::seed_from_u64(key(self.config.seed, &[USER_STREAM, user]));
        let activity: f64 = LogNormal::new(0.0, ACTIVITY_SIGMA)
            .expect("valid log-normal")
            .sample(&mut rng);
        let lines = self.lines_scale * activity * g.rate;
        let orders = lines / g.lines_per_order;
        // at least one order: 1 + Poisson(orders - 1) when orders > 1
        let extra = if orders > 1.0 {
            Poisson::new(orders - 1.0)
                .expect("positive rate")
                .sample(&mut rng) as u64
        } else {
            0
        };
        let (lo, hi) = g.window;
        for _ in 0..=extra {
            let at: f64 = lo + (hi - lo) * rng.random::<f64>();
            out.push(self.start_ms + (at * self.span_ms as f64) as i64);
        }
    }

    /// The file holding an order at `time_ms`.
    fn file_of(&self, time_ms: i64) -> u32 {
        let files = i64::from(self.config.files);
        (((time_ms - self.start_ms) * files / self.span_ms).clamp(0, files - 1)) as u32
    }

    /// The item of one line of a user of group `g`, from two uniforms.
    fn item(&self, g: u32, u_slice: f64, u_rank: f64) -> u64 {
        if u_slice < IN_SLICE {
            let (lo, perm) = &self.slices[g as usize];
            lo + perm.apply(zipf_rank(perm.n, u_rank))
        } else {
            self.global.apply(zipf_rank(self.config.items, u_rank))
        }
    }

    /// The item of one line of `user` (of group `g`): one of the user's favourites
    /// (drawn like any line, once per user), or a fresh draw.
    fn line_item(&self, user: u64, g: u32, rng: &mut Pcg64Mcg) -> u64 {
        if rng.random::<f64>() < FAVOURITE_SHARE {
            let j = rng.random_range(0..FAVOURITES);
            let k = |part| unit(key(self.config.seed, &[FAVOURITE_STREAM, user, j, part]));
            self.item(g, k(0), k(1))
        } else {
            self.item(g, rng.random(), rng.random())
        }
    }

    /// The price of `item`: log-normal around 5 (from its hash) times its slice's
    /// price level, in cents.
    fn price(&self, item: u64) -> f64 {
        let u1 = unit(key(self.config.seed, &[PRICE_STREAM, item, 1])).max(1e-12);
        let u2 = unit(key(self.config.seed, &[PRICE_STREAM, item, 2]));
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let slice = slice_index(item, u64::from(self.config.groups), self.config.items);
        let level = self.groups[slice as usize].price_level;
        ((1.6 + 0.7 * z).exp() * level * 100.0).round().max(1.0) / 100.0
    }
}

/// Items `lo..hi` of slice `s` of `groups` over `items`.
fn slice_of(s: u64, groups: u64, items: u64) -> (u64, u64) {
    (s * items / groups, (s + 1) * items / groups)
}

/// The slice holding `item`.
fn slice_index(item: u64, groups: u64, items: u64) -> u64 {
    // the s with s*items/groups <= item < (s+1)*items/groups
    let mut s = (item * groups / items).min(groups - 1);
    while s > 0 && slice_of(s, groups, items).0 > item {
        s -= 1;
    }
    while slice_of(s, groups, items).1 <= item {
        s += 1;
    }
    s
}

/// The columns of the log.
pub fn log_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Int64, false),
        Field::new("item_id", DataType::Int64, false),
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("order_id", DataType::Utf8, false),
        Field::new("quantity", DataType::Int64, false),
        Field::new("price", DataType::Float64, false),
    ]))
}

fn truth_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Int64, false),
        Field::new("group", DataType::Int32, false),
    ]))
}

fn validate(c: &SynthConfig) -> Result<(), SynthError> {
    let bad = |field, message: &str| {
        Err(SynthError::Invalid {
            field,
            message: message.to_string(),
        })
    };
    if c.users == 0 || c.users > i64::MAX as u64 / 2 {
        return bad("--users", "must be at least 1");
    }
    if c.groups == 0 {
        return bad("--groups", "must be at least 1");
    }
    if c.items < u64::from(c.groups) {
        return bad(
            "--items",
            "must be at least --groups (every group has a slice of the catalogue)",
        );
    }
    if c.files == 0 {
        return bad("--files", "must be at least 1");
    }
    if c.days == 0 {
        return bad("--days", "must be at least 1");
    }
    if c.interactions < c.users {
        return bad(
            "--interactions",
            "must be at least --users (every user places an order)",
        );
    }
    Ok(())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn writer_props() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build()
}

/// Writes the log, its truth table and a spec into `config.output`.
pub fn generate(config: &SynthConfig) -> Result<Summary, SynthError> {
    validate(config)?;
    let out = &config.output;
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(io(out))?;
        if entries.next().is_some() {
            return Err(SynthError::NotEmpty { path: out.clone() });
        }
    }
    let log_dir = out.join("log");
    std::fs::create_dir_all(&log_dir).map_err(io(&log_dir))?;
    let out = std::fs::canonicalize(out).map_err(io(out))?;
    let model = Model::new(config);

    // The log's files and the truth table, side by side on every core.
    let jobs: Vec<Option<u32>> = (0..config.files).map(Some).chain([None]).collect();
    /// A file written, its orders (log files) or group sizes (the truth table).
    type Written = (WrittenFile, u64, Vec<u64>);
    let written: Vec<Result<Written, SynthError>> = jobs
        .into_par_iter()
        .map(|job| match job {
            Some(f) => {
                let path = log_dir.join(format!("part-{f:05}.parquet"));
                write_log_file(&model, f, &path).map(|(file, orders)| (file, orders, Vec::new()))
            }
            None => {
                let path = out.join("truth.parquet");
                write_truth(&model, &path).map(|(file, sizes)| (file, 0, sizes))
            }
        })
        .collect();
    let mut log = Vec::new();
    let mut orders = 0;
    let mut truth = None;
    let mut group_sizes = Vec::new();
    for w in written {
        let (file, o, sizes) = w?;
        if sizes.is_empty() {
            orders += o;
            log.push(file);
        } else {
            truth = Some(file);
            group_sizes = sizes;
        }
    }
    let spec = out.join("job.toml");
    std::fs::write(&spec, spec_text(config, &out)).map_err(io(&spec))?;
    Ok(Summary {
        log,
        truth: truth.expect("the truth table is one of the jobs"),
        spec,
        group_sizes,
        orders,
    })
}

/// One chunk of rows of a log file, before sorting.
#[derive(Default)]
struct Rows {
    user: Vec<i64>,
    item: Vec<i64>,
    time: Vec<i64>,
    /// (user, order number) of each row's order
    order: Vec<(u64, u32)>,
    quantity: Vec<i64>,
    price: Vec<f64>,
}

impl Rows {
    fn clear(&mut self) {
        self.user.clear();
        self.item.clear();
        self.time.clear();
        self.order.clear();
        self.quantity.clear();
        self.price.clear();
    }

    /// The rows sorted by time (then user, order, line: as generated).
    fn batch(&self) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut idx: Vec<u32> = (0..self.time.len() as u32).collect();
        idx.sort_by_key(|&i| self.time[i as usize]);
        let take_i64 = |v: &[i64]| Int64Array::from_iter_values(idx.iter().map(|&i| v[i as usize]));
        let mut order = StringBuilder::with_capacity(idx.len(), idx.len() * 12);
        let mut text = String::new();
        for &i in &idx {
            let (u, o) = self.order[i as usize];
            text.clear();
            write!(text, "O{}-{}", u + 1, o + 1).expect("writing to a string");
            order.append_value(&text);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(take_i64(&self.user)),
            Arc::new(take_i64(&self.item)),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(
                    idx.iter().map(|&i| self.time[i as usize]),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(order.finish()),
            Arc::new(take_i64(&self.quantity)),
            Arc::new(arrow::array::Float64Array::from_iter_values(
                idx.iter().map(|&i| self.price[i as usize]),
            )),
        ];
        RecordBatch::try_new(log_schema(), columns)
    }
}

/// Writes file `f` of the log: the orders of every user that fall in its time
/// window. Returns the file and its orders.
fn write_log_file(model: &Model, f: u32, path: &Path) -> Result<(WrittenFile, u64), SynthError> {
    let file = std::fs::File::create(path).map_err(io(path))?;
    let parquet = |source| SynthError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let mut writer =
        ArrowWriter::try_new(file, log_schema(), Some(writer_props())).map_err(parquet)?;
    let c = &model.config;
    let (mut rows_written, mut orders) = (0u64, 0u64);
    let mut rows = Rows::default();
    let mut times = Vec::new();
    let mut first = 0u64;
    while first < c.users {
        let last = (first + CHUNK_USERS).min(c.users);
        rows.clear();
        for user in first..last {
            let g = model.group_of(user);
            let habits = &model.groups[g as usize];
            model.order_times(user, habits, &mut times);
            for (o, &t) in times.iter().enumerate() {
                if model.file_of(t) != f {
                    continue;
                }
                orders += 1;
                let mut rng = Pcg64Mcg::seed_from_u64(key(c.seed, &[ORDER_STREAM, user, o as u64]));
                let lines = 1 + poisson(&mut rng, habits.lines_per_order - 1.0);
                for _ in 0..lines {
                    let item = model.line_item(user, g, &mut rng);
                    rows.user.push(user as i64 + 1);
                    rows.item.push(item as i64 + 1);
                    rows.time.push(t);
                    rows.order.push((user, o as u32));
                    rows.quantity
                        .push(1 + poisson(&mut rng, habits.quantity - 1.0) as i64);
                    rows.price.push(model.price(item));
                }
            }
        }
        if !rows.time.is_empty() {
            let batch = rows.batch().map_err(|source| SynthError::Arrow {
                path: path.to_path_buf(),
                source,
            })?;
            rows_written += batch.num_rows() as u64;
            writer.write(&batch).map_err(parquet)?;
        }
        first = last;
    }
    writer.close().map_err(parquet)?;
    let bytes = std::fs::metadata(path).map_err(io(path))?.len();
    tracing::info!(file = %path.display(), rows = rows_written, bytes, "log file written");
    Ok((
        WrittenFile {
            path: path.to_path_buf(),
            rows: rows_written,
            bytes,
        },
        orders,
    ))
}

fn poisson(rng: &mut Pcg64Mcg, mean: f64) -> u64 {
    if mean <= 0.0 {
        return 0;
    }
    Poisson::new(mean).expect("positive mean").sample(rng) as u64
}

/// Writes the truth table: every user's group. Returns it and the group sizes.
fn write_truth(model: &Model, path: &Path) -> Result<(WrittenFile, Vec<u64>), SynthError> {
    let file = std::fs::File::create(path).map_err(io(path))?;
    let parquet = |source| SynthError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let mut writer =
        ArrowWriter::try_new(file, truth_schema(), Some(writer_props())).map_err(parquet)?;
    let users = model.config.users;
    let mut sizes = vec![0u64; model.groups.len()];
    let mut first = 0u64;
    while first < users {
        let last = (first + ROW_GROUP_ROWS as u64).min(users);
        let groups: Vec<i32> = (first..last)
            .map(|u| {
                let g = model.group_of(u);
                sizes[g as usize] += 1;
                g as i32
            })
            .collect();
        let batch = RecordBatch::try_new(
            truth_schema(),
            vec![
                Arc::new(Int64Array::from_iter_values(
                    (first..last).map(|u| u as i64 + 1),
                )),
                Arc::new(Int32Array::from(groups)),
            ],
        )
        .map_err(|source| SynthError::Arrow {
            path: path.to_path_buf(),
            source,
        })?;
        writer.write(&batch).map_err(parquet)?;
        first = last;
    }
    writer.close().map_err(parquet)?;
    let bytes = std::fs::metadata(path).map_err(io(path))?.len();
    Ok((
        WrittenFile {
            path: path.to_path_buf(),
            rows: users,
            bytes,
        },
        sizes,
    ))
}

/// A spec that segments the log into as many segments as there are groups.
fn spec_text(c: &SynthConfig, out: &Path) -> String {
    let toml_path = |p: PathBuf| {
        p.display()
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
    };
    format!(
        r#"# Written by `shoal synth` (seed {seed}): {users} users, {items} items, {groups} planted groups.
# The planted groups are in {truth}.
name = "synth-{users}"

[input]
interactions = "{log}"
format = "parquet"

[input.columns]
user = "user_id"
time = "time"
item = "item_id"
order = "order_id"
quantity = "quantity"
price = "price"

[output]
path = "{output}"

[features]
rfm = true
als = true

[als]
factors = 32
iterations = 10

[recommend]
top_n = 10
exclude_seen = true

[segments]
k = {groups}
seed = {seed}

[cluster]
shards = 16
workers = 1
"#,
        seed = c.seed,
        users = c.users,
        items = c.items,
        groups = c.groups,
        truth = toml_path(out.join("truth.parquet")),
        log = toml_path(out.join("log")),
        output = toml_path(out.join("out")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, Int32Type, Int64Type, TimestampMillisecondType};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use std::collections::{BTreeMap, BTreeSet, HashMap};

    fn read(path: &Path) -> Vec<RecordBatch> {
        let file = std::fs::File::open(path).unwrap();
        ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    fn small(dir: &Path) -> SynthConfig {
        SynthConfig {
            users: 3_000,
            items: 600,
            interactions: 60_000,
            groups: 3,
            files: 4,
            seed: 9,
            output: dir.join("synth"),
            ..SynthConfig::default()
        }
    }

    #[test]
    fn permutations_are_bijections_and_zipf_ranks_in_range() {
        for n in [1u64, 2, 7, 600, 1_000_003, 2_000_006] {
            let p = Permutation::new(n, 12345);
            if n <= 2_000 {
                let seen: BTreeSet<u64> = (0..n).map(|r| p.apply(r)).collect();
                assert_eq!(seen.len() as u64, n, "n = {n}");
            }
            for u in [0.0, 0.3, 0.999_999_9] {
                assert!(zipf_rank(n, u) < n);
            }
        }
        // rank 0 is the most likely
        let n = 1000;
        let mut counts = vec![0u32; n as usize];
        for i in 0..100_000u64 {
            counts[zipf_rank(n, unit(key(1, &[i]))) as usize] += 1;
        }
        assert!(counts[0] > counts[1] && counts[1] > counts[10] && counts[10] > counts[500]);
    }

    #[test]
    fn slices_cover_the_catalogue() {
        for (groups, items) in [(3u64, 600u64), (7, 50), (6, 6), (5, 1_000_003)] {
            let mut next = 0;
            for s in 0..groups {
                let (lo, hi) = slice_of(s, groups, items);
                assert_eq!(lo, next);
                assert!(hi > lo);
                for item in [lo, hi - 1, (lo + hi) / 2] {
                    assert_eq!(slice_index(item, groups, items), s);
                }
                next = hi;
            }
            assert_eq!(next, items);
        }
    }

    #[test]
    fn refuses_bad_settings_and_a_folder_with_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = small(dir.path());
        c.groups = 0;
        assert!(generate(&c).unwrap_err().to_string().contains("--groups"));
        let mut c = small(dir.path());
        c.interactions = 10;
        assert!(
            generate(&c)
                .unwrap_err()
                .to_string()
                .contains("--interactions")
        );
        let c = small(dir.path());
        std::fs::create_dir_all(&c.output).unwrap();
        std::fs::write(c.output.join("x"), "keep me").unwrap();
        let err = generate(&c).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
    }

    /// The log holds what the model plants: every user, about the rows asked
    /// for, the groups' slices, windows and habits, and the same bytes twice.
    #[test]
    fn the_log_holds_the_planted_groups() {
        let dir = tempfile::tempdir().unwrap();
        let c = small(dir.path());
        let s = generate(&c).unwrap();
        assert_eq!(s.log.len(), 4);
        let rows = s.rows();
        assert!(
            (rows as f64 - 60_000.0).abs() < 6_000.0,
            "{rows} rows for 60,000 asked"
        );
        assert_eq!(s.group_sizes.iter().sum::<u64>(), 3_000);
        // sizes in the ratio 1 : 1.25 : 1.5
        let shares: Vec<f64> = s.group_sizes.iter().map(|&n| n as f64 / 3000.0).collect();
        for (got, want) in shares.iter().zip([1.0 / 3.75, 1.25 / 3.75, 1.5 / 3.75]) {
            assert!((got - want).abs() < 0.03, "{shares:?}");
        }

        let truth: HashMap<i64, i32> = read(&s.truth.path)
            .iter()
            .flat_map(|b| {
                let u = b.column(0).as_primitive::<Int64Type>().clone();
                let g = b.column(1).as_primitive::<Int32Type>().clone();
                (0..b.num_rows()).map(move |i| (u.value(i), g.value(i)))
            })
            .collect();
        assert_eq!(truth.len(), 3_000);

        let start = c.end_ms - i64::from(c.days) * MS_PER_DAY;
        let mut users = BTreeSet::new();
        let mut in_slice = [(0u64, 0u64); 3];
        let mut last_time: HashMap<i64, i64> = HashMap::new();
        let mut per_order: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for (f, file) in s.log.iter().enumerate() {
            let batches = read(&file.path);
            assert_eq!(batches[0].schema(), log_schema());
            let window = (
                start + i64::from(c.days) * MS_PER_DAY * f as i64 / 4,
                start + i64::from(c.days) * MS_PER_DAY * (f as i64 + 1) / 4,
            );
            let mut n = 0;
            for b in &batches {
                let user = b.column(0).as_primitive::<Int64Type>();
                let item = b.column(1).as_primitive::<Int64Type>();
                let time = b.column(2).as_primitive::<TimestampMillisecondType>();
                let order = b.column(3).as_string::<i32>();
                let qty = b.column(4).as_primitive::<Int64Type>();
                let price = b.column(5).as_primitive::<Float64Type>();
                assert_eq!(b.column(2).null_count(), 0);
                for i in 0..b.num_rows() {
                    n += 1;
                    let (u, t) = (user.value(i), time.value(i));
                    assert!((window.0..window.1).contains(&t), "file {f}: time {t}");
                    if i > 0 {
                        assert!(time.value(i - 1) <= t, "row groups are sorted by time");
                    }
                    assert!(qty.value(i) >= 1 && price.value(i) > 0.0);
                    let g = truth[&u] as u64;
                    let it = item.value(i) as u64 - 1;
                    assert!(it < 600);
                    in_slice[g as usize].1 += 1;
                    if slice_index(it, 3, 600) == g {
                        in_slice[g as usize].0 += 1;
                    }
                    users.insert(u);
                    let last = last_time.entry(u).or_insert(t);
                    *last = (*last).max(t);
                    // every line of an order has its user and time
                    let o = per_order
                        .entry(order.value(i).to_string())
                        .or_insert((u, t));
                    assert_eq!(*o, (u, t), "order {}", order.value(i));
                }
            }
            assert_eq!(n, file.rows);
        }
        assert_eq!(users.len(), 3_000, "every user has an order");
        for (g, (inside, all)) in in_slice.iter().enumerate() {
            let share = *inside as f64 / *all as f64;
            // 80 % by choice, plus the slice's part of the other 20 %
            assert!((0.8..0.95).contains(&share), "group {g}: {share}");
        }
        // recency: the lapsed group (1) has nobody active in the last 45 %; the new
        // group (2) nobody before 70 %
        let span = i64::from(c.days) * MS_PER_DAY;
        for (u, t) in &last_time {
            let at = (t - start) as f64 / span as f64;
            match truth[u] {
                1 => assert!(at < 0.55, "user {u} of the lapsed group at {at}"),
                2 => assert!(at >= 0.7, "user {u} of the new group at {at}"),
                _ => {}
            }
        }

        // the same config gives the same bytes
        let again = SynthConfig {
            output: dir.path().join("again"),
            ..c
        };
        let s2 = generate(&again).unwrap();
        for (a, b) in s.log.iter().zip(&s2.log) {
            assert_eq!(
                std::fs::read(&a.path).unwrap(),
                std::fs::read(&b.path).unwrap()
            );
        }
        let spec = std::fs::read_to_string(&s.spec).unwrap();
        assert!(
            spec.contains("k = 3")
                && spec.contains(&s.log[0].path.parent().unwrap().display().to_string())
        );
    }
}
