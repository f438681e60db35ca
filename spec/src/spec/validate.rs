//! Validation of a parsed spec: every field checked, section by section; the
//! first problem is returned, naming the field.

use super::*;

impl JobSpec {
    /// Checks every field; the first problem is returned, naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.check_input_and_features()?;
        self.check_clean()?;
        self.check_segments()?;
        self.check_als()?;
        self.check_recommend()?;
        self.check_evaluate()?;
        self.check_cluster()?;
        self.check_model()?;
        Ok(())
    }

    /// Checks the input, its columns and the feature blocks.
    fn check_input_and_features(&self) -> Result<(), SpecError> {
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.input.interactions.trim().is_empty() {
            return Err(invalid(
                "input.interactions",
                "must name a path, file:// or s3:// URL, folder or glob",
            ));
        }
        if self.output.path.trim().is_empty() {
            return Err(invalid("output.path", "must name a folder or URL"));
        }
        let cols = &self.input.columns;
        if cols.user().is_empty() {
            return Err(invalid(
                "input.columns.user",
                "is required: the column that identifies the customer",
            ));
        }
        if let Some(fmt) = &self.input.time_format {
            if fmt.trim().is_empty() {
                return Err(invalid(
                    "input.time_format",
                    "must be a strftime format such as \"%d/%m/%Y %H:%M\", or left out for ISO-8601",
                ));
            }
            if chrono::format::StrftimeItems::new(fmt)
                .any(|item| matches!(item, chrono::format::Item::Error))
            {
                return Err(invalid(
                    "input.time_format",
                    format!("`{fmt}` is not a valid strftime format"),
                ));
            }
        }
        if !self.features.rfm && !self.features.als && self.features.extra().is_none() {
            return Err(invalid(
                "features",
                "segments on nothing: set features.rfm = true, features.als = true or a features.extra table (any combination)",
            ));
        }
        if cols.time().is_none() {
            return Err(invalid(
                "input.columns.time",
                "is required: every row needs an event time (recency, the latest event the report measures from)",
            ));
        }
        if self.features.rfm && cols.amount().is_none() && cols.price().is_none() {
            return Err(invalid(
                "input.columns.price",
                "features.rfm needs a monetary value: set input.columns.price (monetary = sum(quantity * price)) or input.columns.amount (monetary = sum(amount))",
            ));
        }
        if cols.amount().is_some() && cols.price().is_some() {
            return Err(invalid(
                "input.columns.amount",
                "set either amount (monetary = sum(amount)) or price (monetary = sum(quantity * price)), not both",
            ));
        }
        if self.features.als && cols.item().is_none() {
            return Err(invalid(
                "input.columns.item",
                "is required when features.als = true: ALS learns from (user, item) pairs",
            ));
        }
        let aw = self.features.als_weight;
        if !aw.is_finite() || aw < 0.0 {
            return Err(invalid(
                "features.als_weight",
                format!("must be a finite number >= 0, got {aw}"),
            ));
        }
        let features = &self.features;
        if features.extra.trim() != features.extra {
            return Err(invalid(
                "features.extra",
                "has leading or trailing spaces; give the path or URL exactly",
            ));
        }
        if features.extra().is_none() {
            for (field, set) in [
                ("features.extra_user", !features.extra_user.is_empty()),
                ("features.extra_columns", !features.extra_columns.is_empty()),
            ] {
                if set {
                    return Err(invalid(
                        field,
                        "is set but features.extra names no table; set features.extra or leave this out",
                    ));
                }
            }
        }
        let ew = features.extra_weight;
        if !ew.is_finite() || ew < 0.0 {
            return Err(invalid(
                "features.extra_weight",
                format!("must be a finite number >= 0, got {ew}"),
            ));
        }
        if features.extra_user.trim() != features.extra_user {
            return Err(invalid(
                "features.extra_user",
                "has leading or trailing spaces; give the column name exactly",
            ));
        }
        let extra_user = self.extra_user_column();
        let mut seen = std::collections::BTreeSet::new();
        for c in &features.extra_columns {
            if c.trim().is_empty() {
                return Err(invalid(
                    "features.extra_columns",
                    "holds an empty column name",
                ));
            }
            if !seen.insert(c.as_str()) {
                return Err(invalid(
                    "features.extra_columns",
                    format!("names column `{c}` twice"),
                ));
            }
            if c == extra_user {
                return Err(invalid(
                    "features.extra_columns",
                    format!("names `{c}`, the user column of the table; list feature columns only"),
                ));
            }
        }
        if !self.input.events.is_empty() && cols.event().is_none() {
            return Err(invalid(
                "input.events",
                "needs input.columns.event: the weights are looked up by the value of the event column",
            ));
        }
        for (event, &weight) in &self.input.events {
            if event.trim().is_empty() || event.trim() != event {
                return Err(invalid(
                    "input.events",
                    format!(
                        "event type {event:?} is blank or has leading/trailing spaces; event values are matched trimmed, so it would never match"
                    ),
                ));
            }
            if !weight.is_finite() || weight < 0.0 {
                return Err(invalid(
                    "input.events",
                    format!(
                        "the weight of event type `{event}` must be a finite number >= 0, got {weight}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks `input.clean`.
    fn check_clean(&self) -> Result<(), SpecError> {
        let cols = &self.input.columns;
        let clean = &self.input.clean;
        if !clean.drop_order_prefixes.is_empty() && cols.order().is_none() {
            return Err(invalid(
                "input.clean.drop_order_prefixes",
                "needs input.columns.order: the prefixes are matched against the order id",
            ));
        }
        if clean.drop_order_prefixes.iter().any(|p| p.is_empty()) {
            return Err(invalid(
                "input.clean.drop_order_prefixes",
                "an empty prefix would drop every row",
            ));
        }
        if let Some(q) = clean.min_quantity {
            if !q.is_finite() {
                return Err(invalid(
                    "input.clean.min_quantity",
                    "must be a finite number",
                ));
            }
            if cols.quantity().is_none() {
                return Err(invalid(
                    "input.clean.min_quantity",
                    "needs input.columns.quantity",
                ));
            }
        }
        if let Some(p) = clean.min_price {
            if !p.is_finite() {
                return Err(invalid("input.clean.min_price", "must be a finite number"));
            }
            if cols.price().is_none() {
                return Err(invalid(
                    "input.clean.min_price",
                    "needs input.columns.price",
                ));
            }
        }
        Ok(())
    }

    /// Checks `[segments]`.
    fn check_segments(&self) -> Result<(), SpecError> {
        let seg = &self.segments;
        if let SegmentCount::Range { min, max } = seg.k {
            // checked before the range is expanded into its candidates
            if min > max {
                return Err(invalid(
                    "segments.k",
                    format!("the range's min ({min}) is above its max ({max})"),
                ));
            }
            if max > MAX_K || (max - min) as usize >= MAX_K_CANDIDATES {
                return Err(invalid(
                    "segments.k",
                    format!(
                        "{{ min = {min}, max = {max} }}: k is at most {MAX_K}, and a range holds at most {MAX_K_CANDIDATES} candidates (each is fitted in full)"
                    ),
                ));
            }
        }
        let candidates = seg.k.candidates();
        if candidates.is_empty() {
            return Err(invalid("segments.k", "the list of candidates is empty"));
        }
        if let Some(&k) = candidates.iter().find(|&&k| k == 0 || k > MAX_K) {
            return Err(invalid(
                "segments.k",
                format!("must be between 1 and {MAX_K}, got {k}"),
            ));
        }
        if candidates.len() > 1 && candidates[0] < 2 {
            return Err(invalid(
                "segments.k",
                "candidates to choose from start at 2 (one segment has nothing to compare)",
            ));
        }
        if candidates.len() > MAX_K_CANDIDATES {
            return Err(invalid(
                "segments.k",
                format!(
                    "{} candidates; at most {MAX_K_CANDIDATES} (each is fitted in full)",
                    candidates.len()
                ),
            ));
        }
        if seg.starts == 0 || seg.starts > MAX_STARTS {
            return Err(invalid(
                "segments.starts",
                format!("must be between 1 and {MAX_STARTS}, got {}", seg.starts),
            ));
        }
        let centroids = u64::from(seg.starts) * u64::from(seg.k.max());
        if centroids > MAX_ROUND_CENTROIDS {
            return Err(invalid(
                "segments.starts",
                format!(
                    "{} starts of k = {} are {centroids} centroids in every Lloyd round; at most {MAX_ROUND_CENTROIDS}: lower segments.starts",
                    seg.starts,
                    seg.k.max()
                ),
            ));
        }
        if !seg.previous.trim().is_empty() && self.model.is_some() {
            return Err(invalid(
                "segments.previous",
                "a fold-in ([model]) keeps the model's segment ids: leave segments.previous out",
            ));
        }
        if seg.max_iter == 0 {
            return Err(invalid("segments.max_iter", "must be at least 1"));
        }
        if !seg.tol.is_finite() || seg.tol < 0.0 {
            return Err(invalid(
                "segments.tol",
                format!("must be a finite number >= 0, got {}", seg.tol),
            ));
        }
        Ok(())
    }

    /// Checks `[als]`.
    fn check_als(&self) -> Result<(), SpecError> {
        let als = &self.als;
        if als.factors == 0 || als.factors > MAX_FACTORS {
            return Err(invalid(
                "als.factors",
                format!("must be between 1 and {MAX_FACTORS}, got {}", als.factors),
            ));
        }
        if als.iterations == 0 || als.iterations > MAX_ALS_ITERATIONS {
            return Err(invalid(
                "als.iterations",
                format!(
                    "must be between 1 and {MAX_ALS_ITERATIONS}, got {}",
                    als.iterations
                ),
            ));
        }
        if !als.regularization.is_finite() || als.regularization < 0.0 {
            return Err(invalid(
                "als.regularization",
                format!("must be a finite number >= 0, got {}", als.regularization),
            ));
        }
        if !als.alpha.is_finite() || als.alpha <= 0.0 {
            return Err(invalid(
                "als.alpha",
                format!("must be a finite number > 0, got {}", als.alpha),
            ));
        }
        if als.cg_steps == 0 || als.cg_steps > MAX_CG_STEPS {
            return Err(invalid(
                "als.cg_steps",
                format!("must be between 1 and {MAX_CG_STEPS}, got {}", als.cg_steps),
            ));
        }
        if als.checkpoint_every == 0 || als.checkpoint_every > MAX_ALS_ITERATIONS {
            return Err(invalid(
                "als.checkpoint_every",
                format!(
                    "must be between 1 and {MAX_ALS_ITERATIONS}, got {}",
                    als.checkpoint_every
                ),
            ));
        }
        Ok(())
    }

    /// Checks `[recommend]`.
    fn check_recommend(&self) -> Result<(), SpecError> {
        if self.recommend.top_n > MAX_TOP_N {
            return Err(invalid(
                "recommend.top_n",
                format!(
                    "must be at most {MAX_TOP_N} (0 = no recommendations), got {}",
                    self.recommend.top_n
                ),
            ));
        }
        if self.recommend.users().is_some() && self.recommend.top_n == 0 {
            return Err(invalid(
                "recommend.users",
                "limits the recommendations, but recommend.top_n = 0 makes none: set top_n or remove users",
            ));
        }
        if self.recommend.users().is_none() && !self.recommend.users_column.trim().is_empty() {
            return Err(invalid(
                "recommend.users_column",
                "names the id column of recommend.users, which is not set",
            ));
        }
        Ok(())
    }

    /// Checks `[evaluate]`.
    fn check_evaluate(&self) -> Result<(), SpecError> {
        let ev = &self.evaluate;
        if !(0.0..1.0).contains(&ev.holdout) {
            return Err(invalid(
                "evaluate.holdout",
                format!(
                    "must be a fraction in [0, 1) (0 = no evaluation), got {}",
                    ev.holdout
                ),
            ));
        }
        if ev.holdout > 0.0 && !self.features.als {
            return Err(invalid(
                "evaluate.holdout",
                "needs features.als = true: evaluation measures the ALS recommendations; set features.als = true or evaluate.holdout = 0",
            ));
        }
        if ev.k == 0 || ev.k > MAX_TOP_N {
            return Err(invalid(
                "evaluate.k",
                format!("must be between 1 and {MAX_TOP_N}, got {}", ev.k),
            ));
        }
        Ok(())
    }

    /// Checks `[cluster]`.
    fn check_cluster(&self) -> Result<(), SpecError> {
        let cl = &self.cluster;
        if cl.shards == 0 || cl.shards > MAX_SHARDS {
            return Err(invalid(
                "cluster.shards",
                format!("must be between 1 and {MAX_SHARDS}, got {}", cl.shards),
            ));
        }
        if cl.workers == 0 {
            return Err(invalid("cluster.workers", "must be at least 1"));
        }
        if cl.max_attempts == 0 || cl.max_attempts > 100 {
            return Err(invalid(
                "cluster.max_attempts",
                format!("must be between 1 and 100, got {}", cl.max_attempts),
            ));
        }
        if let Some(staging) = &cl.staging
            && staging.trim().is_empty()
        {
            return Err(invalid(
                "cluster.staging",
                "must name a folder or URL, or be left out",
            ));
        }
        Ok(())
    }

    /// Checks `[model]`.
    fn check_model(&self) -> Result<(), SpecError> {
        if let Some(model) = &self.model {
            if model.path.trim().is_empty() {
                return Err(invalid(
                    "model.path",
                    "must name a finished job's output folder (path, file:// or s3:// URL)",
                ));
            }
            if self.evaluate.holdout > 0.0 {
                return Err(invalid(
                    "evaluate.holdout",
                    "must be 0 when scoring against a model: nothing is trained, so nothing is evaluated",
                ));
            }
        }
        Ok(())
    }
}
