//! Number and text formatting for people, HTML escaping, and the segment palette.

use crate::model::{Page, SegmentView};
use plotters::style::RGBColor;

/// Tableau 10: a qualitative palette whose colours stay apart on screen and paper.
/// Segment id `i` gets `PALETTE[i % 10]`, in every chart and table; ids 10..19
/// get a darker shade of the same hue and ids 20..29 a lighter one, so up to 30
/// segments keep distinct colours (beyond that the shades repeat).
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4E, 0x79, 0xA7),
    RGBColor(0xF2, 0x8E, 0x2B),
    RGBColor(0xE1, 0x57, 0x59),
    RGBColor(0x76, 0xB7, 0xB2),
    RGBColor(0x59, 0xA1, 0x4F),
    RGBColor(0xED, 0xC9, 0x48),
    RGBColor(0xB0, 0x7A, 0xA1),
    RGBColor(0xFF, 0x9D, 0xA7),
    RGBColor(0x9C, 0x75, 0x5F),
    RGBColor(0xBA, 0xB0, 0xAC),
];

/// The colour of a segment, by its id.
pub fn colour(id: u32) -> RGBColor {
    let base = PALETTE[id as usize % PALETTE.len()];
    match (id as usize / PALETTE.len()) % 3 {
        0 => base,
        1 => shade(base, 0.62),
        _ => tint(base, 0.55),
    }
}

/// Darkens a colour: `t` = 1 keeps it, 0 gives black.
fn shade(c: RGBColor, t: f64) -> RGBColor {
    let mix = |v: u8| (f64::from(v) * t).round() as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

/// The colour as a CSS hex value.
pub fn hex(c: RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

/// Mixes a colour with white: `t` = 1 keeps the colour, 0 gives white.
pub fn tint(c: RGBColor, t: f64) -> RGBColor {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let mix = |v: u8| (255.0 - (255.0 - f64::from(v)) * t).round() as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

/// Relative luminance of a colour (WCAG 2), 0 for black to 1 for white.
fn luminance(c: RGBColor) -> f64 {
    let lin = |v: u8| {
        let v = f64::from(v) / 255.0;
        if v <= 0.03928 {
            v / 12.92
        } else {
            ((v + 0.055) / 1.055).powf(2.4)
        }
    };
    0.2126 * lin(c.0) + 0.7152 * lin(c.1) + 0.0722 * lin(c.2)
}

/// Contrast ratio between two colours (WCAG 2), 1 to 21.
pub fn contrast(a: RGBColor, b: RGBColor) -> f64 {
    let (la, lb) = (luminance(a), luminance(b));
    (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
}

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

/// Groups the digits of a whole number by thousands: 1234567 -> "1,234,567".
fn group(digits: &str) -> String {
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A count with thousands separators.
pub fn int(n: u64) -> String {
    group(&n.to_string())
}

/// A number with `decimals` decimals and thousands separators; "n/a" when not finite.
pub fn num(x: f64, decimals: usize) -> String {
    if !x.is_finite() {
        return "n/a".to_owned();
    }
    let text = format!("{:.*}", decimals, x.abs());
    let (whole, frac) = match text.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (text.as_str(), None),
    };
    let negative = x < 0.0 && text.chars().any(|c| c.is_ascii_digit() && c != '0');
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    out.push_str(&group(whole));
    if let Some(f) = frac {
        out.push('.');
        out.push_str(f);
    }
    out
}

/// A share (0..1) as a percentage: one decimal under 10%, none above.
pub fn pct(share: f64) -> String {
    if !share.is_finite() {
        return "n/a".to_owned();
    }
    let p = share * 100.0;
    if p == 0.0 {
        "0%".to_owned()
    } else if p.abs() < 0.05 {
        "<0.1%".to_owned()
    } else if p.abs() < 9.95 {
        format!("{}%", num(p, 1))
    } else {
        format!("{}%", num(p, 0))
    }
}

/// An amount of money with two decimals.
pub fn money(x: f64) -> String {
    num(x, 2)
}

/// A short number for chart labels: 950, 12.3k, 4.56M, 1.2B.
pub fn short(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".to_owned();
    }
    let a = x.abs();
    let (v, suffix) = if a >= 1e9 {
        (x / 1e9, "B")
    } else if a >= 1e6 {
        (x / 1e6, "M")
    } else if a >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    let decimals = if suffix.is_empty() {
        if a == a.trunc() {
            0
        } else if a >= 10.0 {
            1
        } else {
            2
        }
    } else if v.abs() >= 100.0 {
        0
    } else if v.abs() >= 10.0 {
        1
    } else {
        2
    };
    let mut out = num(v, decimals);
    if out.contains('.') {
        out = out.trim_end_matches('0').trim_end_matches('.').to_owned();
    }
    out.push_str(suffix);
    out
}

/// A duration in seconds, for people: "0.42 s", "12.3 s", "2 min 05 s", "1 h 02 min".
pub fn duration(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "n/a".to_owned();
    }
    if s < 10.0 {
        format!("{s:.2} s")
    } else if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        let whole = s.round() as u64;
        format!("{} min {:02} s", whole / 60, whole % 60)
    } else {
        let minutes = (s / 60.0).round() as u64;
        format!("{} h {:02} min", minutes / 60, minutes % 60)
    }
}

/// Words written in capitals when they appear in a code.
const ACRONYMS: [&str; 9] = ["als", "rfm", "id", "pca", "gpu", "cpu", "io", "csv", "url"];

/// A snake_case code as words: "missing_user" -> "Missing user", "als" -> "ALS".
pub fn humanise(code: &str) -> String {
    let words: Vec<String> = code
        .split(['_', '-', ' '])
        .filter(|w| !w.is_empty())
        .map(|w| {
            if ACRONYMS.contains(&w.to_lowercase().as_str()) {
                w.to_uppercase()
            } else {
                w.to_owned()
            }
        })
        .collect();
    let words = words.join(" ");
    let mut chars = words.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A segment's label: "3 · Champions", or "Segment 3" when it has no name.
pub fn seg_label(s: &SegmentView) -> String {
    match s.name.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => format!("{} · {name}", s.id),
        _ => format!("Segment {}", s.id),
    }
}

/// The label of a segment id of this run, looked up on the page.
pub fn id_label(page: &Page, id: u32) -> String {
    page.segments
        .iter()
        .find(|s| s.id == id)
        .map(seg_label)
        .unwrap_or_else(|| format!("Segment {id}"))
}

/// Cuts a label to at most `max` characters, ending it with "…" when cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let keep = max.saturating_sub(1);
    let mut out: String = s.chars().take(keep).collect();
    out.push('…');
    out
}

/// A coloured square standing for a segment, for HTML tables and legends.
pub fn swatch(id: u32) -> String {
    format!(
        "<span class=\"sw\" style=\"background:{}\" aria-hidden=\"true\"></span>",
        hex(colour(id))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_like_people_write_them() {
        assert_eq!(int(0), "0");
        assert_eq!(int(4338), "4,338");
        assert_eq!(int(1_234_567), "1,234,567");
        assert_eq!(num(-1234.5, 2), "-1,234.50");
        assert_eq!(num(-0.001, 2), "0.00");
        assert_eq!(num(f64::NAN, 2), "n/a");
        assert_eq!(pct(0.31), "31%");
        assert_eq!(pct(0.045), "4.5%");
        assert_eq!(pct(0.0), "0%");
        assert_eq!(pct(0.0001), "<0.1%");
        assert_eq!(short(12_345.0), "12.3k");
        assert_eq!(short(4_560_000.0), "4.56M");
        assert_eq!(short(950.0), "950");
        assert_eq!(short(1500.0), "1.5k");
        assert_eq!(short(2000.0), "2k");
        assert_eq!(humanise("als"), "ALS");
        assert_eq!(humanise("missing_user_id"), "Missing user ID");
        assert_eq!(duration(125.0), "2 min 05 s");
        assert_eq!(humanise("missing_user"), "Missing user");
        assert_eq!(esc("<&\">"), "&lt;&amp;&quot;&gt;");
        assert_eq!(clip("Cannot Lose Them", 8), "Cannot …");
    }
}
