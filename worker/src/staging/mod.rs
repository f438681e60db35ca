//! Staging: what ingest writes and shard loading reads.
//!
//! Ingest appends the kept rows of one split per shard as it reads them, and
//! every [`partial::CHUNK_ROWS`] rows (and at the end) aggregates them into one
//! object per non-empty shard ([`SplitPartials`]):
//!
//! ```text
//! {staging}/users/shard-{shard:05}/split-{split:05}-{chunk:04}.arrows
//!     per user: key, id, last time, events, events without an order, money;
//!     its distinct orders; with ALS its (item, strength) pairs
//! {staging}/items/shard-{shard:05}/split-{split:05}-{chunk:04}.arrows
//!     with ALS, per item: key, id, label; its (user, strength) pairs
//! ```
//!
//! Users and items are named by key (`xxh3(id)`, [`shoal_spec::hash::id_key`]),
//! the id text kept once per object; a shard is `key % shards`. An object holds
//! integer columns only, besides that text: Arrow IPC streams (LZ4), framed by
//! [`encode_tables`]. Each object is written with a single `put`, so a retried
//! split overwrites its objects and ingest is idempotent. A shard is the merge of
//! its objects in split order, so what it holds does not depend on which worker
//! ingested which split: the merge ([`crate::steps::load`]) sums per split in
//! split order, the same on the user side and the item side.

pub mod checkpoint;
mod partial;

pub use partial::{
    ItemPartial, KeptRow, RowSink, SplitPartials, StagedFile, StagedFiles, UserPartial,
    read_item_partials, read_user_partials,
};

use std::io::Cursor;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::ipc::CompressionType;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use shoal_store::Location;

use crate::error::WorkerError;

/// How many staged objects are uploaded at the same time.
const PUT_CONCURRENCY: usize = 16;

/// The first bytes of every staged object, then the format version.
const MAGIC: &[u8; 8] = b"SHOALSTG";
const VERSION: u32 = 1;

/// The folder of user shard `shard`.
pub fn user_prefix(staging: &Location, shard: u32) -> Location {
    staging.child(&format!("users/shard-{shard:05}"))
}

/// The folder of item shard `shard`.
pub fn item_prefix(staging: &Location, shard: u32) -> Location {
    staging.child(&format!("items/shard-{shard:05}"))
}

/// The staged object of chunk `chunk` of `split` in the folder of a shard.
pub fn split_object(prefix: &Location, split: u32, chunk: u32) -> Location {
    prefix.child(&format!("split-{split:05}-{chunk:04}.arrows"))
}

/// The (split, chunk) of a staged object's name, if it is one.
pub(crate) fn split_of_name(name: &str) -> Option<(u32, u32)> {
    let stem = name.strip_prefix("split-")?.strip_suffix(".arrows")?;
    let (split, chunk) = stem.split_once('-')?;
    let number = |d: &str| {
        (!d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .then(|| d.parse().ok())
            .flatten()
    };
    Some((number(split)?, number(chunk)?))
}

/// The objects of a shard's folder, in (split, chunk) order.
pub(crate) async fn list_splits(
    prefix: &Location,
) -> Result<Vec<((u32, u32), Location)>, WorkerError> {
    let mut out: Vec<((u32, u32), Location)> = prefix
        .list()
        .await?
        .into_iter()
        // Only our own objects: a store may show others (e.g. temporary uploads).
        .filter_map(|meta| {
            let at = meta.location.filename().and_then(split_of_name)?;
            Some((at, prefix.at(meta.location)))
        })
        .collect();
    out.sort_by_key(|(at, _)| *at);
    Ok(out)
}

/// The bytes of a staged object holding `tables`: [`MAGIC`], the version and the
/// table count (u32 LE each), then each table as an Arrow IPC stream (LZ4
/// frames) after its length (u64 LE).
pub(crate) fn encode_tables(tables: &[RecordBatch]) -> Result<Bytes, ArrowError> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tables.len() as u32).to_le_bytes());
    let options =
        IpcWriteOptions::default().try_with_compression(Some(CompressionType::LZ4_FRAME))?;
    for t in tables {
        let mut stream = Vec::new();
        {
            let mut w =
                StreamWriter::try_new_with_options(&mut stream, &t.schema(), options.clone())?;
            w.write(t)?;
            w.finish()?;
        }
        out.extend_from_slice(&(stream.len() as u64).to_le_bytes());
        out.extend_from_slice(&stream);
    }
    Ok(Bytes::from(out))
}

/// The tables of a staged object, each checked against its expected schema.
pub(crate) fn decode_tables(
    bytes: &Bytes,
    expected: &[SchemaRef],
    url: &str,
) -> Result<Vec<RecordBatch>, WorkerError> {
    let bad = |detail: String| WorkerError::Staged {
        url: url.to_string(),
        detail,
    };
    let head = 16;
    if bytes.len() < head || &bytes[..8] != MAGIC {
        return Err(bad("it does not start with the staging header".into()));
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    if word(8) != VERSION {
        return Err(bad(format!(
            "format version {}, expected {VERSION}",
            word(8)
        )));
    }
    let count = word(12) as usize;
    if count != expected.len() {
        return Err(bad(format!("{count} tables, expected {}", expected.len())));
    }
    let mut at = head;
    let mut out = Vec::with_capacity(count);
    for schema in expected {
        if bytes.len() < at + 8 {
            return Err(bad("it ends inside a table's length".into()));
        }
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")) as usize;
        at += 8;
        if bytes.len() < at + len {
            return Err(bad("it ends inside a table".into()));
        }
        let reader = StreamReader::try_new(Cursor::new(bytes.slice(at..at + len)), None)
            .map_err(|e| bad(e.to_string()))?;
        let found = reader.schema();
        if found.fields() != schema.fields() {
            return Err(bad(format!(
                "a table with columns {:?}, expected {:?}",
                found.fields().iter().map(|f| f.name()).collect::<Vec<_>>(),
                schema.fields().iter().map(|f| f.name()).collect::<Vec<_>>()
            )));
        }
        let batches: Vec<RecordBatch> = reader
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let batch = match batches.len() {
            0 => RecordBatch::new_empty(schema.clone()),
            1 => batches.into_iter().next().expect("one batch"),
            _ => {
                arrow::compute::concat_batches(schema, &batches).map_err(|e| bad(e.to_string()))?
            }
        };
        out.push(batch);
        at += len;
    }
    Ok(out)
}

/// Puts every `(location, bytes)`, [`PUT_CONCURRENCY`] at a time; the first
/// failure is the error.
pub(crate) async fn put_all(files: Vec<(Location, Bytes)>) -> Result<(), WorkerError> {
    futures::stream::iter(files)
        .map(|(loc, bytes)| async move { loc.put(bytes).await })
        .buffer_unordered(PUT_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// A one-field schema helper for the tables below.
pub(crate) fn schema(fields: Vec<arrow::datatypes::Field>) -> SchemaRef {
    Arc::new(arrow::datatypes::Schema::new(fields))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, UInt64Array};
    use arrow::datatypes::{DataType, Field};
    use shoal_store::resolve;

    #[test]
    fn layout_is_zero_padded_per_shard_and_split() {
        let staging = resolve("/tmp/x/staging").unwrap();
        assert_eq!(
            split_object(&user_prefix(&staging, 3), 12, 1).url(),
            "file:///tmp/x/staging/users/shard-00003/split-00012-0001.arrows"
        );
        assert_eq!(
            split_object(&item_prefix(&staging, 65_535), 0, 0).url(),
            "file:///tmp/x/staging/items/shard-65535/split-00000-0000.arrows"
        );
        assert_eq!(split_of_name("split-00012-0003.arrows"), Some((12, 3)));
        assert_eq!(split_of_name("split-00012-0003.arrows#1"), None);
        assert_eq!(split_of_name("split-00012.arrows"), None);
        assert_eq!(split_of_name("split--0001.arrows"), None);
        assert_eq!(split_of_name("other.arrows"), None);
    }

    #[test]
    fn tables_round_trip_and_foreign_bytes_are_named() {
        let s = schema(vec![Field::new("k", DataType::UInt64, false)]);
        let t = schema(vec![Field::new("j", DataType::UInt64, false)]);
        let a = RecordBatch::try_new(
            s.clone(),
            vec![Arc::new(UInt64Array::from(vec![1u64, 2, 3])) as ArrayRef],
        )
        .unwrap();
        let b = RecordBatch::new_empty(t.clone());
        let bytes = encode_tables(&[a.clone(), b.clone()]).unwrap();
        let got = decode_tables(&bytes, &[s.clone(), t.clone()], "file:///o").unwrap();
        assert_eq!(got, vec![a, b]);
        for (bad, want) in [
            (Bytes::from_static(b"PAR1...."), "staging header"),
            (bytes.slice(..bytes.len() - 3), "ends inside"),
        ] {
            let err = decode_tables(&bad, &[s.clone(), t.clone()], "file:///o")
                .unwrap_err()
                .to_string();
            assert!(err.contains("file:///o") && err.contains(want), "{err}");
        }
        let err = decode_tables(&bytes, &[t.clone(), t], "file:///o")
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected [\"j\"]"), "{err}");
    }
}
