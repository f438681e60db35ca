//! `recommend.users`: the customers a job recommends to, when not all of them
//! (marketing runs usually target a list). Every worker reads the list and keeps
//! the ids of its own shards; finalize recommends to those it finds, and counts
//! the ids it does not know.
//!
//! A list is a file, folder or glob (local or `s3://`) of plain `.txt` lists (one
//! id per line, optionally gzip) or CSV / Parquet tables whose column
//! `recommend.users_column` (default `input.columns.user`) holds the ids. Ids are
//! read like the log's (`input.user_as_integer` included), so a list exported from
//! the same system matches.

use std::collections::BTreeMap;

use arrow::array::ArrayRef;
use arrow::datatypes::Schema;
use shoal_proto::pb;
use shoal_spec::hash::{id_key, shard_of_key};
use shoal_spec::spec::{Format, JobSpec};
use shoal_store::StoreError;
use shoal_store::{list_inputs, resolve};

use crate::WorkerError;
use crate::ingest::{IngestControl, Sink, canonical_integer, find_column, read_split, user_text};

/// The ids of the list that belong to some shards: per shard, (key, id), sorted
/// by key, each once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Audience {
    pub ids: BTreeMap<u32, Vec<(u64, String)>>,
}

impl Audience {
    /// How many ids of the list belong to this worker's shards.
    pub fn requested(&self) -> u64 {
        self.ids.values().map(|v| v.len() as u64).sum()
    }
}

/// Collects ids, keeping those of `shards`.
struct Collect<'a> {
    column: String,
    user_as_integer: bool,
    shards: u32,
    keep: &'a (dyn Fn(u32) -> bool + Sync),
    out: &'a mut Vec<(u64, String)>,
    col: usize,
    control: IngestControl,
    buf: String,
}

impl Collect<'_> {
    fn add(&mut self, id: &str) {
        let id = id.trim();
        if id.is_empty() {
            return;
        }
        let id = if self.user_as_integer {
            if !canonical_integer(id, &mut self.buf) {
                return;
            }
            self.buf.as_str()
        } else {
            id
        };
        let key = id_key(id);
        if (self.keep)(shard_of_key(key, self.shards)) {
            self.out.push((key, id.to_string()));
        }
    }
}

impl Sink for Collect<'_> {
    fn plan(&mut self, schema: &Schema, file: &str) -> Result<Vec<usize>, WorkerError> {
        let col = find_column(schema, &self.column).ok_or_else(|| WorkerError::MissingColumn {
            file: file.to_string(),
            field: "recommend.users_column",
            column: self.column.clone(),
            present: schema.fields().iter().map(|f| f.name().clone()).collect(),
        })?;
        self.col = col;
        Ok(vec![col])
    }

    fn check_types(&self, schema: &Schema, file: &str) -> Result<(), WorkerError> {
        let field = schema.field(self.col);
        let empty = arrow::array::new_empty_array(field.data_type());
        match user_text(&empty) {
            Ok(Some(_)) => Ok(()),
            _ => Err(WorkerError::ColumnType {
                file: file.to_string(),
                field: "recommend.users_column",
                column: field.name().clone(),
                data_type: field.data_type().to_string(),
            }),
        }
    }

    fn batch(
        &mut self,
        columns: &[ArrayRef],
        rows: usize,
        _row_number: &dyn Fn(u64) -> u64,
    ) -> Result<(), WorkerError> {
        let text = user_text(&columns[0])
            .map_err(|source| WorkerError::Arrow {
                file: "recommend.users".into(),
                source,
            })?
            .ok_or_else(|| WorkerError::InvalidRequest("recommend.users: not text".into()))?;
        for i in 0..rows {
            if let Some(id) = text.get(i) {
                self.add(id);
            }
        }
        Ok(())
    }

    /// A malformed line of the list names no customer: skipped, as a blank or
    /// non-integer id is.
    fn malformed(&mut self, _row: u64, _detail: String) -> Result<(), WorkerError> {
        Ok(())
    }

    fn control(&self) -> &IngestControl {
        &self.control
    }
}

/// Reads `recommend.users` of `spec`, keeping the ids of `owned` shards.
pub async fn read(spec: &JobSpec, owned: &[u32]) -> Result<Option<Audience>, WorkerError> {
    let Some(pattern) = spec.recommend.users() else {
        return Ok(None);
    };
    let shards = spec.cluster.shards;
    let keep = |s: u32| owned.binary_search(&s).is_ok();
    let column = match spec.recommend.users_column.trim() {
        "" => spec.input.columns.user().to_string(),
        c => c.to_string(),
    };
    let objects = list_inputs(pattern).await.map_err(|e| match e {
        StoreError::NoInputs { .. } => WorkerError::InvalidRequest(format!(
            "recommend.users: nothing matches `{pattern}` (a file, folder or glob of .txt lists or CSV / Parquet tables)"
        )),
        other => other.into(),
    })?;
    let mut ids = Vec::new();
    for (index, object) in objects.iter().enumerate() {
        let lower = object.url.to_ascii_lowercase();
        let plain = lower.ends_with(".txt") || lower.ends_with(".txt.gz");
        let mut collect = Collect {
            column: column.clone(),
            user_as_integer: spec.input.user_as_integer,
            shards,
            keep: &keep,
            out: &mut ids,
            col: 0,
            control: IngestControl::default(),
            buf: String::new(),
        };
        if plain {
            let bytes = resolve(&object.url)?.get().await?;
            let mut text = String::new();
            let read = if lower.ends_with(".gz") {
                gunzip(&bytes, &mut text).await
            } else {
                std::str::from_utf8(&bytes)
                    .map(|t| text.push_str(t))
                    .map_err(|e| e.to_string())
            };
            read.map_err(|reason| {
                WorkerError::InvalidRequest(format!(
                    "recommend.users: {} is not a UTF-8 list of ids: {reason}",
                    object.url
                ))
            })?;
            text.lines().for_each(|line| collect.add(line));
            continue;
        }
        let Some((format, gzip)) = Format::from_name(&object.url) else {
            return Err(WorkerError::InvalidRequest(format!(
                "recommend.users: {} is neither a .txt list nor a CSV or Parquet table",
                object.url
            )));
        };
        let split = pb::Split {
            index: index as u32,
            object: object.url.clone(),
            size: object.size,
            format: format.as_str().to_string(),
            row_groups: Vec::new(),
            gzip,
        };
        let loc = resolve(&object.url)?;
        read_split(&split, &loc, &mut collect).await?;
    }
    ids.sort_unstable();
    ids.dedup();
    let mut out = Audience::default();
    for (key, id) in ids {
        out.ids
            .entry(shard_of_key(key, shards))
            .or_default()
            .push((key, id));
    }
    Ok(Some(out))
}

/// Gunzips `bytes` (one or more members) into `text`.
async fn gunzip(bytes: &[u8], text: &mut String) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let mut decoder = async_compression::tokio::bufread::GzipDecoder::new(bytes);
    decoder.multiple_members(true);
    decoder
        .read_to_string(text)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
