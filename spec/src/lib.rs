//! shoal's job definition: the job spec operators submit (TOML, validated, every
//! error naming the field), the typed ids, the stable hash that places users on
//! shards and drives every seeded choice, and the `_SUCCESS` manifest of a
//! finished output folder.

pub mod hash;
pub mod ids;
pub mod manifest;
pub mod rfm;
pub mod spec;

pub use ids::{JobId, ShardId, WorkerId};
pub use spec::{JobSpec, SpecError};
