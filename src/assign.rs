//! `shoal assign`: the spec of a fold-in job, built from a finished job's model
//! folder and a new interaction log.

use shoal_spec::JobSpec;
use shoal_spec::manifest::{MANIFEST, Manifest};
use shoal_spec::spec::ModelSpec;
use shoal_store as store;
use std::path::Path;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The model's own spec with `input` (a job spec whose `[input]` is taken, or an
/// interaction log read with the model's input settings), the `features.extra`
/// table `extra` (else the spec's, else the model's), `output`, and the model
/// itself; relative local paths resolved against `cwd`.
pub async fn assign_spec(
    model: &str,
    input: &str,
    extra: Option<&str>,
    output: &str,
    cwd: &Path,
) -> Result<JobSpec, BoxError> {
    let absolute = |p: &str| {
        if p.contains("://") || Path::new(p).is_absolute() {
            p.to_string()
        } else {
            cwd.join(p).display().to_string()
        }
    };
    let model = absolute(model);
    if !model.contains("://") && !Path::new(&model).is_dir() {
        return Err(format!(
            "--model {model}: no such folder; give the output folder of a finished shoal job"
        )
        .into());
    }
    let folder = store::resolve(&model)?;
    let manifest = match folder.child(MANIFEST).head().await? {
        Some(_) => {
            let bytes = folder.child(MANIFEST).get().await?;
            Manifest::from_json(&String::from_utf8_lossy(&bytes))
                .map_err(|e| format!("--model {model}: _SUCCESS is not a shoal manifest ({e})"))?
        }
        None => {
            return Err(format!(
                "--model {model}: no _SUCCESS manifest; give the output folder of a finished shoal job"
            )
            .into());
        }
    };
    let mut spec = manifest.spec;
    spec.name = format!("{}-assign", spec.name);
    if input.ends_with(".toml") {
        let given = JobSpec::from_file(Path::new(&absolute(input)), cwd)?;
        spec.input = given.input;
        if given.features.extra().is_some() {
            spec.features.extra = given.features.extra;
        }
    } else {
        spec.input.interactions = absolute(input);
    }
    if let Some(extra) = extra {
        if spec.features.extra().is_none() {
            return Err(format!(
                "--extra {extra}: the model {model} was trained without a features.extra table, so its segments know no such features"
            )
            .into());
        }
        spec.features.extra = absolute(extra);
    }
    spec.output.path = absolute(output);
    spec.cluster.staging = None;
    spec.evaluate.holdout = 0.0;
    spec.model = Some(ModelSpec { path: model });
    spec.validate()?;
    Ok(spec)
}
