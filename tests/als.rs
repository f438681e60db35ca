//! Distributed implicit ALS, whole system: a planted low-rank preference log is
//! recovered (held-out precision far above popularity), recommendations leave out
//! what users bought, and the factor tables cover every user and item.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;

const USERS: usize = 800;
const ITEMS: usize = 400;
const GROUPS: usize = 8;
const SEED: u64 = 11;
const HOLDOUT: f64 = 0.2;

/// Users of group `u % GROUPS` buy 80 % of the time from their group's 50 items,
/// else from the whole catalogue with a popularity skew. Returns every
/// (user, item) pair written.
fn write_low_rank_log(path: &Path) -> BTreeSet<(String, String)> {
    let mut rng = Rng::new(5);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "order_id,customer,ts,sku,qty,unit_price").unwrap();
    let per_group = ITEMS / GROUPS;
    let mut pairs = BTreeSet::new();
    let mut order = 1000u64;
    for u in 0..USERS {
        let g = u % GROUPS;
        let user = format!("u{u:04}");
        let n = 10 + (rng.next_u64() % 21) as usize;
        for _ in 0..n {
            let item = if rng.unit() < 0.8 {
                g * per_group + (rng.next_u64() as usize % per_group)
            } else {
                // popularity skew: low indices are bought more
                ((rng.unit().powi(3)) * ITEMS as f64) as usize % ITEMS
            };
            let sku = format!("i{item:03}");
            order += 1;
            let day = 1 + rng.next_u64() % 28;
            let month = 1 + rng.next_u64() % 12;
            let qty = 1 + rng.next_u64() % 3;
            let price = 1.0 + (rng.next_u64() % 900) as f64 / 100.0;
            writeln!(
                f,
                "{order},{user},2024-{month:02}-{day:02} 10:00:00,{sku},{qty},{price:.2}"
            )
            .unwrap();
            pairs.insert((user.clone(), sku));
        }
    }
    f.flush().unwrap();
    pairs
}

fn spec(input: &Path, out: &Path) -> shoal_spec::JobSpec {
    let mut spec = planted_spec(input, out, GROUPS as u32);
    spec.name = "low-rank".into();
    spec.features.als = true;
    spec.als.factors = 16;
    spec.als.iterations = 12;
    spec.als.regularization = 0.05;
    spec.als.alpha = 10.0;
    spec.recommend.top_n = 10;
    spec.evaluate.holdout = HOLDOUT;
    spec.evaluate.k = 10;
    spec.segments.seed = SEED;
    spec.cluster.shards = 4;
    spec.validate().unwrap();
    spec
}

/// implicit's precision@k of recommending, to each user, the most popular
/// training items not already bought among those `pool` allows: the whole
/// catalogue is the popularity baseline a model must beat by far; the user's
/// planted group's items is the oracle that knows the truth.
fn precision_of(
    train: &BTreeSet<(String, String)>,
    held: &BTreeSet<(String, String)>,
    k: usize,
    pool: impl Fn(&str, &str) -> bool,
) -> f64 {
    let mut popularity: HashMap<&str, usize> = HashMap::new();
    for (_, i) in train {
        *popularity.entry(i.as_str()).or_default() += 1;
    }
    let mut ranked: Vec<(&str, usize)> = popularity.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut seen: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (u, i) in train {
        seen.entry(u.as_str()).or_default().insert(i.as_str());
    }
    let mut likes: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (u, i) in held {
        likes.entry(u.as_str()).or_default().insert(i.as_str());
    }
    let (mut hits, mut relevant) = (0usize, 0usize);
    let empty = BTreeSet::new();
    for (u, l) in &likes {
        let s = seen.get(u).unwrap_or(&empty);
        let top: Vec<&str> = ranked
            .iter()
            .map(|r| r.0)
            .filter(|i| !s.contains(i) && pool(u, i))
            .take(k)
            .collect();
        hits += top.iter().filter(|i| l.contains(*i)).count();
        relevant += k.min(l.len());
    }
    hits as f64 / relevant as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_low_rank_preferences_are_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("log.csv");
    let pairs = write_low_rank_log(&input);
    let out = dir.path().join("out");
    let cluster = Cluster::start(2).await;
    let status = run_job(&cluster.url, &spec(&input, &out)).await;
    assert!(succeeded(&status), "{status:?}");
    cluster.stop().await;

    // The split the job used, recomputed from its definition.
    let (held, train): (BTreeSet<_>, BTreeSet<_>) = pairs.iter().cloned().partition(|(u, i)| {
        use shoal_spec::hash::id_key;
        shoal_worker::steps::als::held_out(SEED, HOLDOUT, id_key(u), id_key(i))
    });
    let report = read_report(&out);
    let als = &report["als"];
    assert_eq!(als["pairs"].as_u64().unwrap(), train.len() as u64, "{als}");
    assert_eq!(als["held_out_pairs"].as_u64().unwrap(), held.len() as u64);
    let losses: Vec<f64> = als["loss_per_iteration"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 12);
    assert!(losses.last().unwrap() < &losses[0], "{losses:?}");
    let eval = &als["evaluation"];
    let precision = eval["precision_at_k"].as_f64().unwrap();
    let popularity = precision_of(&train, &held, 10, |_, _| true);
    let group_of = |id: &str| id[1..].parse::<usize>().unwrap();
    let oracle = precision_of(&train, &held, 10, |u, i| {
        group_of(u) % GROUPS == group_of(i) / (ITEMS / GROUPS)
    });
    eprintln!("precision@10 {precision}, popularity {popularity}, planted-group oracle {oracle}");
    assert!(
        precision > 2.0 * popularity && precision > 0.8 * oracle,
        "precision@10 {precision} vs popularity {popularity}, planted-group oracle {oracle}: {eval}"
    );
    assert!(eval["map_at_k"].as_f64().unwrap() > 0.0);
    assert!(eval["ndcg_at_k"].as_f64().unwrap() > 0.0);

    // Factors for every user and every item.
    let users = read_factors(&out, "user_factors.parquet", "user_id");
    let items = read_factors(&out, "item_factors.parquet", "item_id");
    assert_eq!(users.len(), USERS);
    let all_items: BTreeSet<&String> = pairs.iter().map(|p| &p.1).collect();
    assert_eq!(items.len(), all_items.len());
    assert!(users.values().chain(items.values()).all(|v| v.len() == 16));

    // Ten recommendations per user, best first, none of them bought in training.
    let recs = read_recommendations(&out);
    assert_eq!(recs.len(), USERS);
    let mut bought: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (u, i) in &train {
        bought.entry(u.as_str()).or_default().insert(i.as_str());
    }
    for (u, list) in &recs {
        assert_eq!(list.len(), 10, "{u}");
        assert!(list.windows(2).all(|w| w[0].1 >= w[1].1), "{u}: {list:?}");
        let b = &bought[u.as_str()];
        assert!(
            list.iter().all(|(i, _)| !b.contains(i.as_str())),
            "{u} got a bought item"
        );
    }

    // Each segment's top items, recounted here from the assignments and the log.
    let assigned = read_assignments(&out);
    let mut size: BTreeMap<u32, u64> = BTreeMap::new();
    for a in assigned.values() {
        *size.entry(a.segment).or_default() += 1;
    }
    let mut per: BTreeMap<(u32, &str), u64> = BTreeMap::new();
    let mut overall: BTreeMap<&str, u64> = BTreeMap::new();
    for (u, i) in &pairs {
        *per.entry((assigned[u].segment, i.as_str())).or_default() += 1;
        *overall.entry(i.as_str()).or_default() += 1;
    }
    let file = std::fs::File::open(out.join("segment_items.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut listed = 0;
    for b in reader {
        let b = b.unwrap();
        use arrow::array::AsArray;
        let seg = b
            .column_by_name("segment")
            .unwrap()
            .as_primitive::<arrow::datatypes::UInt32Type>();
        let rank = b
            .column_by_name("rank")
            .unwrap()
            .as_primitive::<arrow::datatypes::UInt32Type>();
        let item = b.column_by_name("item_id").unwrap().as_string::<i32>();
        let users = b
            .column_by_name("users")
            .unwrap()
            .as_primitive::<arrow::datatypes::UInt64Type>();
        let share = b
            .column_by_name("share")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>();
        let lift = b
            .column_by_name("lift")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>();
        for r in 0..b.num_rows() {
            let (s, i) = (seg.value(r), item.value(r));
            let n = per[&(s, i)];
            assert_eq!(users.value(r), n, "segment {s} item {i}");
            // the item is the rank-th most bought in its segment (ties by id)
            let mut ranked: Vec<(&str, u64)> = per
                .iter()
                .filter(|((seg, _), _)| *seg == s)
                .map(|((_, i), n)| (*i, *n))
                .collect();
            ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            assert_eq!(
                ranked[rank.value(r) as usize - 1].0,
                i,
                "segment {s} rank {}",
                rank.value(r)
            );
            let want_share = n as f64 / size[&s] as f64;
            let want_lift = want_share / (overall[i] as f64 / USERS as f64);
            assert!((share.value(r) - want_share).abs() < 1e-12);
            assert!((lift.value(r) - want_lift).abs() < 1e-9 * want_lift);
            listed += 1;
        }
    }
    assert_eq!(listed, GROUPS * 10);

    // The manifest lists the new tables.
    let manifest = read_manifest(&out);
    for table in [
        "user_factors.parquet/",
        "item_factors.parquet/",
        "recommendations.parquet/",
    ] {
        assert!(
            manifest.files.iter().any(|f| f.path.starts_with(table)),
            "{table} not in the manifest"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fold_in_puts_trained_users_back_in_their_segments() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("log.csv");
    write_low_rank_log(&input);
    let model = dir.path().join("model");
    let mut train = spec(&input, &model);
    train.evaluate.holdout = 0.0;
    let cluster = Cluster::start(2).await;
    let status = run_job(&cluster.url, &train).await;
    assert!(succeeded(&status), "{status:?}");

    // A spec naming a model with another factor count is refused up front.
    let mut wrong = train.clone();
    wrong.output.path = dir.path().join("wrong").display().to_string();
    wrong.als.factors = 8;
    wrong.model = Some(shoal_spec::spec::ModelSpec {
        path: model.display().to_string(),
    });
    let status = run_job(&cluster.url, &wrong).await;
    assert!(!succeeded(&status));
    assert!(
        status.error.contains("16 ALS factors") && status.error.contains("als.factors = 8"),
        "{}",
        status.error
    );

    // A re-run into a folder that held ALS outputs, without ALS, leaves none of
    // them behind.
    let rerun = dir.path().join("rerun");
    let mut again = train.clone();
    again.output.path = rerun.display().to_string();
    assert!(succeeded(&run_job(&cluster.url, &again).await));
    assert!(rerun.join("user_factors.parquet").exists());
    again.features.als = false;
    assert!(succeeded(&run_job(&cluster.url, &again).await));
    for table in [
        "user_factors.parquet",
        "item_factors.parquet",
        "recommendations.parquet",
        "segment_items.parquet",
    ] {
        // (an object store has no folders; a local one may keep an empty one)
        let path = rerun.join(table);
        let empty =
            !path.exists() || (path.is_dir() && std::fs::read_dir(&path).unwrap().next().is_none());
        assert!(empty, "{table} left over");
    }
    cluster.stop().await;

    // `shoal assign` on the same log: every user solved against the frozen items.
    let scored = dir.path().join("scored");
    let ran = shoal_assign(
        model.to_str().unwrap(),
        input.to_str().unwrap(),
        None,
        scored.to_str().unwrap(),
    )
    .await;
    assert_eq!(ran.code, Some(0), "{}", ran.text());
    let trained = read_assignments(&model);
    let folded = read_assignments(&scored);
    assert_eq!(trained.len(), folded.len());
    let same = trained
        .iter()
        .filter(|(u, a)| folded[*u].segment == a.segment)
        .count();
    eprintln!(
        "fold-in: {same} of {} users kept their segment",
        trained.len()
    );
    assert!(
        same as f64 >= 0.99 * trained.len() as f64,
        "{same} of {} users kept their segment",
        trained.len()
    );
    // Same outputs as a full run: the model's item factors, user factors,
    // recommendations, the report naming the model, and a manifest.
    let manifest = read_manifest(&scored);
    for table in [
        "assignments.parquet/",
        "user_factors.parquet/",
        "item_factors.parquet/",
        "recommendations.parquet/",
        "segments.parquet",
        "report.json",
    ] {
        assert!(
            manifest.files.iter().any(|f| f.path.starts_with(table)),
            "{table} not in the manifest"
        );
    }
    assert_eq!(
        read_factors(&scored, "item_factors.parquet", "item_id"),
        read_factors(&model, "item_factors.parquet", "item_id")
    );
    let report = read_report(&scored);
    assert_eq!(
        report["als"]["model"]["path"],
        format!("file://{}", model.display())
    );
    assert_eq!(report["kmeans"]["iterations"], 0);

    // Writing over the model itself is refused, and the model stays whole.
    let ran = shoal_assign(
        model.to_str().unwrap(),
        input.to_str().unwrap(),
        None,
        model.to_str().unwrap(),
    )
    .await;
    assert_ne!(ran.code, Some(0));
    assert!(
        ran.text().contains("is the model's folder"),
        "{}",
        ran.text()
    );
    assert_eq!(read_assignments(&model).len(), trained.len());

    // A folder that is not a finished job is refused with what to give instead.
    let ran = shoal_assign(
        dir.path().to_str().unwrap(),
        input.to_str().unwrap(),
        None,
        dir.path().join("nope").to_str().unwrap(),
    )
    .await;
    assert_ne!(ran.code, Some(0));
    assert!(
        ran.stderr.contains("no _SUCCESS manifest"),
        "{}",
        ran.text()
    );
}

/// `recommend.users` limits the recommendations to a list (a .txt file and a CSV
/// table here): the listed users get exactly the lists a run for everyone gives
/// them, nobody else gets any, and ids the job does not know are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommendations_go_to_the_listed_customers_only() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("log.csv");
    write_low_rank_log(&input);
    let cluster = Cluster::start(2).await;
    let all_out = dir.path().join("all");
    let mut everyone = spec(&input, &all_out);
    everyone.evaluate.holdout = 0.0;
    let status = run_job(&cluster.url, &everyone).await;
    assert!(succeeded(&status), "{status:?}");
    let all = read_recommendations(&all_out);

    let lists = dir.path().join("audience");
    std::fs::create_dir_all(&lists).unwrap();
    std::fs::write(lists.join("a.txt"), "u0003\nu0100\n\nnobody\nu0003\n").unwrap();
    std::fs::write(
        lists.join("b.csv"),
        "customer,campaign\nu0799,x\nu0250,y\nghost,z\n",
    )
    .unwrap();
    let out = dir.path().join("listed");
    let mut listed = spec(&input, &out);
    listed.evaluate.holdout = 0.0;
    listed.recommend.users = lists.display().to_string();
    listed.validate().unwrap();
    let status = run_job(&cluster.url, &listed).await;
    assert!(succeeded(&status), "{status:?}");
    let got = read_recommendations(&out);
    let want: BTreeMap<String, Vec<(String, f32)>> = ["u0003", "u0100", "u0250", "u0799"]
        .iter()
        .map(|u| (u.to_string(), all[*u].clone()))
        .collect();
    assert_eq!(got, want);
    let report = read_report(&out);
    let facts = &report["als"]["recommend_users"];
    assert_eq!(facts["requested"].as_u64(), Some(6), "{facts}");
    assert_eq!(facts["unknown"].as_u64(), Some(2), "{facts}");

    // a list that matches nothing is refused before any work
    let mut missing = spec(&input, &dir.path().join("missing"));
    missing.recommend.users = dir.path().join("no-such-list.txt").display().to_string();
    let status = run_job(&cluster.url, &missing).await;
    assert!(!succeeded(&status));
    assert!(
        status.error.contains("recommend.users") && status.error.contains("no-such-list"),
        "{}",
        status.error
    );
    cluster.stop().await;
}
