use super::*;

#[test]
fn the_shipped_nightly_spec_is_valid() {
    let spec = JobSpec::parse(include_str!("../../../deploy/k8s/base/job.toml"))
        .expect("deploy/k8s/base/job.toml parses and validates");
    assert!(spec.features.als);
    assert_eq!(spec.input.columns.item(), Some("sku"));
}

fn demo() -> JobSpec {
    JobSpec::parse(DEMO_SPEC).expect("demo spec is valid")
}

fn err_of(text: &str) -> String {
    JobSpec::parse(text)
        .expect_err("must be rejected")
        .to_string()
}

fn with(replace: &str, by: &str) -> String {
    assert!(
        DEMO_SPEC.contains(replace),
        "test edits a line that exists: {replace}"
    );
    DEMO_SPEC.replacen(replace, by, 1)
}

#[test]
fn demo_spec_parses_with_its_values() {
    let s = demo();
    assert_eq!(s.name, "online-retail");
    assert_eq!(s.input.format, Some(Format::Csv));
    assert_eq!(s.input.columns.user(), "CustomerID");
    assert_eq!(s.input.columns.amount(), None);
    assert_eq!(s.input.clean.drop_order_prefixes, vec!["C".to_string()]);
    assert_eq!(s.input.clean.min_quantity, Some(1.0));
    assert_eq!(s.segments.k, SegmentCount::One(6));
    assert_eq!(s.segments.starts, 4);
    assert_eq!(s.cluster.shards, 8);
    assert_eq!(
        JobSpec::parse(&s.to_toml()).unwrap(),
        s,
        "round-trips through TOML"
    );
}

#[test]
fn any_non_empty_combination_of_feature_blocks() {
    // ALS alone on a log without money
    let als_only = with("rfm = true", "rfm = false")
        .replace("price = \"UnitPrice\"\n", "")
        .replace("min_price = 0.0\n", "");
    let s = JobSpec::parse(&als_only).unwrap();
    assert_eq!(s.feature_names().len(), 32);
    assert_eq!(s.rfm_dims(), 0);
    // every log needs event times; RFM needs money too
    let err = err_of(&als_only.replace("time = \"InvoiceDate\"\n", ""));
    assert!(err.contains("input.columns.time"), "{err}");
    let err = err_of(&with("price = \"UnitPrice\"\n", "").replace("min_price = 0.0\n", ""));
    assert!(err.contains("features.rfm needs a monetary value"), "{err}");
}

#[test]
fn k_is_a_number_a_range_or_a_list() {
    let range = JobSpec::parse(&with("k = 6", "k = { min = 3, max = 12 }\nstarts = 8")).unwrap();
    assert_eq!(range.segments.k, SegmentCount::Range { min: 3, max: 12 });
    assert_eq!(
        range.segments.k.candidates(),
        (3..=12).collect::<Vec<u32>>()
    );
    assert_eq!(range.segments.k.fixed(), None);
    assert_eq!(range.segments.starts, 8);
    let list = JobSpec::parse(&with("k = 6", "k = [8, 4, 6, 4]")).unwrap();
    assert_eq!(list.segments.k.candidates(), vec![4, 6, 8]);
    assert_eq!(list.segments.k.max(), 8);
    let one = JobSpec::parse(&with("k = 6", "k = [5]")).unwrap();
    assert_eq!(one.segments.k.fixed(), Some(5));
    for s in [range, list, one] {
        assert_eq!(JobSpec::parse(&s.to_toml()).unwrap(), s, "round-trips");
    }
}

#[test]
fn defaults_fill_optional_sections() {
    let s = JobSpec::parse(
        r#"name = "x"
[input]
interactions = "a.csv"
[input.columns]
user = "u"
time = "t"
amount = "a"
[output]
path = "out"
"#,
    )
    .unwrap();
    assert_eq!(s.segments, SegmentsSpec::default());
    assert_eq!(s.cluster, ClusterSpec::default());
    assert_eq!(s.input.clean.on_bad_rows, OnBadRows::Skip);
    assert_eq!(s.input.format, None);
    assert_eq!(s.features, FeaturesSpec::default());
    assert!(s.features.rfm && !s.features.als);
    assert_eq!(s.features.als_weight, 1.0);
    assert_eq!(s.features.extra, "");
    assert_eq!(
        s.als,
        AlsSpec {
            factors: 64,
            iterations: 15,
            regularization: 0.01,
            alpha: 40.0,
            confidence: Confidence::Linear,
            cg_steps: 3,
            checkpoint_every: 5,
        }
    );
    assert_eq!(
        s.recommend,
        RecommendSpec {
            top_n: 10,
            exclude_seen: true,
            ..RecommendSpec::default()
        }
    );
    assert_eq!(
        s.evaluate,
        EvaluateSpec {
            holdout: 0.0,
            k: 10
        }
    );
    assert_eq!(s.input.columns.event(), None);
    assert_eq!(s.input.columns.item_label(), None);
    assert!(s.input.events.is_empty());
    assert_eq!(s.feature_names(), ["recency_days", "frequency", "monetary"]);
}

#[test]
fn every_bad_field_is_named() {
    let cases: Vec<(String, &str)> = vec![
        (with("name = \"online-retail\"", "name = \"\""), "`name`"),
        (with("format = \"csv\"", "format = \"xml\""), "csv"),
        (
            with("user = \"CustomerID\"", "user = \"\""),
            "input.columns.user",
        ),
        (
            with("time = \"InvoiceDate\"", "time = \"\""),
            "input.columns.time",
        ),
        (
            with("price = \"UnitPrice\"", "price = \"\""),
            "input.columns.price",
        ),
        (
            with(
                "price = \"UnitPrice\"",
                "price = \"UnitPrice\"\namount = \"Total\"",
            ),
            "input.columns.amount",
        ),
        (
            with("order = \"InvoiceNo\"", "order = \"\""),
            "input.clean.drop_order_prefixes",
        ),
        (
            with(
                "drop_order_prefixes = [\"C\"]",
                "drop_order_prefixes = [\"\"]",
            ),
            "input.clean.drop_order_prefixes",
        ),
        (
            with("quantity = \"Quantity\"", "quantity = \"\""),
            "input.clean.min_quantity",
        ),
        (
            with("min_quantity = 1", "min_quantity = nan"),
            "input.clean.min_quantity",
        ),
        (
            with("min_price = 0.0", "min_price = inf"),
            "input.clean.min_price",
        ),
        (
            with("on_bad_rows = \"skip\"", "on_bad_rows = \"ignore\""),
            "skip",
        ),
        (
            with("path = \"out/online-retail\"", "path = \"\""),
            "output.path",
        ),
        (
            with("rfm = true\nals = true", "rfm = false\nals = false"),
            "segments on nothing",
        ),
        (with("k = 6", "k = 0"), "segments.k"),
        (with("k = 6", "k = 100000"), "segments.k"),
        (with("k = 6", "k = -1"), "k"),
        (
            with("k = 6", "k = { min = 5, max = 3 }"),
            "min (5) is above its max (3)",
        ),
        (with("k = 6", "k = { min = 1, max = 3 }"), "start at 2"),
        (with("k = 6", "k = { min = 3 }"), "needs both ends"),
        (
            with("k = 6", "k = { min = 3, max = 5, step = 1 }"),
            "unknown key `step`",
        ),
        (with("k = 6", "k = []"), "segments.k"),
        (with("k = 6", "k = [3, 0]"), "segments.k"),
        (with("k = 6", "k = { min = 2, max = 40 }"), "at most 32"),
        (
            with("k = 6", "k = { min = 2, max = 4000000000 }"),
            "k is at most 4096",
        ),
        (with("k = 6", "k = 4096\nstarts = 8"), "32768 centroids"),
        (
            with("[cluster]", "[model]\npath = \"m\"\n[cluster]")
                .replace("k = 6", "k = 6\nprevious = \"earlier\""),
            "keeps the model's segment ids",
        ),
        (
            with("k = 6", "k = \"six\""),
            "a range (k = { min = 3, max = 12 })",
        ),
        (with("k = 6", "k = 6\nstarts = 0"), "segments.starts"),
        (with("max_iter = 300", "max_iter = 0"), "segments.max_iter"),
        (with("tol = 1e-4", "tol = -1.0"), "segments.tol"),
        (with("seed = 42", "seed = \"x\""), "seed"),
        (with("shards = 8", "shards = 0"), "cluster.shards"),
        (with("shards = 8", "shards = 65536"), "between 1 and 4096"),
        (
            with("shards = 8", "shards = 8\nmax_attempts = 0"),
            "cluster.max_attempts",
        ),
        (
            with("cg_steps = 3", "cg_steps = 3\ncheckpoint_every = 0"),
            "als.checkpoint_every",
        ),
        (with("workers = 2", "workers = 0"), "cluster.workers"),
        (
            with("workers = 2", "workers = 2\nstaging = \" \""),
            "cluster.staging",
        ),
        (with("[cluster]", "[cluster]\nnodes = 3"), "nodes"),
        (with("device = \"auto\"", "device = \"tpu\""), "cuda"),
        (
            with("[input.clean]", "[input.clean]\nmax_price = 3"),
            "max_price",
        ),
        (
            with(
                "interactions = \"data/online-retail/online_retail.csv.gz\"",
                "interactions = \"\"",
            ),
            "input.interactions",
        ),
        (
            with("format = \"csv\"", "format = \"csv\"\ntime_format = \"%Q\""),
            "input.time_format",
        ),
    ];
    for (text, needle) in cases {
        let err = err_of(&text);
        assert!(
            err.contains(needle),
            "error `{err}` should mention `{needle}`"
        );
    }
}

#[test]
fn demo_spec_has_als_recommend_and_evaluate() {
    let s = demo();
    assert_eq!(s.input.columns.item_label(), Some("Description"));
    assert_eq!(s.input.columns.event(), None);
    assert!(s.input.events.is_empty());
    assert!(s.features.rfm && s.features.als);
    assert_eq!(s.features.als_weight, 1.0);
    assert_eq!(
        s.als,
        AlsSpec {
            factors: 32,
            ..AlsSpec::default()
        }
    );
    assert_eq!(s.recommend, RecommendSpec::default());
    assert_eq!(s.evaluate, EvaluateSpec::default());
    let names = s.feature_names();
    assert_eq!(names.len(), 32 + 3);
    assert_eq!(names[0], "als_0");
    assert_eq!(names[31], "als_31");
    assert_eq!(&names[32..], ["recency_days", "frequency", "monetary"]);
}

/// The demo spec with an event column and `[input.events]`.
fn with_events(events: &str) -> String {
    with(
        "item_label = \"Description\"",
        &format!("item_label = \"Description\"\nevent = \"Event\"\n\n[input.events]\n{events}"),
    )
}

#[test]
fn every_new_bad_field_is_named() {
    let no_als = |text: String| text.replacen("als = true", "als = false", 1);
    let cases: Vec<(String, &str, &str)> = vec![
        (
            with("item = \"StockCode\"", "item = \"\""),
            "input.columns.item",
            "(user, item) pairs",
        ),
        (with("factors = 32", "factors = 0"), "als.factors", "1024"),
        (
            with("factors = 32", "factors = 1025"),
            "als.factors",
            "1025",
        ),
        (
            with("iterations = 15", "iterations = 0"),
            "als.iterations",
            "between 1 and 1000",
        ),
        (
            with("iterations = 15", "iterations = 1001"),
            "als.iterations",
            "between 1 and 1000",
        ),
        (
            with("regularization = 0.01", "regularization = -0.1"),
            "als.regularization",
            ">= 0",
        ),
        (
            with("regularization = 0.01", "regularization = nan"),
            "als.regularization",
            "finite",
        ),
        (with("alpha = 40.0", "alpha = 0.0"), "als.alpha", "> 0"),
        (with("alpha = 40.0", "alpha = inf"), "als.alpha", "finite"),
        (
            with("cg_steps = 3", "cg_steps = 0"),
            "als.cg_steps",
            "between 1 and 64",
        ),
        (
            with("cg_steps = 3", "cg_steps = 65"),
            "als.cg_steps",
            "between 1 and 64",
        ),
        (
            with("confidence = \"linear\"", "confidence = \"square\""),
            "confidence",
            "log",
        ),
        (
            with("als_weight = 1.0", "als_weight = -1.0"),
            "features.als_weight",
            ">= 0",
        ),
        (
            with("als_weight = 1.0", "als_weight = nan"),
            "features.als_weight",
            "finite",
        ),
        (
            with(
                "als_weight = 1.0",
                "als_weight = 1.0\nextra = \" s3://b/t.parquet\"",
            ),
            "features.extra",
            "spaces",
        ),
        (
            with("als_weight = 1.0", "als_weight = 1.0\nextra_weight = -2.0"),
            "features.extra_weight",
            ">= 0",
        ),
        (
            with("als_weight = 1.0", "als_weight = 1.0\nextra_user = \"id\""),
            "features.extra_user",
            "names no table",
        ),
        (
            with(
                "als_weight = 1.0",
                "als_weight = 1.0\nextra = \"t.csv\"\nextra_columns = [\"age\", \"age\"]",
            ),
            "features.extra_columns",
            "`age` twice",
        ),
        (
            with(
                "als_weight = 1.0",
                "als_weight = 1.0\nextra = \"t.csv\"\nextra_columns = [\"CustomerID\"]",
            ),
            "features.extra_columns",
            "user column",
        ),
        (
            with(
                "[input.clean]",
                "[input.events]\npurchase = 2.0\n\n[input.clean]",
            ),
            "input.events",
            "input.columns.event",
        ),
        (
            with_events("view = 0.5\npurchase = -1.0\n"),
            "input.events",
            "`purchase`",
        ),
        (with_events("view = nan\n"), "input.events", "`view`"),
        (
            with_events("\" view\" = 1.0\n"),
            "input.events",
            "\" view\"",
        ),
        (
            with("top_n = 10", "top_n = 1001"),
            "recommend.top_n",
            "at most 1000",
        ),
        (
            with("top_n = 10", "top_n = 0\nusers = \"list.txt\""),
            "recommend.users",
            "top_n = 0",
        ),
        (
            with("top_n = 10", "top_n = 10\nusers_column = \"id\""),
            "recommend.users_column",
            "not set",
        ),
        (
            with("holdout = 0.0", "holdout = 1.0"),
            "evaluate.holdout",
            "[0, 1)",
        ),
        (
            with("holdout = 0.0", "holdout = -0.1"),
            "evaluate.holdout",
            "[0, 1)",
        ),
        (
            with("holdout = 0.0", "holdout = nan"),
            "evaluate.holdout",
            "[0, 1)",
        ),
        (
            no_als(with("holdout = 0.0", "holdout = 0.2")),
            "evaluate.holdout",
            "needs features.als = true",
        ),
        (with("k = 10", "k = 0"), "evaluate.k", "between 1 and 1000"),
        (
            with("k = 10", "k = 1001"),
            "evaluate.k",
            "between 1 and 1000",
        ),
        (
            with("exclude_seen = true", "exclude_seen = true\nmax = 3"),
            "max",
            "exclude_seen",
        ),
        (
            with("cg_steps = 3", "cg_steps = 3\nrank = 3"),
            "rank",
            "factors",
        ),
        (
            with("k = 10", "k = 10\nmetric = \"ndcg\""),
            "metric",
            "holdout",
        ),
    ];
    for (text, field, detail) in cases {
        let err = err_of(&text);
        assert!(
            err.contains(field) && err.contains(detail),
            "error `{err}` should mention `{field}` and `{detail}`"
        );
    }
}

#[test]
fn als_related_settings_that_are_allowed() {
    // Recommendations without ALS are allowed (skipped), holdout 0 too.
    let s = JobSpec::parse(&with("als = true", "als = false")).unwrap();
    assert!(!s.features.als && s.recommend.top_n == 10);
    assert_eq!(s.feature_names(), ["recency_days", "frequency", "monetary"]);
    // Without ALS the item column is optional.
    JobSpec::parse(&with("als = true", "als = false").replacen(
        "item = \"StockCode\"",
        "item = \"\"",
        1,
    ))
    .unwrap();
    // Bounds are inclusive; zero weights are allowed.
    for (a, b) in [
        ("factors = 32", "factors = 1024"),
        ("factors = 32", "factors = 1"),
        ("iterations = 15", "iterations = 1000"),
        ("regularization = 0.01", "regularization = 0.0"),
        ("cg_steps = 3", "cg_steps = 64"),
        ("als_weight = 1.0", "als_weight = 0.0"),
        ("top_n = 10", "top_n = 0"),
        ("top_n = 10", "top_n = 1000"),
        ("holdout = 0.0", "holdout = 0.999"),
        ("k = 10", "k = 1000"),
        ("confidence = \"linear\"", "confidence = \"log\""),
    ] {
        JobSpec::parse(&with(a, b)).unwrap_or_else(|e| panic!("{b}: {e}"));
    }
    let s = JobSpec::parse(&with_events("view = 0.0\npurchase = 3\n")).unwrap();
    assert_eq!(s.input.events.get("view"), Some(&0.0));
    assert_eq!(s.input.events.get("purchase"), Some(&3.0));
}

#[test]
fn event_weights_match_the_trimmed_value_exactly() {
    let mut s = JobSpec::parse(&with_events(
        "view = 0.25\npurchase = 3.0\n\"add to cart\" = 0.0\n",
    ))
    .unwrap();
    let input = &s.input;
    assert_eq!(input.event_weight(Some("purchase")), 3.0);
    assert_eq!(input.event_weight(Some("  purchase\t")), 3.0);
    assert_eq!(input.event_weight(Some("view")), 0.25);
    assert_eq!(input.event_weight(Some("add to cart")), 0.0);
    assert_eq!(input.event_weight(Some("Purchase")), 1.0, "exact case");
    assert_eq!(input.event_weight(Some("refund")), 1.0, "not listed");
    assert_eq!(input.event_weight(Some("")), 1.0);
    assert_eq!(input.event_weight(Some("   ")), 1.0);
    assert_eq!(input.event_weight(None), 1.0);
    // Without an event column every interaction weighs 1.0.
    s.input.columns.event = " ".into();
    assert_eq!(s.input.event_weight(Some("purchase")), 1.0);
}

#[test]
fn confidence_follows_hu_koren_volinsky() {
    let mut als = AlsSpec {
        alpha: 40.0,
        ..AlsSpec::default()
    };
    assert_eq!(als.confidence, Confidence::Linear);
    assert_eq!(als.confidence_of(0.0), 1.0);
    assert_eq!(als.confidence_of(1.0), 41.0);
    assert_eq!(als.confidence_of(2.5), 101.0);
    als.confidence = Confidence::Log;
    als.alpha = 2.0;
    assert_eq!(als.confidence_of(0.0), 1.0);
    for r in [1e-9, 0.5, 1.0, std::f64::consts::E - 1.0, 10.0, 1e6] {
        let want = 1.0 + 2.0 * (1.0 + r).ln();
        let got = als.confidence_of(r);
        assert!(
            (got - want).abs() <= 1e-12 * want,
            "log confidence of {r}: {got} vs {want}"
        );
    }
    assert!((als.confidence_of(std::f64::consts::E - 1.0) - 3.0).abs() < 1e-12);
}

#[test]
fn every_new_field_round_trips_through_toml() {
    let text = with_events("view = 0.1\n\"add to cart\" = 0.5\npurchase = 3.0\n")
        .replacen(
            "als_weight = 1.0",
            "als_weight = 0.75\nextra = \"s3://b/profiles/\"\nextra_user = \"id\"\nextra_columns = [\"age\", \"emb\"]\nextra_weight = 0.5",
            1,
        )
        .replacen("factors = 32", "factors = 8", 1)
        .replacen("iterations = 15", "iterations = 4", 1)
        .replacen("regularization = 0.01", "regularization = 0.125", 1)
        .replacen("alpha = 40.0", "alpha = 12.5", 1)
        .replacen("confidence = \"linear\"", "confidence = \"log\"", 1)
        .replacen("cg_steps = 3", "cg_steps = 5", 1)
        .replacen("top_n = 10", "top_n = 25", 1)
        .replacen("exclude_seen = true", "exclude_seen = false", 1)
        .replacen("holdout = 0.0", "holdout = 0.2", 1)
        .replacen("k = 10", "k = 20", 1);
    let s = JobSpec::parse(&text).unwrap();
    assert_eq!(s.input.columns.event(), Some("Event"));
    assert_eq!(s.input.columns.item_label(), Some("Description"));
    assert_eq!(s.input.events.len(), 3);
    assert_eq!(s.input.events["add to cart"], 0.5);
    assert_eq!(s.features.als_weight, 0.75);
    assert_eq!(s.features.extra(), Some("s3://b/profiles/"));
    assert_eq!(s.extra_user_column(), "id");
    assert_eq!(s.features.extra_columns, ["age", "emb"]);
    assert_eq!(s.features.extra_weight, 0.5);
    assert_eq!(
        s.als,
        AlsSpec {
            factors: 8,
            iterations: 4,
            regularization: 0.125,
            alpha: 12.5,
            confidence: Confidence::Log,
            cg_steps: 5,
            checkpoint_every: 5,
        }
    );
    assert_eq!(
        s.recommend,
        RecommendSpec {
            top_n: 25,
            exclude_seen: false,
            ..RecommendSpec::default()
        }
    );
    assert_eq!(
        s.evaluate,
        EvaluateSpec {
            holdout: 0.2,
            k: 20
        }
    );
    let toml = s.to_toml();
    assert!(toml.contains("confidence = \"log\""), "{toml}");
    assert_eq!(JobSpec::parse(&toml).unwrap(), s, "round-trips: {toml}");
}

#[test]
fn unknown_variant_lists_allowed_values() {
    let err = err_of(&with("on_bad_rows = \"skip\"", "on_bad_rows = \"ignore\""));
    assert!(err.contains("skip") && err.contains("fail"), "{err}");
    let err = err_of(&with("format = \"csv\"", "format = \"xml\""));
    assert!(err.contains("csv") && err.contains("parquet"), "{err}");
}

#[test]
fn relative_paths_resolve_against_base() {
    let mut s = demo();
    s.resolve_paths(Path::new("/srv/shoal"));
    assert_eq!(
        s.input.interactions,
        "/srv/shoal/data/online-retail/online_retail.csv.gz"
    );
    assert_eq!(s.output.path, "/srv/shoal/out/online-retail");
    let mut u = demo();
    u.output.path = "file:///tmp/x".into();
    u.features.extra = "profiles/*.parquet".into();
    u.segments.previous = "runs/yesterday".into();
    u.resolve_paths(Path::new("/srv"));
    assert_eq!(u.output.path, "file:///tmp/x");
    assert_eq!(u.features.extra, "/srv/profiles/*.parquet");
    assert_eq!(u.segments.previous, "/srv/runs/yesterday");
    // `.` and `..` are taken out (object stores refuse them), globs kept.
    let mut r = demo();
    r.input.interactions = "../logs/./2024/**/*.csv".into();
    r.output.path = "/data/../../out".into();
    r.resolve_paths(Path::new("/srv/shoal/specs"));
    assert_eq!(r.input.interactions, "/srv/shoal/logs/2024/**/*.csv");
    assert_eq!(r.output.path, "/out");
    // Without a table nothing is made up, and the table's users default to
    // the interactions' user column.
    let d = demo();
    assert_eq!(d.features.extra(), None);
    assert_eq!(d.extra_user_column(), d.input.columns.user());
}

#[test]
fn format_from_names() {
    assert_eq!(Format::from_name("a/b.csv.gz"), Some((Format::Csv, true)));
    assert_eq!(Format::from_name("a/b.CSV"), Some((Format::Csv, false)));
    assert_eq!(
        Format::from_name("b.parquet"),
        Some((Format::Parquet, false))
    );
    assert_eq!(Format::from_name("b.json"), None);
}
