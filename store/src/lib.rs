//! Where data lives. Every path in a spec is a local path, a `file://` URL or an
//! `s3://bucket/prefix` URL; all I/O goes through `object_store`, so nothing assumes a
//! local filesystem.
//!
//! S3 stores are configured from the environment: the standard `AWS_*` variables
//! (keys, session token, region, web identity / IRSA, container credentials; see
//! `AmazonS3Builder::from_env`), plus `SHOAL_S3_ENDPOINT` for S3-compatible servers
//! (path-style requests, plain HTTP allowed for an `http://` endpoint). One store per
//! bucket is built on first use and shared, so connections are reused.

use futures::future::BoxFuture;
use futures::{FutureExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::{AsyncFileReader, MetadataSuffixFetch};
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("`{url}` is not a usable location: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "`{url}`: the `{scheme}://` scheme is not supported; use an s3://bucket/prefix URL, a local path or a file:// URL"
    )]
    Unsupported { url: String, scheme: String },
    #[error(
        "cannot set up the S3 client for `{url}`: {source}; check the AWS_* variables and {ENDPOINT_VAR}"
    )]
    S3Setup {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "`{url}`: the bucket `{bucket}` does not exist or these credentials cannot see it; create it or fix the URL (for an S3-compatible store, check {ENDPOINT_VAR})"
    )]
    NoSuchBucket { url: String, bucket: String },
    #[error("no input objects match `{pattern}` (looked for a file, a folder and a glob)")]
    NoInputs { pattern: String },
    #[error("`{pattern}` is not a valid glob: {reason}")]
    BadGlob { pattern: String, reason: String },
    #[error("object store error at `{url}`: {source}")]
    Io {
        url: String,
        #[source]
        source: object_store::Error,
    },
}

impl StoreError {
    /// An I/O error at `url`; a missing S3 bucket gets its own error.
    pub fn io(url: impl Into<String>, source: object_store::Error) -> Self {
        let url = url.into();
        if let Some(bucket) = s3_bucket_of(&url)
            && names_no_such_bucket(&source)
        {
            let bucket = bucket.to_string();
            return StoreError::NoSuchBucket { url, bucket };
        }
        StoreError::Io { url, source }
    }

    /// Whether trying the same call again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Io { source, .. }
            if !matches!(source, object_store::Error::NotFound { .. } | object_store::Error::InvalidPath { .. }))
    }
}

/// A location in an object store: the store, the path inside it, and its URL.
#[derive(Clone)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub path: Path,
    /// Scheme and authority, e.g. `file://`, to rebuild URLs of children.
    root: String,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url())
    }
}

impl Location {
    /// The URL of this location.
    pub fn url(&self) -> String {
        self.url_of(&self.path)
    }

    /// The URL of another path in the same store.
    pub fn url_of(&self, path: &Path) -> String {
        format!("{}/{}", self.root, path)
    }

    /// A location below this one; `rel` is `/`-separated.
    pub fn child(&self, rel: &str) -> Location {
        let mut path = self.path.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        Location {
            store: self.store.clone(),
            path,
            root: self.root.clone(),
        }
    }

    /// The same store at another path.
    pub fn at(&self, path: Path) -> Location {
        Location {
            store: self.store.clone(),
            path,
            root: self.root.clone(),
        }
    }

    /// The path of `full` relative to this location (for manifests).
    pub fn relative(&self, full: &Path) -> String {
        match full.prefix_match(&self.path) {
            Some(parts) => parts
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/"),
            None => full.to_string(),
        }
    }

    /// Writes `bytes` as the object here, replacing any. Objects larger than
    /// [`MULTIPART_PART_BYTES`] go up as a multipart upload (parts of that size, at
    /// most [`MULTIPART_CONCURRENCY`] in flight; aborted on failure), smaller ones in
    /// one request. Every output of a job is written through here.
    pub async fn put(&self, bytes: bytes::Bytes) -> Result<(), StoreError> {
        let result = if bytes.len() <= MULTIPART_PART_BYTES {
            self.store.put(&self.path, bytes.into()).await.map(drop)
        } else {
            self.put_multipart(bytes).await
        };
        result.map_err(|e| StoreError::io(self.url(), e))
    }

    async fn put_multipart(&self, mut bytes: bytes::Bytes) -> object_store::Result<()> {
        let upload = self.store.put_multipart(&self.path).await?;
        let mut parts = WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART_BYTES);
        while !bytes.is_empty() {
            if let Err(e) = parts.wait_for_capacity(MULTIPART_CONCURRENCY).await {
                // best effort: the upload's parts are removed; the first error is the one to report
                let _ = parts.abort().await;
                return Err(e);
            }
            let part = bytes.split_to(bytes.len().min(MULTIPART_PART_BYTES));
            parts.put(part);
        }
        // completes the upload, or aborts it when a part failed
        parts.finish().await.map(drop)
    }

    pub async fn get(&self) -> Result<bytes::Bytes, StoreError> {
        let url = self.url();
        let got = self
            .store
            .get(&self.path)
            .await
            .map_err(|e| StoreError::io(&url, e))?;
        got.bytes().await.map_err(|e| StoreError::io(url, e))
    }

    fn is_s3(&self) -> bool {
        self.root.starts_with("s3://")
    }

    /// Whether `e` only says that the object is not there (not that its bucket is
    /// missing: that is an error to report).
    fn is_absent(e: &object_store::Error) -> bool {
        matches!(e, object_store::Error::NotFound { .. }) && !names_no_such_bucket(e)
    }

    /// Metadata of the object here, or `None` when there is none. The root of a
    /// store (a bucket, `/`) is never an object.
    pub async fn head(&self) -> Result<Option<object_store::ObjectMeta>, StoreError> {
        if self.path.as_ref().is_empty() {
            return Ok(None);
        }
        match self.store.head(&self.path).await {
            Ok(meta) => Ok(Some(meta)),
            Err(e) if Self::is_absent(&e) => Ok(None),
            Err(e) => Err(StoreError::io(self.url(), e)),
        }
    }

    /// Every object below this location, sorted by path. A missing local folder
    /// lists as empty; on S3 an empty prefix lists as empty and a missing bucket is
    /// an error.
    pub async fn list(&self) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
        let mut all: Vec<_> = match self.store.list(Some(&self.path)).try_collect().await {
            Ok(all) => all,
            Err(e) if !self.is_s3() && Self::is_absent(&e) => Vec::new(),
            Err(e) => return Err(StoreError::io(self.url(), e)),
        };
        all.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(all)
    }

    /// The folders directly below this location (their names), sorted. A missing
    /// local folder has none.
    pub async fn folders(&self) -> Result<Vec<String>, StoreError> {
        let listed = match self.store.list_with_delimiter(Some(&self.path)).await {
            Ok(listed) => listed,
            Err(e) if !self.is_s3() && Self::is_absent(&e) => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io(self.url(), e)),
        };
        let mut names: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(String::from))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Deletes every object below this location, and the object here, if any.
    pub async fn delete_all(&self) -> Result<(), StoreError> {
        for meta in self.list().await? {
            match self.store.delete(&meta.location).await {
                Ok(()) => {}
                Err(e) if Self::is_absent(&e) => {}
                Err(e) => return Err(StoreError::io(self.url_of(&meta.location), e)),
            }
        }
        if self.head().await?.is_some() {
            self.delete().await?;
        }
        Ok(())
    }

    /// On a local filesystem, removes the folders below and at this location that
    /// hold no files any more (object stores have no folders: nothing to do there).
    pub fn remove_empty_folders(&self) {
        if self.root != "file://" {
            return;
        }
        fn prune(dir: &std::path::Path) -> bool {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return false;
            };
            let mut empty = true;
            for e in entries.flatten() {
                let p = e.path();
                empty &= p.is_dir() && prune(&p);
            }
            empty && std::fs::remove_dir(dir).is_ok()
        }
        prune(&std::path::Path::new("/").join(self.path.as_ref()));
    }

    /// Deletes the object here if it exists.
    pub async fn delete(&self) -> Result<(), StoreError> {
        match self.store.delete(&self.path).await {
            Ok(()) => Ok(()),
            Err(e) if Self::is_absent(&e) => Ok(()),
            Err(e) => Err(StoreError::io(self.url(), e)),
        }
    }
}

/// Objects up to this size are written in one request; larger ones as a multipart
/// upload in parts of this size (S3 allows 10,000 parts of at least 5 MiB: objects
/// up to about 80 GiB).
pub const MULTIPART_PART_BYTES: usize = 8 * 1024 * 1024;
/// Parts of one multipart upload in flight at once.
pub const MULTIPART_CONCURRENCY: usize = 4;

/// Environment variable naming the endpoint of an S3-compatible store (MinIO, Ceph,
/// moto, ...): requests go there, path-style; `http://` is allowed.
pub const ENDPOINT_VAR: &str = "SHOAL_S3_ENDPOINT";
/// Region used when the environment sets none.
pub const DEFAULT_REGION: &str = "us-east-1";

/// The bucket of an `s3://bucket/...` URL.
fn s3_bucket_of(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    scheme
        .eq_ignore_ascii_case("s3")
        .then(|| rest.split('/').next().unwrap_or(rest))
}

/// Whether an object store error (or one of its causes) is S3's `NoSuchBucket`.
fn names_no_such_bucket(e: &object_store::Error) -> bool {
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cause {
        if c.to_string().contains("NoSuchBucket") {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A plausible bucket name: letters, digits, `.`, `-` (and `_`, which some legacy
/// buckets and S3-compatible stores allow). S3 itself checks the rest.
fn check_bucket(url: &str, bucket: &str) -> Result<(), StoreError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if bucket.is_empty() || bucket.len() > 255 || !bucket.chars().all(ok_char) {
        return Err(StoreError::InvalidUrl {
            url: url.to_string(),
            reason: format!(
                "`{bucket}` is not a bucket name; write s3://BUCKET/PREFIX (bucket names have letters, digits, `.`, `-`)"
            ),
        });
    }
    Ok(())
}

/// The S3 store of `bucket`, built from the environment on first use and shared.
fn s3_store(url: &str, bucket: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let mut stores = STORES
        .get_or_init(Default::default)
        .lock()
        .expect("S3 store cache lock");
    if let Some(store) = stores.get(bucket) {
        return Ok(store.clone());
    }
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if builder
        .get_config_value(&AmazonS3ConfigKey::Region)
        .is_none_or(|r| r.is_empty())
    {
        builder = builder.with_region(DEFAULT_REGION);
    }
    if let Ok(endpoint) = std::env::var(ENDPOINT_VAR)
        && !endpoint.trim().is_empty()
    {
        let endpoint = endpoint.trim().trim_end_matches('/');
        builder = builder
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false);
        if endpoint.starts_with("http://") {
            builder = builder.with_allow_http(true);
        }
    }
    let store: Arc<dyn ObjectStore> =
        Arc::new(builder.build().map_err(|source| StoreError::S3Setup {
            url: url.to_string(),
            source,
        })?);
    stores.insert(bucket.to_string(), store.clone());
    Ok(store)
}

/// `s3://bucket/key/prefix` as a location in the bucket's store.
fn resolve_s3(url: &str, rest: &str) -> Result<Location, StoreError> {
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    check_bucket(url, bucket)?;
    let path = Path::parse(key).map_err(|e| StoreError::InvalidUrl {
        url: url.to_string(),
        reason: e.to_string(),
    })?;
    Ok(Location {
        store: s3_store(url, bucket)?,
        path,
        root: format!("s3://{bucket}"),
    })
}

/// Resolves a path or URL (`s3://bucket/prefix`, `file://`, a local path) to a store
/// and a path in it.
pub fn resolve(url_or_path: &str) -> Result<Location, StoreError> {
    let s = url_or_path.trim();
    let local = if let Some(rest) = s.strip_prefix("file://") {
        rest.to_string()
    } else if let Some((scheme, rest)) = s.split_once("://") {
        if scheme.eq_ignore_ascii_case("s3") {
            return resolve_s3(s, rest);
        }
        return Err(StoreError::Unsupported {
            url: s.to_string(),
            scheme: scheme.to_string(),
        });
    } else {
        s.to_string()
    };
    let fs_path = std::path::Path::new(&local);
    let abs = if fs_path.is_absolute() {
        fs_path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| StoreError::InvalidUrl {
                url: s.to_string(),
                reason: format!("relative path and no working directory: {e}"),
            })?
            .join(fs_path)
    };
    let path = Path::from_absolute_path(&abs).map_err(|e| StoreError::InvalidUrl {
        url: s.to_string(),
        reason: e.to_string(),
    })?;
    Ok(Location {
        store: local_store(),
        path,
        root: "file://".to_string(),
    })
}

fn local_store() -> Arc<dyn ObjectStore> {
    static STORE: std::sync::OnceLock<Arc<dyn ObjectStore>> = std::sync::OnceLock::new();
    STORE
        .get_or_init(|| Arc::new(LocalFileSystem::new()))
        .clone()
}

/// One input object found by [`list_inputs`].
#[derive(Debug, Clone)]
pub struct InputObject {
    pub url: String,
    pub size: u64,
    pub e_tag: Option<String>,
    pub last_modified_ms: i64,
}

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

fn is_hidden(path: &Path) -> bool {
    path.filename()
        .is_some_and(|name| name.starts_with('_') || name.starts_with('.'))
}

fn to_input(loc: &Location, meta: object_store::ObjectMeta) -> InputObject {
    InputObject {
        url: loc.url_of(&meta.location),
        size: meta.size,
        e_tag: meta.e_tag,
        last_modified_ms: meta.last_modified.timestamp_millis(),
    }
}

/// The objects a spec's `input.interactions` names: one file, every object under a
/// folder (names starting with `_` or `.` skipped), or every object matching a glob.
/// Sorted by URL, so splits are planned the same way every time.
pub async fn list_inputs(pattern: &str) -> Result<Vec<InputObject>, StoreError> {
    let pattern = pattern.trim();
    let mut found = Vec::new();
    if is_glob(pattern) {
        // List from the longest prefix without glob characters, then match.
        let cut = pattern.find(['*', '?', '[', '{']).unwrap_or(pattern.len());
        if let Some(scheme_end) = pattern.find("://") {
            // the glob must start after the bucket (authority) of a URL
            let authority_end = pattern[scheme_end + 3..]
                .find('/')
                .map_or(pattern.len(), |i| scheme_end + 3 + i);
            if cut < authority_end {
                return Err(StoreError::BadGlob {
                    pattern: pattern.to_string(),
                    reason: "glob characters are only allowed after the bucket".into(),
                });
            }
        }
        let dir_end = pattern[..cut].rfind('/').map(|i| i + 1).unwrap_or(0);
        let base = resolve(&pattern[..dir_end.max(1)])?;
        let glob_text = format!("{}/{}", base.path, &pattern[dir_end..]);
        let glob = globset::GlobBuilder::new(glob_text.trim_start_matches('/'))
            .literal_separator(true)
            .build()
            .map_err(|e| StoreError::BadGlob {
                pattern: pattern.to_string(),
                reason: e.to_string(),
            })?
            .compile_matcher();
        for meta in base.list().await? {
            if glob.is_match(meta.location.as_ref()) && !is_hidden(&meta.location) {
                found.push(to_input(&base, meta));
            }
        }
    } else {
        let loc = resolve(pattern)?;
        if let Some(meta) = loc.head().await? {
            found.push(to_input(&loc, meta));
        } else {
            for meta in loc.list().await? {
                let rel = loc.relative(&meta.location);
                let hidden = rel
                    .split('/')
                    .any(|p| p.starts_with('_') || p.starts_with('.'));
                if !hidden {
                    found.push(to_input(&loc, meta));
                }
            }
        }
    }
    if found.is_empty() {
        return Err(StoreError::NoInputs {
            pattern: pattern.to_string(),
        });
    }
    found.sort_by(|a, b| a.url.cmp(&b.url));
    Ok(found)
}

/// Encodes record batches as one Parquet file (zstd-compressed) in memory.
pub fn encode_parquet(
    schema: arrow::datatypes::SchemaRef,
    batches: &[arrow::record_batch::RecordBatch],
) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .build();
    let mut buf = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, Some(props))?;
    for b in batches {
        writer.write(b)?;
    }
    writer.close()?;
    Ok(buf)
}

/// A Parquet object read through `object_store`: the `AsyncFileReader` the Parquet
/// async reader wants, counting the bytes it fetches.
pub struct ParquetSource {
    store: Arc<dyn ObjectStore>,
    path: Path,
    fetched: Arc<AtomicU64>,
}

impl ParquetSource {
    pub fn new(loc: &Location) -> Self {
        ParquetSource {
            store: loc.store.clone(),
            path: loc.path.clone(),
            fetched: Arc::default(),
        }
    }

    /// The running count of bytes fetched.
    pub fn fetched(&self) -> Arc<AtomicU64> {
        self.fetched.clone()
    }

    fn count(&self, n: usize) {
        self.fetched.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn to_parquet_error(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl AsyncFileReader for ParquetSource {
    fn get_bytes(
        &mut self,
        range: Range<u64>,
    ) -> BoxFuture<'_, parquet::errors::Result<bytes::Bytes>> {
        async move {
            let bytes = self
                .store
                .get_range(&self.path, range)
                .await
                .map_err(to_parquet_error)?;
            self.count(bytes.len());
            Ok(bytes)
        }
        .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<bytes::Bytes>>> {
        async move {
            let all = self
                .store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(to_parquet_error)?;
            self.count(all.iter().map(bytes::Bytes::len).sum());
            Ok(all)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let metadata = ParquetMetaDataReader::new()
                .with_arrow_reader_options(options)
                .load_via_suffix_and_finish(self)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

/// Reads the footer without knowing the object's size, via suffix requests.
impl MetadataSuffixFetch for &mut ParquetSource {
    fn fetch_suffix(
        &mut self,
        suffix: usize,
    ) -> BoxFuture<'_, parquet::errors::Result<bytes::Bytes>> {
        let options = GetOptions {
            range: Some(GetRange::Suffix(suffix as u64)),
            ..Default::default()
        };
        async move {
            let got = self
                .store
                .get_opts(&self.path, options)
                .await
                .map_err(to_parquet_error)?;
            let bytes = got.bytes().await.map_err(to_parquet_error)?;
            self.count(bytes.len());
            Ok(bytes)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lists_file_folder_and_glob() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("logs/2024")).unwrap();
        std::fs::write(root.join("logs/a.csv"), "x\n1\n").unwrap();
        std::fs::write(root.join("logs/2024/b.csv"), "x\n2\n").unwrap();
        std::fs::write(root.join("logs/_SUCCESS"), "").unwrap();
        std::fs::write(root.join("logs/c.parquet"), "x").unwrap();

        let one = list_inputs(&root.join("logs/a.csv").display().to_string())
            .await
            .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].size, 4);
        assert!(one[0].url.starts_with("file:///"), "{}", one[0].url);

        let folder = list_inputs(&root.join("logs").display().to_string())
            .await
            .unwrap();
        let names: Vec<_> = folder
            .iter()
            .map(|o| o.url.rsplit('/').next().unwrap().to_string())
            .collect();
        assert_eq!(names, vec!["b.csv", "a.csv", "c.parquet"]);

        let glob = list_inputs(&format!("{}/logs/*.csv", root.display()))
            .await
            .unwrap();
        assert_eq!(glob.len(), 1, "* does not cross folders");
        let deep = list_inputs(&format!("{}/logs/**/*.csv", root.display()))
            .await
            .unwrap();
        assert_eq!(deep.len(), 2);

        let url = format!("file://{}", root.join("logs/a.csv").display());
        assert_eq!(list_inputs(&url).await.unwrap().len(), 1);

        let err = list_inputs(&root.join("nothing-here").display().to_string())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NoInputs { .. }), "{err}");
    }

    #[tokio::test]
    async fn put_get_relative_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let out = resolve(&dir.path().join("out").display().to_string()).unwrap();
        let f = out.child("a/b.txt");
        f.put(bytes::Bytes::from_static(b"hi")).await.unwrap();
        assert_eq!(&f.get().await.unwrap()[..], b"hi");
        assert_eq!(out.relative(&f.path), "a/b.txt");
        assert!(f.head().await.unwrap().is_some());
        out.delete_all().await.unwrap();
        assert!(f.head().await.unwrap().is_none());
    }

    #[test]
    fn unsupported_scheme_is_named() {
        let err = resolve("gs://bucket/x").unwrap_err().to_string();
        assert!(err.contains("gs://"), "{err}");
        assert!(
            err.contains("s3://") && err.contains("local path"),
            "says what is supported: {err}"
        );
    }

    #[test]
    fn s3_urls_of_children_round_trip() {
        // builds the client only: no request is made
        let loc = resolve("s3://b/p/q").unwrap();
        assert_eq!(loc.url(), "s3://b/p/q");
        assert_eq!(loc.path.as_ref(), "p/q");
        let child = loc.child("assignments.parquet/part-00003.parquet");
        assert_eq!(
            child.url(),
            "s3://b/p/q/assignments.parquet/part-00003.parquet"
        );
        assert_eq!(
            loc.relative(&child.path),
            "assignments.parquet/part-00003.parquet"
        );
        let again = resolve(&child.url()).unwrap();
        assert_eq!(again.path, child.path);
        assert_eq!(again.url(), child.url());
        assert!(
            Arc::ptr_eq(&again.store, &loc.store),
            "one store per bucket"
        );
        assert_eq!(resolve("s3://b/p/q/").unwrap().url(), "s3://b/p/q");
        assert_eq!(resolve("S3://b/p").unwrap().url(), "s3://b/p");
        let root = resolve("s3://b").unwrap();
        assert_eq!(root.url(), "s3://b/");
        assert_eq!(root.child("x/y").url(), "s3://b/x/y");
        let other = resolve("s3://other-bucket/p").unwrap();
        assert!(!Arc::ptr_eq(&other.store, &loc.store));
    }

    #[test]
    fn bad_s3_urls_are_named() {
        for bad in ["s3://", "s3:///key", "s3://b/a//c", "s3://bad bucket/x"] {
            let err = resolve(bad).unwrap_err();
            assert!(matches!(err, StoreError::InvalidUrl { .. }), "{bad}: {err}");
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[tokio::test]
    async fn globs_in_a_bucket_name_are_refused() {
        let err = list_inputs("s3://logs-*/a.csv").await.unwrap_err();
        assert!(matches!(err, StoreError::BadGlob { .. }), "{err}");
    }

    #[test]
    fn a_missing_bucket_is_its_own_error() {
        let source = object_store::Error::NotFound {
            path: "out/_SUCCESS".into(),
            source: "Server returned non-2xx status code: 404 Not Found: <Error><Code>NoSuchBucket</Code></Error>".into(),
        };
        let err = StoreError::io("s3://nope/out/_SUCCESS", source);
        assert!(
            matches!(&err, StoreError::NoSuchBucket { bucket, .. } if bucket == "nope"),
            "{err}"
        );
        assert!(!err.is_retryable());
        let plain = object_store::Error::NotFound {
            path: "a".into(),
            source: "404".into(),
        };
        assert!(matches!(
            StoreError::io("s3://b/a", plain),
            StoreError::Io { .. }
        ));
    }

    #[tokio::test]
    async fn large_objects_go_up_in_parts_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let loc = resolve(&dir.path().join("big.bin").display().to_string()).unwrap();
        let n = 2 * MULTIPART_PART_BYTES + 12_345;
        let data: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        loc.put(bytes::Bytes::from(data.clone())).await.unwrap();
        assert_eq!(loc.head().await.unwrap().unwrap().size, n as u64);
        assert!(loc.get().await.unwrap() == data);
        // an overwrite with a small object replaces it
        loc.put(bytes::Bytes::from_static(b"small")).await.unwrap();
        assert_eq!(&loc.get().await.unwrap()[..], b"small");
    }
}
