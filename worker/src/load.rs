//! Loading a shard: staged rows -> one record per user with recency, frequency and
//! monetary value, and the per-shard moments of the (log-scaled) features that the
//! coordinator reduces into the global scaling.

use crate::WorkerError;
use arrow::array::{Array, Float64Array, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;
use shoal_proto::pb;
use std::collections::{HashMap, HashSet};

const MS_PER_DAY: f64 = 86_400_000.0;

/// Per-user aggregates of one shard, users sorted by id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardRfm {
    pub users: Vec<String>,
    pub recency_days: Vec<f64>,
    pub frequency: Vec<u64>,
    pub monetary: Vec<f64>,
}

impl ShardRfm {
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The unscaled feature vector of every user (row-major, `DIMS` per user):
    /// log1p of recency, frequency and monetary (sign-preserving for monetary).
    pub fn log_features(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.len() * DIMS);
        for i in 0..self.len() {
            out.push(self.recency_days[i].max(0.0).ln_1p());
            out.push((self.frequency[i] as f64).ln_1p());
            out.push(signed_log1p(self.monetary[i]));
        }
        out
    }
}

/// Features per user: recency, frequency, monetary.
pub const DIMS: usize = 3;

/// `sign(x) * ln(1 + |x|)`: log1p for positive values, defined for negative ones
/// (net refunds) too.
pub fn signed_log1p(x: f64) -> f64 {
    x.signum() * x.abs().ln_1p()
}

/// The inverse of [`signed_log1p`].
pub fn signed_expm1(y: f64) -> f64 {
    y.signum() * y.abs().exp_m1()
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T, WorkerError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            WorkerError::InvalidRequest(format!(
                "staged batch lacks column `{name}` of the expected type"
            ))
        })
}

/// Aggregates the staged rows of a shard. `reference_ms` is the latest event time in
/// the whole input; recency is measured from it in days. Frequency counts distinct
/// orders when the rows carry order ids, else events.
pub fn aggregate(batches: &[RecordBatch], reference_ms: i64) -> Result<ShardRfm, WorkerError> {
    let mut index: HashMap<String, u32> = HashMap::new();
    let mut last_ms: Vec<i64> = Vec::new();
    let mut events: Vec<u64> = Vec::new();
    let mut monetary: Vec<f64> = Vec::new();
    let mut orders: HashSet<(u32, u64)> = HashSet::new();
    let mut has_orders = false;
    for batch in batches {
        let user: &StringArray = column(batch, "user")?;
        let time: &Int64Array = column(batch, "time_ms")?;
        let order: &StringArray = column(batch, "order")?;
        let money: &Float64Array = column(batch, "monetary")?;
        for row in 0..batch.num_rows() {
            let u = user.value(row);
            let idx = match index.get(u) {
                Some(i) => *i,
                None => {
                    let i = last_ms.len() as u32;
                    index.insert(u.to_string(), i);
                    last_ms.push(i64::MIN);
                    events.push(0);
                    monetary.push(0.0);
                    i
                }
            } as usize;
            last_ms[idx] = last_ms[idx].max(time.value(row));
            events[idx] += 1;
            monetary[idx] += money.value(row);
            if order.is_valid(row) {
                has_orders = true;
                let h = xxhash_rust::xxh3::xxh3_64(order.value(row).as_bytes());
                orders.insert((idx as u32, h));
            }
        }
    }
    let mut frequency = events;
    if has_orders {
        frequency.iter_mut().for_each(|f| *f = 0);
        for (u, _) in &orders {
            frequency[*u as usize] += 1;
        }
    }
    let mut users: Vec<(String, u32)> = index.into_iter().collect();
    users.sort_unstable();
    let mut out = ShardRfm::default();
    for (user, i) in users {
        let i = i as usize;
        out.users.push(user);
        out.recency_days
            .push(((reference_ms - last_ms[i]) as f64 / MS_PER_DAY).max(0.0));
        out.frequency.push(frequency[i]);
        out.monetary.push(monetary[i]);
    }
    Ok(out)
}

/// Streaming moments (count, mean, M2) of every feature, in user order.
pub fn moments(features: &[f64], dims: usize) -> Vec<pb::Moments> {
    let mut m = vec![pb::Moments::default(); dims];
    for row in features.chunks_exact(dims) {
        for (s, &x) in m.iter_mut().zip(row) {
            add_to_moments(s, x);
        }
    }
    m
}

/// Adds `x` to the streaming moments `s` (Welford).
pub fn add_to_moments(s: &mut pb::Moments, x: f64) {
    s.count += 1;
    let delta = x - s.mean;
    s.mean += delta / s.count as f64;
    s.m2 += delta * (x - s.mean);
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Float64Array;
    use std::sync::Arc;

    fn batch(rows: &[(&str, i64, Option<&str>, f64)]) -> RecordBatch {
        let schema = crate::staging::staged_schema();
        let user = StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
        let time = Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
        let order = StringArray::from(rows.iter().map(|r| r.2).collect::<Vec<_>>());
        let item = StringArray::from(vec![None::<&str>; rows.len()]);
        let qty = Float64Array::from(vec![1.0; rows.len()]);
        let money = Float64Array::from(rows.iter().map(|r| r.3).collect::<Vec<_>>());
        let mut cols: Vec<Arc<dyn Array>> = Vec::new();
        for f in schema.fields() {
            cols.push(match f.name().as_str() {
                "user" => Arc::new(user.clone()),
                "time_ms" => Arc::new(time.clone()),
                "order" => Arc::new(order.clone()),
                "item" => Arc::new(item.clone()),
                "quantity" => Arc::new(qty.clone()),
                "monetary" => Arc::new(money.clone()),
                "weight" => Arc::new(Float64Array::from(vec![1.0; rows.len()])),
                "item_label" => Arc::new(StringArray::from(vec![None::<&str>; rows.len()])),
                other => panic!("unexpected staged column {other}"),
            });
        }
        RecordBatch::try_new(schema, cols).unwrap()
    }

    const DAY: i64 = 86_400_000;

    #[test]
    fn rfm_by_hand() {
        // Reference time: day 10. Alice bought on day 2 (order A1, two lines) and day 7
        // (order A2); Bob on day 10 (B1). Carol's rows come in a second batch.
        let b1 = batch(&[
            ("alice", 2 * DAY, Some("A1"), 10.0),
            ("alice", 2 * DAY, Some("A1"), 5.5),
            ("bob", 10 * DAY, Some("B1"), 3.0),
            ("alice", 7 * DAY, Some("A2"), 1.25),
        ]);
        let b2 = batch(&[("carol", 4 * DAY + DAY / 2, Some("C1"), 100.0)]);
        let rfm = aggregate(&[b1, b2], 10 * DAY).unwrap();
        assert_eq!(rfm.users, vec!["alice", "bob", "carol"]);
        assert_eq!(rfm.recency_days, vec![3.0, 0.0, 5.5]);
        assert_eq!(rfm.frequency, vec![2, 1, 1]);
        assert_eq!(rfm.monetary, vec![16.75, 3.0, 100.0]);
        let f = rfm.log_features();
        assert!((f[0] - 4f64.ln()).abs() < 1e-12);
        assert!((f[1] - 3f64.ln()).abs() < 1e-12);
        assert!((f[2] - 17.75f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn frequency_counts_events_without_orders() {
        let b = batch(&[
            ("u", DAY, None, 1.0),
            ("u", DAY, None, 1.0),
            ("v", 2 * DAY, None, 2.0),
        ]);
        let rfm = aggregate(&[b], 2 * DAY).unwrap();
        assert_eq!(rfm.frequency, vec![2, 1]);
        assert_eq!(rfm.recency_days, vec![1.0, 0.0]);
    }

    #[test]
    fn moments_match_two_pass() {
        let xs = [1.0, 2.0, 4.0, 7.0, 11.0, 0.5];
        let m = moments(&xs, 2);
        let col0 = [1.0, 4.0, 11.0];
        let mean0 = col0.iter().sum::<f64>() / 3.0;
        let m20: f64 = col0.iter().map(|x| (x - mean0).powi(2)).sum();
        assert_eq!(m[0].count, 3);
        assert!((m[0].mean - mean0).abs() < 1e-12 && (m[0].m2 - m20).abs() < 1e-9);
    }

    #[test]
    fn signed_log_round_trips() {
        for x in [-50.0, -0.5, 0.0, 0.25, 3.0, 1e6] {
            assert!((signed_expm1(signed_log1p(x)) - x).abs() <= 1e-9 * x.abs().max(1.0));
        }
    }
}
