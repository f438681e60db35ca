//! Scale: one reduce round. The RFM block's (and the extra table's) moments are
//! merged in shard order into a mean and scale (a model's own, in a fold-in);
//! every worker standardises its users' features with them and answers the
//! moments of the result.

use super::{Facts, in_shard_order};
use crate::CoordinatorError;
use crate::job::Phase;
use crate::job::driver::Driver;
use crate::{extra, kmeans};
use shoal_proto::pb;
use std::time::Instant;

/// The job's features after scaling.
pub struct Scaled {
    /// Features per user: ALS factors (with ALS), RFM, the extra table's.
    pub dims: usize,
    /// Factors in front (0 without ALS).
    pub factors: usize,
    pub extra_dims: usize,
    /// Per feature (the factor block: 0 and 1).
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
    /// Variance of every scaled feature.
    pub variance: Vec<f64>,
    pub names: Vec<String>,
}

pub async fn run(d: &mut Driver<'_>, facts: &mut Facts) -> Result<(), CoordinatorError> {
    let t = Instant::now();
    d.phase(Phase::Scale);
    let ctx = d.ctx;
    let spec = &ctx.spec;
    let loaded = facts.loaded();
    let extra_columns = &facts.ingested().extra_columns;
    // the RFM block: the load's three features, or none (features.rfm = false)
    let dims = if spec.features.rfm { loaded.dims } else { 0 };
    let moments: Vec<Vec<pb::Moments>> = loaded.stats.values().map(|s| s.moments.clone()).collect();
    let extra_dims = extra::dims(extra_columns);
    let extra_moments: Vec<Vec<pb::Moments>> = loaded
        .stats
        .values()
        .map(|s| s.extra_moments.clone())
        .collect();
    let (rfm_mean, rfm_scale, extra_mean, extra_scale) = match &facts.plan.model {
        // the model's scaling, so its centroids mean what they meant
        Some(model) => (
            model.rfm_mean.clone(),
            model.rfm_scale.clone(),
            model.extra_mean.clone(),
            model.extra_scale.clone(),
        ),
        None => {
            let (mean, scale, _) = kmeans::merge_moments(&moments, dims);
            let (extra_mean, extra_scale, _) = kmeans::merge_moments(&extra_moments, extra_dims);
            (mean, scale, extra_mean, extra_scale)
        }
    };
    let d_ref = &*d;
    let scaled = d_ref
        .all(|_, mut c| {
            let req = pb::StandardizeRequest {
                job_id: d_ref.job_id(),
                attempt: d_ref.attempt.0,
                mean: rfm_mean.clone(),
                scale: rfm_scale.clone(),
                extra_mean: extra_mean.clone(),
                extra_scale: extra_scale.clone(),
            };
            async move { c.standardize(req).await }
        })
        .await?;
    // With ALS the factor block (L2-normalised, times features.als_weight) comes
    // first; it is used as it is (mean 0, scale 1 in the report's terms). The
    // extra table's block comes after RFM.
    let factors = if spec.features.als {
        spec.als.factors as usize
    } else {
        0
    };
    let dims = factors + dims + extra_dims;
    if let Some(bad) = scaled.iter().find(|s| s.dims as usize != dims) {
        return Err(CoordinatorError::Protocol {
            worker: "(all)".into(),
            step: "scale",
            detail: format!("{} dimensions after scaling, expected {dims}", bad.dims),
        });
    }
    let scaled_stats = in_shard_order(
        scaled.into_iter().flat_map(|s| s.shards),
        d.shards,
        "scale",
        |s| s.shard,
    )?;
    let feature_moments: Vec<Vec<pb::Moments>> =
        scaled_stats.iter().map(|s| s.moments.clone()).collect();
    let variance = kmeans::merge_variances(&feature_moments, dims);
    let mean: Vec<f64> = std::iter::repeat_n(0.0, factors)
        .chain(rfm_mean)
        .chain(extra_mean)
        .collect();
    let scale: Vec<f64> = std::iter::repeat_n(1.0, factors)
        .chain(rfm_scale)
        .chain(extra_scale)
        .collect();
    let mut names = spec.feature_names();
    names.extend(extra::feature_names(extra_columns));
    facts.scaled = Some(Scaled {
        dims,
        factors,
        extra_dims,
        mean,
        scale,
        variance,
        names,
    });
    d.on.scaled = true;
    d.times.add("scale", t);
    Ok(())
}
