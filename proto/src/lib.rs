//! shoal's shared contract: the gRPC services and messages (generated into OUT_DIR),
//! the job spec, typed ids, the stable hash that places users on shards, the output
//! manifest, and the object-store conventions every process agrees on.

pub mod auth;
pub mod hash;
pub mod http;
pub mod ids;
pub mod manifest;
pub mod sketch;
pub mod spec;
pub mod store;
pub mod tls;

/// Generated tonic/prost code for `proto/shoal.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("shoal.v1");
}

/// Version of the coordinator <-> worker protocol. A worker that registers with
/// another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest gRPC message shoal sends or accepts (partial sums, candidate samples).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

pub use ids::{JobId, ShardId, WorkerId};
pub use spec::{JobSpec, SpecError};
pub use store::{Location, StoreError};
