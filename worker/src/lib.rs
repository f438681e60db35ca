//! shoal worker: does what the coordinator tells it, one step at a time. It reads
//! input splits and routes rows to user shards through the staging prefix
//! ([`ingest`]), loads the shards it is given and aggregates per-user RFM
//! ([`load`]), keeps the scaled points resident in a compute backend, and runs the
//! k-means steps ([`service`]).

pub mod error;
pub mod extra;
pub mod ingest;
pub mod staging;

pub use error::WorkerError;
pub mod als;
pub mod als_job;
pub mod flight;
pub mod load;
pub mod server;
pub mod service;

pub use server::{WorkerConfig, WorkerHandle, spawn_worker};
