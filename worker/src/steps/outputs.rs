//! The per-shard output tables a worker writes: `assignments.parquet`,
//! `user_factors.parquet` / `item_factors.parquet` and `recommendations.parquet`
//! parts. Ids come straight from the shards' id tables (no copy per user).

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float32Array, Float64Array, StringArray, UInt8Array,
    UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use shoal_kernels::{NO_ITEM, NO_SECOND, Nearest, TopN};
use shoal_spec::rfm::{RfmName, Scores};
use shoal_store as store;

use crate::WorkerError;
use crate::steps::load::Rfm;

fn arrow_err(file: &str) -> impl FnOnce(arrow::error::ArrowError) -> WorkerError + '_ {
    move |source| WorkerError::Arrow {
        file: file.to_string(),
        source,
    }
}

fn encode(file: &str, schema: Arc<Schema>, batch: RecordBatch) -> Result<Vec<u8>, WorkerError> {
    store::encode_parquet(schema, &[batch]).map_err(|source| WorkerError::Parquet {
        file: file.to_string(),
        source,
    })
}

/// Schema of `user_factors.parquet` / `item_factors.parquet` parts.
pub fn factors_schema(id: &str) -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new(id, DataType::Utf8, false),
        Field::new(
            "factors",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, false))),
            false,
        ),
    ]))
}

/// One part of a factors table: ids and their factor rows (row-major, `f` each).
pub fn factors_part(
    id: &str,
    ids: &StringArray,
    values: Vec<f32>,
    f: usize,
) -> Result<Vec<u8>, WorkerError> {
    let file = format!("{}_factors.parquet", id.trim_end_matches("_id"));
    let offsets = arrow::buffer::OffsetBuffer::from_lengths(std::iter::repeat_n(f, ids.len()));
    let list = arrow::array::ListArray::try_new(
        Arc::new(Field::new("item", DataType::Float32, false)),
        offsets,
        Arc::new(Float32Array::from(values)),
        None,
    )
    .map_err(arrow_err(&file))?;
    let schema = factors_schema(id);
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(ids.clone()) as ArrayRef, Arc::new(list)],
    )
    .map_err(arrow_err(&file))?;
    encode(&file, schema, batch)
}

/// Schema of `recommendations.parquet` parts.
pub fn recommendations_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("rank", DataType::UInt32, false),
        Field::new("item_id", DataType::Utf8, false),
        Field::new("score", DataType::Float32, false),
    ]))
}

/// One part of `recommendations.parquet`: every filled slot, rank 1 first, of
/// the users `rows` (positions in `users`; `top` has one row of slots each).
pub fn recommendations_part(
    users: &StringArray,
    rows: &[u32],
    top: &TopN,
    items: &StringArray,
) -> Result<(Vec<u8>, u64), WorkerError> {
    let file = "recommendations.parquet";
    let mut take_user = Vec::new();
    let mut rank = Vec::new();
    let mut take_item = Vec::new();
    let mut score = Vec::new();
    for (q, &u) in rows.iter().enumerate() {
        for r in 0..top.n {
            let i = top.items[q * top.n + r];
            if i == NO_ITEM {
                break;
            }
            take_user.push(u);
            rank.push(r as u32 + 1);
            take_item.push(i);
            score.push(top.scores[q * top.n + r]);
        }
    }
    let n = take_user.len() as u64;
    let pick = |from: &StringArray, at: Vec<u32>| {
        arrow::compute::take(from, &UInt32Array::from(at), None).map_err(arrow_err(file))
    };
    let columns: Vec<ArrayRef> = vec![
        pick(users, take_user)?,
        Arc::new(UInt32Array::from(rank)),
        pick(items, take_item)?,
        Arc::new(Float32Array::from(score)),
    ];
    let batch = RecordBatch::try_new(recommendations_schema(), columns).map_err(arrow_err(file))?;
    Ok((encode(file, recommendations_schema(), batch)?, n))
}

/// Schema of `assignments.parquet` parts.
pub fn assignments_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("segment", DataType::UInt32, false),
        Field::new("distance", DataType::Float32, false),
        Field::new("second_segment", DataType::UInt32, true),
        Field::new("second_distance", DataType::Float32, true),
        // null for a cold-start user (no interactions)
        Field::new("recency_days", DataType::Float64, true),
        Field::new("frequency", DataType::UInt64, true),
        Field::new("monetary", DataType::Float64, true),
        // RFM quintile scores (5 = best; null: not scored) and the customer's
        // name on the R x F map (null: no recency or frequency score)
        Field::new("r_score", DataType::UInt8, true),
        Field::new("f_score", DataType::UInt8, true),
        Field::new("m_score", DataType::UInt8, true),
        Field::new("rfm_cell", DataType::Utf8, true),
        // assigned from the features.extra table alone (a fold-in's users
        // without interactions): distances are over that block only
        Field::new("cold_start", DataType::Boolean, false),
    ]))
}

/// The assignments part of a shard: its users (ids `users`, RFM from `rfm`, their
/// scores `scores`, results `nearest`), then its cold-start users (`cold_users`,
/// results `cold`); segment `c` is written as `segment_ids[c]`.
pub fn assignments_part(
    users: &StringArray,
    (rfm, scores): (&Rfm, &[Scores]),
    nearest: &[Nearest],
    segment_ids: &[u32],
    cold_users: &[&str],
    cold: &[Nearest],
) -> Result<Vec<u8>, WorkerError> {
    let file = "assignments.parquet";
    let k = segment_ids.len();
    let id = |c: u32| segment_ids.get(c as usize).copied().unwrap_or(c);
    let second = |n: &Nearest| (k > 1 && n.second != NO_SECOND).then(|| id(n.second));
    let all = || nearest.iter().chain(cold);
    fn none<T>(n: usize) -> impl Iterator<Item = Option<T>> {
        std::iter::repeat_with(|| None).take(n)
    }
    let ids: ArrayRef = if cold_users.is_empty() {
        Arc::new(users.clone())
    } else {
        Arc::new(StringArray::from_iter_values(
            users.iter().flatten().chain(cold_users.iter().copied()),
        ))
    };
    let columns: Vec<ArrayRef> = vec![
        ids,
        Arc::new(UInt32Array::from_iter_values(all().map(|n| id(n.best)))),
        Arc::new(Float32Array::from_iter_values(
            all().map(|n| n.best_dist.sqrt()),
        )),
        Arc::new(UInt32Array::from_iter(all().map(second))),
        Arc::new(Float32Array::from_iter(
            all().map(|n| second(n).map(|_| n.second_dist.sqrt())),
        )),
        Arc::new(Float64Array::from_iter(
            rfm.recency_days
                .iter()
                .map(|&v| Some(v))
                .chain(none(cold.len())),
        )),
        Arc::new(UInt64Array::from_iter(
            rfm.frequency
                .iter()
                .map(|&v| Some(v))
                .chain(none(cold.len())),
        )),
        Arc::new(Float64Array::from_iter(
            rfm.monetary
                .iter()
                .map(|&v| Some(v))
                .chain(none(cold.len())),
        )),
        Arc::new(UInt8Array::from_iter(
            scores.iter().map(|s| s.r).chain(none(cold.len())),
        )),
        Arc::new(UInt8Array::from_iter(
            scores.iter().map(|s| s.f).chain(none(cold.len())),
        )),
        Arc::new(UInt8Array::from_iter(
            scores.iter().map(|s| s.m).chain(none(cold.len())),
        )),
        Arc::new(StringArray::from_iter(
            scores
                .iter()
                .map(|s| s.name().map(RfmName::as_str))
                .chain(none(cold.len())),
        )),
        Arc::new(BooleanArray::from_iter(
            std::iter::repeat_n(Some(false), nearest.len())
                .chain(std::iter::repeat_n(Some(true), cold.len())),
        )),
    ];
    let batch = RecordBatch::try_new(assignments_schema(), columns).map_err(arrow_err(file))?;
    encode(file, assignments_schema(), batch)
}
