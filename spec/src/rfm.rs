//! RFM scores and the segment map marketers use.
//!
//! Every customer is ranked into quintiles (1..=5, 5 = best) on recency (more
//! recent is better), frequency (more orders) and monetary value (more money), and
//! named after the cell of the widely used R x F map it falls in. The map, the
//! quintile cuts and the per-customer score are here, shared by the workers (which
//! score their customers) and the coordinator (which finds the cuts and names the
//! segments).
//!
//! Quintiles are found from a histogram of keys over every customer, merged across
//! shards: recency in whole days, frequency in orders, monetary value in
//! logarithmic buckets of 1% width (two customers whose totals differ by less fall
//! in the same bucket). Customers with the same key are ranked by a stable hash of
//! their id ("rank first", with a seeded order instead of the file order), so ties
//! split evenly across a cut and a customer's score depends neither on the number
//! of workers nor on the order of the input.

use serde::Serialize;

/// The names of the map, most valuable first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum RfmName {
    Champions,
    Loyal,
    PotentialLoyalists,
    New,
    Promising,
    NeedAttention,
    AboutToSleep,
    AtRisk,
    CantLose,
    Hibernating,
    Lost,
}

impl RfmName {
    pub const ALL: [RfmName; 11] = [
        RfmName::Champions,
        RfmName::Loyal,
        RfmName::PotentialLoyalists,
        RfmName::New,
        RfmName::Promising,
        RfmName::NeedAttention,
        RfmName::AboutToSleep,
        RfmName::AtRisk,
        RfmName::CantLose,
        RfmName::Hibernating,
        RfmName::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RfmName::Champions => "Champions",
            RfmName::Loyal => "Loyal",
            RfmName::PotentialLoyalists => "Potential Loyalists",
            RfmName::New => "New",
            RfmName::Promising => "Promising",
            RfmName::NeedAttention => "Need Attention",
            RfmName::AboutToSleep => "About to Sleep",
            RfmName::AtRisk => "At Risk",
            RfmName::CantLose => "Can't Lose",
            RfmName::Hibernating => "Hibernating",
            RfmName::Lost => "Lost",
        }
    }
}

use RfmName::*;

/// The map: `MAP[r - 1][f - 1]` names the customers with recency score `r` and
/// frequency score `f`. Hibernating's corner R = 1, F = 1 is split out as Lost.
pub const MAP: [[RfmName; 5]; 5] = [
    // R = 1
    [Lost, Hibernating, AtRisk, AtRisk, CantLose],
    // R = 2
    [Hibernating, Hibernating, AtRisk, AtRisk, CantLose],
    // R = 3
    [AboutToSleep, AboutToSleep, NeedAttention, Loyal, Loyal],
    // R = 4
    [
        Promising,
        PotentialLoyalists,
        PotentialLoyalists,
        Loyal,
        Loyal,
    ],
    // R = 5
    [
        New,
        PotentialLoyalists,
        PotentialLoyalists,
        Champions,
        Champions,
    ],
];

/// The name of the cell (`r`, `f`), both scores in 1..=5.
pub fn cell_name(r: u8, f: u8) -> RfmName {
    MAP[usize::from(r.clamp(1, 5) - 1)][usize::from(f.clamp(1, 5) - 1)]
}

/// The index (0..25) of cell (`r`, `f`) in per-cell tables: `(r - 1) * 5 + (f - 1)`.
pub fn cell_index(r: u8, f: u8) -> usize {
    usize::from(r.clamp(1, 5) - 1) * 5 + usize::from(f.clamp(1, 5) - 1)
}

/// The metrics scored, in the order of every per-metric table.
pub const METRICS: [&str; 3] = ["recency", "frequency", "monetary"];

/// Recency's key: minus the whole days since the customer's last event, so a
/// larger key is a better customer.
pub fn recency_key(days: f64) -> i64 {
    if days.is_finite() {
        -(days.max(0.0).floor() as i64)
    } else {
        i64::MIN
    }
}

/// Frequency's key: the orders.
pub fn frequency_key(orders: u64) -> i64 {
    orders.min(i64::MAX as u64) as i64
}

/// Width of monetary's buckets: values within about 1% of each other share one.
const MONEY_BUCKET: f64 = 0.01;
/// Magnitudes below this count as zero.
const MONEY_ZERO: f64 = 1e-6;

/// Monetary's key: 0 for zero, else sign times the logarithmic bucket of the
/// magnitude (buckets counted from `MONEY_ZERO`, so every key of a positive value
/// is positive and the key grows with the value).
pub fn monetary_key(money: f64) -> i64 {
    if !money.is_finite() {
        return if money > 0.0 { i64::MAX } else { i64::MIN };
    }
    let m = money.abs();
    if m < MONEY_ZERO {
        return 0;
    }
    let bucket = ((m / MONEY_ZERO).ln() / MONEY_BUCKET.ln_1p()).floor() as i64 + 1;
    if money > 0.0 { bucket } else { -bucket }
}

/// The value a metric's key stands for, in the metric's units: recency days,
/// orders, or the lower end of a monetary bucket (`metric` indexes [`METRICS`]).
pub fn key_value(metric: usize, key: i64) -> f64 {
    match metric {
        0 => -(key as f64),
        1 => key as f64,
        _ if key == 0 => 0.0,
        _ => {
            let lower = MONEY_ZERO * (MONEY_BUCKET.ln_1p() * (key.unsigned_abs() - 1) as f64).exp();
            if key > 0 { lower } else { -lower }
        }
    }
}

/// The tie-break of a customer with user key `key` on metric `metric` (indexes
/// [`METRICS`]): a uniform number in [0, 1) that orders customers with equal
/// metric keys, drawn anew per metric (a customer first among equals on one
/// metric is not first on the others).
pub fn tie(key: u64, metric: usize) -> f64 {
    crate::hash::unit(crate::hash::key(
        0x7f4a_0005_c0de_0001,
        &[key, metric as u64],
    ))
}

/// One cut between two quintiles: customers with a key above `key`, or equal to
/// it with a tie-break at or above `tie`, are above the cut.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cut {
    pub key: i64,
    pub tie: f64,
}

/// The four cuts of one metric's quintiles.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quintiles {
    pub cuts: [Cut; 4],
}

impl Quintiles {
    /// The cuts of the customers counted in `histogram` (key, customers; in any
    /// order, keys may repeat): cut `j` (1..=4) falls at rank `ceil(j * n / 5)` of
    /// the customers ordered by key, then by tie-break; inside the key it falls in,
    /// the share of that key's customers below it sets `tie`. `None` without
    /// customers.
    pub fn from_histogram(histogram: &[(i64, u64)]) -> Option<Quintiles> {
        let mut sorted: Vec<(i64, u64)> = histogram.to_vec();
        sorted.sort_unstable();
        sorted.dedup_by(|b, a| {
            if a.0 == b.0 {
                a.1 += b.1;
                true
            } else {
                false
            }
        });
        sorted.retain(|&(_, c)| c > 0);
        let n: u64 = sorted.iter().map(|&(_, c)| c).sum();
        if n == 0 {
            return None;
        }
        let mut cuts = [Cut { key: 0, tie: 0.0 }; 4];
        for (j, cut) in cuts.iter_mut().enumerate() {
            let rank = (((j as u64 + 1) * n).div_ceil(5)).min(n);
            let mut before = 0u64;
            *cut = Cut {
                key: i64::MAX,
                tie: 1.0,
            };
            for &(key, count) in &sorted {
                if before + count > rank {
                    *cut = Cut {
                        key,
                        tie: (rank - before) as f64 / count as f64,
                    };
                    break;
                }
                before += count;
            }
        }
        Some(Quintiles { cuts })
    }

    /// The score (1..=5) of a customer with metric key `key` and tie-break `tie`.
    pub fn score(&self, key: i64, tie: f64) -> u8 {
        1 + self
            .cuts
            .iter()
            .filter(|c| key > c.key || (key == c.key && tie >= c.tie))
            .count() as u8
    }
}

/// The quintiles of the three metrics; a metric the log cannot measure (no
/// money, no event times) has none.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Scoring {
    pub recency: Option<Quintiles>,
    pub frequency: Option<Quintiles>,
    pub monetary: Option<Quintiles>,
}

/// A customer's scores; a metric without quintiles scores `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scores {
    pub r: Option<u8>,
    pub f: Option<u8>,
    pub m: Option<u8>,
}

impl Scores {
    /// The customer's cell of the map (needs R and F).
    pub fn name(&self) -> Option<RfmName> {
        Some(cell_name(self.r?, self.f?))
    }

    /// The index of the customer's cell (needs R and F).
    pub fn cell(&self) -> Option<usize> {
        Some(cell_index(self.r?, self.f?))
    }
}

impl Scoring {
    /// Customers can be named: recency and frequency have quintiles.
    pub fn names(&self) -> bool {
        self.recency.is_some() && self.frequency.is_some()
    }

    /// The scores of a customer with user key `user` and these metrics.
    pub fn score(&self, user: u64, recency_days: f64, orders: u64, money: f64) -> Scores {
        Scores {
            r: self
                .recency
                .as_ref()
                .map(|q| q.score(recency_key(recency_days), tie(user, 0))),
            f: self
                .frequency
                .as_ref()
                .map(|q| q.score(frequency_key(orders), tie(user, 1))),
            m: self
                .monetary
                .as_ref()
                .map(|q| q.score(monetary_key(money), tie(user, 2))),
        }
    }
}

/// The name a group of customers goes by: the name whose cells hold most of them
/// (`cells`: customers per cell, 25 of them by [`cell_index`]), and that share.
/// Ties go to the more valuable name. `None` for an empty group.
pub fn group_name(cells: &[u64]) -> Option<(RfmName, f64)> {
    let total: u64 = cells.iter().sum();
    if total == 0 {
        return None;
    }
    let mut per_name = [0u64; 11];
    for r in 1..=5u8 {
        for f in 1..=5u8 {
            let name = cell_name(r, f);
            per_name[name as usize] += cells.get(cell_index(r, f)).copied().unwrap_or(0);
        }
    }
    let (best, count) =
        per_name.iter().enumerate().fold(
            (0, 0u64),
            |best, (i, &c)| if c > best.1 { (i, c) } else { best },
        );
    Some((RfmName::ALL[best], count as f64 / total as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The map as RFM-MAP.md's table writes it (R from 5 down to 1, F from 1 to 5),
    /// with Lost split out of Hibernating at R = 1, F = 1.
    const TABLE: &str = "\
5 | New | Potential Loyalists | Potential Loyalists | Champions | Champions
4 | Promising | Potential Loyalists | Potential Loyalists | Loyal | Loyal
3 | About to Sleep | About to Sleep | Need Attention | Loyal | Loyal
2 | Hibernating | Hibernating | At Risk | At Risk | Can't Lose
1 | Lost | Hibernating | At Risk | At Risk | Can't Lose";

    #[test]
    fn the_map_names_every_cell_as_the_table_does() {
        let mut seen = std::collections::BTreeSet::new();
        for line in TABLE.lines() {
            let cells: Vec<&str> = line.split(" | ").collect();
            let r: u8 = cells[0].parse().unwrap();
            for (f, want) in cells[1..].iter().enumerate() {
                let got = cell_name(r, f as u8 + 1);
                assert_eq!(got.as_str(), *want, "R {r} F {}", f + 1);
                seen.insert(got);
            }
        }
        assert_eq!(seen.len(), RfmName::ALL.len(), "every name names a cell");
        for (i, name) in RfmName::ALL.iter().enumerate() {
            assert_eq!(*name as usize, i);
        }
    }

    #[test]
    fn keys_grow_with_the_better_customer() {
        assert!(recency_key(0.2) > recency_key(1.0));
        assert_eq!(recency_key(0.2), recency_key(0.9), "whole days");
        assert!(frequency_key(3) > frequency_key(2));
        let money = [-50.0, -1.0, 0.0, 0.5, 1.0, 1.02, 100.0, 1e9];
        for w in money.windows(2) {
            assert!(monetary_key(w[0]) < monetary_key(w[1]), "{w:?}");
        }
        assert_eq!(monetary_key(100.0), monetary_key(100.5), "within 1%");
        assert_eq!(monetary_key(1e-9), 0);
    }

    /// Scores by brute force: sort every customer by (key, tie), cut the ranks.
    fn brute(keys: &[(i64, f64)]) -> Vec<u8> {
        let n = keys.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| {
            keys[a]
                .0
                .cmp(&keys[b].0)
                .then(keys[a].1.total_cmp(&keys[b].1))
        });
        let mut scores = vec![0u8; n];
        for (rank, &i) in order.iter().enumerate() {
            // rank r scores 1 + #{j : r >= ceil(j n / 5)}
            scores[i] = 1
                + (1..=4u64)
                    .filter(|j| rank as u64 >= (j * n as u64).div_ceil(5))
                    .count() as u8;
        }
        scores
    }

    #[test]
    fn distinct_keys_score_as_their_ranks() {
        let keys: Vec<(i64, f64)> = (0..103).map(|i| ((i * 7919) % 103, 0.5)).collect();
        let hist: Vec<(i64, u64)> = keys.iter().map(|&(k, _)| (k, 1)).collect();
        let q = Quintiles::from_histogram(&hist).unwrap();
        let got: Vec<u8> = keys.iter().map(|&(k, t)| q.score(k, t)).collect();
        assert_eq!(got, brute(&keys));
        for s in 1..=5u8 {
            let c = got.iter().filter(|&&g| g == s).count();
            assert!((20..=21).contains(&c), "score {s}: {c}");
        }
    }

    #[test]
    fn ties_split_evenly_across_a_cut() {
        // 60% of customers have one order: "rank first" splits them over scores 1-3
        let users: Vec<u64> = (0..10_000u64).collect();
        let orders: Vec<u64> = users
            .iter()
            .map(|&u| if u % 10 < 6 { 1 } else { 2 + u % 7 })
            .collect();
        let mut hist = std::collections::BTreeMap::new();
        for &o in &orders {
            *hist.entry(frequency_key(o)).or_insert(0u64) += 1;
        }
        let hist: Vec<(i64, u64)> = hist.into_iter().collect();
        let q = Quintiles::from_histogram(&hist).unwrap();
        let mut per = [0usize; 5];
        for (&u, &o) in users.iter().zip(&orders) {
            per[usize::from(q.score(frequency_key(o), tie(u, 1)) - 1)] += 1;
        }
        for (s, &c) in per.iter().enumerate() {
            assert!(
                (1_850..=2_150).contains(&c),
                "score {}: {c} of 10000",
                s + 1
            );
        }
        // and exactly as a sort by (key, tie) would, up to the share inside the tie
        let keys: Vec<(i64, f64)> = users
            .iter()
            .zip(&orders)
            .map(|(&u, &o)| (frequency_key(o), tie(u, 1)))
            .collect();
        let want = brute(&keys);
        let got: Vec<u8> = keys.iter().map(|&(k, t)| q.score(k, t)).collect();
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert!(
            differ < 300,
            "{differ} customers scored off the exact ranks"
        );
    }

    #[test]
    fn keys_map_back_to_their_units() {
        assert_eq!(key_value(0, recency_key(12.7)), 12.0);
        assert_eq!(key_value(1, frequency_key(7)), 7.0);
        for money in [0.5, 3.0, 250.0, 77_183.6] {
            let lower = key_value(2, monetary_key(money));
            assert!(
                lower <= money * (1.0 + 1e-9) && lower > money / 1.011,
                "{money} {lower}"
            );
            let negative = key_value(2, monetary_key(-money));
            assert!((negative + lower).abs() < 1e-9 * money);
        }
        assert_eq!(key_value(2, monetary_key(0.0)), 0.0);
    }

    #[test]
    fn one_customer_and_none() {
        assert!(Quintiles::from_histogram(&[]).is_none());
        assert!(Quintiles::from_histogram(&[(3, 0)]).is_none());
        let q = Quintiles::from_histogram(&[(3, 1)]).unwrap();
        assert!((1..=5).contains(&q.score(3, 0.4)));
    }

    #[test]
    fn a_group_is_named_after_its_largest_name() {
        let mut cells = [0u64; 25];
        cells[cell_index(5, 5)] = 30; // Champions
        cells[cell_index(5, 4)] = 15; // Champions
        cells[cell_index(4, 4)] = 40; // Loyal
        cells[cell_index(1, 1)] = 15; // Lost
        let (name, share) = group_name(&cells).unwrap();
        assert_eq!(name, Champions);
        assert!((share - 0.45).abs() < 1e-12);
        assert!(group_name(&[0; 25]).is_none());
        // a tie goes to the more valuable name
        let mut tied = [0u64; 25];
        tied[cell_index(1, 5)] = 5; // Can't Lose
        tied[cell_index(3, 3)] = 5; // Need Attention
        assert_eq!(group_name(&tied).unwrap().0, NeedAttention);
    }

    #[test]
    fn scoring_without_recency_names_nobody() {
        let s = Scoring {
            recency: None,
            frequency: Quintiles::from_histogram(&[(1, 5), (2, 5)]),
            monetary: None,
        };
        assert!(!s.names());
        let sc = s.score(7, 3.0, 2, 10.0);
        assert!(sc.name().is_none() && sc.f.is_some() && sc.m.is_none());
    }
}
