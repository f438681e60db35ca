//! report.html: one self-contained page (inline CSS and SVG charts, no script, no
//! network) drawn from a job's figures.
//!
//! The caller fills a [`Page`] (the view model, see [`model`]) and calls [`render`],
//! which returns the whole HTML5 document as a string. Charts are drawn by plotters'
//! SVG backend and embedded inline; every chart sits in
//! `<figure class="chart" data-chart="NAME">` with a plain-words caption. Sections
//! whose data is absent (`None`, empty) are left out.
//!
//! Errors: [`render`] never fails: a chart that cannot be drawn is replaced by a
//! one-line note, and the rest of the page is kept. [`try_render`] is the strict
//! form that returns the first drawing error as a [`ReportError`] instead.

mod charts;
mod format;
mod grids;
mod html;
pub mod model;

pub use model::{
    GridCell, ItemView, KChoice, KRow, MapView, Migration, Page, Rfm, ScoreRow, SegmentView,
};

/// A count with thousands separators (1234567 -> "1,234,567"), as the page and
/// the CLI write counts.
pub use format::int;

use charts::DrawErr;
use format::esc;

/// A report that could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The drawing library failed to draw a chart.
    #[error("could not draw the {chart} chart: {message}")]
    Chart {
        chart: &'static str,
        message: String,
    },
}

/// The whole report page as an HTML5 document. Never fails: a chart that cannot
/// be drawn becomes a short note in its place.
pub fn render(page: &Page) -> String {
    match assemble(page, false) {
        Ok(html) => html,
        // Unreachable in lenient mode; kept so the function has no panic path.
        Err(e) => format!(
            "<!DOCTYPE html><html lang=\"en\"><meta charset=\"utf-8\"><title>Report</title><p>{}</p></html>\n",
            esc(&e.to_string())
        ),
    }
}

/// The whole report page, failing on the first chart that cannot be drawn.
pub fn try_render(page: &Page) -> Result<String, ReportError> {
    assemble(page, true)
}

/// The page being written, and whether a drawing error stops it.
struct Doc {
    html: String,
    strict: bool,
}

impl Doc {
    fn push(&mut self, s: &str) {
        self.html.push_str(s);
    }

    /// Adds a chart in its figure, followed by `after` (e.g. a legend) inside it.
    fn chart(
        &mut self,
        name: &'static str,
        caption: &str,
        drawn: Result<String, DrawErr>,
        after: &str,
    ) -> Result<(), ReportError> {
        match drawn {
            Ok(svg) => {
                let body = format!("{svg}{after}");
                self.html.push_str(&html::figure(name, caption, &body));
            }
            Err(e) if self.strict => {
                return Err(ReportError::Chart {
                    chart: name,
                    message: e.0,
                });
            }
            Err(e) => {
                let note = format!("The {name} chart could not be drawn: {}", e.0);
                self.html
                    .push_str(&format!("<p class=\"note\">{}</p>\n", esc(&note)));
            }
        }
        Ok(())
    }
}

fn assemble(page: &Page, strict: bool) -> Result<String, ReportError> {
    let mut doc = Doc {
        html: String::with_capacity(256 * 1024),
        strict,
    };
    doc.push("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    doc.push("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    doc.push(&format!(
        "<title>{} · customer segments</title>\n",
        esc(&page.title)
    ));
    doc.push(&format!(
        "<style>{}</style>\n</head>\n<body>\n<main>\n",
        html::STYLE
    ));
    doc.push(&html::header(page));
    segments_section(&mut doc, page)?;
    behaviour_section(&mut doc, page)?;
    map_section(&mut doc, page)?;
    if !page.als_loss.is_empty() || !page.inertia.is_empty() {
        doc.push("<section id=\"convergence\">\n<h2>How the model settled</h2>\n");
        let caption = "Training progress: each line should fall and flatten out. Left: how well the customer embeddings (ALS) fit the purchases, per iteration. Right: how tight the segments are (k-means inertia), per round.";
        let caption = if page.als_loss.is_empty() {
            "Training progress: how tight the segments are (k-means inertia) after each round; the line should fall and flatten out."
        } else {
            caption
        };
        doc.chart("convergence", caption, charts::convergence(page), "")?;
        doc.push("</section>\n");
    }
    if page.segments.iter().any(|s| !s.top_items.is_empty()) {
        doc.push("<section id=\"items\">\n<h2>What each segment buys</h2>\n");
        doc.push("<p>The items that set each segment apart. “Bought by” is the share of the segment's customers who bought the item; a lift of 3× means they buy it three times as often as customers overall.</p>\n");
        doc.push(&html::top_items(page));
        doc.push("</section>\n");
    }
    if !page.quality.is_empty() {
        doc.push("<section id=\"quality\">\n<h2>How well the segments are separated</h2>\n");
        doc.push(&html::quality(page));
        doc.push("</section>\n");
    }
    migration_section(&mut doc, page)?;
    k_section(&mut doc, page)?;
    doc.push("<section id=\"run\">\n<h2>Run details</h2>\n");
    doc.push(&html::run_tables(page));
    doc.push("</section>\n");
    doc.push(&format!(
        "<footer>Report of job {} · produced by shoal.</footer>\n</main>\n</body>\n</html>\n",
        esc(&page.job_id)
    ));
    Ok(doc.html)
}

/// The segment table and the customers and revenue bars.
fn segments_section(doc: &mut Doc, page: &Page) -> Result<(), ReportError> {
    doc.push("<section id=\"segments\">\n<h2>Segments</h2>\n");
    doc.push(&html::segment_table(page));
    if page.segments.is_empty() {
        doc.push("</section>\n");
        return Ok(());
    }
    doc.push("<div class=\"pair\">\n");
    let caption = "How many customers each segment holds, and their share of all customers.";
    doc.chart("sizes", caption, charts::sizes(page), "")?;
    if page
        .segments
        .iter()
        .any(|s| s.revenue.is_some_and(f64::is_finite))
    {
        let caption = "How much revenue each segment brought in, and its share of all revenue.";
        doc.chart("revenue", caption, charts::revenue(page), "")?;
    }
    doc.push("</div>\n</section>\n");
    Ok(())
}

/// The profile bars and the recency x frequency grid.
fn behaviour_section(doc: &mut Doc, page: &Page) -> Result<(), ReportError> {
    let grid = page
        .grid
        .as_ref()
        .filter(|g| !g.is_empty() && !page.segments.is_empty());
    let profile = page
        .population
        .as_ref()
        .filter(|_| !page.segments.is_empty());
    if grid.is_none() && profile.is_none() {
        return Ok(());
    }
    doc.push("<section id=\"behaviour\">\n<h2>How the segments behave</h2>\n");
    if let Some(pop) = profile {
        let caption = "Each segment's average compared with the average of all customers (the line at 1×): 2× is twice the average. Recency counts days since the last order, so for recency a shorter bar means more recent buyers.";
        doc.chart("profile", caption, charts::profile(page, pop), "")?;
    }
    if let Some(cells) = grid {
        let caption = "Customers by recency score (rows, most recent at the top) and frequency score (columns, most orders on the right). Each cell is coloured by the segment that holds most of its customers, paler when the cell holds fewer customers.";
        let legend = html::legend(page);
        doc.chart("rf-grid", caption, grids::rf_grid(page, cells), &legend)?;
    }
    if !page.scores.is_empty() {
        doc.push(&html::score_table(page));
    }
    doc.push("</section>\n");
    Ok(())
}

/// The map of a sample of customers.
fn map_section(doc: &mut Doc, page: &Page) -> Result<(), ReportError> {
    let Some(m) = page
        .map
        .as_ref()
        .filter(|m| !m.points.is_empty() && !page.segments.is_empty())
    else {
        return Ok(());
    };
    doc.push("<section id=\"map\">\n<h2>Map of customers</h2>\n");
    let caption = format!(
        "A fixed random sample of {} of the {} customers, one dot each, placed so that customers who buy alike sit close together (the two main directions of their purchase patterns). Colours are segments.",
        int(m.points.len() as u64),
        int(m.sampled_from)
    );
    let legend = html::legend(page);
    doc.chart("map", &caption, grids::map(page, m), &legend)?;
    doc.push("</section>\n");
    Ok(())
}

/// Customer movement and centre drift since the previous run.
fn migration_section(doc: &mut Doc, page: &Page) -> Result<(), ReportError> {
    let Some(m) = &page.migration else {
        return Ok(());
    };
    doc.push("<section id=\"migration\">\n<h2>Changes since the previous run</h2>\n");
    doc.push(&format!(
        "<p>Compared with the previous run at {}.</p>\n",
        esc(&m.previous)
    ));
    if !m.from.is_empty() && !m.to.is_empty() {
        let caption = "Where the customers of each previous segment (rows) are now (columns): the count of customers, and in brackets the share of the previous segment. Darker cells hold a larger share. Customers new in this run, or gone from it, are not counted.";
        doc.chart("migration", caption, grids::migration(page, m), "")?;
    }
    if !m.drift.is_empty() {
        let caption = "How far each segment's centre moved since the previous run; a long bar means the segment's customers now behave differently. Segments with no counterpart in the previous run are marked new.";
        doc.chart("drift", caption, charts::drift(page, m), "")?;
    }
    doc.push("</section>\n");
    Ok(())
}

/// The metrics per candidate number of segments.
fn k_section(doc: &mut Doc, page: &Page) -> Result<(), ReportError> {
    let Some(kc) = &page.k_choice else {
        return Ok(());
    };
    doc.push("<section id=\"k-choice\">\n<h2>How many segments</h2>\n");
    doc.push(&format!(
        "<p>{} segments were chosen. Rule: {}</p>\n",
        kc.chosen,
        esc(&kc.rule)
    ));
    if !kc.rows.is_empty() {
        let caption = "The candidate numbers of segments that were tried. Inertia always falls as segments are added; the choice looks for well-separated (silhouette, higher is better) and stable (higher is better) segments.";
        doc.chart("k-choice", caption, charts::k_choice(kc), "")?;
        doc.push(&html::k_table(kc));
    }
    doc.push("</section>\n");
    Ok(())
}

#[cfg(test)]
mod tests;
