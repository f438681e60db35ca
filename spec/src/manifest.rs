//! The `_SUCCESS` manifest: written last into a finished output folder. A reader
//! trusts only folders that have one; it lists every file with its row count, the
//! spec, and a fingerprint of the input.

use serde::{Deserialize, Serialize};

/// Name of the manifest object in an output folder.
pub const MANIFEST: &str = "_SUCCESS";
/// Version of the manifest layout.
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub job_id: String,
    pub name: String,
    pub created_unix_ms: i64,
    /// shoal version that wrote the folder.
    pub shoal_version: String,
    pub spec: crate::JobSpec,
    pub input: Vec<InputEntry>,
    /// xxh3 over the input URLs, sizes and e-tags, in order.
    pub input_fingerprint: String,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputEntry {
    pub url: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e_tag: Option<String>,
    pub last_modified_unix_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the output folder, `/`-separated.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
}

impl Manifest {
    pub fn fingerprint(input: &[InputEntry]) -> String {
        let mut text = String::new();
        for i in input {
            text.push_str(&format!(
                "{}\t{}\t{}\n",
                i.url,
                i.size,
                i.e_tag.as_deref().unwrap_or("")
            ));
        }
        crate::hash::fingerprint(text.as_bytes())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a manifest always serialises")
    }

    pub fn from_json(text: &str) -> Result<Manifest, serde_json::Error> {
        serde_json::from_str(text)
    }
}
