//! Whole-system tests on S3: a real S3-compatible server (moto, started by the
//! fixture on a free 127.0.0.1 port), real gRPC between an in-process coordinator and
//! workers, every path of the spec an `s3://` URL.

mod common;

use common::*;
use shoal_store::{self as store, MULTIPART_PART_BYTES, StoreError, list_inputs, resolve};
use std::collections::BTreeSet;
use std::io::Write;

/// Every object below `loc`, relative to it.
async fn objects_below(loc: &shoal_store::Location) -> BTreeSet<String> {
    loc.list()
        .await
        .unwrap()
        .into_iter()
        .map(|m| loc.relative(&m.location))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_job_on_s3_gives_the_same_outputs_as_on_a_local_folder() {
    let s3 = s3();
    let input = s3.url("demo/in/online_retail.csv.gz");
    upload(&demo_data(), &input).await;
    let dir = tempfile::tempdir().unwrap();
    let local_out = dir.path().join("out");
    let local_spec = demo_spec(&local_out, 8);
    let mut spec = local_spec.clone();
    spec.input.interactions = input.clone();
    spec.output.path = s3.url("demo/out/");
    spec.cluster.staging = Some(s3.url("demo/staging"));

    let cluster = Cluster::start(2).await;
    let on_s3 = run_job(&cluster.url, &spec).await;
    assert!(succeeded(&on_s3), "{on_s3:?}");
    let local = run_job(&cluster.url, &local_spec).await;
    assert!(succeeded(&local), "{local:?}");
    cluster.stop().await;

    let out = resolve(&spec.output.path).unwrap();
    let manifest = read_manifest_at(&out).await;
    // _SUCCESS lists every object of the folder, each with the size it has
    let listed: BTreeSet<String> = manifest.files.iter().map(|f| f.path.clone()).collect();
    let mut present = objects_below(&out).await;
    assert!(present.remove("_SUCCESS"));
    assert_eq!(
        listed, present,
        "the manifest lists exactly the output files"
    );
    for f in &manifest.files {
        let meta = out.child(&f.path).head().await.unwrap();
        assert_eq!(meta.map(|m| m.size), Some(f.bytes), "{}", f.path);
    }
    assert_eq!(
        manifest
            .files
            .iter()
            .filter(|f| f.path.starts_with("assignments.parquet/part-"))
            .count(),
        8,
        "one part per shard"
    );
    assert_eq!(manifest.input.len(), 1);
    assert_eq!(manifest.input[0].url, input);
    assert_eq!(
        manifest.input[0].size,
        std::fs::metadata(demo_data()).unwrap().len()
    );
    assert!(manifest.input[0].e_tag.is_some(), "S3 gives an e-tag");

    // the same figures and the same assignments as the job on the local folder
    let report = read_report_at(&out).await;
    let local_report = read_report(&local_out);
    assert_eq!(report["rows"]["read"], 541_909);
    assert_eq!(report["rows"]["kept"], 397_884);
    assert_eq!(report["users"], 4_338);
    assert_eq!(report["workers"], 2);
    for key in [
        "rows",
        "users",
        "reference_time",
        "scaling",
        "segments",
        "quality",
    ] {
        assert_eq!(report[key], local_report[key], "report.json `{key}`");
    }
    assert_eq!(
        report["kmeans"]["inertia_per_iteration"],
        local_report["kmeans"]["inertia_per_iteration"]
    );
    let assignments = read_assignments_at(&out).await;
    let local_assignments = read_assignments(&local_out);
    assert_eq!(assignments.len(), 4_338);
    assert_eq!(segments_of(&assignments), segments_of(&local_assignments));
    assert_eq!(
        assignments, local_assignments,
        "distances and RFM match bit for bit"
    );
    let local_manifest = read_manifest(&local_out);
    for f in local_manifest
        .files
        .iter()
        .filter(|f| !f.path.starts_with("report."))
    {
        let twin = manifest.files.iter().find(|g| g.path == f.path);
        assert_eq!(twin, Some(f), "{} has the same rows and bytes", f.path);
    }

    // staging is removed once the job is done
    let staging = resolve(&spec.cluster.staging.clone().unwrap()).unwrap();
    assert_eq!(objects_below(&staging).await, BTreeSet::new());
}

/// Writes the planted log as two CSV objects (one in a sub-folder) plus objects a
/// listing must skip or a glob must not match, and the same rows as one Parquet
/// object in another folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_inputs_by_file_folder_and_glob_in_csv_and_parquet() {
    let s3 = s3();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("log.csv");
    let truth = write_planted_log(&csv, 100, 31, 0);
    let text = std::fs::read_to_string(&csv).unwrap();
    let (header, rows) = text.split_once('\n').unwrap();
    let lines: Vec<&str> = rows.lines().collect();
    let half = lines.len() / 2;
    for (name, part) in [("a.csv", &lines[..half]), ("2024/b.csv", &lines[half..])] {
        let path = dir.path().join(name.replace('/', "-"));
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(f, "{header}").unwrap();
        for l in part {
            writeln!(f, "{l}").unwrap();
        }
        drop(f);
        upload(&path, &s3.url(&format!("listing/logs/{name}"))).await;
    }
    for skipped in ["listing/logs/_SUCCESS", "listing/logs/.hidden.csv"] {
        store::resolve(&s3.url(skipped))
            .unwrap()
            .put(bytes::Bytes::from_static(b"x"))
            .await
            .unwrap();
    }
    let pq = dir.path().join("log.parquet");
    csv_to_parquet(&csv, &pq);
    upload(&pq, &s3.url("listing/pq/part-0.parquet")).await;

    // listing
    let names = |found: Vec<store::InputObject>| -> Vec<String> {
        found.into_iter().map(|o| o.url).collect()
    };
    let one = list_inputs(&s3.url("listing/logs/a.csv")).await.unwrap();
    assert_eq!(names(one), vec![s3.url("listing/logs/a.csv")]);
    let folder = list_inputs(&s3.url("listing/logs")).await.unwrap();
    assert_eq!(
        names(folder),
        vec![
            s3.url("listing/logs/2024/b.csv"),
            s3.url("listing/logs/a.csv")
        ],
        "a folder lists every object below it, hidden ones skipped"
    );
    let shallow = list_inputs(&s3.url("listing/logs/*.csv")).await.unwrap();
    assert_eq!(
        names(shallow),
        vec![s3.url("listing/logs/a.csv")],
        "* does not cross folders"
    );
    let deep = list_inputs(&s3.url("listing/logs/**/*.csv")).await.unwrap();
    assert_eq!(deep.len(), 2);
    assert!(deep.iter().all(|o| o.size > 0 && o.e_tag.is_some()));
    let err = list_inputs(&s3.url("listing/nothing/*.csv"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NoInputs { .. }), "{err}");
    assert!(
        err.to_string().contains(&s3.url("listing/nothing")),
        "{err}"
    );

    // a job on the glob of CSV objects, and one on the folder of Parquet objects
    let cluster = Cluster::start(2).await;
    let from_csv = s3.url("listing/out-csv");
    let mut spec = planted_spec(&csv, dir.path(), 4);
    spec.input.interactions = s3.url("listing/logs/**/*.csv");
    spec.output.path = from_csv.clone();
    let status = run_job(&cluster.url, &spec).await;
    assert!(succeeded(&status), "{status:?}");
    let from_pq = s3.url("listing/out-pq");
    spec.input.interactions = s3.url("listing/pq");
    spec.output.path = from_pq.clone();
    let status = run_job(&cluster.url, &spec).await;
    assert!(succeeded(&status), "{status:?}");
    cluster.stop().await;

    let a = read_assignments_at(&resolve(&from_csv).unwrap()).await;
    let b = read_assignments_at(&resolve(&from_pq).unwrap()).await;
    assert_eq!(a.len(), truth.len());
    assert_eq!(segments_of(&a), segments_of(&b));
    let (planted, found): (Vec<usize>, Vec<usize>) = a
        .iter()
        .map(|(u, r)| (truth[u], r.segment as usize))
        .unzip();
    let ari = adjusted_rand_index(&planted, &found);
    assert!(ari >= 0.95, "adjusted Rand index {ari}");
    let manifest = read_manifest_at(&resolve(&from_csv).unwrap()).await;
    let inputs: Vec<&str> = manifest.input.iter().map(|i| i.url.as_str()).collect();
    assert_eq!(
        inputs,
        vec![
            s3.url("listing/logs/2024/b.csv"),
            s3.url("listing/logs/a.csv")
        ]
    );
    let report = read_report_at(&resolve(&from_pq).unwrap()).await;
    assert_eq!(report["rows"]["read"], lines.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_fails_naming_the_url_and_leaves_no_success() {
    let s3 = s3();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("log.csv");
    write_planted_log(&csv, 20, 3, 0);
    let input = s3.url("missing/in/log.csv");
    upload(&csv, &input).await;
    let cluster = Cluster::start(1).await;

    // A finished output, then a rerun whose input bucket does not exist: the job
    // fails naming the input URL, and the old manifest is gone.
    let out_url = s3.url("missing/out");
    let mut spec = planted_spec(&csv, dir.path(), 3);
    spec.input.interactions = input.clone();
    spec.output.path = out_url.clone();
    let status = run_job(&cluster.url, &spec).await;
    assert!(succeeded(&status), "{status:?}");
    let out = resolve(&out_url).unwrap();
    assert!(out.child("_SUCCESS").head().await.unwrap().is_some());
    spec.input.interactions = "s3://shoal-no-such-bucket/in/*.csv".into();
    let status = run_job(&cluster.url, &spec).await;
    assert!(!succeeded(&status), "{status:?}");
    assert!(
        status.error.contains("s3://shoal-no-such-bucket/in")
            && status
                .error
                .contains("bucket `shoal-no-such-bucket` does not exist"),
        "{}",
        status.error
    );
    assert!(
        out.child("_SUCCESS").head().await.unwrap().is_none(),
        "a failed job leaves no _SUCCESS"
    );

    // An output in a bucket that does not exist.
    spec.input.interactions = input.clone();
    spec.output.path = "s3://shoal-no-such-bucket/out".into();
    let status = run_job(&cluster.url, &spec).await;
    assert!(!succeeded(&status), "{status:?}");
    assert!(
        status.error.contains("s3://shoal-no-such-bucket/out")
            && status.error.contains("does not exist"),
        "{}",
        status.error
    );
    cluster.stop().await;
    let nowhere = resolve("s3://shoal-no-such-bucket/out/report.json").unwrap();
    let err = nowhere.get().await.unwrap_err();
    assert!(matches!(err, StoreError::NoSuchBucket { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_go_up_as_multipart_uploads() {
    let s3 = s3();
    let n = 2 * MULTIPART_PART_BYTES + 12_345;
    let data: Vec<u8> = (0..n).map(|i| (i * 131 % 251) as u8).collect();
    let big = resolve(&s3.url("multipart/big.bin")).unwrap();
    big.put(data.clone().into()).await.unwrap();
    let meta = big.head().await.unwrap().expect("the object exists");
    assert_eq!(meta.size, n as u64);
    // S3 marks the e-tag of an object assembled from N parts with `-N`
    let e_tag = meta.e_tag.unwrap_or_default();
    assert!(e_tag.trim_matches('"').ends_with("-3"), "e-tag {e_tag}");
    assert!(big.get().await.unwrap() == data, "reads back whole");

    let small = resolve(&s3.url("multipart/small.bin")).unwrap();
    small
        .put(bytes::Bytes::from_static(b"small"))
        .await
        .unwrap();
    let e_tag = small
        .head()
        .await
        .unwrap()
        .unwrap()
        .e_tag
        .unwrap_or_default();
    assert!(!e_tag.contains('-'), "one request: e-tag {e_tag}");
    assert_eq!(&small.get().await.unwrap()[..], b"small");

    big.delete_all().await.unwrap();
    small.delete().await.unwrap();
    let prefix = resolve(&s3.url("multipart")).unwrap();
    assert_eq!(objects_below(&prefix).await, BTreeSet::new());
    prefix.remove_empty_folders(); // no folders on S3: nothing to do, no error
}

/// The operators' path end to end on S3: a `shoal coordinator` process and two
/// `shoal worker` processes (with tokens), the demo log on S3, `shoal submit
/// --wait` and `shoal watch` as an operator types them, outputs read back from S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_run_a_job_from_s3_to_s3_submitted_and_watched_with_the_cli() {
    let s3 = s3(); // sets the S3 environment the processes inherit
    let input = s3.url("cli/in/online_retail.csv.gz");
    upload(&demo_data(), &input).await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = demo_spec(&dir.path().join("unused"), 4);
    spec.input.interactions = input;
    spec.output.path = s3.url("cli/out/");
    let spec_path = dir.path().join("job.toml");
    std::fs::write(&spec_path, spec.to_toml()).unwrap();

    let (operators, workers) = ("ops-s3-41", "wrk-s3-17");
    let (_coordinator, url) =
        coordinator_process_with(&[("SHOAL_TOKEN", operators), ("SHOAL_WORKER_TOKEN", workers)]);
    let _workers: Vec<Proc> = (0..2)
        .map(|_| worker_process(&url, &[("SHOAL_TOKEN", workers)]))
        .collect();
    wait_for_workers_with_token(&url, 2, Some(operators)).await;
    let env = [
        ("SHOAL_COORDINATOR", url.as_str()),
        ("SHOAL_TOKEN", operators),
    ];

    let submitted = run_shoal(&["submit", spec_path.to_str().unwrap(), "--wait"], &env).await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.text());
    let job = submitted.stdout.lines().next().unwrap().trim().to_string();
    assert!(
        submitted.stdout.contains("median recency"),
        "the segment table, read from S3: {}",
        submitted.text()
    );
    let watched = run_shoal(&["watch", &job], &env).await;
    assert_eq!(watched.code, Some(0), "{}", watched.text());
    for phase in ["ingest", "lloyd", "write"] {
        assert!(
            watched.stdout.contains(&format!("{phase:<9} done · ")),
            "{phase}: {}",
            watched.text()
        );
    }

    let out = resolve(&spec.output.path).unwrap();
    let manifest = read_manifest_at(&out).await;
    assert!(!manifest.files.is_empty());
    let report = read_report_at(&out).await;
    assert_eq!(report["rows"]["read"], 541_909, "{report}");
    assert_eq!(report["users"], 4338, "{report}");
    assert_eq!(report["workers"], 2, "{report}");
    assert_eq!(read_assignments_at(&out).await.len(), 4338);
}
