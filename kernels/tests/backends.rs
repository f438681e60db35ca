//! Every operation of [`Backend`], on every backend this machine has, against the
//! plain twins in `shoal_kernels::reference`.
//!
//! `test_backends!` turns each body below into one test per backend: `cpu` always,
//! `cuda` when `device::cuda_devices()` finds a device (otherwise the test prints
//! why CUDA was skipped and passes). A machine with a device but a backend that
//! does not start (e.g. no NVRTC on `LD_LIBRARY_PATH`) fails the `cuda` tests.
//!
//! Tolerances:
//! - assignments: indices identical to the reference except on a near-tie (the
//!   distance, by the reference, to the centroid the backend chose equals the
//!   reference's within 1e-4 relative + 1e-5); distances within the same bound;
//!   exact ties (duplicate centroids or points) must resolve exactly as the
//!   reference (lowest index, identical bits);
//! - partial sums: counts exact, sums within 1e-5 relative (of max(|sum|, 1));
//! - Gram: within 1e-10 of Σ|a_ri a_rj| (only the order of f64 additions differs),
//!   exactly symmetric;
//! - ALS: the same CG steps as the reference within 1e-3 of the row's norm (f32
//!   arithmetic, other reduction order); with enough steps, within 1e-3 of the
//!   exact (Cholesky) solution;
//! - top-n: the same scores per slot within 1e-5 relative, the same items except
//!   where two scores are that close, excluded items never listed.

use std::sync::{Arc, OnceLock};

use shoal_kernels::cuda::CudaBackend;
use shoal_kernels::{
    Backend, CgParams, Csr, KernelError, NO_ITEM, NO_SECOND, Nearest, PartialSums, Resident,
    device, reference,
};

/// The CUDA backend on device 0, built once for all tests; `Err` says why there
/// is none.
fn cuda() -> Result<Arc<CudaBackend>, String> {
    static CUDA: OnceLock<Result<Arc<CudaBackend>, String>> = OnceLock::new();
    CUDA.get_or_init(|| match device::cuda_devices() {
        Err(reason) => Err(reason.to_string()),
        Ok(devices) => match CudaBackend::new(0) {
            Ok(b) => Ok(Arc::new(b)),
            // A device is there: failing to use it is a failure, not a skip.
            Err(e) => panic!(
                "{} is present but the CUDA backend did not start: {e}",
                devices[0]
            ),
        },
    })
    .clone()
}

macro_rules! test_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn cpu() {
                    super::$name(&shoal_kernels::CpuBackend::new());
                }

                #[test]
                fn cuda() {
                    match super::cuda() {
                        Ok(backend) => super::$name(&*backend),
                        Err(reason) => {
                            eprintln!("{}: CUDA skipped: {reason}", stringify!($name))
                        }
                    }
                }
            }
        )*
    };
}

test_backends!(
    assign_matches_reference,
    assign_ties_go_to_the_lowest_index,
    assign_duplicate_points_get_identical_results,
    assign_single_centroid_has_no_second,
    assign_every_point_a_centroid,
    assign_does_not_depend_on_the_batch,
    assign_overflowing_distances,
    assign_far_from_zero,
    assign_labels_equal_the_backends_own_assign,
    partial_sums_match_reference,
    partial_sums_reject_bad_labels,
    gram_matches_reference,
    als_solve_matches_reference,
    als_solve_converges_to_the_exact_solution,
    als_solve_rows_are_independent,
    als_solve_pair_loss_matches_reference,
    als_solve_rejects_bad_input,
    top_n_matches_reference,
    top_n_ties_go_to_the_lowest_index,
    top_n_limits,
    upload_rejects_non_finite_values,
    rows_round_trip,
    residents_of_another_backend_are_rejected,
);

// ---------------------------------------------------------------------------
// Helpers.

/// splitmix64: small, deterministic, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn values(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.unit()).collect()
    }
}

fn bits(n: &Nearest) -> (u32, u32, u32, u32) {
    (
        n.best,
        n.best_dist.to_bits(),
        n.second,
        n.second_dist.to_bits(),
    )
}

fn close(got: f32, want: f32) -> bool {
    got == want || (got - want).abs() <= 1e-4 * want.abs() + 1e-5
}

fn run_assign(
    b: &dyn Backend,
    points: &[f32],
    d: usize,
    centroids: &[f32],
    k: usize,
) -> Vec<Nearest> {
    let resident = b.upload(points, d).unwrap();
    let mut out = vec![Nearest::default(); resident.n()];
    b.assign(&resident, centroids, k, &mut out).unwrap();
    out
}

/// Checks one backend result against the reference. Indices may differ only on a
/// near-tie: the distance (by the reference) to the centroid the backend chose
/// must equal the reference's within tolerance.
fn check_assign(
    points: &[f32],
    d: usize,
    centroids: &[f32],
    k: usize,
    got: &[Nearest],
    what: &str,
) {
    let want = reference::assign(points, d, centroids, k);
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let x = &points[i * d..(i + 1) * d];
        let ref_dist = |j: u32| {
            reference::squared_distance(x, &centroids[j as usize * d..(j as usize + 1) * d])
        };
        let ctx = || format!("{what}: point {i}: got {g:?}, reference {w:?}");
        assert!((g.best as usize) < k, "{}", ctx());
        assert!(g.best_dist >= 0.0, "{}", ctx());
        assert!(
            close(g.best_dist, w.best_dist),
            "best distance differs: {}",
            ctx()
        );
        if g.best != w.best {
            assert!(
                close(ref_dist(g.best), w.best_dist),
                "best differs without a near-tie: {}",
                ctx()
            );
        }
        if k == 1 {
            assert_eq!(g.second, NO_SECOND, "{}", ctx());
            assert_eq!(g.second_dist, f32::INFINITY, "{}", ctx());
            continue;
        }
        assert!((g.second as usize) < k && g.second != g.best, "{}", ctx());
        assert!(g.second_dist >= g.best_dist, "{}", ctx());
        assert!(
            close(g.second_dist, w.second_dist),
            "second distance differs: {}",
            ctx()
        );
        if g.second != w.second {
            assert!(
                close(ref_dist(g.second), w.second_dist),
                "second differs without a near-tie: {}",
                ctx()
            );
        }
    }
}

/// A random CSR matrix: every row holds each column with probability `density`,
/// values from `value`.
fn random_csr(
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    density: f64,
    mut value: impl FnMut(&mut Rng) -> f32,
) -> Csr {
    let mut indptr = vec![0u64];
    let (mut indices, mut values) = (Vec::new(), Vec::new());
    for _ in 0..rows {
        for c in 0..cols {
            if (rng.next_u64() % 1_000_000) as f64 / 1e6 < density {
                indices.push(c as u32);
                values.push(value(rng));
            }
        }
        indptr.push(indices.len() as u64);
    }
    Csr {
        rows,
        cols,
        indptr,
        indices,
        values,
    }
}

fn csr_from_rows(cols: usize, rows: &[Vec<(u32, f32)>]) -> Csr {
    let mut indptr = vec![0u64];
    let (mut indices, mut values) = (Vec::new(), Vec::new());
    for row in rows {
        for &(c, v) in row {
            indices.push(c);
            values.push(v);
        }
        indptr.push(indices.len() as u64);
    }
    Csr {
        rows: rows.len(),
        cols,
        indptr,
        indices,
        values,
    }
}

// ---------------------------------------------------------------------------
// assign

fn assign_matches_reference(b: &dyn Backend) {
    let mut rng = Rng(1);
    // Sizes straddle every tile of both backends (CPU 256 points; CUDA 64 and 128
    // points, 64 and 128 centroids, 16-feature slices) and the direct/expanded
    // switches (CPU d 16/17, CUDA d 32/33).
    for &n in &[1, 63, 65, 129, 700] {
        for &d in &[1, 2, 3, 5, 8, 16, 17, 31, 32, 33, 64, 100] {
            for &k in &[1, 2, 7, 65, 130] {
                let points = rng.values(n * d);
                let centroids = rng.values(k * d);
                let got = run_assign(b, &points, d, &centroids, k);
                check_assign(
                    &points,
                    d,
                    &centroids,
                    k,
                    &got,
                    &format!("n={n} d={d} k={k}"),
                );
            }
        }
    }
}

fn assign_ties_go_to_the_lowest_index(b: &dyn Backend) {
    let mut rng = Rng(4);
    for &d in &[1, 3, 32, 64] {
        let distinct = rng.values(5 * d);
        // Centroid j is copy pattern[j] of the distinct ones.
        let pattern = [1, 0, 1, 3, 2, 0, 4, 3, 1, 2, 4, 4];
        let k = pattern.len();
        let centroids: Vec<f32> = pattern
            .iter()
            .flat_map(|&p| distinct[p * d..(p + 1) * d].to_vec())
            .collect();
        let first_of = |p: usize| pattern.iter().position(|&q| q == p).unwrap();
        let second_of = |p: usize| {
            first_of(p)
                + 1
                + pattern[first_of(p) + 1..]
                    .iter()
                    .position(|&q| q == p)
                    .unwrap()
        };
        let points = rng.values(300 * d);
        let got = run_assign(b, &points, d, &centroids, k);
        check_assign(
            &points,
            d,
            &centroids,
            k,
            &got,
            &format!("duplicate centroids d={d}"),
        );
        for g in &got {
            let p = pattern[g.best as usize];
            assert_eq!(g.best as usize, first_of(p), "d={d}: {g:?}");
            assert_eq!(g.second as usize, second_of(p), "d={d}: {g:?}");
            assert_eq!(
                g.best_dist.to_bits(),
                g.second_dist.to_bits(),
                "d={d}: {g:?}"
            );
        }
        // A point exactly between two centroids: equal distances, lower index.
        let (a, c) = (vec![-1.0f32; d], vec![1.0f32; d]);
        let two: Vec<f32> = c.iter().chain(&a).copied().collect();
        let got = run_assign(b, &vec![0.0; d], d, &two, 2);
        assert_eq!(
            (got[0].best, got[0].second),
            (0, 1),
            "midpoint d={d}: {:?}",
            got[0]
        );
        assert_eq!(got[0].best_dist, d as f32, "midpoint d={d}");
    }
}

fn assign_duplicate_points_get_identical_results(b: &dyn Backend) {
    let mut rng = Rng(5);
    for &d in &[3, 32, 64] {
        let k = 10;
        let distinct = rng.values(7 * d);
        let picks: Vec<usize> = (0..900).map(|_| rng.below(7)).collect();
        let points: Vec<f32> = picks
            .iter()
            .flat_map(|&p| distinct[p * d..(p + 1) * d].to_vec())
            .collect();
        let centroids = rng.values(k * d);
        let got = run_assign(b, &points, d, &centroids, k);
        check_assign(
            &points,
            d,
            &centroids,
            k,
            &got,
            &format!("duplicate points d={d}"),
        );
        let alone = run_assign(b, &distinct, d, &centroids, k);
        for (g, &p) in got.iter().zip(&picks) {
            assert_eq!(bits(g), bits(&alone[p]), "d={d}");
        }
    }
}

fn assign_single_centroid_has_no_second(b: &dyn Backend) {
    let mut rng = Rng(6);
    for &d in &[1, 3, 64] {
        let points = rng.values(257 * d);
        let centroid = rng.values(d);
        let got = run_assign(b, &points, d, &centroid, 1);
        check_assign(&points, d, &centroid, 1, &got, &format!("k=1 d={d}"));
        assert!(
            got.iter()
                .all(|g| g.best == 0 && g.second == NO_SECOND && g.second_dist == f32::INFINITY)
        );
    }
}

fn assign_every_point_a_centroid(b: &dyn Backend) {
    // k = n: every point is a centroid, found at distance 0.
    let mut rng = Rng(7);
    for &d in &[1, 3, 33, 100] {
        let n = 257;
        let points = rng.values(n * d);
        let got = run_assign(b, &points, d, &points, n);
        check_assign(&points, d, &points, n, &got, &format!("k=n d={d}"));
        for (i, g) in got.iter().enumerate() {
            // Random f32 features: no two points coincide, even at d = 1.
            assert_eq!((g.best as usize, g.best_dist), (i, 0.0), "d={d}: {g:?}");
            assert!(g.second_dist > 0.0, "d={d}: {g:?}");
        }
    }
}

fn assign_does_not_depend_on_the_batch(b: &dyn Backend) {
    let mut rng = Rng(9);
    for &d in &[3, 17, 64, 300] {
        let (n, k) = (1000, 150);
        let centroids = rng.values(k * d);
        let batch = rng.values(n * d);
        let in_batch = run_assign(b, &batch, d, &centroids, k);
        for &i in &[0, 1, 63, 64, 65, 127, 128, 255, 256, 511, 700, n - 1] {
            let alone = run_assign(b, &batch[i * d..(i + 1) * d], d, &centroids, k);
            assert_eq!(bits(&alone[0]), bits(&in_batch[i]), "d={d}, point {i}");
            let mut other = rng.values(41 * d);
            other.extend_from_slice(&batch[i * d..(i + 1) * d]);
            let elsewhere = run_assign(b, &other, d, &centroids, k);
            assert_eq!(bits(&elsewhere[41]), bits(&in_batch[i]), "d={d}, point {i}");
        }
    }
}

fn assign_overflowing_distances(b: &dyn Backend) {
    for &d in &[2, 64] {
        // The point sits on centroid 2; centroids 0 and 1 are out of f32 range.
        let point = vec![1e20f32; d];
        let mut centroids = vec![-1e20f32; 2 * d];
        centroids.extend(&point);
        let got = run_assign(b, &point, d, &centroids, 3);
        let want = Nearest {
            best: 2,
            best_dist: 0.0,
            second: 0,
            second_dist: f32::INFINITY,
        };
        assert_eq!(got, vec![want], "d={d}");
        assert_eq!(got, reference::assign(&point, d, &centroids, 3), "d={d}");
        // Every centroid at infinity: lowest indices.
        let got = run_assign(b, &point, d, &centroids[..2 * d], 2);
        assert_eq!(
            got,
            reference::assign(&point, d, &centroids[..2 * d], 2),
            "d={d}"
        );
        assert_eq!((got[0].best, got[0].second), (0, 1), "d={d}");
    }
}

fn assign_far_from_zero(b: &dyn Backend) {
    // Values near 1000 with a spread of 1: the expanded form without a shift would
    // lose the distances in the rounding of |x|^2 ~ 6.4e7.
    let mut rng = Rng(2);
    let (n, d, k) = (500, 64, 20);
    let points: Vec<f32> = rng.values(n * d).iter().map(|v| 1000.0 + v).collect();
    let centroids: Vec<f32> = rng.values(k * d).iter().map(|v| 1000.0 + 0.3 * v).collect();
    let got = run_assign(b, &points, d, &centroids, k);
    check_assign(&points, d, &centroids, k, &got, "offset data");
}

// ---------------------------------------------------------------------------
// partial sums

/// `assign_labels` gives, round after round, exactly the labels of the same
/// backend's `assign` (whatever it skips), along a Lloyd trajectory with a
/// change of k in the middle.
fn assign_labels_equal_the_backends_own_assign(b: &dyn Backend) {
    let mut rng = Rng(31);
    let (n, d) = (3000, 40);
    let points = rng.values(n * d);
    let resident = b.upload(&points, d).unwrap();
    let mut bounds = b.lloyd_bounds(&resident).unwrap();
    let mut labels = vec![0u32; n];
    let mut near = vec![Nearest::default(); n];
    for (round, k) in [9, 9, 9, 9, 5, 5, 5].into_iter().enumerate() {
        let mut c = points[..k * d].to_vec();
        if round > 0 {
            // Lloyd's update from the previous labels, when k has not changed.
            let sums = b.partial_sums(&resident, &labels, k).ok();
            if let Some(sums) = sums.filter(|_| labels.iter().all(|&l| (l as usize) < k)) {
                for j in 0..k {
                    if sums.counts[j] > 0 {
                        for f in 0..d {
                            c[j * d + f] = (sums.sums[j * d + f] / sums.counts[j] as f64) as f32;
                        }
                    }
                }
            }
        }
        b.assign_labels(&resident, &mut bounds, &c, k, &mut labels)
            .unwrap();
        b.assign(&resident, &c, k, &mut near).unwrap();
        for (i, (l, s)) in labels.iter().zip(&near).enumerate() {
            assert_eq!(*l, s.best, "round {round} (k = {k}), point {i}");
        }
    }
}

fn check_sums(got: &PartialSums, want: &PartialSums, what: &str) {
    assert_eq!((got.k, got.d), (want.k, want.d), "{what}");
    assert_eq!(got.counts, want.counts, "{what}");
    for (i, (g, w)) in got.sums.iter().zip(&want.sums).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs().max(1.0),
            "{what}: sum {i}: {g} vs {w}"
        );
    }
}

fn partial_sums_match_reference(b: &dyn Backend) {
    let mut rng = Rng(11);
    // k*d on both sides of the CUDA register path (1024) and chunk boundaries
    // (4096 points).
    for &n in &[0, 1, 255, 4095, 4096, 4097, 10_000] {
        for &(d, k) in &[(1, 1), (3, 5), (64, 7), (2, 300), (64, 20), (300, 5)] {
            let points = rng.values(n * d);
            let labels: Vec<u32> = (0..n).map(|_| rng.below(k) as u32).collect();
            let resident = b.upload(&points, d).unwrap();
            let got = b.partial_sums(&resident, &labels, k).unwrap();
            let want = reference::partial_sums(&points, d, &labels, k);
            check_sums(&got, &want, &format!("n={n} d={d} k={k}"));
        }
    }
    // All points in one cluster, others empty (the contended case for atomics).
    let (n, d, k) = (9000, 5, 4);
    let points = rng.values(n * d);
    let labels = vec![2u32; n];
    let resident = b.upload(&points, d).unwrap();
    let got = b.partial_sums(&resident, &labels, k).unwrap();
    check_sums(
        &got,
        &reference::partial_sums(&points, d, &labels, k),
        "one cluster",
    );
    assert_eq!(got.counts, vec![0, 0, n as u64, 0]);
    // Deterministic: the same call gives the same bits.
    let again = b.partial_sums(&resident, &labels, k).unwrap();
    assert_eq!(
        got.sums.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        again.sums.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

fn partial_sums_reject_bad_labels(b: &dyn Backend) {
    let resident = b.upload(&Rng(15).values(6 * 2), 2).unwrap();
    let err = b
        .partial_sums(&resident, &[0, 1, 2, 3, 1, 0], 3)
        .unwrap_err();
    assert!(matches!(err, KernelError::Shape(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("point 3") && message.contains("label 3"),
        "{message}"
    );
    assert!(matches!(
        b.partial_sums(&resident, &[0, 0, 0], 1),
        Err(KernelError::Shape(_))
    ));
    assert!(matches!(
        b.partial_sums(&resident, &[0; 6], 0),
        Err(KernelError::EmptyCentroids)
    ));
}

// ---------------------------------------------------------------------------
// Gram

fn gram_matches_reference(b: &dyn Backend) {
    let mut rng = Rng(20);
    for &n in &[0, 1, 1023, 1024, 1025, 3000] {
        for &d in &[1, 3, 32, 33, 70] {
            let a = rng.values(n * d);
            let resident = b.upload(&a, d).unwrap();
            let got = b.gram(&resident).unwrap();
            let want = reference::gram(&a, d);
            let abs: Vec<f32> = a.iter().map(|v| v.abs()).collect();
            let scale = reference::gram(&abs, d);
            assert_eq!(got.len(), d * d);
            for i in 0..d {
                for j in 0..d {
                    let (g, w) = (got[i * d + j], want[i * d + j]);
                    assert!(
                        (g - w).abs() <= 1e-10 * scale[i * d + j],
                        "n={n} d={d} ({i}, {j}): {g} vs {w}"
                    );
                    assert_eq!(
                        g.to_bits(),
                        got[j * d + i].to_bits(),
                        "n={n} d={d}: not symmetric"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// ALS

/// Item factors, their Gram, confidences (1 + 4 w) and a warm start.
struct AlsCase {
    d: usize,
    y: Vec<f32>,
    yty: Vec<f64>,
    confidence: Csr,
    x: Vec<f32>,
}

fn als_case(seed: u64, rows: usize, items: usize, d: usize) -> AlsCase {
    let mut rng = Rng(seed);
    let scale = 1.0 / (d as f32).sqrt();
    let y: Vec<f32> = rng.values(items * d).iter().map(|v| v * scale).collect();
    let yty = reference::gram(&y, d);
    let mut confidence = random_csr(&mut rng, rows, items, 0.1, |r| 1.0 + 4.0 * (r.unit() + 1.0));
    // Row 0 holds nothing, row 1 holds every item.
    let mut rows_of: Vec<Vec<(u32, f32)>> = (0..rows)
        .map(|r| {
            let (c, v) = confidence.row(r);
            c.iter().copied().zip(v.iter().copied()).collect()
        })
        .collect();
    if rows >= 2 {
        rows_of[0].clear();
        rows_of[1] = (0..items as u32)
            .map(|c| (c, 2.0 + (c % 5) as f32))
            .collect();
        confidence = csr_from_rows(items, &rows_of);
    }
    let x: Vec<f32> = rng.values(rows * d).iter().map(|v| 0.1 * v).collect();
    AlsCase {
        d,
        y,
        yty,
        confidence,
        x,
    }
}

fn run_als(b: &dyn Backend, case: &AlsCase, params: CgParams) -> Vec<f32> {
    let mut x = b.upload(&case.x, case.d).unwrap();
    let y = b.upload(&case.y, case.d).unwrap();
    let c = b.upload_sparse(&case.confidence).unwrap();
    b.als_solve(&mut x, &y, &case.yty, &c, params).unwrap();
    let rows: Vec<u32> = (0..x.n() as u32).collect();
    b.download_rows(&x, &rows).unwrap()
}

fn als_solve_matches_reference(b: &dyn Backend) {
    // d = 256: A = YᵀY + λI (256 KiB) does not fit shared memory on any GPU, so the
    // CUDA kernel reads it from global memory; the others keep it in shared memory.
    for &(d, rows, items) in &[
        (1, 9, 20),
        (8, 40, 60),
        (33, 25, 80),
        (70, 12, 100),
        (256, 4, 300),
        // row 1 holds all 1,500 items: more item rows than the CPU backend
        // gathers per block, so it reads them in place
        (64, 6, 1500),
    ] {
        let case = als_case(30 + d as u64, rows, items, d);
        for steps in [0u32, 1, 3] {
            let params = CgParams {
                regularization: 0.1,
                cg_steps: steps,
                pair_loss: false,
            };
            let got = run_als(b, &case, params);
            let mut want = case.x.clone();
            reference::als_solve(&mut want, &case.y, d, &case.yty, &case.confidence, params);
            for u in 0..rows {
                let (g, w) = (&got[u * d..(u + 1) * d], &want[u * d..(u + 1) * d]);
                let norm = w.iter().map(|v| v * v).sum::<f32>().sqrt();
                let diff = g
                    .iter()
                    .zip(w)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    .sqrt();
                assert!(
                    diff <= 1e-3 * norm.max(1e-2),
                    "d={d} steps={steps} row {u}: |x - ref| = {diff}, |ref| = {norm}"
                );
            }
        }
    }
}

fn als_solve_converges_to_the_exact_solution(b: &dyn Backend) {
    for &(d, rows, items) in &[(4, 10, 30), (16, 10, 60)] {
        let case = als_case(40 + d as u64, rows, items, d);
        let params = CgParams {
            regularization: 0.5,
            cg_steps: 3 * d as u32,
            pair_loss: false,
        };
        let got = run_als(b, &case, params);
        for u in 0..rows {
            let (cols, conf) = case.confidence.row(u);
            let exact =
                reference::als_exact_row(&case.yty, params.regularization, &case.y, d, cols, conf);
            let norm = exact.iter().map(|v| v * v).sum::<f64>().sqrt();
            let diff = got[u * d..(u + 1) * d]
                .iter()
                .zip(&exact)
                .map(|(&a, &b)| (f64::from(a) - b).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(
                diff <= 1e-3 * norm.max(1e-2),
                "d={d} row {u}: |x - exact| = {diff}, |exact| = {norm}"
            );
        }
    }
}

fn als_solve_rows_are_independent(b: &dyn Backend) {
    // d = 24: whole blocks of 8 features only; d = 37: a block of 32, then
    // single features; 1,500 items: row 1 holds them all (read in place on the
    // CPU backend, the other rows gathered); 131 rows: more than one block of
    // rows, an odd number of them.
    for &(seed, rows, items, d) in &[(50, 30, 70, 24), (51, 131, 90, 37), (52, 9, 1500, 64)] {
        rows_solved_alone_are_equal(b, seed, rows, items, d);
    }
}

fn rows_solved_alone_are_equal(b: &dyn Backend, seed: u64, rows: usize, items: usize, d: usize) {
    let case = als_case(seed, rows, items, d);
    let params = CgParams {
        regularization: 0.1,
        cg_steps: 3,
        pair_loss: false,
    };
    let all = run_als(b, &case, params);
    for &u in &[0usize, 1, 7, rows - 1] {
        let (cols, conf) = case.confidence.row(u);
        let single = AlsCase {
            d,
            y: case.y.clone(),
            yty: case.yty.clone(),
            confidence: csr_from_rows(
                items,
                &[cols.iter().copied().zip(conf.iter().copied()).collect()],
            ),
            x: case.x[u * d..(u + 1) * d].to_vec(),
        };
        let alone = run_als(b, &single, params);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&alone),
            bits(&all[u * d..(u + 1) * d]),
            "d={d} row {u}"
        );
    }
}

fn als_solve_pair_loss_matches_reference(b: &dyn Backend) {
    for &(d, rows, items) in &[(1, 9, 20), (37, 40, 80), (64, 6, 1500)] {
        let case = als_case(70 + d as u64, rows, items, d);
        for steps in [0u32, 3] {
            let params = CgParams {
                regularization: 0.1,
                cg_steps: steps,
                pair_loss: true,
            };
            let mut x = b.upload(&case.x, d).unwrap();
            let y = b.upload(&case.y, d).unwrap();
            let c = b.upload_sparse(&case.confidence).unwrap();
            let got = b
                .als_solve(&mut x, &y, &case.yty, &c, params)
                .unwrap()
                .expect("a pair loss was asked for");
            // of the new rows, as the backend left them
            let all: Vec<u32> = (0..rows as u32).collect();
            let solved = b.download_rows(&x, &all).unwrap();
            let want = reference::pair_loss(&solved, &case.y, d, &case.confidence);
            let scale: f64 = case.confidence.values.iter().map(|&v| f64::from(v)).sum();
            assert!(
                (got - want).abs() <= 1e-5 * scale,
                "d={d} steps={steps}: {got} vs {want}"
            );
            if steps == 0 {
                assert_eq!(solved, case.x, "no step leaves the rows alone");
            }
        }
        let params = CgParams {
            regularization: 0.1,
            cg_steps: 3,
            pair_loss: false,
        };
        let mut x = b.upload(&case.x, d).unwrap();
        let y = b.upload(&case.y, d).unwrap();
        let c = b.upload_sparse(&case.confidence).unwrap();
        assert_eq!(
            b.als_solve(&mut x, &y, &case.yty, &c, params).unwrap(),
            None
        );
    }
    // no rows: a loss of 0
    let case = als_case(79, 0, 5, 3);
    let mut x = b.upload(&case.x, 3).unwrap();
    let y = b.upload(&case.y, 3).unwrap();
    let c = b.upload_sparse(&case.confidence).unwrap();
    let params = CgParams {
        regularization: 0.1,
        cg_steps: 3,
        pair_loss: true,
    };
    assert_eq!(
        b.als_solve(&mut x, &y, &case.yty, &c, params).unwrap(),
        Some(0.0)
    );
}

fn als_solve_rejects_bad_input(b: &dyn Backend) {
    let case = als_case(60, 5, 10, 4);
    let params = CgParams {
        regularization: 0.1,
        cg_steps: 3,
        pair_loss: false,
    };
    let mut x = b.upload(&case.x, 4).unwrap();
    let y = b.upload(&case.y, 4).unwrap();
    let c = b.upload_sparse(&case.confidence).unwrap();
    // Confidence below 1.
    let low = csr_from_rows(
        10,
        &[
            vec![(2, 3.0)],
            vec![],
            vec![(1, 2.0), (4, 0.5)],
            vec![],
            vec![],
        ],
    );
    let low = b.upload_sparse(&low).unwrap();
    let err = b
        .als_solve(&mut x, &y, &case.yty, &low, params)
        .unwrap_err();
    assert!(err.to_string().contains("row 2, item 4"), "{err}");
    // YᵀY of the wrong size, negative λ, y as confidences.
    assert!(matches!(
        b.als_solve(&mut x, &y, &case.yty[1..], &c, params),
        Err(KernelError::Shape(_))
    ));
    let negative = CgParams {
        regularization: -1.0,
        cg_steps: 3,
        pair_loss: false,
    };
    assert!(matches!(
        b.als_solve(&mut x, &y, &case.yty, &c, negative),
        Err(KernelError::Shape(_))
    ));
    assert!(b.als_solve(&mut x, &y, &case.yty, &y, params).is_err());
    // Factors of another width.
    let y5 = b.upload(&Rng(61).values(10 * 5), 5).unwrap();
    assert!(matches!(
        b.als_solve(&mut x, &y5, &case.yty, &c, params),
        Err(KernelError::Shape(_))
    ));
}

// ---------------------------------------------------------------------------
// top-n

fn check_top_n(
    b: &dyn Backend,
    queries: &[f32],
    items: &[f32],
    d: usize,
    n: usize,
    exclude: Option<&Csr>,
    what: &str,
) {
    let q = b.upload(queries, d).unwrap();
    let it = b.upload(items, d).unwrap();
    let ex = exclude.map(|e| b.upload_sparse(e).unwrap());
    let got = b.top_n(&q, &it, n, ex.as_ref()).unwrap();
    let want = reference::top_n(queries, items, d, n, exclude);
    assert_eq!(got.n, n, "{what}");
    assert_eq!(got.items.len(), q.n() * n, "{what}");
    assert_eq!(got.scores.len(), q.n() * n, "{what}");
    let tol = |s: f32| 1e-5 * s.abs().max(1.0);
    for row in 0..q.n() {
        let slots = row * n..(row + 1) * n;
        let (gi, gs) = (&got.items[slots.clone()], &got.scores[slots.clone()]);
        let (wi, ws) = (&want.items[slots.clone()], &want.scores[slots]);
        let skip: &[u32] = exclude.map(|e| e.row(row).0).unwrap_or(&[]);
        for s in 0..n {
            let ctx = || {
                format!(
                    "{what}: query {row} slot {s}: got {:?} / {:?}, want {:?} / {:?}",
                    gi, gs, wi, ws
                )
            };
            if wi[s] == NO_ITEM {
                assert_eq!(gi[s], NO_ITEM, "{}", ctx());
                assert_eq!(gs[s], f32::NEG_INFINITY, "{}", ctx());
                continue;
            }
            assert!(gi[s] != NO_ITEM, "{}", ctx());
            assert!(!skip.contains(&gi[s]), "excluded item listed: {}", ctx());
            assert!(
                (gs[s] - ws[s]).abs() <= tol(ws[s]),
                "score differs: {}",
                ctx()
            );
            if gi[s] != wi[s] {
                // Only a near-equal score may take another item's place.
                let near = |t: usize| {
                    t < n && wi[t] != NO_ITEM && (ws[t] - ws[s]).abs() <= 2.0 * tol(ws[s])
                };
                assert!(
                    near(s + 1) || (s > 0 && near(s - 1)),
                    "item differs without a near-tie: {}",
                    ctx()
                );
            }
            // The reported score is the item's score.
            let item = &items[gi[s] as usize * d..(gi[s] as usize + 1) * d];
            let score: f32 = queries[row * d..(row + 1) * d]
                .iter()
                .zip(item)
                .map(|(a, b)| a * b)
                .sum();
            assert!((gs[s] - score).abs() <= tol(score), "{}", ctx());
        }
        let mut listed: Vec<u32> = gi.iter().copied().filter(|&i| i != NO_ITEM).collect();
        listed.sort_unstable();
        assert!(
            listed.windows(2).all(|w| w[0] < w[1]),
            "an item is listed twice: {gi:?}"
        );
    }
}

fn top_n_matches_reference(b: &dyn Backend) {
    let mut rng = Rng(70);
    for &m in &[0, 1, 255, 256, 257, 700] {
        for &d in &[1, 8, 33] {
            for &n in &[1, 5, 128] {
                let q_n = 9;
                let queries = rng.values(q_n * d);
                let items = rng.values(m * d);
                check_top_n(
                    b,
                    &queries,
                    &items,
                    d,
                    n,
                    None,
                    &format!("m={m} d={d} n={n}"),
                );
                let exclude = random_csr(&mut rng, q_n, m, 0.3, |_| 1.0);
                check_top_n(
                    b,
                    &queries,
                    &items,
                    d,
                    n,
                    Some(&exclude),
                    &format!("m={m} d={d} n={n} excluded"),
                );
            }
        }
    }
    // Every item excluded for one query, none for another: fewer than n remain.
    let (m, d) = (40, 4);
    let queries = rng.values(2 * d);
    let items = rng.values(m * d);
    let exclude = csr_from_rows(m, &[(0..m as u32).map(|c| (c, 1.0)).collect(), vec![]]);
    check_top_n(b, &queries, &items, d, 50, Some(&exclude), "all excluded");
}

fn top_n_ties_go_to_the_lowest_index(b: &dyn Backend) {
    let mut rng = Rng(71);
    let d = 6;
    let distinct = rng.values(4 * d);
    // 600 items, each a copy of one of 4 rows: equal scores everywhere.
    let picks: Vec<usize> = (0..600).map(|_| rng.below(4)).collect();
    let items: Vec<f32> = picks
        .iter()
        .flat_map(|&p| distinct[p * d..(p + 1) * d].to_vec())
        .collect();
    let queries = rng.values(3 * d);
    let q = b.upload(&queries, d).unwrap();
    let it = b.upload(&items, d).unwrap();
    let got = b.top_n(&q, &it, 20, None).unwrap();
    let want = reference::top_n(&queries, &items, d, 20, None);
    // Copies of a row score the same bits on one backend (whatever their place),
    // so the order among them is exact: lower index first.
    assert_eq!(got.items, want.items);
    for (g, w) in got.scores.iter().zip(&want.scores) {
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
    }
}

fn top_n_limits(b: &dyn Backend) {
    let mut rng = Rng(72);
    let d = 3;
    let queries = rng.values(4 * d);
    let items = rng.values(300 * d);
    let q = b.upload(&queries, d).unwrap();
    let it = b.upload(&items, d).unwrap();
    // n = 0: no slots.
    let got = b.top_n(&q, &it, 0, None).unwrap();
    assert!(got.items.is_empty() && got.scores.is_empty());
    // Above a backend's limit: either supported (and right) or a clean error.
    match b.top_n(&q, &it, 200, None) {
        Ok(got) => assert_eq!(
            got.items,
            reference::top_n(&queries, &items, d, 200, None).items
        ),
        Err(e) => assert!(matches!(e, KernelError::Unsupported { .. }), "{e:?}"),
    }
    // Exclusions of the wrong shape.
    let ex = b.upload_sparse(&csr_from_rows(300, &[vec![]])).unwrap();
    assert!(matches!(
        b.top_n(&q, &it, 3, Some(&ex)),
        Err(KernelError::Shape(_))
    ));
}

// ---------------------------------------------------------------------------
// residents

fn upload_rejects_non_finite_values(b: &dyn Backend) {
    let d = 4;
    for (pos, bad) in [
        (3 * d + 2, f32::NAN),
        (0, f32::INFINITY),
        (8 * d + 3, f32::NEG_INFINITY),
    ] {
        let mut points = Rng(12).values(10 * d);
        points[pos] = bad;
        points[10 * d - 1] = f32::NAN; // a later bad value must not hide the first
        match b.upload(&points, d) {
            Err(KernelError::NonFinitePoint { row, col, value }) => {
                assert_eq!((row, col), (pos / d, pos % d));
                assert_eq!(value.to_bits(), bad.to_bits());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Centroids.
    let resident = b.upload(&Rng(13).values(20 * 3), 3).unwrap();
    let mut out = vec![Nearest::default(); 20];
    let mut centroids = Rng(14).values(4 * 3);
    centroids[2 * 3 + 1] = f32::NAN;
    assert!(matches!(
        b.assign(&resident, &centroids, 4, &mut out),
        Err(KernelError::NonFiniteCentroid { row: 2, col: 1, .. })
    ));
    // Sparse values and written rows.
    let mut bad = csr_from_rows(5, &[vec![(1, 1.0)], vec![(0, 2.0), (3, f32::NAN)]]);
    assert!(matches!(
        b.upload_sparse(&bad),
        Err(KernelError::NonFinitePoint { row: 1, col: 3, .. })
    ));
    bad.values[2] = 1.0;
    bad.indices.swap(1, 2); // columns out of order
    assert!(matches!(b.upload_sparse(&bad), Err(KernelError::Shape(_))));
    let mut target = b.upload(&[0.0; 6], 3).unwrap();
    assert!(matches!(
        b.write_rows(&mut target, &[1], &[1.0, f32::INFINITY, 2.0]),
        Err(KernelError::NonFinitePoint { row: 1, col: 1, .. })
    ));
    // Shapes.
    assert!(matches!(
        b.upload(&[1.0, 2.0, 3.0], 2),
        Err(KernelError::Shape(_))
    ));
    assert!(matches!(b.upload(&[1.0], 0), Err(KernelError::Shape(_))));
    let empty = b.upload(&[], 5).unwrap();
    assert_eq!(empty.n(), 0);
    b.assign(&empty, &[0.0; 10], 2, &mut []).unwrap();
    assert_eq!(
        b.partial_sums(&empty, &[], 2).unwrap(),
        PartialSums::zeros(2, 5)
    );
}

fn rows_round_trip(b: &dyn Backend) {
    let d = 3;
    let points = Rng(16).values(7 * d);
    let mut resident = b.upload(&points, d).unwrap();
    let got = b.download_rows(&resident, &[6, 0, 6, 2]).unwrap();
    let want: Vec<f32> = [6, 0, 6, 2]
        .iter()
        .flat_map(|&r| points[r * d..r * d + d].to_vec())
        .collect();
    assert_eq!(got, want);
    assert!(b.download_rows(&resident, &[]).unwrap().is_empty());
    assert!(matches!(
        b.download_rows(&resident, &[1, 7]),
        Err(KernelError::Shape(_))
    ));
    // Row 4 twice: the last values win.
    b.write_rows(
        &mut resident,
        &[4, 1, 4],
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
    )
    .unwrap();
    let mut expected = points.clone();
    expected[4 * d..5 * d].copy_from_slice(&[7.0, 8.0, 9.0]);
    expected[d..2 * d].copy_from_slice(&[4.0, 5.0, 6.0]);
    let all: Vec<u32> = (0..7).collect();
    assert_eq!(b.download_rows(&resident, &all).unwrap(), expected);
    assert!(matches!(
        b.write_rows(&mut resident, &[7], &[0.0; 3]),
        Err(KernelError::Shape(_))
    ));
    assert!(matches!(
        b.write_rows(&mut resident, &[0], &[0.0; 2]),
        Err(KernelError::Shape(_))
    ));
}

fn residents_of_another_backend_are_rejected(b: &dyn Backend) {
    let foreign = Resident::new(1, 1, "elsewhere", Box::new(()));
    let mut out = vec![Nearest::default()];
    assert!(matches!(
        b.assign(&foreign, &[0.0], 1, &mut out),
        Err(KernelError::ForeignPoints("elsewhere"))
    ));
    assert!(matches!(
        b.partial_sums(&foreign, &[0], 1),
        Err(KernelError::ForeignPoints(_))
    ));
    assert!(matches!(
        b.download_rows(&foreign, &[0]),
        Err(KernelError::ForeignPoints(_))
    ));
    assert!(b.gram(&foreign).is_err());
    // Right name, wrong storage: a sparse matrix where dense points are expected.
    let sparse = b
        .upload_sparse(&csr_from_rows(2, &[vec![(1, 1.0)]]))
        .unwrap();
    assert!(b.gram(&sparse).is_err());
    assert!(b.download_rows(&sparse, &[0]).is_err());
}
