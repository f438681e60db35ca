//! Charts made of cells and points: the recency x frequency grid, the migration
//! matrix and the customer map. Drawn with plotters rectangles, circles and text.

use crate::charts::{DrawErr, FULL, INK, MUTED, bold, span, svg, text};
use crate::format::{clip, colour, int, pct, tint};
use crate::model::{GridCell, MapView, Migration, Page};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

/// The colour of the migration matrix cells at 100%.
const FLOW: RGBColor = RGBColor(0x2F, 0x5D, 0x8A);
/// A cell with no customers.
const EMPTY: RGBColor = RGBColor(0xF4, 0xF4, 0xF4);

/// The text colour, dark or white, that contrasts most with `fill`.
fn ink_on(fill: RGBColor) -> RGBColor {
    if crate::format::contrast(fill, INK) >= crate::format::contrast(fill, WHITE) {
        INK
    } else {
        WHITE
    }
}

/// What a grid cell shows: its total and the segment holding most of its customers.
struct CellSummary {
    total: u64,
    /// Index into `Page::segments` and that segment's share of the cell.
    dominant: Option<(usize, f64)>,
}

fn summarise(page: &Page, cell: &GridCell) -> CellSummary {
    let counts = &cell.counts[..cell.counts.len().min(page.segments.len())];
    let total: u64 = counts.iter().sum();
    let dominant = counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, c)| (i, *c as f64 / total as f64));
    CellSummary { total, dominant }
}

/// The 5 x 5 grid of recency score (rows, 5 at the top) by frequency score
/// (columns). Each cell is coloured by the segment holding most of its customers,
/// paler when the cell holds fewer customers.
pub(crate) fn rf_grid(page: &Page, cells: &[GridCell]) -> Result<String, DrawErr> {
    let max = cells
        .iter()
        .map(|c| summarise(page, c).total)
        .max()
        .unwrap_or(0)
        .max(1);
    svg(FULL, 600, "Recency by frequency score grid", |root| {
        let mut chart = ChartBuilder::on(root)
            .margin_left(96)
            .margin_bottom(62)
            .margin_top(8)
            .margin_right(8)
            .build_cartesian_2d(0f64..5.0, 0f64..5.0)?;
        let plot = chart.plotting_area();
        for cell in cells
            .iter()
            .filter(|c| (1..=5).contains(&c.r) && (1..=5).contains(&c.f))
        {
            draw_cell(plot, page, cell, max)?;
        }
        for i in 1..=5u8 {
            let mid = f64::from(i) - 0.5;
            let top = text(13.0, &INK, HPos::Center, VPos::Top);
            plot.draw(
                &(EmptyElement::at((mid, 0.0)) + Text::new(format!("F = {i}"), (0, 8), top)),
            )?;
            let left = text(13.0, &INK, HPos::Right, VPos::Center);
            plot.draw(
                &(EmptyElement::at((0.0, mid)) + Text::new(format!("R = {i}"), (-10, 0), left)),
            )?;
        }
        let desc = text(13.0, &MUTED, HPos::Center, VPos::Top);
        let x_desc = "Frequency score F: 1 = fewest orders … 5 = most orders";
        plot.draw(&(EmptyElement::at((2.5, 0.0)) + Text::new(x_desc, (0, 34), desc.clone())))?;
        let y_desc = "Recency score R: 1 = longest ago … 5 = most recent";
        let rotated = desc.transform(FontTransform::Rotate270);
        plot.draw(&(EmptyElement::at((0.0, 2.5)) + Text::new(y_desc, (-86, 0), rotated)))?;
        chart
            .configure_mesh()
            .disable_mesh()
            .disable_axes()
            .draw()?;
        Ok(())
    })
}

/// One cell of the grid: a filled rectangle, its name, its count and its main segment.
fn draw_cell(
    plot: &DrawingArea<
        SVGBackend<'_>,
        plotters::coord::cartesian::Cartesian2d<
            plotters::coord::types::RangedCoordf64,
            plotters::coord::types::RangedCoordf64,
        >,
    >,
    page: &Page,
    cell: &GridCell,
    max: u64,
) -> Result<(), DrawErr> {
    let sum = summarise(page, cell);
    let (x, y) = (f64::from(cell.f) - 1.0, f64::from(cell.r) - 1.0);
    let fill = match sum.dominant {
        Some((i, _)) => {
            let weight = (sum.total as f64 / max as f64).sqrt();
            tint(colour(page.segments[i].id), 0.22 + 0.78 * weight)
        }
        None => EMPTY,
    };
    plot.draw(&Rectangle::new([(x, y), (x + 1.0, y + 1.0)], fill.filled()))?;
    plot.draw(&Rectangle::new(
        [(x, y), (x + 1.0, y + 1.0)],
        WHITE.stroke_width(3),
    ))?;
    let ink = ink_on(fill);
    let centre = EmptyElement::at((x + 0.5, y + 0.5));
    let name = clip(&cell.name, 24);
    let customers = format!("{} customers", int(sum.total));
    let main = match sum.dominant {
        Some((i, share)) => {
            let seg = &page.segments[i];
            let who = match seg.name.as_deref().map(str::trim) {
                Some(n) if !n.is_empty() => n.to_owned(),
                _ => format!("segment {}", seg.id),
            };
            format!("mostly {} ({})", clip(&who, 16), pct(share))
        }
        None => String::new(),
    };
    let mid = |px| text(px, &ink, HPos::Center, VPos::Center);
    let label = centre
        + Text::new(name, (0, -20), bold(13.0, &ink, HPos::Center, VPos::Center))
        + Text::new(customers, (0, 0), mid(13.0))
        + Text::new(main, (0, 19), mid(11.5));
    plot.draw(&label)?;
    Ok(())
}

/// Customers moving from the previous run's segments (rows) to this run's
/// (columns). Cells are shaded by the share of the row's customers.
pub(crate) fn migration(page: &Page, m: &Migration) -> Result<String, DrawErr> {
    let (rows, cols) = (m.from.len(), m.to.len());
    let h = 110 + 46 * rows as u32;
    svg(FULL, h, "Customer migration between runs", |root| {
        let mut chart = ChartBuilder::on(root)
            .margin_left(180)
            .margin_bottom(70)
            .margin_top(8)
            .margin_right(10)
            .build_cartesian_2d(0f64..cols as f64, 0f64..rows as f64)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .disable_axes()
            .draw()?;
        let plot = chart.plotting_area();
        let col_px = (FULL - 190) as f64 / cols as f64;
        for (i, from) in m.from.iter().enumerate() {
            let row = m.counts.get(i);
            let total: u64 = row.map(|r| r.iter().take(cols).sum()).unwrap_or(0);
            let y = (rows - 1 - i) as f64;
            for j in 0..cols {
                let count = row.and_then(|r| r.get(j)).copied().unwrap_or(0);
                let share = if total > 0 {
                    count as f64 / total as f64
                } else {
                    0.0
                };
                let fill = if count == 0 {
                    EMPTY
                } else {
                    tint(FLOW, 0.08 + 0.92 * share)
                };
                let (x, cell) = (j as f64, [(j as f64, y), (j as f64 + 1.0, y + 1.0)]);
                plot.draw(&Rectangle::new(cell, fill.filled()))?;
                plot.draw(&Rectangle::new(cell, WHITE.stroke_width(2)))?;
                let ink = ink_on(fill);
                let words = if col_px > 110.0 && count > 0 {
                    format!("{} ({})", int(count), pct(share))
                } else {
                    int(count)
                };
                let style = text(12.5, &ink, HPos::Center, VPos::Center);
                plot.draw(&Text::new(words, (x + 0.5, y + 0.5), style))?;
            }
            let style = text(13.0, &INK, HPos::Right, VPos::Center);
            let label = format!("was {from} · {} customers", int(total));
            plot.draw(&(EmptyElement::at((0.0, y + 0.5)) + Text::new(label, (-10, 0), style)))?;
        }
        let chars = ((col_px - 10.0) / 7.2).max(3.0) as usize;
        for (j, to) in m.to.iter().enumerate() {
            let at = EmptyElement::at((j as f64 + 0.5, 0.0));
            let swatch = Rectangle::new([(-16, 8), (16, 13)], colour(*to).filled());
            let style = text(13.0, &INK, HPos::Center, VPos::Top);
            let now = Text::new(format!("now {to}"), (0, 20), style.clone());
            let name = page
                .segments
                .iter()
                .find(|s| s.id == *to)
                .and_then(|s| s.name.clone());
            let name = Text::new(clip(name.as_deref().unwrap_or(""), chars), (0, 38), style);
            plot.draw(&(at + swatch + now + name))?;
        }
        Ok(())
    })
}

/// A sample of customers projected on two principal components, one dot per
/// customer coloured by segment.
pub(crate) fn map(page: &Page, m: &MapView) -> Result<String, DrawErr> {
    let n = page.segments.len();
    let pts: Vec<(f64, f64, u32)> = m
        .points
        .iter()
        .filter(|p| p.0.is_finite() && p.1.is_finite() && (p.2 as usize) < n)
        .map(|p| {
            (
                f64::from(p.0),
                f64::from(p.1),
                page.segments[p.2 as usize].id,
            )
        })
        .collect();
    let fold = |f: fn(&(f64, f64, u32)) -> f64| {
        pts.iter()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            })
    };
    let (x_lo, x_hi) = fold(|p| p.0);
    let (y_lo, y_hi) = fold(|p| p.1);
    let (x_lo, x_hi) = span(x_lo, x_hi, 0.04);
    let (y_lo, y_hi) = span(y_lo, y_hi, 0.04);
    let axis = |i: usize| {
        let e = m.explained[i];
        if e.is_finite() {
            format!("PC{} ({} of variance)", i + 1, pct(e))
        } else {
            format!("PC{}", i + 1)
        }
    };
    let (x_desc, y_desc) = (axis(0), axis(1));
    svg(FULL, 620, "Map of customers", |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .x_label_area_size(46)
            .y_label_area_size(60)
            .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
        chart
            .configure_mesh()
            .x_desc(x_desc.as_str())
            .y_desc(y_desc.as_str())
            .label_style(crate::charts::font(12.0).color(&MUTED))
            .axis_desc_style(crate::charts::font(13.0).color(&MUTED))
            .bold_line_style(RGBColor(0xEC, 0xEC, 0xEC))
            .light_line_style(TRANSPARENT)
            .axis_style(RGBColor(0x9A, 0x9A, 0x9A))
            .draw()?;
        let dots = pts
            .iter()
            .map(|&(x, y, id)| Circle::new((x, y), 3, colour(id).mix(0.8).filled()));
        chart.draw_series(dots)?;
        Ok(())
    })
}
