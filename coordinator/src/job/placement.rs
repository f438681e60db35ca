//! Where a job's shards go. After ingest the coordinator knows, per shard, how
//! many users, items and pairs were staged (distinct counts merged from the
//! splits' sketches); a stated memory model turns them into bytes, and the shards
//! are placed on the workers within their memory limits (the largest first, each
//! on the worker with the most room left). A job that cannot fit fails here,
//! before anything is loaded, naming what it needs and what the workers have.
//!
//! Placement never changes results: every reduction runs in shard order and
//! every shard's contents are the same wherever it is loaded.

use crate::CoordinatorError;
use shoal_proto::pb;
use shoal_proto::sketch::Distinct;

/// The staged size of one shard (user shard and item shard of one index).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardSize {
    pub users: u64,
    pub user_pairs: u64,
    pub items: u64,
    pub item_pairs: u64,
    /// Bytes staged for the shard (both sides), read back at load.
    pub staged_bytes: u64,
}

/// Every shard's size, and the totals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sizes {
    pub shards: Vec<ShardSize>,
    pub users: u64,
    pub items: u64,
}

impl Sizes {
    /// From the splits' staged counts: the distinct-count sketches merged per
    /// shard (a user staged by several splits counts once).
    pub fn from_splits(splits: &[pb::SplitResult], shards: u32) -> Sizes {
        let n = shards as usize;
        let mut sketches = vec![[Distinct::default(), Distinct::default()]; 2 * n];
        let mut bytes = vec![0u64; n];
        for s in splits {
            for st in &s.staged {
                let i = st.shard as usize;
                if i >= n {
                    continue;
                }
                bytes[i] += st.bytes;
                let at = i + if st.items { n } else { 0 };
                for (j, raw) in [&st.entities_sketch, &st.pairs_sketch]
                    .into_iter()
                    .enumerate()
                {
                    if let Some(d) = Distinct::from_bytes(raw) {
                        sketches[at][j].merge(&d);
                    }
                }
            }
        }
        let count = |d: &Distinct| d.estimate().round() as u64;
        let shards: Vec<ShardSize> = (0..n)
            .map(|i| ShardSize {
                users: count(&sketches[i][0]),
                user_pairs: count(&sketches[i][1]),
                items: count(&sketches[n + i][0]),
                item_pairs: count(&sketches[n + i][1]),
                staged_bytes: bytes[i],
            })
            .collect();
        Sizes {
            users: shards.iter().map(|s| s.users).sum(),
            items: shards.iter().map(|s| s.items).sum(),
            shards,
        }
    }
}

/// Bytes a job's data takes on a worker, from counts. Per user: its id (key,
/// offset, text), RFM, the features.extra values, the scaled point and the
/// k-means state (labels, bounds, nearest two, cost), and with ALS its factors
/// (one host copy: the CPU solver's rows are the ones served to the other
/// workers; a GPU solves in device memory). Per pair, on each side: 16 bytes
/// while the shard is loaded (other key and strength), which the confidence
/// matrix (8) replaces shard by shard as the job links. Per item: id, label,
/// factors. Per worker:
/// with ALS the copies of the other side's rows its shards read (every user for
/// a worker with item shards, every item for one with user shards) and the
/// catalogue of the recommendations; the staged objects of the shards it merges
/// at once; and the process itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryModel {
    /// ALS factors (0 without ALS).
    pub factors: u64,
    /// Features per user after scaling.
    pub dims: u64,
    /// Extra-table values per user.
    pub extra: u64,
    /// Shards a worker merges at once (its threads).
    pub parallel_loads: u64,
}

/// Bytes of one user id with its key and offset (ids are short: customer numbers).
const ID_BYTES: u64 = 28;
/// Bytes per pair and side while loaded (then 8 as a confidence matrix).
const PAIR_BYTES: u64 = 16;
/// A worker process without a job.
const PROCESS_BYTES: u64 = 64 << 20;
/// Allocator slack over the model.
const SLACK: f64 = 1.25;
/// A staged object's bytes decompressed and merged (LZ4 of integer columns,
/// mostly hashed keys, which hardly compress: measured ~1.2x at 1M users).
const STAGED_EXPANSION: u64 = 2;

impl MemoryModel {
    fn user_shard(&self, s: &ShardSize) -> u64 {
        let per_user = ID_BYTES + 24 + 4 * self.extra + 4 * self.dims + 36 + 4 * self.factors;
        s.users * per_user + s.user_pairs * PAIR_BYTES * u64::from(self.factors > 0)
    }

    fn item_shard(&self, s: &ShardSize) -> u64 {
        if self.factors == 0 {
            return 0;
        }
        s.items * (ID_BYTES + 16 + 4 * self.factors) + s.item_pairs * PAIR_BYTES
    }

    /// One shard (both sides) placed on a worker.
    pub fn shard(&self, s: &ShardSize) -> u64 {
        self.user_shard(s) + self.item_shard(s)
    }

    /// What a worker holding shards needs besides them.
    pub fn worker_fixed(&self, sizes: &Sizes) -> u64 {
        let copies = if self.factors > 0 {
            4 * self.factors * (sizes.users + sizes.items)
                + sizes.items * (ID_BYTES + 16 + 4 * self.factors)
        } else {
            0
        };
        let largest = sizes
            .shards
            .iter()
            .map(|s| s.staged_bytes)
            .max()
            .unwrap_or(0);
        PROCESS_BYTES + copies + self.parallel_loads * largest * STAGED_EXPANSION
    }
}

/// Which member holds each shard (user shard s and item shard s together), and
/// the bytes each member is expected to need.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub owner: Vec<usize>,
    pub need: Vec<u64>,
}

impl Placement {
    /// The shards of `member`, in shard order.
    pub fn shards_of(&self, member: usize) -> Vec<u32> {
        (0..self.owner.len() as u32)
            .filter(|&s| self.owner[s as usize] == member)
            .collect()
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Places the shards of `sizes` on members with memory limits `limits` (bytes,
/// in member order; `names` for the message). Deterministic for the same inputs.
pub fn place(
    sizes: &Sizes,
    limits: &[u64],
    names: &[String],
    model: &MemoryModel,
) -> Result<Placement, CoordinatorError> {
    let fixed = model.worker_fixed(sizes);
    let with_slack = |b: u64| (b as f64 * SLACK) as u64;
    let shard_bytes: Vec<u64> = sizes
        .shards
        .iter()
        .map(|s| with_slack(model.shard(s)))
        .collect();
    let mut need = vec![0u64; limits.len()];
    let mut owner = vec![usize::MAX; shard_bytes.len()];
    let mut order: Vec<usize> = (0..shard_bytes.len()).collect();
    order.sort_by(|&a, &b| shard_bytes[b].cmp(&shard_bytes[a]).then(a.cmp(&b)));
    let room = |m: usize, need: &[u64]| -> i128 {
        let used = if need[m] > 0 {
            need[m]
        } else {
            with_slack(fixed)
        };
        i128::from(limits[m]) - i128::from(used)
    };
    for &s in &order {
        // the member with the most room left (ties: the first)
        let best = (0..limits.len())
            .max_by(|&a, &b| room(a, &need).cmp(&room(b, &need)).then(b.cmp(&a)))
            .expect("a job has at least one worker");
        if room(best, &need) < i128::from(shard_bytes[s]) {
            let total: u64 = shard_bytes.iter().sum::<u64>() + with_slack(fixed);
            let have: Vec<String> = names
                .iter()
                .zip(limits)
                .map(|(n, &l)| format!("{n} {}", gib(l)))
                .collect();
            return Err(CoordinatorError::OverBudget {
                need: gib(total),
                have: have.join(", "),
                detail: format!(
                    "{} users, {} items, {} pairs; the largest shard needs {}, a worker's own share {}",
                    sizes.users,
                    sizes.items,
                    sizes.shards.iter().map(|s| s.user_pairs).sum::<u64>(),
                    gib(shard_bytes[order[0]]),
                    gib(with_slack(fixed))
                ),
            });
        }
        if need[best] == 0 {
            need[best] = with_slack(fixed);
        }
        need[best] += shard_bytes[s];
        owner[s] = best;
    }
    tracing::info!(
        users = sizes.users,
        items = sizes.items,
        need_mib = ?need.iter().map(|b| b >> 20).collect::<Vec<_>>(),
        largest_staged_mib = sizes.shards.iter().map(|s| s.staged_bytes >> 20).max().unwrap_or(0),
        "shards placed"
    );
    Ok(Placement { owner, need })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(users: &[u64]) -> Sizes {
        let shards: Vec<ShardSize> = users
            .iter()
            .map(|&u| ShardSize {
                users: u,
                user_pairs: 10 * u,
                items: u / 20,
                item_pairs: 10 * u,
                staged_bytes: 20 * u,
            })
            .collect();
        Sizes {
            users: users.iter().sum(),
            items: users.iter().sum::<u64>() / 20,
            shards,
        }
    }

    const MODEL: MemoryModel = MemoryModel {
        factors: 32,
        dims: 35,
        extra: 0,
        parallel_loads: 2,
    };

    #[test]
    fn shards_go_where_there_is_room_and_balance() {
        let s = sizes(&[100_000; 8]);
        let names: Vec<String> = (0..3).map(|i| format!("w{i}")).collect();
        let p = place(&s, &[8 << 30; 3], &names, &MODEL).unwrap();
        let mut counts = [0; 3];
        for &o in &p.owner {
            counts[o] += 1;
        }
        assert_eq!(counts, [3, 3, 2]);
        assert_eq!(p.shards_of(2).len(), 2);
        // a worker with little room gets nothing, the others everything
        let p = place(&s, &[8 << 30, 1 << 20, 8 << 30], &names, &MODEL).unwrap();
        assert!(p.owner.iter().all(|&o| o != 1));
    }

    #[test]
    fn a_job_that_cannot_fit_is_refused_naming_what_it_needs_and_what_workers_have() {
        let s = sizes(&[2_000_000; 4]);
        let names = vec!["worker-1".to_string(), "worker-2".to_string()];
        let err = place(&s, &[1 << 30, 1 << 30], &names, &MODEL)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("8000000 users")
                && err.contains("worker-1 1.00 GiB")
                && err.contains("worker-2 1.00 GiB")
                && err.contains("needs about"),
            "{err}"
        );
    }

    #[test]
    fn sizes_merge_the_splits_sketches() {
        let mut a = Distinct::default();
        let mut b = Distinct::default();
        for i in 0..10_000u64 {
            a.add(shoal_spec::hash::key(1, &[i]));
            b.add(shoal_spec::hash::key(1, &[i + 5_000]));
        }
        let staged = |sketch: &Distinct| pb::StagedShard {
            shard: 1,
            items: false,
            entities: 10_000,
            pairs: 0,
            bytes: 100,
            entities_sketch: sketch.to_bytes(),
            pairs_sketch: Vec::new(),
        };
        let splits = vec![
            pb::SplitResult {
                staged: vec![staged(&a)],
                ..Default::default()
            },
            pb::SplitResult {
                staged: vec![staged(&b)],
                ..Default::default()
            },
        ];
        let s = Sizes::from_splits(&splits, 2);
        assert!(
            (14_000..16_000).contains(&s.shards[1].users),
            "{:?}",
            s.shards[1]
        );
        assert_eq!(s.shards[1].staged_bytes, 200);
        assert_eq!(s.shards[0], ShardSize::default());
    }
}
