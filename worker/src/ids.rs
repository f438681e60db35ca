//! The ids of a shard: its users (or items) as dense `u32` positions, sorted by
//! key ([`shoal_spec::hash::id_key`]), with the text of every id kept once, in one
//! Arrow string array, for the outputs.
//!
//! Ids are encoded once, at ingest: each split's rows name their users by key, and
//! a shard's table is the merge of its splits' tables ([`IdMerge`]). Every step after
//! that works on positions; text is read back only to write outputs.

use std::sync::Arc;

use arrow::array::{Array, StringArray, StringBuilder};

use crate::WorkerError;

/// How many ids a shard may hold, and how many bytes of id text: positions are
/// `u32`, and the text lives in one Arrow array with `i32` offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdLimits {
    pub max_ids: usize,
    pub max_text_bytes: usize,
}

impl Default for IdLimits {
    fn default() -> Self {
        IdLimits {
            // u32::MAX itself marks "none" in some tables
            max_ids: u32::MAX as usize - 1,
            max_text_bytes: i32::MAX as usize,
        }
    }
}

/// The entities of one shard of one side, by position: keys increasing, and their
/// ids' text.
#[derive(Debug, Clone, PartialEq)]
pub struct IdTable {
    keys: Arc<Vec<u64>>,
    ids: StringArray,
}

impl Default for IdTable {
    fn default() -> Self {
        IdTable {
            keys: Arc::default(),
            ids: StringArray::from(Vec::<&str>::new()),
        }
    }
}

impl IdTable {
    /// From keys (strictly increasing) and their ids in the same order.
    pub fn new(keys: Vec<u64>, ids: StringArray) -> IdTable {
        debug_assert_eq!(keys.len(), ids.len());
        debug_assert!(keys.windows(2).all(|w| w[0] < w[1]));
        IdTable {
            keys: Arc::new(keys),
            ids,
        }
    }

    /// The keys, shared (for the ALS state and the peers).
    pub fn shared_keys(&self) -> Arc<Vec<u64>> {
        self.keys.clone()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Keys, by position (increasing).
    pub fn keys(&self) -> &[u64] {
        &self.keys
    }

    /// The id of position `i`.
    pub fn id(&self, i: usize) -> &str {
        self.ids.value(i)
    }

    /// Every id, by position (for the outputs: no copy).
    pub fn ids(&self) -> &StringArray {
        &self.ids
    }

    /// The position of `key`.
    pub fn position(&self, key: u64) -> Option<u32> {
        self.keys.binary_search(&key).ok().map(|p| p as u32)
    }

    /// Bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.keys.capacity() * 8 + self.ids.get_array_memory_size()
    }
}

/// Merges the sorted id tables of a shard's splits into the shard's table, and
/// maps each split's local positions to the shard's.
pub struct IdMerge {
    /// The shard's table.
    pub table: IdTable,
    /// Per input table (in the order given), local position -> shard position.
    pub remap: Vec<Vec<u32>>,
}

/// What [`IdMerge::new`] says about one collision.
fn collision(what: &str, shard: u32, key: u64, a: &str, b: &str) -> WorkerError {
    WorkerError::IdCollision {
        what: what.to_string(),
        shard,
        key,
        first: a.to_string(),
        second: b.to_string(),
    }
}

impl IdMerge {
    /// Merges `tables` (each: keys strictly increasing, ids alongside) of shard
    /// `shard` of `what` ("user" or "item"). An id seen in several tables gets one
    /// position; two different ids with one key, or more ids or id text than
    /// `limits` allow, are errors.
    pub fn new(
        what: &str,
        shard: u32,
        tables: &[(&[u64], &StringArray)],
        limits: IdLimits,
    ) -> Result<IdMerge, WorkerError> {
        // (key, table, local position), sorted by key then table: the first
        // occurrence of a key is its earliest table's.
        let total: usize = tables.iter().map(|t| t.0.len()).sum();
        let mut all: Vec<(u64, u32, u32)> = Vec::with_capacity(total);
        for (t, (keys, _)) in tables.iter().enumerate() {
            all.extend(
                keys.iter()
                    .enumerate()
                    .map(|(i, &k)| (k, t as u32, i as u32)),
            );
        }
        all.sort_unstable();
        let mut remap: Vec<Vec<u32>> = tables.iter().map(|t| vec![0; t.0.len()]).collect();
        let mut keys: Vec<u64> = Vec::new();
        let mut text_bytes = 0usize;
        let mut first: Vec<(u32, u32)> = Vec::new();
        for &(key, t, i) in &all {
            if keys.last() == Some(&key) {
                let (ft, fi) = *first.last().expect("a key has its first occurrence");
                let a = tables[ft as usize].1.value(fi as usize);
                let b = tables[t as usize].1.value(i as usize);
                if a != b {
                    return Err(collision(what, shard, key, a, b));
                }
            } else {
                if keys.len() >= limits.max_ids {
                    return Err(WorkerError::ShardTooLarge {
                        what: what.to_string(),
                        shard,
                        detail: format!(
                            "more than {} {what}s (positions are 32-bit)",
                            limits.max_ids
                        ),
                    });
                }
                text_bytes += tables[t as usize].1.value(i as usize).len();
                if text_bytes > limits.max_text_bytes {
                    return Err(WorkerError::ShardTooLarge {
                        what: what.to_string(),
                        shard,
                        detail: format!("more than {} bytes of {what} ids", limits.max_text_bytes),
                    });
                }
                keys.push(key);
                first.push((t, i));
            }
            remap[t as usize][i as usize] = (keys.len() - 1) as u32;
        }
        let mut ids = StringBuilder::with_capacity(keys.len(), text_bytes);
        for &(t, i) in &first {
            ids.append_value(tables[t as usize].1.value(i as usize));
        }
        Ok(IdMerge {
            table: IdTable::new(keys, ids.finish()),
            remap,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_spec::hash::id_key;

    fn table(ids: &[&str]) -> (Vec<u64>, StringArray) {
        let mut v: Vec<(u64, &str)> = ids.iter().map(|s| (id_key(s), *s)).collect();
        v.sort_unstable();
        (
            v.iter().map(|p| p.0).collect(),
            StringArray::from(v.iter().map(|p| p.1).collect::<Vec<_>>()),
        )
    }

    #[test]
    fn merged_tables_hold_each_id_once_and_map_every_local_position() {
        let a = table(&["alice", "Bob", "bob", "ünïcødé", "🦀"]);
        let b = table(&["bob", "carol", "🦀", "BOB"]);
        let m = IdMerge::new(
            "user",
            3,
            &[(&a.0, &a.1), (&b.0, &b.1)],
            IdLimits::default(),
        )
        .unwrap();
        let t = &m.table;
        assert_eq!(
            t.len(),
            7,
            "ids that differ only in case are different users"
        );
        assert!(t.keys().windows(2).all(|w| w[0] < w[1]));
        for (src, map) in [(&a, &m.remap[0]), (&b, &m.remap[1])] {
            for (i, &p) in map.iter().enumerate() {
                assert_eq!(t.id(p as usize), src.1.value(i));
                assert_eq!(t.keys()[p as usize], src.0[i]);
                assert_eq!(t.position(src.0[i]), Some(p));
            }
        }
        assert_eq!(t.position(id_key("dave")), None);
    }

    #[test]
    fn two_ids_with_one_key_are_refused() {
        let keys = vec![7u64];
        let a = StringArray::from(vec!["x"]);
        let b = StringArray::from(vec!["y"]);
        let err = IdMerge::new("item", 2, &[(&keys, &a), (&keys, &b)], IdLimits::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("`x`") && err.contains("`y`") && err.contains("item shard 2"),
            "{err}"
        );
    }

    #[test]
    fn a_shard_over_the_id_limits_is_refused_clearly() {
        let a = table(&["a", "b", "c", "d"]);
        let limits = IdLimits {
            max_ids: 3,
            max_text_bytes: 1 << 20,
        };
        let err = IdMerge::new("user", 5, &[(&a.0, &a.1)], limits)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("user shard 5")
                && err.contains("more than 3 users")
                && err.contains("cluster.shards"),
            "{err}"
        );
        let limits = IdLimits {
            max_ids: 100,
            max_text_bytes: 3,
        };
        let err = IdMerge::new("user", 5, &[(&a.0, &a.1)], limits)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("more than 3 bytes"), "{err}");
        assert!(IdMerge::new("user", 5, &[(&a.0, &a.1)], IdLimits::default()).is_ok());
    }
}
