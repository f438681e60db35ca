//! shoal-fuzz: a mutation fuzzer that runs on the stable toolchain, for the two
//! places untrusted text enters shoal: the job spec (`JobSpec::parse`) and the
//! interaction log's rows (the worker's CSV decoding, typing and cleaning,
//! `clean_split`).
//!
//! It is not coverage-guided (that needs a nightly compiler): it mutates seed
//! inputs (`fuzz/seeds/{spec,rows}/`) with byte flips, insertions, deletions,
//! duplications and tokens of each format (TOML keys and values; CSV quotes,
//! separators, line ends, numbers, dates, bytes that are not UTF-8), keeps the
//! inputs that are accepted as further seeds, and checks properties:
//!
//! - spec: parsing never panics; a spec that parses writes TOML that parses back
//!   to the same spec;
//! - rows: decoding never panics; every row read is either kept or counted under
//!   one reason (read = kept + dropped).
//!
//! ```sh
//! cargo build --release -p shoal-fuzz   # or the workspace
//! target/release/shoal-fuzz spec --seconds 600
//! target/release/shoal-fuzz rows --seconds 600
//! ```
//!
//! A failing input is written to `target/fuzz-crashes/<target>-<n>` and the run
//! exits 1 after printing it.

use futures::FutureExt;
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64Mcg;
use shoal_proto::pb;
use shoal_spec::JobSpec;
use shoal_spec::spec::DEMO_SPEC;
use shoal_worker::ingest::{IngestControl, clean_split};
use shoal_worker::staging::{KeptRow, RowSink};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const SPEC_TOKENS: &[&str] = &[
    "[input]",
    "[output]",
    "[segments]",
    "[als]",
    "[cluster]",
    "[features]",
    "[recommend]",
    "[evaluate]",
    "[input.columns]",
    "[input.clean]",
    "[model]",
    "k = ",
    "shards = ",
    "factors = ",
    "iterations = ",
    "max_attempts = ",
    "checkpoint_every = ",
    "top_n = ",
    "path = ",
    "interactions = ",
    "seed = ",
    "tol = ",
    "holdout = ",
    "extra = ",
    "users = ",
    "0",
    "-1",
    "1e308",
    "nan",
    "inf",
    "4294967296",
    "18446744073709551616",
    "\"\"",
    "\"s3://\"",
    "\"../../etc\"",
    "true",
    "[]",
    "{}",
    "'''",
    "\"\"\"",
    "=",
    "\n",
    "#",
    ".",
    "\\u0000",
];

const ROW_TOKENS: &[&[u8]] = &[
    b",",
    b"\"",
    b"\"\"",
    b"\n",
    b"\r\n",
    b"\r",
    b"\xff",
    b"\xef\xbb\xbf",
    b"\x00",
    b"-",
    b"1e308",
    b"NaN",
    b"inf",
    b"-0",
    b"99999999999999999999",
    b"2010-12-01 08:26:00",
    b"9999-12-31T23:59:59Z",
    b"12/1/2010 8:26",
    b"17850.0",
    b"0.5",
    b" ",
    b"\t",
];

enum Target {
    Spec,
    Rows,
}

struct Args {
    target: Target,
    seconds: u64,
    seed: u64,
}

fn args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let target = match it.next().as_deref() {
        Some("spec") => Target::Spec,
        Some("rows") => Target::Rows,
        other => {
            return Err(format!(
                "usage: shoal-fuzz spec|rows [--seconds N] [--seed N] (got {other:?})"
            ));
        }
    };
    let (mut seconds, mut seed) = (60, 1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let n: u64 = value.parse().map_err(|e| format!("{flag} {value}: {e}"))?;
        match flag.as_str() {
            "--seconds" => seconds = n,
            "--seed" => seed = n,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(Args {
        target,
        seconds,
        seed,
    })
}

/// The seed inputs of a target: every file of `fuzz/seeds/<name>/`.
fn seeds(name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(name);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    if name == "spec" {
        out.push(DEMO_SPEC.as_bytes().to_vec());
    }
    out
}

/// One mutation of `input`: a few edits, each a byte flip, an insertion (random
/// byte or a token), a deletion or a duplication of a range.
fn mutate(rng: &mut Pcg64Mcg, input: &[u8], tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let at = if out.is_empty() {
            0
        } else {
            rng.random_range(0..=out.len())
        };
        match rng.random_range(0..5) {
            0 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 => out.insert(at, rng.random()),
            2 => {
                let t = tokens[rng.random_range(0..tokens.len())];
                out.splice(at..at, t.iter().copied());
            }
            3 if !out.is_empty() => {
                let end = (at + rng.random_range(1..16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            _ if !out.is_empty() => {
                let start = at.min(out.len() - 1);
                let end = (start + rng.random_range(1..64)).min(out.len());
                let piece = out[start..end].to_vec();
                let to = rng.random_range(0..=out.len());
                out.splice(to..to, piece);
            }
            _ => out.push(rng.random()),
        }
    }
    out.truncate(1 << 16);
    out
}

/// spec: parse never panics; what parses round-trips through its TOML.
fn check_spec(input: &[u8]) -> Result<bool, String> {
    let Ok(text) = std::str::from_utf8(input) else {
        return Ok(false);
    };
    let parsed = std::panic::catch_unwind(|| JobSpec::parse(text))
        .map_err(|_| "JobSpec::parse panicked".to_string())?;
    let Ok(spec) = parsed else {
        return Ok(false);
    };
    let written = spec.to_toml();
    match JobSpec::parse(&written) {
        Ok(back) if back == spec => Ok(true),
        Ok(_) => Err(format!(
            "the spec's TOML parses to another spec:\n{written}"
        )),
        Err(e) => Err(format!("the spec's TOML does not parse ({e}):\n{written}")),
    }
}

/// Counts the rows a cleaned split keeps.
struct Count(u64);

impl RowSink for Count {
    fn push(&mut self, _row: &KeptRow<'_>) -> Result<(), shoal_worker::WorkerError> {
        self.0 += 1;
        Ok(())
    }
}

/// rows: decoding never panics; every row read is kept or counted dropped.
async fn check_rows(input: &[u8], file: &Path, spec: &JobSpec) -> Result<bool, String> {
    std::fs::write(file, input).map_err(|e| e.to_string())?;
    let split = pb::Split {
        index: 0,
        object: file.display().to_string(),
        size: input.len() as u64,
        format: "csv".into(),
        row_groups: Vec::new(),
        gzip: false,
    };
    let control = IngestControl::default();
    let run = AssertUnwindSafe(clean_split(spec, &split, &control, Count(0)))
        .catch_unwind()
        .await
        .map_err(|_| "clean_split panicked".to_string())?;
    let Ok((result, kept)) = run else {
        return Ok(false);
    };
    let counts = result.counts.unwrap_or_default();
    let dropped: u64 = counts.dropped.values().sum();
    if counts.read != counts.kept + dropped || counts.kept != kept.0 {
        return Err(format!(
            "read {} rows, kept {} (the sink saw {}), dropped {dropped}: {:?}",
            counts.read, counts.kept, kept.0, counts.dropped
        ));
    }
    Ok(counts.kept > 0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // a panic is a finding, reported below, not a crash of the fuzzer
    std::panic::set_hook(Box::new(|_| {}));
    let name = match args.target {
        Target::Spec => "spec",
        Target::Rows => "rows",
    };
    let tokens: Vec<&[u8]> = match args.target {
        Target::Spec => SPEC_TOKENS.iter().map(|t| t.as_bytes()).collect(),
        Target::Rows => ROW_TOKENS.to_vec(),
    };
    let mut pool = seeds(name);
    if pool.is_empty() {
        eprintln!("no seeds for {name}");
        return ExitCode::from(2);
    }
    let work = std::env::temp_dir().join(format!("shoal-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("a temporary folder");
    let file = work.join("log.csv");
    let mut spec = JobSpec::parse(DEMO_SPEC).expect("the demo spec");
    spec.input.interactions = file.display().to_string();
    let crashes = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-crashes");
    let mut rng = Pcg64Mcg::seed_from_u64(args.seed);
    let (started, limit) = (Instant::now(), Duration::from_secs(args.seconds));
    let (mut runs, mut accepted, mut findings) = (0u64, 0u64, 0u32);
    while started.elapsed() < limit {
        let parent = &pool[rng.random_range(0..pool.len())];
        let input = mutate(&mut rng, parent, &tokens);
        let verdict = match args.target {
            Target::Spec => check_spec(&input),
            Target::Rows => check_rows(&input, &file, &spec).await,
        };
        runs += 1;
        match verdict {
            Ok(true) => {
                accepted += 1;
                if pool.len() < 4096 {
                    pool.push(input);
                }
            }
            Ok(false) => {}
            Err(what) => {
                findings += 1;
                let _ = std::fs::create_dir_all(&crashes);
                let path = crashes.join(format!("{name}-{findings}"));
                let _ = std::fs::write(&path, &input);
                eprintln!("finding {findings}: {what}\n  input: {}", path.display());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "shoal-fuzz {name}: {runs} inputs in {:.0} s (seed {}), {accepted} accepted, {findings} findings",
        started.elapsed().as_secs_f64(),
        args.seed
    );
    if findings > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
