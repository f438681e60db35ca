//! A finished job's output folder used as a model (`[model] path` in a spec): its
//! manifest, frozen centroids and feature scaling, checked against the spec that
//! scores new users with it.

use crate::CoordinatorError;
use arrow::array::{Array, AsArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use shoal_proto::pb;
use shoal_spec::JobSpec;
use shoal_spec::manifest::{MANIFEST, Manifest};
use shoal_store::{self as store, Location};

/// What scoring against a model needs from it.
#[derive(Debug, Clone)]
pub struct Model {
    pub folder: Location,
    pub manifest: Manifest,
    pub k: usize,
    /// Feature dimensions (ALS factors, then recency, frequency, monetary, then
    /// a `features.extra` table's).
    pub dims: usize,
    /// Row-major `k x dims`, in the model's segment order, and their segment ids.
    pub centroids: Vec<f32>,
    pub ids: Vec<u32>,
    /// Mean and scale of the three (log-scaled) RFM features (none without RFM).
    pub rfm_mean: Vec<f64>,
    pub rfm_scale: Vec<f64>,
    /// The model's `features.extra` columns (empty without a table), and the
    /// mean and scale of their features.
    pub extra_columns: Vec<pb::ExtraColumn>,
    pub extra_mean: Vec<f64>,
    pub extra_scale: Vec<f64>,
}

fn toml_of<T: serde::Serialize>(v: &T) -> toml::Table {
    toml::Table::try_from(v).unwrap_or_default()
}

/// The spec fields (`section.key`) whose values differ, and `segments.seed` when
/// `seed_differs`.
fn differing<const N: usize>(
    sections: [(&str, toml::Table, toml::Table); N],
    seed_differs: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, a, b) in &sections {
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for k in keys {
            if a.get(k) != b.get(k) {
                out.push(format!("{name}.{k}"));
            }
        }
    }
    if seed_differs {
        out.push("segments.seed".into());
    }
    out
}

fn bad(folder: &Location, reason: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Model {
        url: folder.url(),
        reason: reason.into(),
    }
}

impl Model {
    /// Checks that today's `features.extra` table has the model's columns.
    pub fn check_extra(&self, columns: &[pb::ExtraColumn]) -> Result<(), CoordinatorError> {
        if columns == self.extra_columns.as_slice() {
            return Ok(());
        }
        let show = |c: &[pb::ExtraColumn]| {
            c.iter()
                .map(|c| format!("{} ({})", c.name, c.dims))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Err(bad(
            &self.folder,
            format!(
                "the features.extra table has the columns [{}], the model's had [{}] (name (values)); give a table with the model's columns",
                show(columns),
                show(&self.extra_columns)
            ),
        ))
    }

    /// The `item_factors.parquet/` parts the model's manifest lists, in order.
    pub fn item_parts(&self) -> Vec<String> {
        self.manifest
            .files
            .iter()
            .filter(|f| f.path.starts_with("item_factors.parquet/"))
            .map(|f| f.path.clone())
            .collect()
    }

    /// Reads and checks the model at `url` for `spec`, whose outputs go to
    /// `output` (which must not be the model's folder).
    pub async fn load(
        url: &str,
        spec: &JobSpec,
        output: &Location,
    ) -> Result<Model, CoordinatorError> {
        let folder = store::resolve(url)?;
        let (m, o) = (
            folder.url().trim_end_matches('/').to_string(),
            output.url().trim_end_matches('/').to_string(),
        );
        if m == o || o.starts_with(&format!("{m}/")) {
            return Err(bad(
                &folder,
                format!(
                    "output.path {o} is the model's folder (or inside it): scoring would overwrite the model; write to another folder"
                ),
            ));
        }
        let manifest = match folder.child(MANIFEST).head().await? {
            None => {
                return Err(bad(
                    &folder,
                    "no _SUCCESS manifest: not the output folder of a finished shoal job (or the job did not finish)",
                ));
            }
            Some(_) => {
                let text = folder.child(MANIFEST).get().await?;
                Manifest::from_json(&String::from_utf8_lossy(&text))
                    .map_err(|e| bad(&folder, format!("_SUCCESS is not a shoal manifest: {e}")))?
            }
        };
        let trained = &manifest.spec;
        if trained.features.als != spec.features.als {
            return Err(bad(
                &folder,
                format!(
                    "the model was trained with features.als = {}, the spec asks for {}",
                    trained.features.als, spec.features.als
                ),
            ));
        }
        if spec.features.als && trained.als.factors != spec.als.factors {
            return Err(bad(
                &folder,
                format!(
                    "the model has {} ALS factors, the spec asks for als.factors = {}",
                    trained.als.factors, spec.als.factors
                ),
            ));
        }
        if trained.features.extra().is_some() != spec.features.extra().is_some() {
            return Err(bad(
                &folder,
                if spec.features.extra().is_some() {
                    "the model was trained without a features.extra table; leave features.extra out (or train a model with one)".to_string()
                } else {
                    format!(
                        "the model was trained with the features.extra table {}; give one with the same columns (`shoal assign --extra TABLE`)",
                        trained.features.extra
                    )
                },
            ));
        }
        // Everything that shapes a user's features must be the model's, or the
        // frozen centroids would mean something else. (The extra table itself is
        // today's, its columns are checked after ingest.)
        let without_table = |f: &shoal_spec::spec::FeaturesSpec| {
            let mut f = f.clone();
            f.extra.clear();
            toml_of(&f)
        };
        let differs = differing(
            [
                ("als", toml_of(&trained.als), toml_of(&spec.als)),
                (
                    "features",
                    without_table(&trained.features),
                    without_table(&spec.features),
                ),
            ],
            trained.segments.seed != spec.segments.seed,
        );
        if !differs.is_empty() {
            return Err(bad(
                &folder,
                format!(
                    "{} differ from the model's; use the model's values (`shoal assign` copies them)",
                    differs.join(", ")
                ),
            ));
        }
        let listed = |path: &str| {
            manifest
                .files
                .iter()
                .any(|f| f.path == path || f.path.starts_with(&format!("{path}/")))
        };
        for needed in ["centroids.parquet", "report.json"]
            .into_iter()
            .chain(spec.features.als.then_some("item_factors.parquet"))
        {
            if !listed(needed) {
                return Err(bad(&folder, format!("its manifest lists no {needed}")));
            }
        }
        let report: serde_json::Value =
            serde_json::from_slice(&folder.child("report.json").get().await?)
                .map_err(|e| bad(&folder, format!("report.json: {e}")))?;
        let dims = match report["features"].as_array() {
            Some(names) => names.len(),
            None => return Err(bad(&folder, "report.json lists no features")),
        };
        let mut extra_columns = Vec::new();
        if trained.features.extra().is_some() {
            let cols = report["extra"]["columns"]
                .as_array()
                .ok_or_else(|| bad(&folder, "report.json describes no features.extra columns"))?;
            for c in cols {
                match (c["name"].as_str(), c["dims"].as_u64()) {
                    (Some(name), Some(dims)) => extra_columns.push(pb::ExtraColumn {
                        name: name.to_string(),
                        dims: dims as u32,
                    }),
                    _ => {
                        return Err(bad(
                            &folder,
                            "report.json: a features.extra column without name or dims",
                        ));
                    }
                }
            }
        }
        let rfm_at = if trained.features.als {
            trained.als.factors as usize
        } else {
            0
        };
        let extra_dims = shoal_proto::extra::dims(&extra_columns);
        let rfm_dims = trained.rfm_dims();
        if rfm_at + rfm_dims + extra_dims != dims {
            return Err(bad(
                &folder,
                format!(
                    "report.json lists {dims} features, its ALS, RFM and features.extra blocks make {}",
                    rfm_at + rfm_dims + extra_dims
                ),
            ));
        }
        let bytes = folder.child("centroids.parquet").get().await?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(|e| bad(&folder, format!("centroids.parquet: {e}")))?;
        let mut centroids = Vec::new();
        let mut ids = Vec::new();
        let mut k = 0;
        for batch in reader {
            let batch = batch.map_err(|e| bad(&folder, format!("centroids.parquet: {e}")))?;
            let segments = batch
                .column_by_name("segment")
                .and_then(|c| c.as_primitive_opt::<arrow::datatypes::UInt32Type>())
                .ok_or_else(|| bad(&folder, "centroids.parquet has no uint32 column `segment`"))?;
            ids.extend(segments.values().iter().copied());
            let list = batch
                .column_by_name("centroid")
                .and_then(|c| c.as_list_opt::<i32>())
                .ok_or_else(|| bad(&folder, "centroids.parquet has no list column `centroid`"))?;
            for r in 0..list.len() {
                let row = list.value(r);
                let values = row
                    .as_primitive_opt::<arrow::datatypes::Float32Type>()
                    .ok_or_else(|| bad(&folder, "centroids.parquet: centroids are not float32"))?;
                if values.len() != dims {
                    return Err(bad(
                        &folder,
                        format!(
                            "centroid {r} has {} values; the model's features are {dims}",
                            values.len()
                        ),
                    ));
                }
                centroids.extend_from_slice(values.values());
                k += 1;
            }
        }
        if k == 0 {
            return Err(bad(&folder, "centroids.parquet holds no centroid"));
        }
        let numbers = |key: &str| -> Result<Vec<f64>, CoordinatorError> {
            let v: Vec<f64> = report["scaling"][key]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default();
            if v.len() != dims {
                return Err(bad(
                    &folder,
                    format!(
                        "report.json scaling.{key} has {} values, expected {dims}",
                        v.len()
                    ),
                ));
            }
            Ok(v)
        };
        let (mean, scale) = (numbers("mean")?, numbers("scale")?);
        let rfm = rfm_at..rfm_at + rfm_dims;
        Ok(Model {
            rfm_mean: mean[rfm.clone()].to_vec(),
            rfm_scale: scale[rfm.clone()].to_vec(),
            extra_mean: mean[rfm.end..].to_vec(),
            extra_scale: scale[rfm.end..].to_vec(),
            extra_columns,
            folder,
            manifest,
            k,
            dims,
            centroids,
            ids,
        })
    }
}
