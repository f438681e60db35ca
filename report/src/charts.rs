//! Bar and line charts, drawn by plotters into SVG strings.
//!
//! Every chart is drawn on `SVGBackend::with_string`; text stays SVG `<text>` (the
//! page's style sheet sets its font). Values that are not finite are not drawn.

use crate::format::{clip, colour, esc, int, num, pct, seg_label, short};
use crate::model::{KChoice, Migration, Page};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// A drawing area on an SVG string.
pub(crate) type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Width of a chart that spans the page, and of one of a pair side by side.
pub(crate) const FULL: u32 = 1100;
pub(crate) const HALF: u32 = 540;

/// Text, secondary text, grid lines and axes.
pub(crate) const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
pub(crate) const MUTED: RGBColor = RGBColor(0x5F, 0x5F, 0x5F);
const GRID: RGBColor = RGBColor(0xE4, 0xE4, 0xE4);
const AXIS: RGBColor = RGBColor(0x9A, 0x9A, 0x9A);

/// Colours of metric lines (not segments, so they are not from the segment palette).
const METRIC_A: RGBColor = RGBColor(0x2F, 0x4B, 0x7C);
const METRIC_B: RGBColor = RGBColor(0xB5, 0x3A, 0x1F);
const METRIC_C: RGBColor = RGBColor(0x55, 0x55, 0x55);

/// A chart that could not be drawn, with the drawing library's message.
#[derive(Debug)]
pub(crate) struct DrawErr(pub String);

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for DrawErr {
    fn from(e: DrawingAreaErrorKind<E>) -> Self {
        DrawErr(e.to_string())
    }
}

/// Draws one SVG of `w` x `h` pixels with `draw` and returns its text, labelled for
/// screen readers with `label`.
pub(crate) fn svg<F>(w: u32, h: u32, label: &str, draw: F) -> Result<String, DrawErr>
where
    F: FnOnce(&Area<'_>) -> Result<(), DrawErr>,
{
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (w, h)).into_drawing_area();
        draw(&root)?;
        root.present()?;
    }
    let attrs = format!("<svg role=\"img\" aria-label=\"{}\" ", esc(label));
    Ok(buf.replacen("<svg ", &attrs, 1))
}

/// A text style of `px` CSS pixels (plotters writes font-size as size / 1.24).
pub(crate) fn font(px: f64) -> TextStyle<'static> {
    ("sans-serif", px * 1.24).into_font().into()
}

/// A text style of `px` pixels in `c`, anchored at (`h`, `v`).
pub(crate) fn text(px: f64, c: &RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    TextStyle {
        font: ("sans-serif", px * 1.24).into_font(),
        color: c.to_backend_color(),
        pos: Pos::new(h, v),
    }
}

/// A bold text style of `px` pixels in `c`, anchored at (`h`, `v`).
pub(crate) fn bold(px: f64, c: &RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    let font = ("sans-serif", px * 1.24, FontStyle::Bold).into_font();
    TextStyle {
        font,
        color: c.to_backend_color(),
        pos: Pos::new(h, v),
    }
}

/// A finite, non-empty range around `lo..hi`, widened by `pad` of its span.
pub(crate) fn span(lo: f64, hi: f64, pad: f64) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() || lo > hi {
        return (0.0, 1.0);
    }
    let width = hi - lo;
    if width <= f64::EPSILON * hi.abs().max(1.0) {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - d, hi + d);
    }
    (lo - width * pad, hi + width * pad)
}

/// A tick label for whole-number axes: integers only, blank elsewhere.
fn whole_tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        String::new()
    }
}

/// One bar of a horizontal bar chart.
pub(crate) struct Bar {
    pub label: String,
    pub value: Option<f64>,
    pub colour: RGBColor,
    /// Text written after the end of the bar.
    pub note: String,
}

/// A horizontal bar chart, first bar at the top.
pub(crate) struct Bars<'a> {
    pub title: &'a str,
    pub bars: &'a [Bar],
    /// Room left of the axis for the bar labels (small: no labels).
    pub label_px: u32,
    /// A value to mark with a vertical line (e.g. 1 for an index).
    pub reference: Option<f64>,
    pub x_desc: &'a str,
    pub tick: &'a dyn Fn(f64) -> String,
    /// The axis runs to the largest value times this, leaving room for the notes.
    pub headroom: f64,
}

/// Pixel height of a bar chart of `n` bars.
pub(crate) fn bars_height(n: usize) -> u32 {
    90 + 32 * n.max(1) as u32
}

/// Draws a horizontal bar chart on `area`.
pub(crate) fn draw_bars(area: &Area<'_>, spec: &Bars<'_>) -> Result<(), DrawErr> {
    let n = spec.bars.len().max(1) as f64;
    let max = spec
        .bars
        .iter()
        .filter_map(|b| b.value)
        .filter(|v| v.is_finite())
        .fold(spec.reference.unwrap_or(0.0), f64::max);
    let x_max = if max > 0.0 { max * spec.headroom } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .margin_top(6)
        .margin_right(14)
        .caption(spec.title, bold(14.0, &INK, HPos::Center, VPos::Top))
        .x_label_area_size(if spec.x_desc.is_empty() { 26 } else { 46 })
        .y_label_area_size(spec.label_px.max(6))
        .build_cartesian_2d(0f64..x_max, 0f64..n)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_labels(5)
        .x_label_formatter(&|v| (spec.tick)(*v))
        .x_desc(spec.x_desc)
        .label_style(font(12.0).color(&MUTED))
        .axis_desc_style(font(12.0).color(&MUTED))
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .axis_style(AXIS)
        .draw()?;
    let plot = chart.plotting_area();
    let label_chars = (spec.label_px.saturating_sub(12) as f64 / 7.2) as usize;
    for (i, bar) in spec.bars.iter().enumerate() {
        let top = n - i as f64;
        let mid = top - 0.5;
        if spec.label_px > 30 {
            let label = clip(&bar.label, label_chars);
            let style = text(13.0, &INK, HPos::Right, VPos::Center);
            plot.draw(&(EmptyElement::at((0.0, mid)) + Text::new(label, (-8, 0), style)))?;
        }
        let value = bar.value.filter(|v| v.is_finite() && *v >= 0.0);
        if let Some(v) = value {
            let end = v.min(x_max);
            plot.draw(&Rectangle::new(
                [(0.0, top - 0.82), (end, top - 0.18)],
                bar.colour.filled(),
            ))?;
        }
        if !bar.note.is_empty() {
            let at = value.unwrap_or(0.0).min(x_max);
            let style = text(12.0, &INK, HPos::Left, VPos::Center);
            plot.draw(&(EmptyElement::at((at, mid)) + Text::new(bar.note.clone(), (5, 0), style)))?;
        }
    }
    if let Some(r) = spec.reference.filter(|r| r.is_finite()) {
        plot.draw(&PathElement::new(
            vec![(r, 0.0), (r, n)],
            INK.stroke_width(1),
        ))?;
    }
    Ok(())
}

/// One line of a line chart.
pub(crate) struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
    pub colour: RGBColor,
}

/// A line chart over whole-number x values (iterations, rounds, k).
pub(crate) struct Lines<'a> {
    pub title: &'a str,
    pub series: &'a [Series<'a>],
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    /// An x value to mark with a vertical line, and its label.
    pub mark: Option<(f64, String)>,
    /// Whether to write the names of the lines under the chart.
    pub key: bool,
}

/// Draws a line chart on `area`; points that are not finite are left out.
pub(crate) fn draw_lines(area: &Area<'_>, spec: &Lines<'_>) -> Result<(), DrawErr> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let all: Vec<(f64, f64)> = spec
        .series
        .iter()
        .flat_map(|s| s.points.iter().filter(finite).copied())
        .collect();
    let (x_lo, x_hi) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (y_lo, y_hi) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    let (x_lo, x_hi) = if all.is_empty() {
        (0.0, 1.0)
    } else {
        (x_lo - 0.5, x_hi + 0.5)
    };
    let (y_lo, y_hi) = span(y_lo, y_hi, 0.08);
    let mut chart = ChartBuilder::on(area)
        .margin(10)
        .margin_right(20)
        .caption(spec.title, bold(14.0, &INK, HPos::Center, VPos::Top))
        .margin_bottom(if spec.key { 30 } else { 10 })
        .x_label_area_size(46)
        .y_label_area_size(64)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
    chart
        .configure_mesh()
        .x_labels(12)
        .y_labels(6)
        .x_label_formatter(&|v| whole_tick(*v))
        .y_label_formatter(&|v| short(*v))
        .x_desc(spec.x_desc)
        .y_desc(spec.y_desc)
        .label_style(font(12.0).color(&MUTED))
        .axis_desc_style(font(12.0).color(&MUTED))
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .axis_style(AXIS)
        .draw()?;
    if let Some((x, label)) = spec.mark.as_ref().filter(|m| m.0.is_finite()) {
        let line = PathElement::new(vec![(*x, y_lo), (*x, y_hi)], AXIS.stroke_width(2));
        chart.plotting_area().draw(&line)?;
        let style = text(12.0, &INK, HPos::Left, VPos::Top);
        let note = EmptyElement::at((*x, y_hi)) + Text::new(label.clone(), (6, 4), style);
        chart.plotting_area().draw(&note)?;
    }
    for s in spec.series {
        let pts: Vec<(f64, f64)> = s.points.iter().filter(finite).copied().collect();
        let c = s.colour;
        chart.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?;
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
    }
    if spec.key {
        draw_key(area, spec.series)?;
    }
    Ok(())
}

/// The names of the lines, in a row centred under the chart: a short stroke of
/// each line's colour followed by its name.
fn draw_key(area: &Area<'_>, series: &[Series<'_>]) -> Result<(), DrawErr> {
    let (w, h) = area.dim_in_pixel();
    let widths: Vec<i32> = series
        .iter()
        .map(|s| 34 + 7 * s.name.chars().count() as i32)
        .collect();
    let mut x = (w as i32 - widths.iter().sum::<i32>()) / 2;
    let y = h as i32 - 14;
    for (s, width) in series.iter().zip(widths) {
        let stroke = PathElement::new(vec![(0, 0), (20, 0)], s.colour.stroke_width(3));
        let name = Text::new(
            s.name.to_owned(),
            (26, 0),
            text(12.0, &INK, HPos::Left, VPos::Center),
        );
        area.draw(&(EmptyElement::at((x, y)) + stroke + name))?;
        x += width;
    }
    Ok(())
}

/// Customers per segment.
pub(crate) fn sizes(page: &Page) -> Result<String, DrawErr> {
    let bars: Vec<Bar> = page
        .segments
        .iter()
        .map(|s| Bar {
            label: seg_label(s),
            value: Some(s.size as f64),
            colour: colour(s.id),
            note: format!("{} ({})", int(s.size), pct(s.share)),
        })
        .collect();
    half_bars("Customers", "Customers per segment", &bars)
}

/// A half-width chart of one bar per segment, titled `title` (`alt` for the svg).
fn half_bars(title: &'static str, alt: &str, bars: &[Bar]) -> Result<String, DrawErr> {
    svg(HALF, bars_height(bars.len()), alt, |root| {
        let spec = Bars {
            title,
            bars,
            label_px: 182,
            reference: None,
            x_desc: "",
            tick: &short,
            headroom: 1.55,
        };
        draw_bars(root, &spec)
    })
}

/// Revenue per segment, with each segment's share of revenue.
pub(crate) fn revenue(page: &Page) -> Result<String, DrawErr> {
    let bars: Vec<Bar> = page
        .segments
        .iter()
        .map(|s| Bar {
            label: seg_label(s),
            value: s.revenue,
            colour: colour(s.id),
            note: match (s.revenue, s.revenue_share) {
                (Some(r), Some(sh)) => format!("{} ({})", short(r), pct(sh)),
                (Some(r), None) => short(r),
                _ => "n/a".to_owned(),
            },
        })
        .collect();
    half_bars("Revenue", "Revenue per segment", &bars)
}

/// Each segment's recency, frequency and monetary mean as a multiple of the mean
/// of all customers: three panels side by side sharing the segment rows.
pub(crate) fn profile(page: &Page, pop: &crate::model::Rfm) -> Result<String, DrawErr> {
    type Pick = fn(&crate::model::Rfm) -> f64;
    let metrics: [(&str, Pick, String); 3] = [
        (
            "Recency",
            |r| r.recency_days,
            format!("{} days", num(pop.recency_days, 0)),
        ),
        (
            "Frequency",
            |r| r.frequency,
            format!("{} orders", num(pop.frequency, 1)),
        ),
        ("Monetary", |r| r.monetary, num(pop.monetary, 2)),
    ];
    let label_px = 182u32;
    let side = 18u32;
    let panel = (FULL - label_px - 2 * side) / 3;
    let h = bars_height(page.segments.len()) + 10;
    svg(FULL, h, "Segment profiles against all customers", |root| {
        let (first, rest) = root.split_horizontally(label_px + panel);
        let (second, third) = rest.split_horizontally(side + panel);
        for (i, (area, (name, pick, mean))) in [first, second, third]
            .iter()
            .zip(metrics.iter())
            .enumerate()
        {
            let whole = pick(pop);
            let bars: Vec<Bar> = page
                .segments
                .iter()
                .map(|s| {
                    let value = s
                        .rfm
                        .as_ref()
                        .map(|r| pick(r) / whole)
                        .filter(|v| v.is_finite());
                    let note = value
                        .map(|v| format!("{}×", num(v, 2)))
                        .unwrap_or_else(|| "n/a".to_owned());
                    Bar {
                        label: seg_label(s),
                        value,
                        colour: colour(s.id),
                        note,
                    }
                })
                .collect();
            let title = format!("{name} (all customers: {mean})");
            let spec = Bars {
                title: &title,
                bars: &bars,
                label_px: if i == 0 { label_px } else { side },
                reference: Some(1.0),
                x_desc: "× the average of all customers",
                tick: &|v| format!("{}×", num(v, 1)),
                headroom: 1.3,
            };
            draw_bars(area, &spec)?;
        }
        Ok(())
    })
}

/// ALS loss per iteration and k-means inertia per round, side by side (inertia
/// alone when the job ran no ALS).
pub(crate) fn convergence(page: &Page) -> Result<String, DrawErr> {
    let numbered = |v: &[f64]| -> Vec<(f64, f64)> {
        v.iter()
            .enumerate()
            .map(|(i, y)| ((i + 1) as f64, *y))
            .collect()
    };
    let als = [Series {
        name: "ALS loss",
        points: numbered(&page.als_loss),
        colour: METRIC_A,
    }];
    let km = [Series {
        name: "inertia",
        points: numbered(&page.inertia),
        colour: METRIC_B,
    }];
    let als_spec = Lines {
        title: "Embedding (ALS) loss",
        series: &als,
        x_desc: "iteration",
        y_desc: "loss",
        mark: None,
        key: false,
    };
    let km_spec = Lines {
        title: "Clustering (k-means) inertia",
        series: &km,
        x_desc: "round",
        y_desc: "inertia",
        mark: None,
        key: false,
    };
    svg(FULL, 340, "Training convergence", |root| {
        match (page.als_loss.is_empty(), page.inertia.is_empty()) {
            (false, false) => {
                let (left, right) = root.split_horizontally(FULL / 2);
                draw_lines(&left, &als_spec)?;
                draw_lines(&right, &km_spec)
            }
            (false, true) => draw_lines(root, &als_spec),
            _ => draw_lines(root, &km_spec),
        }
    })
}

/// How far each segment's centre moved since the previous run.
pub(crate) fn drift(page: &Page, m: &Migration) -> Result<String, DrawErr> {
    let bars: Vec<Bar> = m
        .drift
        .iter()
        .map(|(id, d)| Bar {
            label: crate::format::id_label(page, *id),
            value: d.filter(|v| v.is_finite()),
            colour: colour(*id),
            note: match d {
                Some(v) => num(*v, 3),
                None => "new segment".to_owned(),
            },
        })
        .collect();
    let h = bars_height(bars.len()) + 10;
    svg(FULL, h, "Segment centre drift", |root| {
        let spec = Bars {
            title: "Distance each segment's centre moved",
            bars: &bars,
            label_px: 200,
            reference: None,
            x_desc: "distance in embedding space",
            tick: &|v| num(v, 2),
            headroom: 1.2,
        };
        draw_bars(root, &spec)
    })
}

/// Metrics per candidate k: inertia on the left; silhouette and stability on the
/// right when present. The chosen k is marked on both.
pub(crate) fn k_choice(kc: &KChoice) -> Result<String, DrawErr> {
    let pick = |f: fn(&crate::model::KRow) -> Option<f64>| -> Vec<(f64, f64)> {
        kc.rows
            .iter()
            .filter_map(|r| f(r).map(|v| (f64::from(r.k), v)))
            .collect()
    };
    let inertia = [Series {
        name: "inertia",
        points: pick(|r| Some(r.inertia)),
        colour: METRIC_C,
    }];
    let mut scores = Vec::new();
    for (name, points, c) in [
        ("silhouette", pick(|r| r.silhouette), METRIC_A),
        ("stability", pick(|r| r.stability), METRIC_B),
    ] {
        if points.iter().any(|p| p.1.is_finite()) {
            scores.push(Series {
                name,
                points,
                colour: c,
            });
        }
    }
    let mark = Some((f64::from(kc.chosen), format!("chosen: k = {}", kc.chosen)));
    let left = Lines {
        title: "Inertia by number of segments (lower = tighter)",
        series: &inertia,
        x_desc: "number of segments (k)",
        y_desc: "inertia",
        mark: mark.clone(),
        key: true,
    };
    let right = Lines {
        title: "Separation and stability by number of segments",
        series: &scores,
        x_desc: "number of segments (k)",
        y_desc: "score",
        mark,
        key: true,
    };
    svg(FULL, 340, "Choice of the number of segments", |root| {
        if scores.is_empty() {
            return draw_lines(root, &left);
        }
        let (a, b) = root.split_horizontally(FULL / 2);
        draw_lines(&a, &left)?;
        draw_lines(&b, &right)
    })
}
