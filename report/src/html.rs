//! The page's HTML pieces: style sheet, header, tables and figure frames.
//! Every piece of text from the data goes through `esc`.

use crate::format::{duration, esc, humanise, int, money, num, pct, seg_label, short, swatch};
use crate::model::{KChoice, Page, Rfm, SegmentView};
use std::fmt::Write as _;

/// The inline style sheet: system fonts, at most 1200 px wide, and a print layout
/// without backgrounds where figures and tables are not split across pages.
pub(crate) const STYLE: &str = r#"
:root { --ink: #222; --muted: #5f5f5f; --rule: #ddd; --band: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 28px; margin: 0 0 4px; }
h2 { font-size: 21px; margin: 40px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--rule); }
h3 { font-size: 16px; margin: 0 0 6px; }
p { margin: 6px 0 12px; max-width: 860px; }
.meta { color: var(--muted); margin: 0 0 12px; }
.summary { font-size: 17px; max-width: 900px; }
.note { color: var(--muted); font-size: 14px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--rule); text-align: left; vertical-align: top; }
th { background: var(--band); font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.n { white-space: nowrap; }
tr.chosen td { font-weight: 700; }
.wide { width: 100%; }
.scroll { overflow-x: auto; }
.sw { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px;
  vertical-align: -1px; -webkit-print-color-adjust: exact; print-color-adjust: exact; }
.share { color: var(--muted); font-size: 13px; white-space: nowrap; }
figure.chart { margin: 16px 0 24px; break-inside: avoid; page-break-inside: avoid; }
figure.chart figcaption { color: var(--muted); font-size: 14px; margin: 0 0 6px; max-width: 900px; }
table.scores { margin-top: 16px; }
table.scores caption { text-align: left; color: var(--muted); font-size: 14px; padding-bottom: 6px; }
figure.chart svg { display: block; max-width: 100%; height: auto; }
figure.chart svg text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 20px; }
.legend { list-style: none; padding: 0; margin: 4px 0 0; display: flex; flex-wrap: wrap; gap: 4px 18px; font-size: 14px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 16px 24px; }
.card { break-inside: avoid; page-break-inside: avoid; }
.card table { width: 100%; margin: 0; font-size: 13px; }
.card th, .card td { padding: 4px 6px; }
.card td.label { word-break: break-word; }
.card td.id { white-space: nowrap; color: var(--muted); font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
footer { margin-top: 40px; color: var(--muted); font-size: 13px; }
@media (max-width: 820px) { .pair { grid-template-columns: 1fr; } }
@media print {
  @page { margin: 14mm; }
  body { font-size: 11pt; }
  table { font-size: 9pt; }
  th, td { padding: 3px 6px; }
  main { max-width: none; padding: 0; }
  th { background: none; }
  h2 { break-after: avoid; page-break-after: avoid; }
  table, tr, .card, figure.chart { break-inside: avoid; page-break-inside: avoid; }
  .pair { display: block; }
  .cards { grid-template-columns: 1fr 1fr; gap: 10px 16px; }
  .scroll { overflow: visible; }
}
"#;

/// A chart in its figure frame, with a plain-words caption above it.
pub(crate) fn figure(name: &str, caption: &str, body: &str) -> String {
    format!(
        "<figure class=\"chart\" data-chart=\"{}\">\n<figcaption>{}</figcaption>\n{}</figure>\n",
        esc(name),
        esc(caption),
        body
    )
}

/// The segments' colours and names, for charts that colour by segment.
pub(crate) fn legend(page: &Page) -> String {
    let mut out = String::from("<ul class=\"legend\">");
    for s in &page.segments {
        let _ = write!(out, "<li>{}{}</li>", swatch(s.id), esc(&seg_label(s)));
    }
    out.push_str("</ul>\n");
    out
}

/// Title, job, reference time and a one-paragraph summary.
pub(crate) fn header(page: &Page) -> String {
    format!(
        "<header>\n<h1>{}</h1>\n<p class=\"meta\">Job {} · recency measured from {}</p>\n<p class=\"summary\">{}</p>\n</header>\n",
        esc(&page.title),
        esc(&page.job_id),
        esc(&page.reference_time),
        esc(&summary(page))
    )
}

/// The plain-words summary of the segmentation.
fn summary(page: &Page) -> String {
    let total: u64 = page.segments.iter().map(|s| s.size).sum();
    let k = page.segments.len();
    if k == 0 || total == 0 {
        return "No customers were segmented in this run.".to_owned();
    }
    let mut out = format!(
        "{} customers in {} segment{}",
        int(total),
        k,
        if k == 1 { "" } else { "s" }
    );
    if let Some(big) = page
        .segments
        .iter()
        .max_by(|a, b| a.size.cmp(&b.size).then(b.id.cmp(&a.id)))
    {
        let _ = write!(
            out,
            "; the largest is {} ({})",
            seg_label(big),
            pct(big.share)
        );
    }
    out.push('.');
    let best = page
        .segments
        .iter()
        .filter_map(|s| s.revenue_share.filter(|v| v.is_finite()).map(|v| (s, v)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((s, share)) = best {
        let _ = write!(
            out,
            " {} brings the most revenue: {} of it, from {} of customers.",
            seg_label(s),
            pct(share),
            pct(s.share)
        );
    }
    if let Some(kc) = &page.k_choice {
        let _ = write!(
            out,
            " The number of segments, {}, was chosen automatically.",
            kc.chosen
        );
    }
    out
}

fn rfm_cells(rfm: Option<&Rfm>) -> String {
    match rfm {
        Some(r) => format!(
            "<td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>",
            num(r.recency_days, 0),
            num(r.frequency, 1),
            money(r.monetary)
        ),
        None => {
            "<td class=\"n\">n/a</td><td class=\"n\">n/a</td><td class=\"n\">n/a</td>".to_owned()
        }
    }
}

fn segment_row(s: &SegmentView, with_rfm: bool, with_money: bool) -> String {
    let mut name = match s.name.as_deref() {
        Some(n) => esc(n),
        None => "<span class=\"note\">unnamed</span>".to_owned(),
    };
    if s.name.is_some() && s.name_share.is_finite() {
        let _ = write!(
            name,
            " <span class=\"share\">({} of its customers)</span>",
            pct(s.name_share)
        );
    }
    let mut row = format!(
        "<tr><td>{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>",
        swatch(s.id),
        s.id,
        name,
        int(s.size),
        pct(s.share)
    );
    if with_money {
        let revenue = s.revenue.map(money).unwrap_or_else(|| "n/a".to_owned());
        let share = s.revenue_share.map(pct).unwrap_or_else(|| "n/a".to_owned());
        let _ = write!(
            row,
            "<td class=\"n\">{revenue}</td><td class=\"n\">{share}</td>"
        );
    }
    if with_rfm {
        row.push_str(&rfm_cells(s.rfm.as_ref()));
    }
    row.push_str("</tr>\n");
    row
}

/// The segment table, with a last row for all customers when means are known.
pub(crate) fn segment_table(page: &Page) -> String {
    let with_money = page.segments.iter().any(|s| s.revenue.is_some());
    let with_rfm = page.population.is_some() || page.segments.iter().any(|s| s.rfm.is_some());
    let mut out = String::from(
        "<div class=\"scroll\"><table class=\"wide\">\n<thead><tr><th></th><th class=\"n\">Id</th><th>Name</th><th class=\"n\">Customers</th><th class=\"n\">Share</th>",
    );
    if with_money {
        out.push_str("<th class=\"n\">Revenue</th><th class=\"n\">Share of revenue</th>");
    }
    if with_rfm {
        out.push_str("<th class=\"n\">Days since last order</th><th class=\"n\">Orders</th><th class=\"n\">Spend per customer</th>");
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for s in &page.segments {
        out.push_str(&segment_row(s, with_rfm, with_money));
    }
    let total: u64 = page.segments.iter().map(|s| s.size).sum();
    let _ = write!(
        out,
        "<tr><td></td><td></td><td><strong>All customers</strong></td><td class=\"n\"><strong>{}</strong></td><td class=\"n\">100%</td>",
        int(total)
    );
    if with_money {
        let sum: f64 = page.segments.iter().filter_map(|s| s.revenue).sum();
        let _ = write!(
            out,
            "<td class=\"n\">{}</td><td class=\"n\">100%</td>",
            money(sum)
        );
    }
    if with_rfm {
        out.push_str(&rfm_cells(page.population.as_ref()));
    }
    out.push_str("</tr>\n</tbody></table></div>\n");
    if with_rfm {
        out.push_str("<p class=\"note\">Days since last order, orders and spend are averages per customer.</p>\n");
    }
    out
}

/// One card per segment listing the items that characterise it.
pub(crate) fn top_items(page: &Page) -> String {
    let mut out = String::from("<div class=\"cards\">\n");
    for s in &page.segments {
        let _ = writeln!(
            out,
            "<div class=\"card\"><h3>{}{}</h3>",
            swatch(s.id),
            esc(&seg_label(s))
        );
        if s.top_items.is_empty() {
            out.push_str("<p class=\"note\">No items stand out for this segment.</p></div>\n");
            continue;
        }
        out.push_str("<table><thead><tr><th>Item</th><th>Id</th><th class=\"n\">Bought by</th><th class=\"n\">Lift</th></tr></thead><tbody>\n");
        for item in &s.top_items {
            let label = match item.label.as_deref() {
                Some(l) if !l.trim().is_empty() => esc(l),
                _ => "<span class=\"note\">(no label)</span>".to_owned(),
            };
            let lift = if item.lift.is_finite() {
                format!("{}×", num(item.lift, 1))
            } else {
                "n/a".to_owned()
            };
            let _ = writeln!(
                out,
                "<tr><td class=\"label\">{}</td><td class=\"id\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                label,
                esc(&item.id),
                pct(item.share),
                lift
            );
        }
        out.push_str("</tbody></table></div>\n");
    }
    out.push_str("</div>\n");
    out
}

/// A one-line explanation of a quality metric, found by its label.
fn explain(label: &str) -> &'static str {
    let l = label.to_lowercase();
    if l.contains("silhouette") {
        "From -1 to 1; higher means customers sit closer to their own segment than to the next one."
    } else if l.contains("davies") {
        "0 or more; lower means segments are tighter and further apart."
    } else if l.contains("calinski") {
        "0 or more; higher means segments are better separated relative to their spread."
    } else if l.contains("inertia") {
        "Total squared distance of customers to their segment's centre; lower is tighter."
    } else if l.contains("stability") {
        "From 0 to 1; how much the segments agree when the clustering is rerun on resampled data."
    } else {
        ""
    }
}

/// The quality metrics with their explanations.
pub(crate) fn quality(page: &Page) -> String {
    let mut out = String::from(
        "<table>\n<thead><tr><th>Measure</th><th class=\"n\">Value</th><th>What it means</th></tr></thead><tbody>\n",
    );
    for (label, value) in &page.quality {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            esc(label),
            esc(value),
            esc(explain(label))
        );
    }
    out.push_str("</tbody></table>\n");
    out
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map(|x| num(x, decimals))
        .unwrap_or_else(|| "n/a".to_owned())
}

/// Every candidate k with its metrics; the chosen one in bold.
pub(crate) fn k_table(kc: &KChoice) -> String {
    let mut out = String::from(
        "<table>\n<thead><tr><th class=\"n\">k</th><th class=\"n\">Inertia</th><th class=\"n\">Silhouette</th><th class=\"n\">Davies-Bouldin</th><th class=\"n\">Calinski-Harabasz</th><th class=\"n\">Stability</th><th></th></tr></thead><tbody>\n",
    );
    for r in &kc.rows {
        let chosen = r.k == kc.chosen;
        let _ = writeln!(
            out,
            "<tr{}><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            if chosen { " class=\"chosen\"" } else { "" },
            r.k,
            short(r.inertia),
            opt(r.silhouette, 3),
            opt(r.davies_bouldin, 3),
            opt(r.calinski_harabasz, 1),
            opt(r.stability, 3),
            if chosen { "chosen" } else { "" }
        );
    }
    out.push_str("</tbody></table>\n");
    out
}

/// Run facts, rows dropped by reason and time per phase.
pub(crate) fn run_tables(page: &Page) -> String {
    let mut out =
        String::from("<div class=\"cards\">\n<div class=\"card\"><h3>Run facts</h3><table>\n");
    for (label, value) in &page.facts {
        let _ = writeln!(
            out,
            "<tr><th>{}</th><td>{}</td></tr>",
            esc(label),
            esc(value)
        );
    }
    out.push_str("</table></div>\n<div class=\"card\"><h3>Rows dropped</h3>");
    if page.dropped.is_empty() {
        out.push_str("<p class=\"note\">No rows were dropped.</p>");
    } else {
        out.push_str(
            "<table>\n<thead><tr><th>Reason</th><th class=\"n\">Rows</th></tr></thead><tbody>\n",
        );
        for (reason, rows) in &page.dropped {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=\"n\">{}</td></tr>",
                esc(&humanise(reason)),
                int(*rows)
            );
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</div>\n<div class=\"card\"><h3>Time per phase</h3>");
    if page.seconds.is_empty() {
        out.push_str("<p class=\"note\">No timings were recorded.</p>");
    } else {
        out.push_str(
            "<table>\n<thead><tr><th>Phase</th><th class=\"n\">Time</th></tr></thead><tbody>\n",
        );
        for (phase, s) in &page.seconds {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=\"n\">{}</td></tr>",
                esc(&humanise(phase)),
                duration(*s)
            );
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</div>\n</div>\n");
    out
}

/// What the RFM scores mean: one row per metric, its ranges for scores 1 to 5.
pub fn score_table(page: &Page) -> String {
    let mut out = String::from(
        "<table class=\"scores\">\n<caption>What the scores mean: each score holds a fifth of the customers (customers exactly at a boundary are split between the two scores)</caption>\n<thead><tr><th>Metric</th>",
    );
    for score in 1..=5 {
        out.push_str(&format!("<th class=\"num\">Score {score}</th>"));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for row in &page.scores {
        out.push_str(&format!("<tr><td>{}</td>", esc(&row.metric)));
        for band in row.bands.iter().take(5) {
            out.push_str(&format!("<td class=\"num\">{}</td>", esc(band)));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
    out
}
