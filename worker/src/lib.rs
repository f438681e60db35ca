//! shoal worker: does what the coordinator tells it, one step at a time. It reads
//! input splits and aggregates their rows per shard into the staging prefix
//! ([`ingest`], [`staging`]), loads the shards it is given ([`steps::load`]),
//! learns ALS factors with the other workers ([`steps::als_job`], [`flight`]),
//! keeps the scaled points resident in a compute backend and runs the k-means
//! steps ([`steps::kmeans`]), and writes its shards' outputs
//! ([`steps::finalize`]). [`service`] holds the gRPC handlers, [`job`] what a
//! worker holds for a job.

pub mod error;
pub mod extra;
pub mod flight;
pub mod ids;
pub mod ingest;
pub mod job;
pub mod memory;
pub mod server;
pub mod service;
pub mod staging;
pub mod steps;

pub use error::WorkerError;
pub use server::{WorkerConfig, WorkerHandle, spawn_worker};
