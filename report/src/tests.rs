//! Tests of the whole page: charts present and drawn, nothing fetched from the
//! network, text escaped, sections left out when their data is absent.

use super::*;

const NASTY: &str = "Mugs <&\"> 'Co'";

/// A small deterministic generator for test data.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

const NAMES: [&str; 6] = [
    "Champions",
    "Loyal",
    "Potential Loyalists",
    "Need Attention",
    "Cannot Lose Them",
    "Hibernating",
];

fn segment(id: u32, size: u64, total: u64) -> SegmentView {
    let f = f64::from(id);
    SegmentView {
        id,
        name: Some(NAMES[id as usize % NAMES.len()].to_owned()),
        name_share: 0.55 + 0.05 * f,
        size,
        share: size as f64 / total as f64,
        revenue: Some(120_000.0 / (f + 1.0)),
        revenue_share: Some(0.4 / (f + 1.0)),
        rfm: Some(Rfm {
            recency_days: 15.0 + 40.0 * f,
            frequency: 9.0 / (f + 1.0),
            monetary: 2400.0 / (f + 1.0),
        }),
        top_items: (0..5)
            .map(|i| ItemView {
                id: format!("SKU-{id}{i}"),
                label: Some(if i == 0 {
                    NASTY.to_owned()
                } else {
                    format!("Item {i} for segment {id}")
                }),
                share: 0.6 / f64::from(i + 1),
                lift: 4.0 / f64::from(i + 1),
            })
            .collect(),
    }
}

const CELL_NAMES: [&str; 5] = [
    "Hibernating",
    "At Risk",
    "Need Attention",
    "Loyal",
    "Champions",
];

fn grid() -> Vec<GridCell> {
    (1..=5u8)
        .flat_map(|r| (1..=5u8).map(move |f| (r, f)))
        .map(|(r, f)| GridCell {
            r,
            f,
            name: CELL_NAMES[((r + f) / 2 - 1) as usize].to_owned(),
            counts: (0..6)
                .map(|s| ((u64::from(r) * 7 + u64::from(f) * 13 + s * 29) % 97) * u64::from(r))
                .collect(),
        })
        .collect()
}

/// 500 points in six clouds on a circle, one per segment.
fn map_points() -> Vec<(f32, f32, u32)> {
    let mut rng = Lcg(7);
    (0..500u32)
        .map(|i| {
            let s = i % 6;
            let (cx, cy) = (f64::from(s).cos() * 3.0, f64::from(s).sin() * 3.0);
            let x = (cx + rng.next() * 2.0 - 1.0) as f32;
            let y = (cy + rng.next() * 2.0 - 1.0) as f32;
            (x, y, s)
        })
        .collect()
}

fn migration() -> Migration {
    let cell = |i: u64, j: u64| if i == j { 400 } else { (i * 7 + j * 3) % 40 };
    Migration {
        from: vec![0, 1, 2, 3, 4],
        to: (0..6).collect(),
        counts: (0..5)
            .map(|i| (0..6).map(|j| cell(i, j)).collect())
            .collect(),
        drift: (0..6)
            .map(|i| (i, (i != 5).then(|| 0.05 * f64::from(i + 1))))
            .collect(),
        previous: "runs/2024-03 <prev>".to_owned(),
    }
}

fn k_choice() -> KChoice {
    let row = |k: u32| KRow {
        k,
        inertia: 9000.0 / f64::from(k),
        silhouette: Some(0.3 + 0.02 * f64::from(k % 6)),
        davies_bouldin: Some(1.0 - 0.03 * f64::from(k)),
        calinski_harabasz: Some(2000.0 + 10.0 * f64::from(k)),
        stability: (k != 9).then(|| 0.9 - 0.03 * f64::from(k)),
    };
    KChoice {
        rows: (3..=10).map(row).collect(),
        chosen: 6,
        rule: "highest silhouette among k with stability ≥ 0.75".to_owned(),
    }
}

fn pairs<T: Clone>(items: &[(&str, T)]) -> Vec<(String, T)> {
    items
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// A page with every section present.
fn full_page() -> Page {
    let sizes = [612u64, 540, 880, 470, 302, 1534];
    let total: u64 = sizes.iter().sum();
    let segments = (0..6u32)
        .zip(sizes)
        .map(|(i, s)| segment(i, s, total))
        .collect();
    Page {
        title: format!("Spring campaign {NASTY}"),
        job_id: "job-0190a1b2".to_owned(),
        reference_time: "2011-12-10T00:00:00Z".to_owned(),
        facts: pairs(&[
            ("Input", "s3://shop/log/*.parquet".to_owned()),
            ("Rows read", "541,909".to_owned()),
            ("Users", "4,338".to_owned()),
        ]),
        dropped: pairs(&[("missing_user", 135_080), ("negative_quantity", 10_624)]),
        seconds: pairs(&[("plan", 0.12), ("als", 74.5), ("total", 3725.0)]),
        segments,
        population: Some(Rfm {
            recency_days: 92.0,
            frequency: 4.2,
            monetary: 2048.0,
        }),
        grid: Some(grid()),
        map: Some(MapView {
            points: map_points(),
            explained: [0.214, 0.118],
            sampled_from: total,
        }),
        als_loss: (0..15).map(|i| 1000.0 / f64::from(i + 1)).collect(),
        inertia: (0..12)
            .map(|i| 5000.0 + 3000.0 / f64::from(i + 1))
            .collect(),
        quality: pairs(&[
            ("Silhouette", "0.41".to_owned()),
            ("Davies-Bouldin", "0.87".to_owned()),
            ("Calinski-Harabasz", "2,315.4".to_owned()),
        ]),
        migration: Some(migration()),
        k_choice: Some(k_choice()),
        scores: vec![
            crate::ScoreRow {
                metric: "Recency: days since the last order".into(),
                bands: ["120+", "60–120", "30–60", "8–30", "0–8"]
                    .map(String::from)
                    .to_vec(),
            },
            crate::ScoreRow {
                metric: "Spend <&>".into(),
                bands: ["up to 10", "10–50", "50–200", "200–900", "900+"]
                    .map(String::from)
                    .to_vec(),
            },
        ],
    }
}

/// The HTML of the figure named `name`, if the page has exactly one.
fn figure<'a>(html: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<figure class=\"chart\" data-chart=\"{name}\">");
    if html.matches(&open).count() != 1 {
        return None;
    }
    let start = html.find(&open)?;
    let end = start + html[start..].find("</figure>")?;
    Some(&html[start..end])
}

fn assert_drawn(html: &str, name: &str) {
    let fig = figure(html, name).unwrap_or_else(|| panic!("one figure {name}"));
    assert!(fig.contains("<figcaption>"), "{name} has a caption");
    assert!(fig.contains("<svg"), "{name} has an svg");
    let marks = ["<rect", "<circle", "<polyline", "<path", "<polygon"];
    assert!(
        marks.iter().any(|m| fig.contains(m)),
        "{name} has drawn marks"
    );
}

const ALL: [&str; 9] = [
    "sizes",
    "revenue",
    "profile",
    "rf-grid",
    "map",
    "convergence",
    "migration",
    "drift",
    "k-choice",
];

#[test]
fn full_page_has_every_chart_drawn_and_nothing_external() {
    let page = full_page();
    let html = try_render(&page).expect("renders");
    assert_eq!(html, render(&page));
    for name in ALL {
        assert_drawn(&html, name);
    }
    let lower = html.to_lowercase();
    for banned in [
        "<script",
        "src=\"http",
        "href=\"http",
        "@import",
        "url(http",
        "url(\"http",
        "url('http",
        "<link",
        "<img",
    ] {
        assert!(!lower.contains(banned), "page contains {banned}");
    }
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("break-inside: avoid"));
    assert!(html.contains("@media print"));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/report-dev");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("sample-report.html"), &html);
}

#[test]
fn text_from_the_data_is_escaped() {
    let html = render(&full_page());
    assert!(!html.contains(NASTY));
    assert!(!html.contains("<&\">"));
    assert!(!html.contains("<prev>"));
    assert!(html.contains("Mugs &lt;&amp;&quot;&gt; &#39;Co&#39;"));
    assert!(html.contains("&lt;prev&gt;"));
    assert!(
        html.contains("Spend &lt;&amp;&gt;"),
        "the score table, escaped"
    );
    assert!(html.contains("<td class=\"num\">900+</td>"));
}

#[test]
fn absent_data_leaves_its_sections_out() {
    let mut page = full_page();
    page.map = None;
    page.migration = None;
    page.k_choice = None;
    page.population = None;
    page.grid = None;
    for s in &mut page.segments {
        s.name = None;
        s.rfm = None;
    }
    let html = try_render(&page).expect("renders");
    for name in [
        "map",
        "migration",
        "drift",
        "k-choice",
        "profile",
        "rf-grid",
    ] {
        assert!(
            !html.contains(&format!("data-chart=\"{name}\"")),
            "{name} is left out"
        );
    }
    for name in ["sizes", "revenue", "convergence"] {
        assert_drawn(&html, name);
    }
    assert!(html.contains("Run details"));
}

#[test]
fn no_money_and_no_als_leave_out_revenue_and_the_als_panel() {
    let mut page = full_page();
    page.als_loss.clear();
    for s in &mut page.segments {
        s.revenue = None;
        s.revenue_share = None;
    }
    let html = try_render(&page).expect("renders");
    assert!(!html.contains("data-chart=\"revenue\""));
    assert_drawn(&html, "convergence");
    assert!(!figure(&html, "convergence").unwrap().contains("ALS"));
}

#[test]
fn render_is_deterministic() {
    assert_eq!(render(&full_page()), render(&full_page()));
}

#[test]
fn odd_data_does_not_panic() {
    let mut page = full_page();
    page.segments[0].size = 0;
    page.segments[0].share = f64::NAN;
    page.segments[1].revenue = Some(f64::NAN);
    page.segments[2].rfm = Some(Rfm {
        recency_days: f64::INFINITY,
        frequency: -1.0,
        monetary: f64::NAN,
    });
    page.segments[3].top_items[0].lift = f64::NAN;
    page.population = Some(Rfm {
        recency_days: 0.0,
        frequency: f64::NAN,
        monetary: 0.0,
    });
    page.als_loss = vec![f64::NAN, f64::NAN];
    page.inertia = vec![3.0, 3.0, 3.0];
    if let Some(g) = &mut page.grid {
        g[0].counts = vec![0; 6];
        g[1].counts = vec![1];
        g[2].r = 9;
    }
    if let Some(m) = &mut page.map {
        m.points.push((f32::NAN, 1.0, 0));
        m.points.push((1.0, 1.0, 99));
        m.explained = [f64::NAN, 0.1];
    }
    if let Some(m) = &mut page.migration {
        m.counts = vec![vec![0; 2]];
        m.drift.push((42, Some(f64::NAN)));
    }
    if let Some(k) = &mut page.k_choice {
        k.rows.truncate(1);
        k.rows[0].inertia = f64::NAN;
    }
    let html = try_render(&page).expect("renders");
    assert!(html.contains("n/a"));

    let empty = Page {
        segments: Vec::new(),
        grid: Some(Vec::new()),
        map: Some(MapView {
            points: Vec::new(),
            explained: [0.0; 2],
            sampled_from: 0,
        }),
        als_loss: Vec::new(),
        inertia: Vec::new(),
        migration: Some(Migration {
            from: Vec::new(),
            to: Vec::new(),
            counts: Vec::new(),
            drift: Vec::new(),
            previous: String::new(),
        }),
        k_choice: Some(KChoice {
            rows: Vec::new(),
            chosen: 0,
            rule: String::new(),
        }),
        ..full_page()
    };
    let html = try_render(&empty).expect("renders");
    assert!(!html.contains("<figure"));

    assert!(html.contains("No customers were segmented"));
}

#[test]
fn page_serialises_to_json() {
    let json = serde_json::to_string(&full_page()).expect("serialises");
    assert!(json.contains("\"segments\""));
}

#[test]
fn many_segments_with_long_or_no_names_render() {
    let mut page = full_page();
    let total = 12_000u64;
    page.segments = (0..12u32)
        .map(|id| {
            let mut s = segment(id, 1000, total);
            s.name = match id % 3 {
                0 => Some("Big spenders who only buy in December & January".to_owned()),
                1 => None,
                _ => s.name,
            };
            s
        })
        .collect();
    if let Some(g) = &mut page.grid {
        for c in g.iter_mut() {
            c.counts = (0..12)
                .map(|i| (u64::from(c.r) * 31 + u64::from(c.f) * 17 + i * 7) % 50)
                .collect();
        }
    }
    if let Some(m) = &mut page.map {
        for (i, p) in m.points.iter_mut().enumerate() {
            p.2 = (i % 12) as u32;
        }
    }
    if let Some(m) = &mut page.migration {
        m.to = (0..12).collect();
        m.counts = (0..5)
            .map(|i| (0..12).map(|j| (i * 13 + j * 5) % 70).collect())
            .collect();
        m.drift = (0..12)
            .map(|i| {
                (
                    i,
                    if i > 9 {
                        None
                    } else {
                        Some(0.1 * f64::from(i))
                    },
                )
            })
            .collect();
    }
    let html = try_render(&page).expect("renders");
    for name in ALL {
        assert_drawn(&html, name);
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/report-dev");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("sample-report-many.html"), &html);
}
