//! The `features.extra` table on the coordinator's side: the columns every split
//! of it must agree on, and what the job reports about it.

use crate::CoordinatorError;
use crate::rows::RowTally;
use serde::Serialize;
use shoal_proto::pb;

pub use shoal_proto::extra::{dims, feature_names};

/// The table's feature columns as all splits agree on them: the same names in
/// the same order everywhere, and each list column one length (splits where a
/// list column held no value do not vote). `objects` names each split's object.
pub fn agree(
    results: &[pb::ExtraSplitResult],
    object: impl Fn(u32) -> String,
) -> Result<Vec<pb::ExtraColumn>, CoordinatorError> {
    let Some(first) = results.first() else {
        return Ok(Vec::new());
    };
    let names =
        |r: &pb::ExtraSplitResult| r.columns.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    let mut columns: Vec<pb::ExtraColumn> = first
        .columns
        .iter()
        .map(|c| pb::ExtraColumn {
            name: c.name.clone(),
            dims: 0,
        })
        .collect();
    // (dims, split) that fixed each column's length
    let mut fixed: Vec<Option<(u32, u32)>> = vec![None; columns.len()];
    for r in results {
        if names(r) != names(first) {
            return Err(CoordinatorError::ExtraTable {
                reason: format!(
                    "{} has the feature columns [{}], {} has [{}]; every file of the table needs the same columns (or list them in features.extra_columns)",
                    object(first.split),
                    names(first).join(", "),
                    object(r.split),
                    names(r).join(", ")
                ),
            });
        }
        for (c, col) in r.columns.iter().enumerate() {
            if col.dims == 0 {
                continue;
            }
            match fixed[c] {
                None => fixed[c] = Some((col.dims, r.split)),
                Some((d, s)) if d != col.dims => {
                    return Err(CoordinatorError::ExtraTable {
                        reason: format!(
                            "column `{}` holds lists of {d} values in {} and of {} in {}; give every row of a list column the same length",
                            col.name,
                            object(s),
                            col.dims,
                            object(r.split)
                        ),
                    });
                }
                Some(_) => {}
            }
        }
    }
    for (col, f) in columns.iter_mut().zip(&fixed) {
        match f {
            Some((d, _)) => col.dims = *d,
            None => {
                return Err(CoordinatorError::ExtraTable {
                    reason: format!(
                        "column `{}` holds no value in any row; drop it, or name the wanted columns in features.extra_columns",
                        col.name
                    ),
                });
            }
        }
    }
    Ok(columns)
}

/// Rows read, kept and dropped of the table's splits.
pub fn tally(results: &[pb::ExtraSplitResult]) -> RowTally {
    RowTally::from_counts(results.iter().filter_map(|s| s.counts.as_ref()))
}

/// A column of the table, in the report.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ColumnFacts {
    pub name: String,
    /// 1 for a number, else the length of its lists.
    pub dims: u32,
}

/// What the job did with the `features.extra` table (`report.json` `extra`).
#[derive(Debug, Clone, Serialize)]
pub struct ExtraFacts {
    pub table: String,
    pub columns: Vec<ColumnFacts>,
    /// `features.extra_weight`.
    pub weight: f64,
    pub rows: RowTally,
    /// Segmented users with a row in the table, and without one (every feature
    /// of those takes its mean).
    pub users_with_row: u64,
    pub users_without_row: u64,
    /// Values that took their feature's mean: no row, a null, a null element.
    pub missing_values: u64,
    /// Rows of users without interactions: not segmented in training; in a
    /// fold-in (`[model]`) they are assigned from these features alone.
    pub rows_without_interactions: u64,
    /// In a fold-in: the users assigned from the table alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_start_users: Option<u64>,
}

impl ExtraFacts {
    pub fn new(
        table: &str,
        columns: &[pb::ExtraColumn],
        weight: f64,
        rows: RowTally,
        stats: &[pb::ShardStats],
    ) -> ExtraFacts {
        let users: u64 = stats.iter().map(|s| s.users).sum();
        let with: u64 = stats.iter().map(|s| s.extra_users).sum();
        ExtraFacts {
            table: table.to_string(),
            columns: columns
                .iter()
                .map(|c| ColumnFacts {
                    name: c.name.clone(),
                    dims: c.dims,
                })
                .collect(),
            weight,
            rows,
            users_with_row: with,
            users_without_row: users - with.min(users),
            missing_values: stats.iter().map(|s| s.extra_missing_values).sum(),
            rows_without_interactions: stats.iter().map(|s| s.extra_orphans).sum(),
            cold_start_users: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(index: u32, columns: &[(&str, u32)]) -> pb::ExtraSplitResult {
        pb::ExtraSplitResult {
            split: index,
            columns: columns
                .iter()
                .map(|(n, d)| pb::ExtraColumn {
                    name: n.to_string(),
                    dims: *d,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn object(s: u32) -> String {
        format!("part-{s}.parquet")
    }

    #[test]
    fn splits_agree_on_columns_and_list_lengths() {
        let got = agree(
            &[
                split(0, &[("age", 1), ("emb", 0)]),
                split(1, &[("age", 1), ("emb", 4)]),
                split(2, &[("age", 1), ("emb", 4)]),
            ],
            object,
        )
        .unwrap();
        assert_eq!(
            got.iter()
                .map(|c| (c.name.as_str(), c.dims))
                .collect::<Vec<_>>(),
            [("age", 1), ("emb", 4)]
        );
        assert!(agree(&[], object).unwrap().is_empty());
    }

    #[test]
    fn disagreements_name_the_files() {
        let err = agree(
            &[
                split(0, &[("age", 1)]),
                split(3, &[("age", 1), ("spend", 1)]),
            ],
            object,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("part-0.parquet") && err.contains("part-3.parquet"),
            "{err}"
        );
        let err = agree(&[split(0, &[("emb", 8)]), split(1, &[("emb", 4)])], object)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`emb`") && err.contains("8") && err.contains("4"),
            "{err}"
        );
        let err = agree(&[split(0, &[("emb", 0)])], object)
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds no value"), "{err}");
    }
}
