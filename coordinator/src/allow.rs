//! Where a coordinator lets jobs read and write: an allow-list of local folders
//! and object-store locations (`shoal coordinator --allow-path`). Every location a
//! spec names (input, output, staging, features table, model, recommendation
//! list) is checked when the job is submitted, so a token holder cannot make the
//! coordinator and its workers read or write any path their processes can.

use std::path::{Component, Path, PathBuf};

use shoal_spec::JobSpec;

use crate::CoordinatorError;

/// The locations jobs may use. The default is everything: what code embedding a
/// coordinator gets unless it says otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    /// Local folders (absolute, symbolic links resolved): a path inside one is
    /// allowed. `None`: any local path.
    local: Option<Vec<PathBuf>>,
    /// Object-store URL prefixes (`s3://bucket/prefix`). `None`: any.
    remote: Option<Vec<String>>,
}

impl AllowList {
    /// Exactly `entries` (local folders, `file://` URLs or object-store
    /// prefixes); local ones relative to `cwd`. Without an object-store entry
    /// every object-store location is allowed (its credentials decide); without a
    /// local one, no local path is.
    pub fn of(entries: &[String], cwd: &Path) -> AllowList {
        let mut local = Vec::new();
        let mut remote = Vec::new();
        for e in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            match local_path(e, cwd) {
                Some(p) => local.push(resolved(&p)),
                None => remote.push(e.trim_end_matches('/').to_string()),
            }
        }
        AllowList {
            local: Some(local),
            remote: (!remote.is_empty()).then_some(remote),
        }
    }

    /// Checks every location of `spec`; the first one outside is the error.
    pub fn check(&self, spec: &JobSpec) -> Result<(), CoordinatorError> {
        let mut places = vec![
            ("input.interactions", spec.input.interactions.as_str()),
            ("output.path", spec.output.path.as_str()),
            ("features.extra", spec.features.extra.as_str()),
            ("recommend.users", spec.recommend.users.as_str()),
            ("segments.previous", spec.segments.previous.as_str()),
        ];
        if let Some(staging) = &spec.cluster.staging {
            places.push(("cluster.staging", staging));
        }
        if let Some(model) = &spec.model {
            places.push(("model.path", &model.path));
        }
        for (field, place) in places {
            let place = place.trim();
            if !place.is_empty() && !self.allows(place) {
                return Err(CoordinatorError::PathNotAllowed {
                    field,
                    path: place.to_string(),
                    allowed: self.describe(),
                });
            }
        }
        Ok(())
    }

    fn allows(&self, place: &str) -> bool {
        // A glob is checked by the folder its literal part names.
        let literal = &place[..place.find(['*', '?', '[', '{']).unwrap_or(place.len())];
        match local_path(literal, Path::new("/")) {
            Some(path) => match &self.local {
                None => true,
                Some(roots) => {
                    let path = resolved(&path);
                    roots.iter().any(|root| path.starts_with(root))
                }
            },
            None => match &self.remote {
                None => true,
                Some(prefixes) => prefixes.iter().any(|p| {
                    literal == p.as_str()
                        || literal.starts_with(&format!("{p}/"))
                        || (p.ends_with("://") && literal.starts_with(p.as_str()))
                }),
            },
        }
    }

    /// The allowed locations, for an error.
    fn describe(&self) -> String {
        let local = match &self.local {
            None => vec!["any local path".to_string()],
            Some(l) if l.is_empty() => vec!["no local path".to_string()],
            Some(l) => l.iter().map(|p| p.display().to_string()).collect(),
        };
        let remote = match &self.remote {
            None => vec!["any object store".to_string()],
            Some(r) => r.clone(),
        };
        [local, remote].concat().join(", ")
    }
}

/// The local path `place` names (absolute against `cwd`), or `None` for an
/// object-store URL.
fn local_path(place: &str, cwd: &Path) -> Option<PathBuf> {
    let place = match place.strip_prefix("file://") {
        Some(rest) => rest,
        None if place.contains("://") => return None,
        None => place,
    };
    Some(lexical(&cwd.join(place)))
}

/// `path` without `.` and `..` (taken lexically, as the spec's paths are).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// `path` with the symbolic links of the part that exists resolved, so that a
/// link inside an allowed folder does not lead out of it.
fn resolved(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (
            existing.file_name().map(|n| n.to_owned()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(input: &str, output: &str) -> JobSpec {
        let mut spec = JobSpec::parse(shoal_spec::spec::DEMO_SPEC).unwrap();
        spec.input.interactions = input.into();
        spec.output.path = output.into();
        spec
    }

    #[test]
    fn paths_inside_the_allowed_folders_pass_and_others_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("jobs");
        std::fs::create_dir(&root).unwrap();
        let allow = AllowList::of(&[root.display().to_string()], Path::new("/"));
        let inside = |p: &str| root.join(p).display().to_string();
        allow
            .check(&spec_with(&inside("logs/**/*.csv"), &inside("out")))
            .unwrap();
        allow
            .check(&spec_with(
                &format!("file://{}", inside("a.csv")),
                "s3://any/out",
            ))
            .unwrap();
        let err = allow
            .check(&spec_with("/etc/shadow", &inside("out")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("input.interactions") && err.contains("/etc/shadow"),
            "{err}"
        );
        // `..` and a link inside the folder do not lead out of it.
        let climb = format!("{}/../../etc/passwd", root.display());
        assert!(allow.check(&spec_with(&climb, &inside("out"))).is_err());
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
            assert!(
                allow
                    .check(&spec_with(&inside("etc/passwd"), &inside("out")))
                    .is_err()
            );
        }
        // Nothing local unless named; object stores as listed.
        let s3_only = AllowList::of(&["s3://logs/shop".into()], Path::new("/"));
        s3_only
            .check(&spec_with(
                "s3://logs/shop/2024/*.csv",
                "s3://logs/shop/out",
            ))
            .unwrap();
        let err = s3_only
            .check(&spec_with(
                "s3://logs/shopfront/x.csv",
                "s3://logs/shop/out",
            ))
            .unwrap_err()
            .to_string();
        assert!(err.contains("s3://logs/shop"), "{err}");
        assert!(
            s3_only
                .check(&spec_with("s3://logs/shop/x.csv", "/tmp/out"))
                .is_err()
        );
        AllowList::default()
            .check(&spec_with("/anywhere.csv", "/out"))
            .unwrap();
    }
}
