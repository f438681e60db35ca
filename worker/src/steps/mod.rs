//! The steps of a job on a worker, each a plain function of the job's state:
//! loading shards from staging ([`load`]), ALS ([`als`], [`als_job`],
//! [`catalog`]), the k-means rounds ([`kmeans`]) and the last step that writes the
//! per-shard outputs ([`finalize`], [`outputs`]).

pub mod als;
pub mod als_job;
pub mod audience;
pub mod catalog;
pub mod finalize;
pub mod kmeans;
pub mod load;
pub mod outputs;
pub mod previous;
