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
fn brute_scores(users: &[(&String, f64)]) -> BTreeMap<String, u8> {
    let n = users.len() as u64;
    let mut order: Vec<(f64, f64, &String)> = users
        .iter()
        .map(|&(u, v)| (v, rfm::tie(id_key(u)), u))
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
        brute_scores(&metric(&|x| -x.recency_days.floor())),
        brute_scores(&metric(&|x| x.frequency as f64)),
        brute_scores(&metric(&|x| x.monetary)),
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
    // Every customer's cell is the map's name of its (R, F) scores.
    for (u, x) in &a {
        let [r, f, _] = x.scores.map(Option::unwrap);
        assert_eq!(x.rfm_cell.as_deref(), Some(cell_name(r, f).as_str()), "{u}");
    }

    // Segments are named after the name most of their customers carry, with that
    // share: recounted from the assignments.
    let report = read_report(&out);
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
