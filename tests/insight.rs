//! What the people who act on segments read: RFM scores and the segments' names.

mod common;

use arrow::array::Array;
use common::*;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use shoal_spec::hash::id_key;
use shoal_spec::rfm::{self, cell_name};
use std::collections::BTreeMap;

/// Quintile scores by brute force: every customer sorted by (metric, tie-break of
/// its id), ranks cut into fifths (rank r scores 1 + #{j in 1..=4 : r >= ceil(j n / 5)}).
fn brute_scores(users: &[(&String, f64)], metric: usize) -> BTreeMap<String, u8> {
    let n = users.len() as u64;
    let mut order: Vec<(f64, f64, &String)> = users
        .iter()
        .map(|&(u, v)| (v, rfm::tie(id_key(u), metric), u))
        .collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    order
        .iter()
        .enumerate()
        .map(|(rank, &(_, _, u))| {
            let above = (1..=4u64)
                .filter(|j| rank as u64 >= (j * n).div_ceil(5))
                .count();
            (u.clone(), 1 + above as u8)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_customers_are_scored_and_segments_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cluster = Cluster::start(2).await;
    let status = run_job(&cluster.url, &demo_spec(&out, 8)).await;
    assert!(succeeded(&status), "{status:?}");
    cluster.stop().await;
    let a = read_assignments(&out);
    let n = a.len();

    // Scores against a brute-force ranking of the same customers: recency in whole
    // days (more recent is better), frequency in orders, monetary exact (the job
    // ranks money in 1% buckets, so a few customers near a cut may differ).
    let metric = |f: &dyn Fn(&Assigned) -> f64| -> Vec<(&String, f64)> {
        a.iter().map(|(u, x)| (u, f(x))).collect()
    };
    let wanted = [
        brute_scores(&metric(&|x| -x.recency_days.floor()), 0),
        brute_scores(&metric(&|x| x.frequency as f64), 1),
        brute_scores(&metric(&|x| x.monetary), 2),
    ];
    for (j, want) in wanted.iter().enumerate() {
        let mut per_score = [0usize; 5];
        let mut off = 0usize;
        for (u, x) in &a {
            let got = x.scores[j].unwrap_or_else(|| panic!("{u}: no {} score", rfm::METRICS[j]));
            per_score[usize::from(got - 1)] += 1;
            if got != want[u] {
                off += 1;
                assert!(
                    got.abs_diff(want[u]) <= 1,
                    "{u}: {} score {got}, {} by rank",
                    rfm::METRICS[j],
                    want[u]
                );
            }
        }
        // ties split at random (seeded) instead of by rank: a few near each cut
        assert!(
            off * 50 < n,
            "{}: {off} of {n} off the ranks",
            rfm::METRICS[j]
        );
        for (s, &c) in per_score.iter().enumerate() {
            let fifth = n as f64 / 5.0;
            assert!(
                (c as f64 - fifth).abs() < 0.06 * fifth,
                "{}: {c} customers score {} of {n}",
                rfm::METRICS[j],
                s + 1
            );
        }
    }
    // The thresholds in report.json bound every customer's score: recency in
    // whole days at most the cut where its score begins, at least the next cut;
    // frequency the other way round.
    let report = read_report(&out);
    let cut = |metric: &str| -> Vec<f64> {
        report["rfm_scores"]["thresholds"][metric]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let (days, orders) = (cut("recency_days"), cut("frequency"));
    for (u, x) in &a {
        let (r, f) = (
            usize::from(x.scores[0].unwrap()),
            usize::from(x.scores[1].unwrap()),
        );
        let d = x.recency_days.floor();
        assert!(
            r == 1 || d <= days[r - 2],
            "{u}: R {r}, {d} days, cuts {days:?}"
        );
        assert!(
            r == 5 || d >= days[r - 1],
            "{u}: R {r}, {d} days, cuts {days:?}"
        );
        let n = x.frequency as f64;
        assert!(
            f == 1 || n >= orders[f - 2],
            "{u}: F {f}, {n} orders, cuts {orders:?}"
        );
        assert!(
            f == 5 || n <= orders[f - 1],
            "{u}: F {f}, {n} orders, cuts {orders:?}"
        );
    }
    // Every customer's cell is the map's name of its (R, F) scores.
    for (u, x) in &a {
        let [r, f, _] = x.scores.map(Option::unwrap);
        assert_eq!(x.rfm_cell.as_deref(), Some(cell_name(r, f).as_str()), "{u}");
    }

    // Segments are named after the name most of their customers carry, with that
    // share: recounted from the assignments.
    let segments = report["segments"].as_array().unwrap();
    for s in segments {
        let id = s["segment"].as_u64().unwrap() as u32;
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for x in a.values().filter(|x| x.segment == id) {
            *names.entry(x.rfm_cell.as_deref().unwrap()).or_default() += 1;
        }
        let size: usize = names.values().sum();
        let top = names.values().copied().max().unwrap();
        let name = s["name"].as_str().unwrap();
        assert_eq!(
            names[name], top,
            "segment {id}: {name} is not its largest name {names:?}"
        );
        let share = s["name_share"].as_f64().unwrap();
        assert!(
            (share - top as f64 / size as f64).abs() < 1e-12,
            "segment {id}"
        );
        assert_eq!(s["size"].as_u64().unwrap() as usize, size);
    }
    // The same names in segments.parquet.
    let file = std::fs::File::open(out.join("segments.parquet")).unwrap();
    let table = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let names: Vec<String> = table
        .flat_map(|b| {
            let b = b.unwrap();
            let c = b.column_by_name("name").unwrap();
            let c = c
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap();
            (0..c.len())
                .map(|i| c.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let reported: Vec<String> = segments
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, reported);
}

/// The demo's segments computed with two ALS kernel sets (`--cpu-kernels`): their
/// factors differ at rounding level, the segments must not.
async fn demo_with_kernels(dir: &std::path::Path, kernels: &str) -> BTreeMap<String, Assigned> {
    let out = dir.join(kernels);
    let ran = run_shoal(
        &[
            "demo",
            "--workers",
            "2",
            "--device",
            "cpu",
            "--cpu-kernels",
            kernels,
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{}", ran.text());
    assert!(
        ran.stderr
            .contains(&format!("with the {kernels} ALS kernels")),
        "{}",
        ran.stderr
    );
    read_assignments(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_segments_alike_with_the_avx2_and_the_avx512_kernels() {
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    assert!(
        avx512,
        "this test compares the AVX-512 and the AVX2 ALS kernels: it needs an x86-64 CPU with AVX-512F"
    );
    let dir = tempfile::tempdir().unwrap();
    let a = demo_with_kernels(dir.path(), "avx2").await;
    let b = demo_with_kernels(dir.path(), "avx512").await;
    assert_eq!(a.len(), b.len());
    let la: Vec<usize> = a.values().map(|x| x.segment as usize).collect();
    let lb: Vec<usize> = b.values().map(|x| x.segment as usize).collect();
    let ari = adjusted_rand_index(&la, &lb);
    eprintln!("adjusted Rand index, AVX2 against AVX-512 ALS kernels: {ari:.4}");
    assert!(ari >= 0.95, "adjusted Rand index {ari:.4}");
}

/// Every user's planted group from a synth truth table, by user id as the
/// assignments spell it.
fn read_truth(path: &std::path::Path) -> BTreeMap<String, usize> {
    let file = std::fs::File::open(path).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut truth = BTreeMap::new();
    for b in reader {
        let b = b.unwrap();
        let users = b.column_by_name("user_id").unwrap();
        let users = users
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        let groups = b.column_by_name("group").unwrap();
        let groups = groups
            .as_any()
            .downcast_ref::<arrow::array::Int32Array>()
            .unwrap();
        for i in 0..b.num_rows() {
            truth.insert(users.value(i).to_string(), groups.value(i) as usize);
        }
    }
    truth
}

/// On synth logs with 3, 5 and 8 planted groups (behaviour planted in what users
/// buy, when and how much; segmented with the ALS block weighted up), a range of k
/// from 2 to 10 chooses the planted number, and the segments it keeps are the
/// planted groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rule_picks_the_planted_number_of_groups() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(2).await;
    for groups in [3u32, 5, 8] {
        let folder = dir.path().join(format!("synth-{groups}"));
        let s = shoal_synth::generate(&shoal_synth::SynthConfig {
            users: 3_000,
            items: 500,
            interactions: 60_000,
            groups,
            files: 2,
            output: folder.clone(),
            ..shoal_synth::SynthConfig::default()
        })
        .unwrap();
        let mut spec = shoal_spec::JobSpec::from_file(&s.spec, &folder).unwrap();
        spec.segments.k = shoal_spec::spec::SegmentCount::Range { min: 2, max: 10 };
        spec.features.als_weight = 4.0;
        spec.cluster.shards = 6;
        let status = run_job(&cluster.url, &spec).await;
        assert!(succeeded(&status), "{status:?}");
        let out = std::path::Path::new(&spec.output.path);
        let report = read_report(out);
        let choice = &report["k_choice"];
        let rows: Vec<String> = choice["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "k {} silhouette {:.3} stability {:.3}",
                    r["k"], r["silhouette"], r["stability"]
                )
            })
            .collect();
        assert_eq!(choice["candidates"].as_array().unwrap().len(), 9);
        assert_eq!(
            choice["chosen"].as_u64(),
            Some(u64::from(groups)),
            "planted {groups}: {rows:#?}"
        );
        assert_eq!(report["kmeans"]["k"].as_u64(), Some(u64::from(groups)));
        assert_eq!(
            report["segments"].as_array().unwrap().len(),
            groups as usize
        );
        // the outputs are those of the chosen k, and its segments are the groups
        let truth = read_truth(&s.truth.path);
        let a = read_assignments(out);
        assert_eq!(a.len(), truth.len());
        let got: Vec<usize> = a.values().map(|x| x.segment as usize).collect();
        let want: Vec<usize> = a.keys().map(|u| truth[u]).collect();
        let ari = adjusted_rand_index(&got, &want);
        assert!(ari > 0.8, "planted {groups}: adjusted Rand index {ari:.3}");
    }
    cluster.stop().await;
}

/// The migration matrix of a report, recounted from the two runs' assignments:
/// (from id, to id) -> customers in both runs.
fn recount(
    before: &BTreeMap<String, Assigned>,
    after: &BTreeMap<String, Assigned>,
) -> BTreeMap<(u32, u32), u64> {
    let mut moves = BTreeMap::new();
    for (user, a) in after {
        if let Some(b) = before.get(user) {
            *moves.entry((b.segment, a.segment)).or_insert(0) += 1;
        }
    }
    moves
}

/// The report's migration matrix as (from id, to id) -> customers (non-zero).
fn reported_moves(report: &serde_json::Value) -> BTreeMap<(u32, u32), u64> {
    let m = &report["migration"];
    let ids = |k: &str| -> Vec<u32> {
        m[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let (from, to) = (ids("from"), ids("to"));
    let mut moves = BTreeMap::new();
    for (row, f) in m["counts"].as_array().unwrap().iter().zip(&from) {
        for (n, t) in row.as_array().unwrap().iter().zip(&to) {
            let n = n.as_u64().unwrap();
            if n > 0 {
                moves.insert((*f, *t), n);
            }
        }
    }
    moves
}

/// A re-run of the demo with another seed (other ALS factors, other k-means
/// starts) and the first run as `segments.previous` keeps every segment id: each
/// segment holds mostly the customers of the earlier segment with its id, and
/// the migration matrix is the recount of the two assignment tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_with_other_seeds_keeps_every_segment_id() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(2).await;
    let first = dir.path().join("first");
    let status = run_job(&cluster.url, &demo_spec(&first, 8)).await;
    assert!(succeeded(&status), "{status:?}");
    let second = dir.path().join("second");
    let mut spec = demo_spec(&second, 8);
    spec.segments.seed = 99;
    spec.segments.previous = first.display().to_string();
    let status = run_job(&cluster.url, &spec).await;
    assert!(succeeded(&status), "{status:?}");
    cluster.stop().await;

    let (a, b) = (read_assignments(&first), read_assignments(&second));
    let report = read_report(&second);
    let moves = recount(&a, &b);
    assert_eq!(reported_moves(&report), moves, "the matrix is the recount");
    let ids = |r: &serde_json::Value| -> Vec<u64> {
        r["segments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["segment"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(ids(&report), ids(&read_report(&first)), "the same ids");
    // every segment's customers came mostly from the earlier segment of its id
    for id in 0..6u32 {
        let into: u64 = moves
            .iter()
            .filter(|((_, t), _)| *t == id)
            .map(|(_, n)| n)
            .sum();
        let stayed = moves.get(&(id, id)).copied().unwrap_or(0);
        assert!(
            stayed * 10 >= into * 8,
            "segment {id}: {stayed} of its {into} customers were in segment {id}: {moves:?}"
        );
    }
    let drift = report["migration"]["drift"].as_array().unwrap();
    assert!(drift.iter().all(|d| d["previous"] == d["segment"]));
}

/// A run whose log has one planted group more than the earlier run's (the same
/// customers, and a group of new ones) keeps the four ids and gives the new
/// group exactly one new id, the next after the earlier ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_planted_group_gets_exactly_one_new_id() {
    let dir = tempfile::tempdir().unwrap();
    let four = planted_groups();
    let mut five = planted_groups();
    // new one-off buyers: bought once, two days ago, little
    five.push(Group {
        recency_days: 2.0,
        orders: 1.0,
        order_value: 30.0,
    });
    let (log4, log5) = (dir.path().join("four.csv"), dir.path().join("five.csv"));
    write_planted_log_of(&log4, &four, 150, 3, 0);
    let truth = write_planted_log_of(&log5, &five, 150, 3, 0);
    let cluster = Cluster::start(2).await;
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    let status = run_job(&cluster.url, &planted_spec(&log4, &first, 4)).await;
    assert!(succeeded(&status), "{status:?}");
    let mut spec = planted_spec(&log5, &second, 5);
    spec.segments.previous = first.display().to_string();
    let status = run_job(&cluster.url, &spec).await;
    assert!(succeeded(&status), "{status:?}");
    cluster.stop().await;

    let report = read_report(&second);
    let drift = report["migration"]["drift"].as_array().unwrap();
    let new: Vec<u64> = drift
        .iter()
        .filter(|d| d["previous"].is_null())
        .map(|d| d["segment"].as_u64().unwrap())
        .collect();
    assert_eq!(new, vec![4], "exactly one new id, after 0..=3: {drift:?}");
    let kept: Vec<u64> = drift
        .iter()
        .filter_map(|d| d["previous"].as_u64())
        .collect();
    assert_eq!(kept, vec![0, 1, 2, 3]);
    let (a, b) = (read_assignments(&first), read_assignments(&second));
    assert_eq!(reported_moves(&report), recount(&a, &b));
    // the new id holds the added group, and the others their customers
    let in_new: Vec<&String> = b
        .iter()
        .filter(|(_, x)| x.segment == 4)
        .map(|(u, _)| u)
        .collect();
    let added = in_new.iter().filter(|u| truth[u.as_str()] == 4).count();
    assert!(
        added * 100 >= in_new.len() * 95 && added >= 140,
        "{added} of {}",
        in_new.len()
    );
    let new_customers: u64 = report["migration"]["new_customers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(new_customers, 150, "the added group's customers are new");
}

/// An earlier run that segmented on other features is refused, naming the first
/// difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_run_on_other_features_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.csv");
    write_planted_log(&log, 40, 5, 0);
    let cluster = Cluster::start(1).await;
    let first = dir.path().join("first");
    let status = run_job(&cluster.url, &planted_spec(&log, &first, 3)).await;
    assert!(succeeded(&status), "{status:?}");
    let mut spec = planted_spec(&log, &dir.path().join("second"), 3);
    spec.features.als = true;
    spec.als.factors = 4;
    spec.segments.previous = first.display().to_string();
    let status = run_job(&cluster.url, &spec).await;
    cluster.stop().await;
    assert!(!succeeded(&status));
    for needle in [
        "segments.previous",
        "it segmented on 3 features and this job on 7",
        "feature 1 is `recency_days` there and `als_0` here",
    ] {
        assert!(status.error.contains(needle), "{needle}: {}", status.error);
    }
}

/// A log of plays, without price or amount (user, item, time): with
/// `features.rfm = false` the job segments on the ALS factors alone, and finds
/// the planted groups; customers still get R and F scores and names (M is not
/// scored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_without_money_segments_on_als_factors_alone() {
    let dir = tempfile::tempdir().unwrap();
    let s = shoal_synth::generate(&shoal_synth::SynthConfig {
        users: 2_000,
        items: 400,
        interactions: 40_000,
        groups: 4,
        files: 1,
        output: dir.path().join("synth"),
        ..shoal_synth::SynthConfig::default()
    })
    .unwrap();
    // the synth log as plays: who, what, when; no order, quantity or price
    let plays = dir.path().join("plays.csv");
    let mut csv = String::from("user,track,played_at\n");
    for part in &s.log {
        let file = std::fs::File::open(&part.path).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for b in reader {
            let b = b.unwrap();
            let col = |n: &str| b.column_by_name(n).unwrap().clone();
            let (users, items, times) = (col("user_id"), col("item_id"), col("time"));
            let users = users
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .unwrap();
            let items = items
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .unwrap();
            let times = times
                .as_any()
                .downcast_ref::<arrow::array::TimestampMillisecondArray>()
                .unwrap();
            for i in 0..b.num_rows() {
                let t = iso(times.value(i) as f64 / 86_400_000.0);
                csv.push_str(&format!("{},{},{t}\n", users.value(i), items.value(i)));
            }
        }
    }
    std::fs::write(&plays, csv).unwrap();
    let out = dir.path().join("out");
    let spec = shoal_spec::JobSpec::parse(&format!(
        r#"name = "plays"
[input]
interactions = "{}"
[input.columns]
user = "user"
item = "track"
time = "played_at"
[output]
path = "{}"
[features]
rfm = false
als = true
[als]
factors = 16
iterations = 10
[segments]
k = 4
[cluster]
shards = 4
"#,
        plays.display(),
        out.display()
    ))
    .unwrap();
    let cluster = Cluster::start(2).await;
    let status = run_job(&cluster.url, &spec).await;
    cluster.stop().await;
    assert!(succeeded(&status), "{status:?}");
    let report = read_report(&out);
    let features: Vec<&str> = report["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..16).map(|i| format!("als_{i}")).collect();
    assert_eq!(features, want, "the ALS factors alone");
    let truth = read_truth(&s.truth.path);
    let a = read_assignments(&out);
    let got: Vec<usize> = a.values().map(|x| x.segment as usize).collect();
    let planted: Vec<usize> = a.keys().map(|u| truth[u]).collect();
    let ari = adjusted_rand_index(&got, &planted);
    assert!(
        ari > 0.8,
        "adjusted Rand index {ari:.3} against the planted groups"
    );
    // recency and plays are scored, money is not
    assert!(
        a.values()
            .all(|x| x.scores[0].is_some() && x.scores[1].is_some())
    );
    assert!(
        a.values()
            .all(|x| x.scores[2].is_none() && x.monetary == 0.0)
    );
    let segments = report["segments"].as_array().unwrap();
    assert!(segments.iter().all(|s| s["name"].is_string()));
    assert!(segments.iter().all(|s| s.get("m_score_mean").is_none()));
    assert!(out.join("report.html").exists());
}
