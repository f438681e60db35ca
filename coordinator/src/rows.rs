//! What ingest did to the rows: read, kept, and dropped by reason, summed over
//! splits (the report's `rows`, the extra table's too).

use serde::Serialize;
use shoal_proto::pb;
use std::collections::BTreeMap;

/// Rows read, kept and dropped by reason, over all splits.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RowTally {
    pub read: u64,
    pub kept: u64,
    pub dropped: BTreeMap<String, u64>,
}

impl RowTally {
    pub fn from_splits(splits: &[pb::SplitResult]) -> Self {
        Self::from_counts(splits.iter().filter_map(|s| s.counts.as_ref()))
    }

    /// The sum of the counts of some splits.
    pub fn from_counts<'a>(counts: impl Iterator<Item = &'a pb::RowCounts>) -> Self {
        let mut t = RowTally::default();
        for c in counts {
            t.read += c.read;
            t.kept += c.kept;
            for (reason, n) in &c.dropped {
                *t.dropped.entry(reason.clone()).or_default() += n;
            }
        }
        t
    }

    pub fn dropped_text(&self) -> String {
        if self.dropped.is_empty() {
            return "none".into();
        }
        self.dropped
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
