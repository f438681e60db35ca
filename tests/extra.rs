//! The `features.extra` table, whole system: groups that only a shop's own
//! per-user features tell apart (their interactions all look alike) are found
//! with the table and not without it; every row of the table is accounted for;
//! a fold-in assigns the table's users without interactions from their
//! features alone (cold start); bad tables fail naming what is wrong.

mod common;

use arrow::array::{ArrayRef, Float32Builder, Int64Array, ListBuilder, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use common::*;
use shoal_spec::JobSpec;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

const GROUPS: usize = 3;
const PER_GROUP: usize = 200;
/// Log users without a row in the table (every third group-0 user up to this).
const NO_ROW: usize = 30;
/// Table rows of users without interactions, per group.
const ORPHANS_PER_GROUP: usize = 20;

/// The planted group's mean of (age, score) and of a 4-value embedding.
fn centre(g: usize) -> ([f64; 2], [f64; 4]) {
    let g = g as f64;
    (
        [25.0 + 20.0 * g, 10.0 - 4.0 * g],
        [g - 1.0, 1.0 - g, 0.5 * g, (g - 1.0) * (g - 1.0)],
    )
}

fn user(g: usize, i: usize) -> String {
    format!("u{g}{i:04}")
}

fn orphan(g: usize, i: usize) -> String {
    format!("x{g}{i:04}")
}

/// One interaction log in which every user behaves alike: 3–6 orders of
/// similar value over the last year, whatever the group.
fn write_log(path: &Path, users: &[String], seed: u64) {
    let mut rng = Rng::new(seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "order_id,customer,ts,sku,qty,unit_price").unwrap();
    let mut order = 1000u64;
    for u in users {
        let orders = 3 + (rng.next_u64() % 4) as usize;
        for _ in 0..orders {
            order += 1;
            let month = 1 + rng.next_u64() % 12;
            let day = 1 + rng.next_u64() % 28;
            let price = 20.0 * (0.2 * rng.normal()).exp();
            writeln!(
                f,
                "{order},{u},2024-{month:02}-{day:02} 12:00:00,SKU{},1,{price:.2}",
                rng.next_u64() % 50
            )
            .unwrap();
        }
    }
    f.flush().unwrap();
}

fn log_users() -> Vec<String> {
    (0..GROUPS)
        .flat_map(|g| (0..PER_GROUP).map(move |i| user(g, i)))
        .collect()
}

/// A user's (age, score) and embedding, drawn around its group's centre.
fn features(rng: &mut Rng, g: usize) -> ([f64; 2], [f32; 4]) {
    let (a, e) = centre(g);
    (
        [a[0] + 2.0 * rng.normal(), a[1] + 0.5 * rng.normal()],
        e.map(|v| (v + 0.15 * rng.normal()) as f32),
    )
}

/// What the CSV table holds, for the counts the report must give.
struct CsvTable {
    rows_read: u64,
    with_row: usize,
    blank_values: u64,
}

/// `customer,age,score` for every log user but [`NO_ROW`] of group 0, and for
/// [`ORPHANS_PER_GROUP`] users per group without interactions; one blank score,
/// one row with a non-number age and one with no user.
fn write_csv_table(path: &Path) -> CsvTable {
    let mut rng = Rng::new(3);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "customer,age,score").unwrap();
    let (mut rows, mut with_row, mut blank) = (0u64, 0usize, 0u64);
    for g in 0..GROUPS {
        for i in 0..PER_GROUP {
            let (v, _) = features(&mut rng, g);
            if g == 0 && i < NO_ROW {
                continue;
            }
            if g == 1 && i == 7 {
                writeln!(f, "{},{:.3},", user(g, i), v[0]).unwrap();
                blank += 1;
            } else {
                writeln!(f, "{},{:.3},{:.3}", user(g, i), v[0], v[1]).unwrap();
            }
            rows += 1;
            with_row += 1;
        }
        for i in 0..ORPHANS_PER_GROUP {
            let (v, _) = features(&mut rng, g);
            writeln!(f, "{},{:.3},{:.3}", orphan(g, i), v[0], v[1]).unwrap();
            rows += 1;
        }
    }
    writeln!(f, "u9bad,n/a,3.0").unwrap();
    writeln!(f, ",40.0,3.0").unwrap();
    f.flush().unwrap();
    CsvTable {
        rows_read: rows + 2,
        with_row,
        blank_values: blank,
    }
}

/// A Parquet table of `users` (each with its group): an Int64 `age` and a
/// list<float32> `emb` of `emb_len` values (the first `short` rows one shorter).
fn write_parquet_table(path: &Path, users: &[(String, usize)], seed: u64, emb_len: usize) {
    let mut rng = Rng::new(seed);
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let schema = Arc::new(Schema::new(vec![
        Field::new("customer", DataType::Utf8, false),
        Field::new("age", DataType::Int64, true),
        Field::new("emb", DataType::List(item.clone()), true),
    ]));
    let mut emb = ListBuilder::new(Float32Builder::new()).with_field(item);
    let mut ages = Vec::new();
    for (_, g) in users {
        let (v, e) = features(&mut rng, *g);
        ages.push(v[0].round() as i64);
        emb.values().append_slice(&e[..emb_len.min(4)]);
        for _ in 4..emb_len {
            emb.values().append_value(0.0);
        }
        emb.append(true);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            users.iter().map(|(u, _)| u.as_str()),
        )),
        Arc::new(Int64Array::from(ages)),
        Arc::new(emb.finish()),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn spec(log: &Path, out: &Path, extra: Option<&Path>) -> JobSpec {
    let mut spec = planted_spec(log, out, GROUPS as u32);
    spec.name = "extra".into();
    spec.cluster.shards = 5;
    if let Some(t) = extra {
        spec.features.extra = t.display().to_string();
        spec.features.extra_weight = 3.0;
    }
    spec.validate().unwrap();
    spec
}

/// ARI of the job's segments against the planted groups, over the log users
/// (those `keep` allows).
fn ari_of(assigned: &BTreeMap<String, Assigned>, keep: impl Fn(&str) -> bool) -> f64 {
    let (mut truth, mut got) = (Vec::new(), Vec::new());
    for (u, a) in assigned.iter().filter(|(u, a)| !a.cold_start && keep(u)) {
        truth.push(u[1..2].parse::<usize>().unwrap());
        got.push(a.segment as usize);
    }
    adjusted_rand_index(&truth, &got)
}

fn ari(assigned: &BTreeMap<String, Assigned>) -> f64 {
    ari_of(assigned, |_| true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_csv_table_separates_groups_the_log_cannot_and_every_row_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.csv");
    write_log(&log, &log_users(), 1);
    let table = dir.path().join("profiles.csv");
    let facts = write_csv_table(&table);

    let cluster = Cluster::start(3).await;
    // Without the table: the log alone says nothing about the groups.
    let plain = dir.path().join("plain");
    let status = run_job(&cluster.url, &spec(&log, &plain, None)).await;
    assert!(succeeded(&status), "{status:?}");
    let without = ari(&read_assignments(&plain));
    assert!(without < 0.2, "ARI without the table: {without}");

    let out = dir.path().join("out");
    let status = run_job(&cluster.url, &spec(&log, &out, Some(&table))).await;
    assert!(succeeded(&status), "{status:?}");
    let assigned = read_assignments(&out);
    assert_eq!(
        assigned.len(),
        GROUPS * PER_GROUP,
        "every log user, no orphan"
    );
    assert!(assigned.values().all(|a| !a.cold_start));
    // The users with a row are found; the ones without sit at the features'
    // means, which is the middle group's place (and so is its segment).
    let has_row = |u: &str| !(u.starts_with("u0") && u[2..].parse::<usize>().unwrap() < NO_ROW);
    let with = ari_of(&assigned, has_row);
    assert!(with > 0.95, "ARI with the table: {with}");
    let middle = assigned[&user(1, 0)].segment;
    let at_mean = (0..NO_ROW)
        .filter(|&i| assigned[&user(0, i)].segment == middle)
        .count();
    assert!(
        at_mean * 10 >= NO_ROW * 9,
        "{at_mean} of {NO_ROW} users without a row at the mean"
    );

    let report = read_report(&out);
    let e = &report["extra"];
    assert_eq!(e["rows"]["read"], facts.rows_read);
    assert_eq!(e["rows"]["kept"], facts.rows_read - 2);
    assert_eq!(e["rows"]["dropped"]["bad_value"], 1);
    assert_eq!(e["rows"]["dropped"]["missing_user"], 1);
    assert_eq!(e["users_with_row"], facts.with_row as u64);
    assert_eq!(e["users_without_row"], NO_ROW as u64);
    assert_eq!(e["missing_values"], 2 * NO_ROW as u64 + facts.blank_values);
    assert_eq!(
        e["rows_without_interactions"],
        (GROUPS * ORPHANS_PER_GROUP) as u64
    );
    let names: Vec<&str> = report["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["recency_days", "frequency", "monetary", "age", "score"]
    );
    // Each segment's mean age is one planted group's (within 1.5 years), and
    // together they are all three.
    let mut ages: Vec<f64> = report["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["extra_means"]["age"].as_f64().unwrap())
        .collect();
    ages.sort_by(f64::total_cmp);
    for (g, age) in ages.iter().enumerate() {
        let want = centre(g).0[0];
        // group 0's missing rows count at the overall mean (45): a pull of
        // 30/200 * 20 years at most
        let slack = if g == 0 { 3.5 } else { 1.5 };
        assert!((age - want).abs() < slack, "segment mean ages {ages:?}");
    }

    // One worker: the same assignments bit for bit (shards fix the result).
    let cluster1 = Cluster::start(1).await;
    let out1 = dir.path().join("out1");
    let status = run_job(&cluster1.url, &spec(&log, &out1, Some(&table))).await;
    assert!(succeeded(&status), "{status:?}");
    assert_eq!(read_assignments(&out1), assigned);
    cluster1.stop().await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parquet_vectors_in_several_files_and_a_fold_in_with_cold_start_users() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.csv");
    let users = log_users();
    write_log(&log, &users, 2);
    let tables = dir.path().join("profiles");
    std::fs::create_dir(&tables).unwrap();
    let grouped: Vec<(String, usize)> = users
        .iter()
        .map(|u| (u.clone(), u[1..2].parse().unwrap()))
        .collect();
    let (a, b) = grouped.split_at(grouped.len() / 2);
    write_parquet_table(&tables.join("part-0.parquet"), a, 4, 4);
    write_parquet_table(&tables.join("part-1.parquet"), b, 5, 4);

    let cluster = Cluster::start(2).await;
    let model = dir.path().join("model");
    let mut s = spec(&log, &model, Some(&tables));
    s.features.extra_columns = vec!["emb".into()];
    let status = run_job(&cluster.url, &s).await;
    assert!(succeeded(&status), "{status:?}");
    let trained = read_assignments(&model);
    let fit = ari(&trained);
    assert!(fit > 0.95, "ARI with the embedding: {fit}");
    let report = read_report(&model);
    assert_eq!(report["extra"]["columns"][0]["name"], "emb");
    assert_eq!(report["extra"]["columns"][0]["dims"], 4);
    assert_eq!(report["features"].as_array().unwrap().len(), 3 + 4);
    cluster.stop().await;

    // The segment each planted group landed in.
    let mut votes: HashMap<(usize, u32), usize> = HashMap::new();
    for (u, a) in &trained {
        *votes
            .entry((u[1..2].parse().unwrap(), a.segment))
            .or_default() += 1;
    }
    let segment_of = |g: usize| {
        (0..GROUPS as u32)
            .max_by_key(|&c| votes.get(&(g, c)).copied().unwrap_or(0))
            .unwrap()
    };

    // A day later: a log of 30 known users, and a table with them and 60 new
    // users who have not bought anything yet.
    let known: Vec<(String, usize)> = grouped.iter().step_by(20).cloned().collect();
    let today = dir.path().join("today.csv");
    write_log(
        &today,
        &known.iter().map(|(u, _)| u.clone()).collect::<Vec<_>>(),
        9,
    );
    let mut table_users = known.clone();
    table_users
        .extend((0..GROUPS).flat_map(|g| (0..ORPHANS_PER_GROUP).map(move |i| (orphan(g, i), g))));
    let today_table = dir.path().join("today.parquet");
    write_parquet_table(&today_table, &table_users, 11, 4);
    let scored = dir.path().join("scored");
    let ran = shoal_assign(
        model.to_str().unwrap(),
        today.to_str().unwrap(),
        Some(today_table.to_str().unwrap()),
        scored.to_str().unwrap(),
    )
    .await;
    assert_eq!(ran.code, Some(0), "{}", ran.text());
    let folded = read_assignments(&scored);
    assert_eq!(folded.len(), known.len() + GROUPS * ORPHANS_PER_GROUP);
    let kept = known
        .iter()
        .filter(|(u, _)| folded[u].segment == trained[u].segment && !folded[u].cold_start)
        .count();
    assert!(
        kept * 100 >= known.len() * 99,
        "{kept} of {} keep their segment",
        known.len()
    );
    let mut right = 0;
    for g in 0..GROUPS {
        for i in 0..ORPHANS_PER_GROUP {
            let a = &folded[&orphan(g, i)];
            assert!(a.cold_start && a.frequency == 0, "{a:?}");
            right += usize::from(a.segment == segment_of(g));
        }
    }
    assert!(
        right * 100 >= GROUPS * ORPHANS_PER_GROUP * 95,
        "{right} of {} cold-start users in their group's segment",
        GROUPS * ORPHANS_PER_GROUP
    );
    let report = read_report(&scored);
    assert_eq!(
        report["extra"]["cold_start_users"],
        (GROUPS * ORPHANS_PER_GROUP) as u64
    );
    assert!(scored.join("_SUCCESS").exists());

    // A table without the model's columns is refused, naming them.
    let other = dir.path().join("other.csv");
    std::fs::write(&other, "customer,emb\nu00000,1.5\n").unwrap();
    let refused = dir.path().join("refused");
    let ran = shoal_assign(
        model.to_str().unwrap(),
        today.to_str().unwrap(),
        Some(other.to_str().unwrap()),
        refused.to_str().unwrap(),
    )
    .await;
    assert_ne!(ran.code, Some(0), "{}", ran.text());
    assert!(ran.text().contains("emb (4)"), "{}", ran.text());
    assert!(!refused.join("_SUCCESS").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_tables_fail_naming_the_problem_and_leave_no_success() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.csv");
    let users = log_users();
    write_log(&log, &users, 3);
    let cluster = Cluster::start(2).await;
    let fails = |name: &str, s: JobSpec, wanted: Vec<String>| {
        let url = cluster.url.clone();
        let out = std::path::PathBuf::from(&s.output.path);
        let name = name.to_string();
        async move {
            let status = run_job(&url, &s).await;
            assert!(!succeeded(&status), "{name}: {status:?}");
            for w in &wanted {
                assert!(
                    status.error.contains(w.as_str()),
                    "{name}: {}",
                    status.error
                );
            }
            assert!(!out.join("_SUCCESS").exists(), "{name}");
        }
    };

    // A user twice, in two files.
    let twice = dir.path().join("twice");
    std::fs::create_dir(&twice).unwrap();
    std::fs::write(twice.join("a.csv"), "customer,age\nu00003,30\nu00004,31\n").unwrap();
    std::fs::write(twice.join("b.csv"), "customer,age\nu10000,50\nu00003,33\n").unwrap();
    fails(
        "duplicate user",
        spec(&log, &dir.path().join("o1"), Some(&twice)),
        vec![
            "u00003".into(),
            "more than one row".into(),
            "a.csv row 1".into(),
            "b.csv row 2".into(),
        ],
    )
    .await;

    // A column the spec names that the table lacks.
    let t = dir.path().join("t.csv");
    std::fs::write(&t, "customer,age,score\nu00001,30,2\n").unwrap();
    let mut s = spec(&log, &dir.path().join("o2"), Some(&t));
    s.features.extra_columns = vec!["age".into(), "visits".into()];
    fails(
        "missing column",
        s,
        vec![
            "`visits`".into(),
            "features.extra_columns".into(),
            "customer, age, score".into(),
        ],
    )
    .await;

    // Lists of two lengths in two files.
    let lists = dir.path().join("lists");
    std::fs::create_dir(&lists).unwrap();
    let grouped: Vec<(String, usize)> = users.iter().take(10).map(|u| (u.clone(), 0)).collect();
    write_parquet_table(&lists.join("p0.parquet"), &grouped[..5], 1, 4);
    write_parquet_table(&lists.join("p1.parquet"), &grouped[5..], 2, 5);
    fails(
        "list lengths",
        spec(&log, &dir.path().join("o3"), Some(&lists)),
        vec!["`emb`".into(), "p0.parquet".into(), "p1.parquet".into()],
    )
    .await;

    // Nothing matches the table's path.
    fails(
        "no table",
        spec(
            &log,
            &dir.path().join("o4"),
            Some(&dir.path().join("none-*.csv")),
        ),
        vec!["features.extra".into(), "no object matches".into()],
    )
    .await;

    // A bad row under on_bad_rows = "fail" names the file, row and column.
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "customer,age\nu00001,30\nu00002,old\n").unwrap();
    let mut s = spec(&log, &dir.path().join("o5"), Some(&bad));
    s.input.clean.on_bad_rows = shoal_spec::spec::OnBadRows::Fail;
    fails(
        "bad value",
        s,
        vec![
            "bad.csv, row 2".into(),
            "bad_value".into(),
            "`age`".into(),
            "`old`".into(),
        ],
    )
    .await;
    cluster.stop().await;
}
