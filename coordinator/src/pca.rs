//! The first two principal components of a small sample of feature vectors, for
//! the report's map of customers. Pure math: the covariance matrix (dims x dims)
//! and power iteration with deflation, deterministic for a given input.

/// A sample projected on its first two principal components.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    /// One (PC1, PC2) pair per point, in input order.
    pub points: Vec<[f32; 2]>,
    /// Share of the sample's total variance each component explains.
    pub explained: [f64; 2],
}

/// Projects `points` (`n` rows of `dims` values, row-major) on their first two
/// principal components. Each component's sign is fixed so that its largest
/// coordinate is positive. `None` with fewer than two points, no dimensions, or no
/// variance.
pub fn project2(points: &[f32], dims: usize) -> Option<Projection> {
    if dims == 0 || points.len() < 2 * dims || !points.len().is_multiple_of(dims) {
        return None;
    }
    let n = points.len() / dims;
    let mut mean = vec![0.0f64; dims];
    for row in points.chunks_exact(dims) {
        for (m, &x) in mean.iter_mut().zip(row) {
            *m += f64::from(x);
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut cov = vec![0.0f64; dims * dims];
    let mut centred = vec![0.0f64; dims];
    for row in points.chunks_exact(dims) {
        for ((c, &x), m) in centred.iter_mut().zip(row).zip(&mean) {
            *c = f64::from(x) - m;
        }
        for i in 0..dims {
            let ci = centred[i];
            for j in i..dims {
                cov[i * dims + j] += ci * centred[j];
            }
        }
    }
    for i in 0..dims {
        for j in i..dims {
            let v = cov[i * dims + j] / (n - 1) as f64;
            cov[i * dims + j] = v;
            cov[j * dims + i] = v;
        }
    }
    let total: f64 = (0..dims).map(|i| cov[i * dims + i]).sum();
    if total.is_nan() || total <= 0.0 {
        return None;
    }
    let (l1, v1) = top_eigen(&cov, dims);
    // deflate: remove the first component, then find the next
    for i in 0..dims {
        for j in 0..dims {
            cov[i * dims + j] -= l1 * v1[i] * v1[j];
        }
    }
    let (l2, v2) = if dims > 1 {
        top_eigen(&cov, dims)
    } else {
        (0.0, vec![0.0])
    };
    let project = |row: &[f32], v: &[f64]| -> f32 {
        row.iter()
            .zip(&mean)
            .zip(v)
            .map(|((&x, m), v)| (f64::from(x) - m) * v)
            .sum::<f64>() as f32
    };
    Some(Projection {
        points: points
            .chunks_exact(dims)
            .map(|row| [project(row, &v1), project(row, &v2)])
            .collect(),
        explained: [l1.max(0.0) / total, l2.max(0.0) / total],
    })
}

/// The largest eigenvalue of the symmetric positive semi-definite `m` (`d` x `d`)
/// and its unit eigenvector, by power iteration from a fixed start.
fn top_eigen(m: &[f64], d: usize) -> (f64, Vec<f64>) {
    // a start with a part along every direction (not orthogonal to the answer in
    // practice), the same every time
    let mut v: Vec<f64> = (0..d).map(|i| 1.0 + 0.01 * i as f64).collect();
    normalise(&mut v);
    let mut lambda = 0.0;
    for _ in 0..1000 {
        let mut w: Vec<f64> = (0..d)
            .map(|i| (0..d).map(|j| m[i * d + j] * v[j]).sum())
            .collect();
        let norm = normalise(&mut w);
        if norm == 0.0 {
            return (0.0, v);
        }
        let moved: f64 = w.iter().zip(&v).map(|(a, b)| (a - b).abs()).sum();
        v = w;
        lambda = norm;
        if moved < 1e-12 {
            break;
        }
    }
    // fix the sign: the largest coordinate positive
    let largest = v
        .iter()
        .copied()
        .fold(0.0f64, |a, x| if x.abs() > a.abs() { x } else { a });
    if largest < 0.0 {
        v.iter_mut().for_each(|x| *x = -*x);
    }
    (lambda, v)
}

/// Scales `v` to unit length; returns its length before.
fn normalise(v: &mut [f64]) -> f64 {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_the_directions_of_a_known_spread() {
        // 3-D points: variance 9 along (1, 1, 0)/sqrt 2, 1 along z, 0.01 along
        // (1, -1, 0)/sqrt 2; a seeded walk over a grid instead of random numbers
        let mut pts = Vec::new();
        for a in -10..=10 {
            for b in -5..=5 {
                let (s, t, u) = (
                    a as f64 * 0.3,
                    b as f64 * 0.2,
                    ((a * 7 + b * 3) % 5) as f64 * 0.02,
                );
                let x = (s + u) / 2f64.sqrt();
                let y = (s - u) / 2f64.sqrt();
                pts.extend([x as f32, y as f32, t as f32]);
            }
        }
        let p = project2(&pts, 3).unwrap();
        assert_eq!(p.points.len(), 21 * 11);
        // the first component is along (1, 1, 0) (tilted a little: u is not
        // independent of s): PC1 of a point is about its s
        let want_pc1: Vec<f64> = (-10..=10)
            .flat_map(|a| (-5..=5).map(move |_| a as f64 * 0.3))
            .collect();
        for (got, want) in p.points.iter().zip(&want_pc1) {
            assert!((f64::from(got[0]) - want).abs() < 2e-3, "{got:?} {want}");
        }
        assert!(p.explained[0] > p.explained[1] && p.explained[1] > 0.0);
        assert!(p.explained[0] + p.explained[1] <= 1.0 + 1e-9);
        // PC2 is along z: its values are the b grid
        let pc2: Vec<f32> = p.points.iter().map(|q| q[1]).collect();
        let max = pc2.iter().copied().fold(f32::MIN, f32::max);
        assert!((max - 1.0).abs() < 0.05, "{max}");
    }

    #[test]
    fn the_same_sample_projects_the_same_way() {
        let pts: Vec<f32> = (0..300).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        assert_eq!(project2(&pts, 3), project2(&pts, 3));
    }

    #[test]
    fn degenerate_samples_have_no_projection() {
        assert!(project2(&[], 3).is_none());
        assert!(project2(&[1.0, 2.0, 3.0], 3).is_none());
        assert!(project2(&[1.0, 1.0, 1.0, 1.0], 2).is_none(), "no variance");
        assert!(project2(&[1.0, 2.0, 3.0, 4.0], 1).is_some());
    }
}
