//! A mergeable quantile sketch with bounded relative error (logarithmic buckets, as
//! in DDSketch). Workers build one per segment and feature; the coordinator merges
//! them in shard order and reads medians off the result. Merging adds bucket counts,
//! so the result does not depend on how shards were spread over workers.

use crate::pb;
use std::collections::BTreeMap;

/// Relative accuracy of quantiles read from a sketch.
pub const RELATIVE_ACCURACY: f64 = 0.005;
/// Magnitudes below this count as zero.
const MIN_MAGNITUDE: f64 = 1e-9;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sketch {
    zeros: u64,
    positive: BTreeMap<i32, u64>,
    negative: BTreeMap<i32, u64>,
}

fn gamma_ln() -> f64 {
    ((1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY)).ln()
}

fn bucket(magnitude: f64) -> i32 {
    (magnitude.ln() / gamma_ln()).ceil() as i32
}

/// The value a bucket stands for: within RELATIVE_ACCURACY of every value in it.
fn value(key: i32) -> f64 {
    let g = gamma_ln();
    2.0 * (key as f64 * g).exp() / (1.0 + g.exp())
}

impl Sketch {
    pub fn add(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        if x.abs() < MIN_MAGNITUDE {
            self.zeros += 1;
        } else if x > 0.0 {
            *self.positive.entry(bucket(x)).or_default() += 1;
        } else {
            *self.negative.entry(bucket(-x)).or_default() += 1;
        }
    }

    pub fn count(&self) -> u64 {
        self.zeros + self.positive.values().sum::<u64>() + self.negative.values().sum::<u64>()
    }

    pub fn merge(&mut self, other: &Sketch) {
        self.zeros += other.zeros;
        for (k, c) in &other.positive {
            *self.positive.entry(*k).or_default() += c;
        }
        for (k, c) in &other.negative {
            *self.negative.entry(*k).or_default() += c;
        }
    }

    /// The q-quantile (0..=1), within RELATIVE_ACCURACY; `None` when empty.
    /// Uses the lower median convention (rank floor(q * (n - 1))).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * (n - 1) as f64).floor() as u64;
        let mut seen = 0u64;
        // ascending: most negative first
        for (k, c) in self.negative.iter().rev() {
            seen += c;
            if seen > rank {
                return Some(-value(*k));
            }
        }
        seen += self.zeros;
        if seen > rank {
            return Some(0.0);
        }
        for (k, c) in &self.positive {
            seen += c;
            if seen > rank {
                return Some(value(*k));
            }
        }
        None
    }

    pub fn to_proto(&self) -> pb::Sketch {
        pb::Sketch {
            zeros: self.zeros,
            keys: self.positive.keys().copied().collect(),
            counts: self.positive.values().copied().collect(),
            negative_keys: self.negative.keys().copied().collect(),
            negative_counts: self.negative.values().copied().collect(),
        }
    }

    pub fn from_proto(p: &pb::Sketch) -> Sketch {
        Sketch {
            zeros: p.zeros,
            positive: p
                .keys
                .iter()
                .copied()
                .zip(p.counts.iter().copied())
                .collect(),
            negative: p
                .negative_keys
                .iter()
                .copied()
                .zip(p.negative_counts.iter().copied())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact_lower_quantile(mut v: Vec<f64>, q: f64) -> f64 {
        v.sort_by(f64::total_cmp);
        v[(q * (v.len() - 1) as f64).floor() as usize]
    }

    #[test]
    fn quantiles_within_relative_accuracy() {
        let values: Vec<f64> = (0..10_001)
            .map(|i| {
                let u = crate::hash::unit(crate::hash::key(3, &[i]));
                (u * 12.0).exp() - 2.0
            })
            .collect();
        let mut sketch = Sketch::default();
        values.iter().for_each(|v| sketch.add(*v));
        for q in [0.0, 0.1, 0.5, 0.9, 1.0] {
            let exact = exact_lower_quantile(values.clone(), q);
            let got = sketch.quantile(q).unwrap();
            assert!(
                (got - exact).abs() <= RELATIVE_ACCURACY * exact.abs() + 1e-9,
                "q {q}: sketch {got} exact {exact}"
            );
        }
    }

    #[test]
    fn merge_equals_one_sketch_and_round_trips() {
        let mut all = Sketch::default();
        let mut a = Sketch::default();
        let mut b = Sketch::default();
        for i in 0..1000 {
            let x = (i as f64 - 300.0) * 1.7;
            all.add(x);
            if i % 3 == 0 { a.add(x) } else { b.add(x) }
        }
        a.merge(&b);
        assert_eq!(a, all);
        assert_eq!(Sketch::from_proto(&all.to_proto()), all);
        assert_eq!(all.count(), 1000);
        assert_eq!(Sketch::default().quantile(0.5), None);
    }

    #[test]
    fn integers_read_back_close() {
        let mut s = Sketch::default();
        for x in [1.0, 2.0, 2.0, 3.0, 50.0] {
            s.add(x);
        }
        let m = s.quantile(0.5).unwrap();
        assert!((m - 2.0).abs() <= 0.01, "{m}");
    }
}
