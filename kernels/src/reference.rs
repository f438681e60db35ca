//! Plain, obviously-correct twins of the backend kernels, written for clarity
//! rather than speed. Every backend is tested against these.
//!
//! Unlike the backends, these functions do not validate their input with errors:
//! they panic on inconsistent shapes or out-of-range labels, which is what a test
//! wants.

use crate::{NO_SECOND, Nearest, PartialSums};

/// Squared Euclidean distance, accumulated in f32 one feature after the other.
pub fn squared_distance(x: &[f32], c: &[f32]) -> f32 {
    assert_eq!(
        x.len(),
        c.len(),
        "point and centroid have different lengths"
    );
    let mut acc = 0.0f32;
    for (a, b) in x.iter().zip(c) {
        let t = a - b;
        acc += t * t;
    }
    acc
}

/// Nearest and second-nearest centroid of every point (`n x d` and `k x d`,
/// row-major). Ties go to the lowest index; with `k = 1` the second-best is
/// `NO_SECOND` at infinity.
///
/// # Panics
/// If `d` or `k` is 0 or the slices are not `n x d` and `k x d`.
pub fn assign(points: &[f32], d: usize, centroids: &[f32], k: usize) -> Vec<Nearest> {
    assert!(d >= 1, "d must be at least 1");
    assert!(k >= 1, "k must be at least 1");
    assert_eq!(points.len() % d, 0, "points are not a whole number of rows");
    assert_eq!(centroids.len(), k * d, "centroids are not k x d");

    points
        .chunks_exact(d)
        .map(|x| {
            let dist: Vec<f32> = centroids
                .chunks_exact(d)
                .map(|c| squared_distance(x, c))
                .collect();

            let mut best = 0;
            for j in 1..k {
                if dist[j] < dist[best] {
                    best = j;
                }
            }

            let mut second: Option<usize> = None;
            for j in (0..k).filter(|&j| j != best) {
                match second {
                    Some(s) if dist[j] >= dist[s] => {}
                    _ => second = Some(j),
                }
            }

            match second {
                Some(s) => Nearest {
                    best: best as u32,
                    best_dist: dist[best],
                    second: s as u32,
                    second_dist: dist[s],
                },
                None => Nearest {
                    best: best as u32,
                    best_dist: dist[best],
                    second: NO_SECOND,
                    second_dist: f32::INFINITY,
                },
            }
        })
        .collect()
}

/// Per-label sums (f64) and counts, accumulated sequentially in point order.
///
/// # Panics
/// If `d` is 0, the shapes disagree, or a label is not below `k`.
pub fn partial_sums(points: &[f32], d: usize, labels: &[u32], k: usize) -> PartialSums {
    assert!(d >= 1, "d must be at least 1");
    assert_eq!(
        points.len(),
        labels.len() * d,
        "one label per point is needed"
    );

    let mut out = PartialSums::zeros(k, d);
    for (x, &label) in points.chunks_exact(d).zip(labels) {
        let label = label as usize;
        assert!(label < k, "label {label} is not below k = {k}");
        out.counts[label] += 1;
        for (s, &v) in out.sums[label * d..(label + 1) * d].iter_mut().zip(x) {
            *s += f64::from(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_assignment() {
        // Point (0, 0); centroids (1, 0), (0, 2), (1, 0), (3, 4).
        let centroids = [1.0, 0.0, 0.0, 2.0, 1.0, 0.0, 3.0, 4.0];
        let got = assign(&[0.0, 0.0], 2, &centroids, 4);
        assert_eq!(
            got,
            vec![Nearest {
                best: 0,
                best_dist: 1.0,
                second: 2,
                second_dist: 1.0
            }]
        );

        // Point (0, 1.5): (0, 2) is nearest at 0.25, then (1, 0) at 3.25.
        let got = assign(&[0.0, 1.5], 2, &centroids, 4);
        assert_eq!(
            got,
            vec![Nearest {
                best: 1,
                best_dist: 0.25,
                second: 0,
                second_dist: 3.25
            }]
        );
    }

    #[test]
    fn single_centroid_has_no_second() {
        let got = assign(&[1.0, 2.0, 3.0], 1, &[2.0], 1);
        let want: Vec<Nearest> = [1.0, 0.0, 1.0]
            .iter()
            .map(|&dist| Nearest {
                best: 0,
                best_dist: dist,
                second: NO_SECOND,
                second_dist: f32::INFINITY,
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn infinite_distances_still_pick_lowest_indices() {
        // (1e20 - -1e20)^2 overflows f32: both centroids are at infinity.
        let got = assign(&[1e20], 1, &[-1e20, -1e20, 1e20], 3);
        assert_eq!(
            got,
            vec![Nearest {
                best: 2,
                best_dist: 0.0,
                second: 0,
                second_dist: f32::INFINITY
            }]
        );
        let got = assign(&[1e20], 1, &[-1e20, -1e20], 2);
        assert_eq!(
            got,
            vec![Nearest {
                best: 0,
                best_dist: f32::INFINITY,
                second: 1,
                second_dist: f32::INFINITY
            }]
        );
    }

    #[test]
    fn hand_computed_partial_sums() {
        let points = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let got = partial_sums(&points, 2, &[1, 0, 1], 3);
        assert_eq!(got.sums, vec![3.0, 4.0, 6.0, 8.0, 0.0, 0.0]);
        assert_eq!(got.counts, vec![1, 2, 0]);
    }
}
