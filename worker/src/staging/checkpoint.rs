//! ALS checkpoints: the factors of every shard after an iteration, so that a job
//! which lost a worker resumes its ALS there, on whichever worker now holds the
//! shard, instead of from the seeded start.
//!
//! ```text
//! {checkpoint}/users/shard-{shard:05}.factors
//! {checkpoint}/items/shard-{shard:05}.factors
//!     "SHOALCKP", format version (u32 LE), factors (u32 LE), rows (u64 LE),
//!     fingerprint of the shard's keys (u64 LE), then rows x factors f32 (LE),
//!     row-major in the shard's key order
//! ```
//!
//! The coordinator names one folder per checkpointed iteration and removes the
//! older one once every shard of the newer is written, so a checkpoint is never
//! a mix of two iterations. The keys' fingerprint ties the rows to the shard as
//! it was loaded: a shard loaded from other staging is refused, not misread.

use crate::WorkerError;
use crate::steps::als::Side;
use bytes::Bytes;
use shoal_store::Location;
use xxhash_rust::xxh3::xxh3_64;

const MAGIC: &[u8; 8] = b"SHOALCKP";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8 + 8;

/// The object of `side`'s shard `shard` in a checkpoint folder.
pub fn object(folder: &Location, side: Side, shard: u32) -> Location {
    folder.child(&format!("{}/shard-{shard:05}.factors", side.as_str()))
}

fn fingerprint(keys: &[u64]) -> u64 {
    let bytes: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
    xxh3_64(&bytes)
}

/// The bytes of a shard's checkpoint: `values` are `keys.len()` rows of `f`.
pub fn encode(keys: &[u64], f: usize, values: &[f32]) -> Bytes {
    debug_assert_eq!(values.len(), keys.len() * f);
    let mut out = Vec::with_capacity(HEADER + values.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(f as u32).to_le_bytes());
    out.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    out.extend_from_slice(&fingerprint(keys).to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

/// The factors in a checkpoint's `bytes`, checked against the shard they are for.
pub fn decode(bytes: &[u8], keys: &[u64], f: usize, url: &str) -> Result<Vec<f32>, WorkerError> {
    let bad = |detail: String| WorkerError::Staged {
        url: url.to_string(),
        detail,
    };
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(bad("not an ALS checkpoint".into()));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    if u32_at(8) != VERSION {
        return Err(bad(format!("checkpoint format version {}", u32_at(8))));
    }
    let (factors, rows, print) = (u32_at(12) as usize, u64_at(16), u64_at(24));
    if factors != f || rows != keys.len() as u64 || print != fingerprint(keys) {
        return Err(bad(format!(
            "it holds {rows} rows of {factors} factors for other keys; the shard has {} rows of {f}",
            keys.len()
        )));
    }
    let body = &bytes[HEADER..];
    if body.len() != keys.len() * f * 4 {
        return Err(bad(format!(
            "{} bytes of factors for {} rows of {f}",
            body.len(),
            keys.len()
        )));
    }
    Ok(body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

/// Writes a shard's factors into the checkpoint folder (one `put`).
pub async fn write(
    folder: &Location,
    side: Side,
    shard: u32,
    keys: &[u64],
    f: usize,
    values: &[f32],
) -> Result<(), WorkerError> {
    object(folder, side, shard)
        .put(encode(keys, f, values))
        .await?;
    Ok(())
}

/// Reads a shard's factors from the checkpoint folder.
pub async fn read(
    folder: &Location,
    side: Side,
    shard: u32,
    keys: &[u64],
    f: usize,
) -> Result<Vec<f32>, WorkerError> {
    let at = object(folder, side, shard);
    let bytes = at.get().await?;
    decode(&bytes, keys, f, &at.url())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_round_trip_and_other_keys_are_refused() {
        let keys = vec![3u64, 9, 27];
        let values: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let bytes = encode(&keys, 2, &values);
        assert_eq!(decode(&bytes, &keys, 2, "x").unwrap(), values);
        let other = decode(&bytes, &[3, 9, 28], 2, "x").unwrap_err();
        assert!(other.to_string().contains("for other keys"), "{other}");
        assert!(decode(&bytes, &keys, 3, "x").is_err());
        assert!(decode(&bytes[..bytes.len() - 4], &keys, 2, "x").is_err());
        assert!(decode(b"SHOALSTG????????????????????????", &keys, 2, "x").is_err());
    }
}
