//! Cleaning: every row of a split is kept or dropped under exactly one reason,
//! checked in a fixed order ([`DropReason`]); kept rows go to a [`RowSink`].

use std::sync::atomic::Ordering;

use arrow::array::Array;

use shoal_proto::pb;
use shoal_spec::SpecError;
use shoal_spec::spec::{InputSpec, JobSpec, OnBadRows};

use super::columns::{Num, Plan, Prepared, Role, Times, describe_text};
use super::time::TimeParser;
use super::{DropReason, IngestControl};
use crate::error::WorkerError;
use crate::staging::{KeptRow, RowSink};

/// Writes the integer `s` stands for into `out` (`17850.0` -> `17850`, `-007` ->
/// `-7`); false when `s` is not an integer (`17850.5`, `1e3`, `12a`).
pub fn canonical_integer(s: &str, out: &mut String) -> bool {
    let s = s.trim();
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b == b'0')
    {
        return false;
    }
    let int = int.trim_start_matches('0');
    out.clear();
    if int.is_empty() {
        out.push('0');
    } else {
        if negative {
            out.push('-');
        }
        out.push_str(int);
    }
    true
}

// ---------------------------------------------------------------------------
// Cleaning

/// The largest quantity, price or amount (in absolute value) a row may hold: far
/// above any real order, and far enough below a float's range that a customer's
/// sums and the ALS confidences stay finite (a quantity of 1e308 made them
/// infinite, and the job failed in ALS without naming the row).
pub const MAX_VALUE: f64 = 1e15;

/// How far past this worker's clock an event time may be (ms): clocks differ a
/// little; an event dated later (year 9999) is a bad time, not every customer's
/// recency moved by millennia.
const FUTURE_SLACK_MS: i64 = 24 * 3600 * 1000;

/// `ms` as people read it (RFC 3339, UTC).
fn utc_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| format!("{ms} ms"), |t| t.to_rfc3339())
}

/// Counts a malformed record as read and dropped (`count`: its reason's
/// counter); under `on_bad_rows = "fail"` (`fail`) it is the split's error,
/// naming the file, data row, reason and what is wrong.
pub(crate) fn count_malformed(
    control: &IngestControl,
    read: &mut u64,
    count: &mut u64,
    fail: bool,
    (file, row, reason, detail): (&str, u64, &'static str, String),
) -> Result<(), WorkerError> {
    control.check()?;
    control.rows_read.fetch_add(1, Ordering::Relaxed);
    *read += 1;
    *count += 1;
    if fail {
        return Err(WorkerError::BadRow {
            file: file.to_string(),
            row,
            reason,
            detail,
        });
    }
    Ok(())
}

/// What cleaning counted in one split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Counts {
    pub read: u64,
    pub kept: u64,
    pub min_time_ms: i64,
    pub max_time_ms: i64,
    dropped: [u64; DropReason::ALL.len()],
    /// The user column holds numbers (Parquet): its ids read as integers.
    pub numeric_user_ids: bool,
    /// Text ids that are integers written with a fraction (`17850.0`), counted
    /// while `input.user_as_integer` is false; the first of them.
    pub fractional_integer_ids: u64,
    pub fractional_integer_example: String,
}

impl Counts {
    /// The rows dropped per reason, in the order of the checks.
    pub fn dropped(&self) -> [(&'static str, u64); DropReason::ALL.len()] {
        DropReason::ALL.map(|r| (r.as_str(), self.dropped[r as usize]))
    }
}

/// Cleans batches of one split and hands the kept rows to its sink.
pub(crate) struct Cleaner<'a, S> {
    spec: &'a JobSpec,
    file: &'a str,
    /// For the event weights.
    input: &'a InputSpec,
    fail_on_bad: bool,
    user_as_integer: bool,
    drop_order_prefixes: &'a [String],
    min_quantity: Option<f64>,
    min_price: Option<f64>,
    time: TimeParser,
    /// Event times after this (ms) are bad: see [`FUTURE_SLACK_MS`].
    latest_ms: i64,
    counts: [u64; DropReason::ALL.len()],
    read: u64,
    kept: u64,
    min_time_ms: i64,
    max_time_ms: i64,
    sink: S,
    user_buf: String,
    /// See [`Counts`].
    pub(crate) numeric_user_ids: bool,
    fractional_integer_ids: u64,
    fractional_integer_example: String,
    pub(crate) control: &'a IngestControl,
}

impl<'a, S: RowSink> Cleaner<'a, S> {
    pub(crate) fn new(
        spec: &'a JobSpec,
        split: &'a pb::Split,
        control: &'a IngestControl,
        sink: S,
    ) -> Result<Cleaner<'a, S>, WorkerError> {
        let input = &spec.input;
        if input.columns.time().is_none() {
            return Err(SpecError::Invalid {
                field: "input.columns.time",
                message: "is required: every staged row has an event time".to_string(),
            }
            .into());
        }
        Ok(Cleaner {
            spec,
            file: &split.object,
            input,
            fail_on_bad: input.clean.on_bad_rows == OnBadRows::Fail,
            user_as_integer: input.user_as_integer,
            drop_order_prefixes: &input.clean.drop_order_prefixes,
            min_quantity: input.clean.min_quantity,
            min_price: input.clean.min_price,
            time: TimeParser::new(input.time_format.as_deref())?,
            latest_ms: chrono::Utc::now().timestamp_millis() + FUTURE_SLACK_MS,
            counts: [0; DropReason::ALL.len()],
            read: 0,
            kept: 0,
            min_time_ms: i64::MAX,
            max_time_ms: i64::MIN,
            sink,
            user_buf: String::new(),
            numeric_user_ids: false,
            fractional_integer_ids: 0,
            fractional_integer_example: String::new(),
            control,
        })
    }

    /// The split's counts, and the sink with every kept row.
    pub(crate) fn finish(self) -> (Counts, S) {
        let counts = Counts {
            read: self.read,
            kept: self.kept,
            min_time_ms: self.min_time_ms,
            max_time_ms: self.max_time_ms,
            dropped: self.counts,
            numeric_user_ids: self.numeric_user_ids,
            fractional_integer_ids: self.fractional_integer_ids,
            fractional_integer_example: self.fractional_integer_example,
        };
        (counts, self.sink)
    }

    /// Where kept rows go.
    pub(crate) fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// The spec the cleaner works for.
    pub(crate) fn spec(&self) -> &'a JobSpec {
        self.spec
    }

    /// The file of the split.
    pub(crate) fn file(&self) -> &'a str {
        self.file
    }

    /// Counts a malformed record (the next row in read order, data row `row`) as
    /// read and dropped; under `on_bad_rows = "fail"` it is the split's error.
    pub(crate) fn malformed(&mut self, row: u64, detail: String) -> Result<(), WorkerError> {
        let count = &mut self.counts[DropReason::MalformedRow as usize];
        let reason = DropReason::MalformedRow.as_str();
        let bad = (self.file, row, reason, detail);
        count_malformed(self.control, &mut self.read, count, self.fail_on_bad, bad)
    }

    /// Cleans `rows` rows of `cols`; `row_number` maps a row's index in read order
    /// (over the whole split) to its 1-based data row in the file.
    pub(crate) fn batch(
        &mut self,
        plan: &Plan,
        cols: &Prepared,
        rows: usize,
        row_number: &dyn Fn(u64) -> u64,
    ) -> Result<(), WorkerError> {
        self.control.check()?;
        self.control
            .rows_read
            .fetch_add(rows as u64, Ordering::Relaxed);
        let Cleaner {
            spec: _,
            file,
            input,
            fail_on_bad,
            user_as_integer,
            drop_order_prefixes,
            min_quantity,
            min_price,
            time,
            latest_ms,
            counts,
            read,
            kept,
            min_time_ms,
            max_time_ms,
            sink,
            user_buf,
            numeric_user_ids: _,
            fractional_integer_ids,
            fractional_integer_example,
            control: _,
        } = self;
        let column = |role: Role| plan.slot(role).map_or("", |s| s.column.as_str());
        let beyond =
            |v: f64| format!("{v:e} is beyond ±{MAX_VALUE:e}, the largest value shoal takes");
        for i in 0..rows {
            let index = *read;
            *read += 1;
            // Counts the row under `reason`; a bad row fails the split when asked to.
            macro_rules! drop_row {
                ($reason:expr, $role:expr, $detail:expr) => {{
                    let reason: DropReason = $reason;
                    counts[reason as usize] += 1;
                    if *fail_on_bad && reason.is_bad() {
                        return Err(WorkerError::BadRow {
                            file: file.to_string(),
                            row: row_number(index),
                            reason: reason.as_str(),
                            detail: format!("column `{}`: {}", column($role), $detail),
                        });
                    }
                    continue;
                }};
            }

            // 1-2. user
            let raw_user = match cols.user.get(i) {
                Some(u) if !u.trim().is_empty() => u,
                other => drop_row!(DropReason::MissingUser, Role::User, describe_text(other)),
            };
            let user = if *user_as_integer {
                if !canonical_integer(raw_user, user_buf) {
                    drop_row!(
                        DropReason::BadUser,
                        Role::User,
                        format!("`{raw_user}` is not an integer (input.user_as_integer = true)")
                    );
                }
                user_buf.as_str()
            } else {
                // `17850.0` as text is another id than `17850`: counted, so that
                // a job that also reads the id as a number can say so.
                if raw_user.contains('.') && canonical_integer(raw_user, user_buf) {
                    if *fractional_integer_ids == 0 {
                        *fractional_integer_example = raw_user.to_string();
                    }
                    *fractional_integer_ids += 1;
                }
                raw_user
            };

            // 3. order
            let order = cols
                .order
                .as_ref()
                .and_then(|c| c.get(i))
                .filter(|o| !o.is_empty());
            if let Some(o) = order {
                let o = o.trim_start();
                if drop_order_prefixes
                    .iter()
                    .any(|p| o.starts_with(p.as_str()))
                {
                    drop_row!(DropReason::CancelledOrder, Role::Order, format!("`{o}`"));
                }
            }

            // 4. time
            let time_ms = match &cols.time {
                Times::Ms(a) => {
                    if a.is_null(i) {
                        drop_row!(DropReason::MissingTime, Role::Time, "null");
                    }
                    a.value(i)
                }
                Times::Text(t) => match t.get(i).map(str::trim) {
                    None | Some("") => {
                        drop_row!(DropReason::MissingTime, Role::Time, describe_text(t.get(i)))
                    }
                    Some(s) => match time.parse(s) {
                        Some(ms) => ms,
                        None => drop_row!(
                            DropReason::BadTime,
                            Role::Time,
                            format!("`{s}` is not a time (expected {})", time.expected())
                        ),
                    },
                },
            };
            if time_ms > *latest_ms {
                drop_row!(
                    DropReason::BadTime,
                    Role::Time,
                    format!(
                        "{} is in the future (after {}, this worker's clock and a day)",
                        utc_text(time_ms),
                        utc_text(*latest_ms)
                    )
                );
            }

            // 5. quantity
            let quantity = match &cols.quantity {
                None => 1.0,
                Some(q) => match q.get(i) {
                    Num::Value(v) if v.abs() > MAX_VALUE => {
                        drop_row!(DropReason::BadQuantity, Role::Quantity, beyond(v))
                    }
                    Num::Value(v) => {
                        if min_quantity.is_some_and(|min| v < min) {
                            drop_row!(DropReason::QuantityBelowMin, Role::Quantity, v);
                        }
                        v
                    }
                    Num::Missing | Num::Bad => drop_row!(
                        DropReason::BadQuantity,
                        Role::Quantity,
                        format!("{} is not a number", q.describe(i))
                    ),
                },
            };

            // 6. price
            let price = match &cols.price {
                None => None,
                Some(p) => match p.get(i) {
                    Num::Value(v) if v.abs() > MAX_VALUE => {
                        drop_row!(DropReason::BadPrice, Role::Price, beyond(v))
                    }
                    Num::Value(v) => {
                        if min_price.is_some_and(|min| v <= min) {
                            drop_row!(DropReason::PriceAtOrBelowMin, Role::Price, v);
                        }
                        Some(v)
                    }
                    Num::Missing | Num::Bad => drop_row!(
                        DropReason::BadPrice,
                        Role::Price,
                        format!("{} is not a number", p.describe(i))
                    ),
                },
            };

            // 7. amount
            let amount = match &cols.amount {
                None => None,
                Some(a) => match a.get(i) {
                    Num::Value(v) if v.abs() > MAX_VALUE => {
                        drop_row!(DropReason::BadAmount, Role::Amount, beyond(v))
                    }
                    Num::Value(v) => Some(v),
                    Num::Missing | Num::Bad => drop_row!(
                        DropReason::BadAmount,
                        Role::Amount,
                        format!("{} is not a number", a.describe(i))
                    ),
                },
            };

            let monetary = match (amount, price) {
                (Some(a), _) => a,
                (None, Some(p)) => quantity * p,
                (None, None) => 0.0,
            };
            let item = cols
                .item
                .as_ref()
                .and_then(|c| c.get(i))
                .filter(|s| !s.is_empty());
            // A missing or blank event weighs 1.0: never a bad row.
            let weight = input.event_weight(cols.event.as_ref().and_then(|c| c.get(i)));
            let item_label = cols
                .item_label
                .as_ref()
                .and_then(|c| c.get(i))
                .filter(|s| !s.trim().is_empty());
            sink.push(&KeptRow {
                user,
                time_ms,
                order,
                item,
                quantity,
                monetary,
                weight,
                item_label,
            })?;
            *kept += 1;
            *min_time_ms = (*min_time_ms).min(time_ms);
            *max_time_ms = (*max_time_ms).max(time_ms);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_user_ids() {
        let mut out = String::new();
        for (input, want) in [
            ("17850.0", "17850"),
            ("17850", "17850"),
            (" 17850.000 ", "17850"),
            ("17850.", "17850"),
            ("007", "7"),
            ("-12.0", "-12"),
            ("+12", "12"),
            ("-0", "0"),
            ("0.0", "0"),
            (
                "123456789012345678901234567890",
                "123456789012345678901234567890",
            ),
        ] {
            assert!(canonical_integer(input, &mut out), "{input}");
            assert_eq!(out, want, "{input}");
        }
        for bad in [
            "17850.5", "1e3", "12a", "", "-", ".0", "1.0.0", "0x10", "１２",
        ] {
            assert!(
                !canonical_integer(bad, &mut out),
                "`{bad}` is not an integer"
            );
        }
    }
}
