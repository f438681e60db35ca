//! Bad input through the real command line (`shoal run`: a coordinator and two
//! workers in one process over loopback gRPC). Each case ends in a counted skip
//! or in a clear error that names the file, row or field and says what to do;
//! none panics.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

const HEAD: &str = "order_id,customer,ts,sku,qty,unit_price\n";

/// 60 good rows: 20 customers (`1000` … `1019`) with 3 orders each, in two
/// groups that buy different items.
fn good_rows() -> String {
    let mut rows = String::new();
    for u in 0..20 {
        for j in 0..3 {
            let sku = (u % 2) * 5 + j;
            rows.push_str(&format!(
                "{},{},2024-0{}-1{} 10:00:00,S{sku},{},2.5\n",
                u * 10 + j,
                1000 + u,
                1 + j,
                u % 9,
                1 + j
            ));
        }
    }
    rows
}

/// A spec reading `input` into `dir/out` with k = 2, after `edits` (pairs of
/// text and its replacement in the TOML); its path.
fn spec_file(dir: &Path, input: &str, edits: &[(&str, &str)]) -> PathBuf {
    let mut toml = planted_spec(Path::new(input), &dir.join("out"), 2).to_toml();
    for (from, to) in edits {
        assert!(toml.contains(from), "{from} in\n{toml}");
        toml = toml.replacen(from, to, 1);
    }
    let path = dir.join("job.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

async fn run(spec: &Path) -> Ran {
    let spec = spec.to_str().unwrap();
    run_shoal(&["run", spec, "--workers", "2", "--device", "cpu"], &[]).await
}

/// The job failed (exit 1) with an error holding every one of `parts`, and
/// nothing panicked.
fn assert_refused(ran: &Ran, parts: &[&str]) {
    assert_eq!(ran.code, Some(1), "{}", ran.text());
    for part in parts {
        assert!(ran.stderr.contains(part), "`{part}` in {}", ran.text());
    }
    assert!(!ran.stderr.contains("panicked"), "{}", ran.text());
}

/// A log with four malformed records among the good rows: a short row, a field
/// that is not UTF-8, a row with a field too many, and an unclosed quote on the
/// last row (which swallows the line after it).
fn write_malformed_log(path: &Path) {
    let mut bytes = HEAD.as_bytes().to_vec();
    bytes.extend(good_rows().bytes());
    bytes.extend(b"900,1000\n");
    bytes.extend(b"901,10\xe901,2024-01-01 10:00:00,S1,1,2.5\n");
    bytes.extend(b"902,1001,2024-01-01 10:00:00,S1,1,2.5,surplus\n");
    bytes.extend(b"903,1002,2024-01-01 10:00:00,\"S1,1,2.5\n");
    bytes.extend(b"904,1003,2024-01-01 10:00:00,S1,1,2.5\n");
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_csv_records_are_counted_under_skip() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("log.csv");
    write_malformed_log(&input);
    let spec = spec_file(dir.path(), input.to_str().unwrap(), &[]);
    let ran = run(&spec).await;
    assert_eq!(ran.code, Some(0), "{}", ran.text());
    assert!(ran.stdout.contains("malformed_row 4"), "{}", ran.text());
    let report = read_report(&dir.path().join("out"));
    assert_eq!(report["rows"]["read"], 64, "{report}");
    assert_eq!(report["rows"]["kept"], 60, "{report}");
    assert_eq!(report["rows"]["dropped"]["malformed_row"], 4, "{report}");
    assert_eq!(report["users"], 20, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_record_under_fail_names_the_file_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("log.csv");
    write_malformed_log(&input);
    let spec = spec_file(
        dir.path(),
        input.to_str().unwrap(),
        &[("on_bad_rows = \"skip\"", "on_bad_rows = \"fail\"")],
    );
    let ran = run(&spec).await;
    assert_refused(
        &ran,
        &[
            "log.csv",
            "row 61",
            "malformed_row",
            "2 fields where the header has 6",
        ],
    );
    assert!(
        !dir.path().join("out/_SUCCESS").exists(),
        "a failed job leaves no manifest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_numbers_and_future_times_are_counted_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("log.csv");
    let mut rows: Vec<String> = good_rows().lines().map(str::to_string).collect();
    let mut edit = |row: usize, field: usize, value: &str| {
        let mut f: Vec<&str> = rows[row].split(',').collect();
        f[field] = value;
        rows[row] = f.join(",");
    };
    edit(0, 4, "1e308");
    edit(1, 5, "-2e20");
    edit(2, 2, "9999-01-01 10:00:00");
    std::fs::write(&input, format!("{HEAD}{}\n", rows.join("\n"))).unwrap();
    let spec = spec_file(dir.path(), input.to_str().unwrap(), &[]);
    let ran = run(&spec).await;
    assert_eq!(ran.code, Some(0), "{}", ran.text());
    let report = read_report(&dir.path().join("out"));
    let dropped = &report["rows"]["dropped"];
    assert_eq!(dropped["bad_quantity"], 1, "{report}");
    assert_eq!(dropped["bad_price"], 1, "{report}");
    assert_eq!(dropped["bad_time"], 1, "{report}");
    // recency is measured from the latest real event, not from year 9999
    assert!(
        report["reference_time"]
            .as_str()
            .unwrap()
            .starts_with("2024-"),
        "{report}"
    );

    let spec = spec_file(
        dir.path(),
        input.to_str().unwrap(),
        &[("on_bad_rows = \"skip\"", "on_bad_rows = \"fail\"")],
    );
    assert_refused(
        &run(&spec).await,
        &["log.csv", "row 1", "`qty`", "1e308 is beyond ±1e15"],
    );
}

/// Every row's price beyond the limit: the job says nothing was left and why,
/// instead of failing later on an infinite feature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_of_huge_prices_fails_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("log.csv");
    let rows = good_rows().replace(",2.5\n", ",1e308\n");
    std::fs::write(&input, format!("{HEAD}{rows}")).unwrap();
    let spec = spec_file(dir.path(), input.to_str().unwrap(), &[]);
    assert_refused(
        &run(&spec).await,
        &["no rows are left after cleaning", "60 bad_price"],
    );
}

/// A file that is not a table is not echoed into the error; an empty one says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_no_table_is_refused_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("shadow.csv");
    std::fs::write(
        &secret,
        "root:$6$salt$hash:19000:0:99999:7:::\nbin:*:19000::::::\n",
    )
    .unwrap();
    let spec = spec_file(dir.path(), secret.to_str().unwrap(), &[]);
    let ran = run(&spec).await;
    assert_refused(
        &ran,
        &["`customer`", "shadow", "does not read as column names"],
    );
    assert!(!ran.stderr.contains("root:"), "{}", ran.text());

    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, "").unwrap();
    let spec = spec_file(dir.path(), empty.to_str().unwrap(), &[]);
    assert_refused(&run(&spec).await, &["empty.csv", "it has no columns"]);
}

/// Relative paths climbing out of the folder shoal runs in resolve (the
/// README's promise); a model folder that does not exist is named as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_with_dot_dot_resolve_and_a_missing_model_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("log.csv"), format!("{HEAD}{}", good_rows())).unwrap();
    let specs = dir.path().join("specs");
    std::fs::create_dir(&specs).unwrap();
    let toml = planted_spec(Path::new("../log.csv"), Path::new("../out"), 2).to_toml();
    std::fs::write(specs.join("job.toml"), toml).unwrap();
    // resolved against the folder shoal runs in
    let args = ["run", "job.toml", "--workers", "2", "--device", "cpu"];
    let ran = run_shoal_in(Some(&specs), &args, &[]).await;
    assert_eq!(ran.code, Some(0), "{}", ran.text());
    assert!(dir.path().join("out/_SUCCESS").exists(), "{}", ran.text());

    let missing = dir.path().join("no-such-model");
    let log = dir.path().join("log.csv");
    let out = dir.path().join("scored");
    let ran = shoal_assign(
        missing.to_str().unwrap(),
        log.to_str().unwrap(),
        None,
        out.to_str().unwrap(),
    )
    .await;
    assert_eq!(ran.code, Some(1), "{}", ran.text());
    assert!(
        ran.stderr.contains("no-such-model: no such folder"),
        "{}",
        ran.text()
    );
}

/// Jobs use only the locations allowed: `shoal run` the current folder, the
/// temporary folder and those given with --allow-path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locations_outside_the_allowed_ones_are_refused_at_submission() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("log.csv");
    std::fs::write(&input, format!("{HEAD}{}", good_rows())).unwrap();
    let spec = spec_file(dir.path(), "/etc/passwd", &[]);
    let ran = run(&spec).await;
    assert_refused(
        &ran,
        &[
            "input.interactions `/etc/passwd` is outside",
            "--allow-path",
        ],
    );
    assert!(!ran.stderr.contains("root:"), "{}", ran.text());
    let spec = spec_file(
        dir.path(),
        input.to_str().unwrap(),
        &[("path = \"", "path = \"/etc/shoal-out\"\n# \"")],
    );
    assert_refused(&run(&spec).await, &["output.path `/etc/shoal-out`"]);
    assert!(!Path::new("/etc/shoal-out").exists());
}

/// `dir/ids.parquet`: the good rows with the customer column as float64.
fn write_float_id_parquet(path: &Path) {
    use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
    use arrow::record_batch::RecordBatch;
    use std::sync::Arc;
    let rows = good_rows();
    let fields: Vec<Vec<&str>> = rows.lines().map(|l| l.split(',').collect()).collect();
    let text = |i: usize| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(fields.iter().map(|f| f[i])))
    };
    let float = |i: usize| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(
            fields.iter().map(|f| f[i].parse::<f64>().unwrap()),
        ))
    };
    let qty: ArrayRef = Arc::new(Int64Array::from_iter_values(
        fields.iter().map(|f| f[4].parse::<i64>().unwrap()),
    ));
    let batch = RecordBatch::try_from_iter([
        ("order_id", text(0)),
        ("customer", float(1)),
        ("ts", text(2)),
        ("sku", text(3)),
        ("qty", qty),
        ("unit_price", float(5)),
    ])
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_read_as_a_number_and_as_text_with_a_fraction_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    write_float_id_parquet(&logs.join("a.parquet"));
    // The same customers in a CSV export that wrote them as `1000.0`.
    let csv: String = good_rows()
        .lines()
        .map(|l| {
            let mut f: Vec<String> = l.split(',').map(str::to_string).collect();
            f[0] = format!("c{}", f[0]);
            f[1].push_str(".0");
            f.join(",") + "\n"
        })
        .collect();
    std::fs::write(logs.join("b.csv"), format!("{HEAD}{csv}")).unwrap();
    let input = format!("{}/*", logs.display());
    let spec = spec_file(dir.path(), &input, &[]);
    assert_refused(
        &run(&spec).await,
        &[
            "a.parquet",
            "b.csv",
            "`1000.0`",
            "input.user_as_integer = true",
        ],
    );

    // Asked to, both forms read as one integer: 20 customers, not 40.
    let spec = spec_file(
        dir.path(),
        &input,
        &[("user_as_integer = false", "user_as_integer = true")],
    );
    let ran = run(&spec).await;
    assert_eq!(ran.code, Some(0), "{}", ran.text());
    let report = read_report(&dir.path().join("out"));
    assert_eq!(report["users"], 20, "{report}");
    assert_eq!(report["rows"]["kept"], 120, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_workers_and_too_many_shards_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("log.csv");
    std::fs::write(&input, format!("{HEAD}{}", good_rows())).unwrap();
    let spec = spec_file(dir.path(), input.to_str().unwrap(), &[]);
    let spec_arg = spec.to_str().unwrap();
    let ran = run_shoal(&["run", spec_arg, "--workers", "0"], &[]).await;
    assert_eq!(ran.code, Some(2), "{}", ran.text());
    assert!(ran.stderr.contains("'0' for '--workers"), "{}", ran.text());

    let spec = spec_file(
        dir.path(),
        input.to_str().unwrap(),
        &[("shards = 6", "shards = 65536")],
    );
    assert_refused(
        &run(&spec).await,
        &["cluster.shards", "between 1 and 4096", "65536"],
    );
    assert!(!dir.path().join("out").exists(), "nothing was written");
}

/// `shoal run … | head -1`: the command ends when its reader goes, without a
/// panic and without waiting on anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_read_by_a_command_that_stops_early_ends_the_run_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("log.csv");
    std::fs::write(&input, format!("{HEAD}{}", good_rows())).unwrap();
    let spec = spec_file(dir.path(), input.to_str().unwrap(), &[]);
    let mut cmd = shoal();
    cmd.args([
        "run",
        spec.to_str().unwrap(),
        "--workers",
        "1",
        "--device",
        "cpu",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let status = tokio::task::spawn_blocking(move || {
        let mut child = Proc(cmd.spawn().expect("run shoal"));
        let mut first = String::new();
        let mut out = BufReader::new(child.0.stdout.take().unwrap());
        out.read_line(&mut first).unwrap();
        assert!(first.starts_with("job "), "{first}");
        drop(out);
        let mut err = child.0.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
            text
        });
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the run did not end");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let stderr = stderr.join().unwrap();
        assert!(!stderr.contains("panicked"), "{stderr}");
        status
    })
    .await
    .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(SIGPIPE), "{status:?}");
}

/// SIGPIPE's number on Linux (and the other platforms shoal builds for).
const SIGPIPE: i32 = 13;

/// What a bad input must come to.
enum Want {
    /// The job fails, its error holding every one of these.
    Refused(&'static [&'static str]),
    /// The job succeeds with this many rows counted under this reason.
    Dropped(&'static str, u64),
    /// The job succeeds and keeps this many rows.
    Kept(u64),
}

/// One case of the corpus: files written into its folder (name, bytes), the
/// input the spec reads (relative to the folder), the spec's edits, and what
/// must come of it.
struct Case {
    name: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
    input: &'static str,
    edits: Vec<(&'static str, String)>,
    want: Want,
}

/// The good rows with one more, whose fields are `row` (six, comma-separated).
fn with_row(row: &str) -> Vec<u8> {
    format!("{HEAD}{}{row}\n", good_rows()).into_bytes()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(bytes).unwrap();
    z.finish().unwrap()
}

fn corpus() -> Vec<Case> {
    let good = format!("{HEAD}{}", good_rows()).into_bytes();
    let log = |bytes: Vec<u8>| vec![("log.csv", bytes)];
    let edit = |from: &'static str, to: &str| vec![(from, to.to_string())];
    let case = |name, files, edits, want| Case {
        name,
        files,
        input: "log.csv",
        edits,
        want,
    };
    let mut truncated = gzip(&good);
    truncated.truncate(truncated.len() / 2);
    let crlf = String::from_utf8(good.clone())
        .unwrap()
        .replace('\n', "\r\n");
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend(&good);
    let wide = format!("7,1000,2024-01-01 10:00:00,{},1,2.5", "W".repeat(10 << 20));
    vec![
        case(
            "a renamed column",
            log(String::from_utf8(good.clone())
                .unwrap()
                .replacen("customer", "cust", 1)
                .into_bytes()),
            vec![],
            Want::Refused(&["`customer`", "log.csv", "cust"]),
        ),
        case(
            "a quantity that is text",
            log(with_row("7,1000,2024-01-01 10:00:00,S1,abc,2.5")),
            vec![],
            Want::Dropped("bad_quantity", 1),
        ),
        case(
            "a quantity that is NaN",
            log(with_row("7,1000,2024-01-01 10:00:00,S1,NaN,2.5")),
            vec![],
            Want::Dropped("bad_quantity", 1),
        ),
        case(
            "a price that is inf",
            log(with_row("7,1000,2024-01-01 10:00:00,S1,1,inf")),
            vec![],
            Want::Dropped("bad_price", 1),
        ),
        case(
            "a time that is no time",
            log(with_row("7,1000,yesterday,S1,1,2.5")),
            vec![],
            Want::Dropped("bad_time", 1),
        ),
        case(
            "an empty user id",
            log(with_row("7,,2024-01-01 10:00:00,S1,1,2.5")),
            vec![],
            Want::Dropped("missing_user", 1),
        ),
        case(
            "a negative quantity (a return)",
            log(with_row("7,1000,2024-01-01 10:00:00,S1,-3,2.5")),
            vec![],
            Want::Dropped("quantity_below_min", 1),
        ),
        case(
            "a header and no rows",
            log(HEAD.as_bytes().to_vec()),
            vec![],
            Want::Refused(&["no data rows"]),
        ),
        case(
            "CRLF line ends",
            log(crlf.into_bytes()),
            vec![],
            Want::Kept(60),
        ),
        case("a byte-order mark", log(bom), vec![], Want::Kept(60)),
        case(
            "a 10 MB field",
            log(with_row(&wide)),
            vec![],
            Want::Kept(61),
        ),
        Case {
            name: "a truncated gzip stream",
            files: vec![("log.csv.gz", truncated)],
            input: "log.csv.gz",
            edits: vec![],
            want: Want::Refused(&["log.csv.gz"]),
        },
        Case {
            name: "a Parquet file that is not one",
            files: vec![("log.parquet", b"PAR1 this is not a Parquet file".to_vec())],
            input: "log.parquet",
            edits: vec![],
            want: Want::Refused(&["log.parquet", "Parquet footer"]),
        },
        Case {
            name: "files of two schemas",
            files: vec![
                ("in/a.csv", good.clone()),
                (
                    "in/b.csv",
                    b"order_id,customer,ts,sku,qty\n1,1000,2024-01-01 10:00:00,S1,1\n".to_vec(),
                ),
            ],
            input: "in",
            edits: vec![],
            want: Want::Refused(&["b.csv", "`unit_price`"]),
        },
        Case {
            name: "an input that matches nothing",
            files: vec![],
            input: "nothing-*.csv",
            edits: vec![],
            want: Want::Refused(&["nothing-*.csv"]),
        },
        case(
            "an unknown spec field",
            log(good.clone()),
            edit("seed = 7", "seed = 7\ncolour = \"red\""),
            Want::Refused(&["colour"]),
        ),
        case(
            "a key given twice",
            log(good.clone()),
            edit("seed = 7", "seed = 7\nseed = 8"),
            Want::Refused(&["seed"]),
        ),
        case(
            "k = 0",
            log(good.clone()),
            edit("k = 2", "k = 0"),
            Want::Refused(&["segments.k"]),
        ),
        case(
            "k above the users",
            log(good.clone()),
            edit("k = 2", "k = 50"),
            Want::Refused(&["segments.k = 50", "20 users"]),
        ),
        case(
            "factors = 0",
            log(good.clone()),
            edit("factors = 64", "factors = 0"),
            Want::Refused(&["als.factors"]),
        ),
        case(
            "max_attempts = 0",
            log(good.clone()),
            edit("max_attempts = 3", "max_attempts = 0"),
            Want::Refused(&["cluster.max_attempts"]),
        ),
        case(
            "an output under a file",
            log(good.clone()),
            vec![],
            Want::Refused(&["not-a-folder"]),
        ),
    ]
}

/// The corpus: each case through `shoal run`, none panicking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bad_input_corpus() {
    let cases = corpus();
    assert!(cases.len() >= 20);
    for case in cases {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in &case.files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        let input = dir.path().join(case.input).display().to_string();
        let edits: Vec<(&str, &str)> = case.edits.iter().map(|(a, b)| (*a, b.as_str())).collect();
        let spec = spec_file(dir.path(), &input, &edits);
        if case.name == "an output under a file" {
            let blocker = dir.path().join("not-a-folder");
            std::fs::write(&blocker, "x").unwrap();
            let toml = std::fs::read_to_string(&spec).unwrap().replace(
                &dir.path().join("out").display().to_string(),
                &blocker.join("out").display().to_string(),
            );
            std::fs::write(&spec, toml).unwrap();
        }
        let ran = run(&spec).await;
        assert!(
            !ran.stderr.contains("panicked"),
            "{}: {}",
            case.name,
            ran.text()
        );
        match case.want {
            Want::Refused(parts) => {
                assert_eq!(ran.code, Some(1), "{}: {}", case.name, ran.text());
                for part in parts {
                    assert!(
                        ran.stderr.contains(part),
                        "{}: `{part}` in {}",
                        case.name,
                        ran.text()
                    );
                }
            }
            Want::Dropped(reason, n) => {
                assert_eq!(ran.code, Some(0), "{}: {}", case.name, ran.text());
                let report = read_report(&dir.path().join("out"));
                assert_eq!(
                    report["rows"]["dropped"][reason], n,
                    "{}: {report}",
                    case.name
                );
            }
            Want::Kept(n) => {
                assert_eq!(ran.code, Some(0), "{}: {}", case.name, ran.text());
                let report = read_report(&dir.path().join("out"));
                assert_eq!(report["rows"]["kept"], n, "{}: {report}", case.name);
            }
        }
        println!("ok: {}", case.name);
    }
}
