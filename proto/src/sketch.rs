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
                let u = shoal_spec::hash::unit(shoal_spec::hash::key(3, &[i]));
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

/// A HyperLogLog distinct-count sketch (Flajolet et al.) of 64-bit hashes, with
/// 2^[`DISTINCT_BITS`] one-byte registers: workers build one per shard of each
/// staged split; the coordinator merges them (register-wise maximum, in any
/// order) to size shards before placing them. Relative error about 1.6 %.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distinct {
    registers: Vec<u8>,
}

/// Register bits of a [`Distinct`] sketch.
pub const DISTINCT_BITS: u32 = 12;

impl Default for Distinct {
    fn default() -> Self {
        Distinct {
            registers: vec![0; 1 << DISTINCT_BITS],
        }
    }
}

impl Distinct {
    /// Adds a hash (spread evenly over 64 bits, as xxh3's are).
    #[inline]
    pub fn add(&mut self, hash: u64) {
        let j = (hash >> (64 - DISTINCT_BITS)) as usize;
        let rest = hash << DISTINCT_BITS | (1 << (DISTINCT_BITS - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        if rank > self.registers[j] {
            self.registers[j] = rank;
        }
    }

    pub fn merge(&mut self, other: &Distinct) {
        for (a, &b) in self.registers.iter_mut().zip(&other.registers) {
            *a = (*a).max(b);
        }
    }

    /// The estimated number of distinct hashes added.
    pub fn estimate(&self) -> f64 {
        let m = self.registers.len() as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let sum: f64 = self
            .registers
            .iter()
            .map(|&r| 2f64.powi(-i32::from(r)))
            .sum();
        let raw = alpha * m * m / sum;
        let zeros = self.registers.iter().filter(|&&r| r == 0).count();
        if raw <= 2.5 * m && zeros > 0 {
            // linear counting for small sets
            m * (m / zeros as f64).ln()
        } else {
            raw
        }
    }

    /// The registers, for the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.registers.clone()
    }

    /// From the wire: `None` when `bytes` are not a sketch's registers (empty
    /// bytes are an empty sketch).
    pub fn from_bytes(bytes: &[u8]) -> Option<Distinct> {
        if bytes.is_empty() {
            return Some(Distinct::default());
        }
        (bytes.len() == 1 << DISTINCT_BITS
            && bytes.iter().all(|&r| r <= 64 - DISTINCT_BITS as u8 + 1))
        .then(|| Distinct {
            registers: bytes.to_vec(),
        })
    }
}

#[cfg(test)]
mod distinct_tests {
    use super::*;
    use shoal_spec::hash;

    #[test]
    fn distinct_counts_are_within_a_few_percent_and_merge_exactly() {
        for n in [0u64, 1, 10, 1000, 50_000, 2_000_000] {
            let mut a = Distinct::default();
            let mut b = Distinct::default();
            for i in 0..n {
                let h = hash::key(3, &[i]);
                // every value twice, split over two sketches
                a.add(h);
                if i % 2 == 0 {
                    b.add(h);
                }
            }
            let mut both = b.clone();
            both.merge(&a);
            assert_eq!(both, a, "merging a subset changes nothing");
            let e = a.estimate();
            let tolerance = if n < 100 { 1.0 } else { 0.05 * n as f64 };
            assert!((e - n as f64).abs() <= tolerance, "n = {n}: {e}");
            assert_eq!(Distinct::from_bytes(&a.to_bytes()), Some(a));
        }
        assert!(Distinct::from_bytes(&[1, 2, 3]).is_none());
    }
}
