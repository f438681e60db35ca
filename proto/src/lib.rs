//! shoal's wire: the gRPC services and messages (generated into OUT_DIR from
//! `proto/shoal.proto`), the protocol version, the message limit, and the
//! conversions of wire messages (the extra table's columns as features, the
//! distinct-count sketches). The job spec, ids and stable hash are `shoal-spec`'s;
//! object-store access is `shoal-store`'s; tokens, TLS and the HTTP endpoints are
//! `shoal-net`'s.

pub mod sketch;

/// Generated tonic/prost code for `proto/shoal.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("shoal.v1");
}

/// Version of the coordinator <-> worker protocol. A worker that registers with
/// another version is refused. (2: the `features.extra` table; 3: ids as keys,
/// staged partials per split, memory limits, segment items as counts; 4: attempts,
/// checkpoints, running jobs in heartbeats; 5: RFM scores, several k-means fits
/// per Lloyd round, the seeded sample, an earlier run's segments, segment ids.)
pub const PROTOCOL_VERSION: u32 = 5;

/// The columns of a `features.extra` table as features, the same on every side.
pub mod extra {
    use crate::pb::ExtraColumn;

    /// The features the columns make: one per number, one per list element.
    pub fn dims(columns: &[ExtraColumn]) -> usize {
        columns.iter().map(|c| c.dims as usize).sum()
    }

    /// Their names: a number's column name, `name[i]` for a list's elements.
    pub fn feature_names(columns: &[ExtraColumn]) -> Vec<String> {
        let mut names = Vec::new();
        for c in columns {
            if c.dims == 1 {
                names.push(c.name.clone());
            } else {
                names.extend((0..c.dims).map(|i| format!("{}[{i}]", c.name)));
            }
        }
        names
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn numbers_and_lists_become_features() {
            let cols = [
                ExtraColumn {
                    name: "age".into(),
                    dims: 1,
                },
                ExtraColumn {
                    name: "emb".into(),
                    dims: 3,
                },
            ];
            assert_eq!(dims(&cols), 4);
            assert_eq!(feature_names(&cols), ["age", "emb[0]", "emb[1]", "emb[2]"]);
        }
    }
}

/// Largest gRPC message shoal sends or accepts (partial sums, candidate samples).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
