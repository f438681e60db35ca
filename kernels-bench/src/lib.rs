//! The drivers behind `shoal bench` (kept out of the kernels' library API).
//!
//! A synthetic k-means benchmark of a [`Backend`]: Gaussian blobs generated from a
//! seed, a seeded initialisation, and plain Lloyd iterations timed one by one.
//!
//! It measures the hot calls of a k-means round on one process and one data set:
//! [`Backend::lloyd_round`] (exact labels and their partial sums; or, with
//! [`Labelling::FullPass`], [`Backend::assign`] then [`Backend::partial_sums`]),
//! plus the centroid update the coordinator does after merging. `shoal bench
//! kmeans` prints its [`LloydReport`]; `benches/kmeans_vs_faiss.sh` runs faiss and
//! scikit-learn on the same points from the same initial centroids.
//!
//! Definitions (the peers in `benches/kmeans_vs_faiss.py` compute the same):
//! - iteration `t` (1-based) assigns every point to its nearest centroid among
//!   `C_{t-1}` (`C_0` = the initial centroids), then sets `C_t[j]` to the mean of
//!   the points assigned to `j` (sums in f64, cast to f32); a centroid with no
//!   point keeps its previous value;
//! - the reported inertia is that of the final centroids `C_I`: one more
//!   assignment after the timed loop, and the sum in f64, in point order, of every
//!   point's squared distance to its nearest centroid of `C_I`;
//! - the nominal FLOPs of one assignment are `2·n·k·d` (one multiply-add per
//!   feature of each point–centroid pair), whatever the backend actually does.
//!   With [`Labelling::FullPass`] every iteration is a full `assign` pass, so its
//!   GFLOP/s is the rate of the distance kernel; with [`Labelling::Bounded`] the
//!   backend may skip points, and the figure is the nominal work of a plain
//!   Lloyd iteration over the time taken.

pub mod als;

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;

use shoal_kernels::{Backend, KernelError, Nearest, Resident};

/// splitmix64: small, fast and deterministic; one stream per point.
#[derive(Debug, Clone)]
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1], 53 bits.
    fn open_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (the modulo bias is irrelevant for `n` far below 2^64).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A pair of independent standard normals (Box–Muller).
    fn normals(&mut self) -> (f64, f64) {
        let r = (-2.0 * self.open_unit().ln()).sqrt();
        let theta = std::f64::consts::TAU * self.open_unit();
        (r * theta.cos(), r * theta.sin())
    }

    /// Fills `out` with standard normals.
    fn fill_normals(&mut self, out: &mut [f64]) {
        for pair in out.chunks_mut(2) {
            let (a, b) = self.normals();
            pair[0] = a;
            if let Some(second) = pair.get_mut(1) {
                *second = b;
            }
        }
    }
}

/// The stream of one purpose (`tag`) and one index under `seed`: independent of
/// every other stream and of the order in which streams are used.
fn stream(seed: u64, tag: u64, index: u64) -> SplitMix {
    let mut s = SplitMix(seed ^ tag.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let a = s.next_u64();
    let mut t = SplitMix(a ^ index.wrapping_mul(0xA076_1D64_78BD_642F));
    t.next_u64();
    t
}

const TAG_CENTERS: u64 = 1;
const TAG_POINTS: u64 = 2;
const TAG_INIT: u64 = 3;

/// Standard deviation of the blob centers' coordinates around 0; the points'
/// spread around their center is 1 in every feature, so neighbouring blobs overlap
/// a little in 64 dimensions and Lloyd has work to do for several rounds.
pub const CENTER_STD: f64 = 1.0;

/// A synthetic data set: `k` Gaussian blobs and a seeded initialisation.
#[derive(Debug, Clone)]
pub struct Blobs {
    pub n: usize,
    pub d: usize,
    pub k: usize,
    /// Row-major `n x d`: point `i` is `centers[blob[i]] + N(0, I)`.
    pub points: Vec<f32>,
    /// The true blob of every point.
    pub blob: Vec<u32>,
    /// Row-major `k x d`, coordinates drawn from `N(0, CENTER_STD²)`.
    pub centers: Vec<f32>,
    /// Row-major `k x d`: the points at [`Blobs::init_rows`].
    pub init: Vec<f32>,
    /// `k` distinct point indices chosen by the seed (the initial centroids).
    pub init_rows: Vec<u32>,
}

impl Blobs {
    /// Generates the data set of `seed`. Every point comes from its own random
    /// stream, so the result is the same however many threads build it.
    pub fn generate(n: usize, d: usize, k: usize, seed: u64) -> Result<Blobs, KernelError> {
        if d == 0 {
            return Err(KernelError::Shape("d must be at least 1".into()));
        }
        if k == 0 {
            return Err(KernelError::EmptyCentroids);
        }
        if k > n {
            return Err(KernelError::Shape(format!(
                "k = {k} distinct initial centroids cannot be picked from n = {n} points"
            )));
        }
        let mut centers = vec![0.0f32; k * d];
        let mut normals = vec![0.0f64; d];
        for (j, c) in centers.chunks_exact_mut(d).enumerate() {
            stream(seed, TAG_CENTERS, j as u64).fill_normals(&mut normals);
            for (v, z) in c.iter_mut().zip(&normals) {
                *v = (CENTER_STD * z) as f32;
            }
        }

        let mut points = vec![0.0f32; n * d];
        let mut blob = vec![0u32; n];
        points
            .par_chunks_mut(d)
            .zip(blob.par_iter_mut())
            .enumerate()
            .for_each_init(
                || vec![0.0f64; d],
                |normals, (i, (x, b))| {
                    let mut rng = stream(seed, TAG_POINTS, i as u64);
                    let j = rng.below(k);
                    *b = j as u32;
                    rng.fill_normals(normals);
                    let c = &centers[j * d..(j + 1) * d];
                    for ((v, &m), z) in x.iter_mut().zip(c).zip(normals.iter()) {
                        *v = (f64::from(m) + z) as f32;
                    }
                },
            );

        // k distinct rows: a partial Fisher–Yates shuffle on a sparse permutation.
        let mut rng = stream(seed, TAG_INIT, 0);
        let mut swapped = std::collections::HashMap::<usize, usize>::new();
        let mut init_rows = Vec::with_capacity(k);
        for t in 0..k {
            let r = t + rng.below(n - t);
            let at_r = *swapped.get(&r).unwrap_or(&r);
            let at_t = *swapped.get(&t).unwrap_or(&t);
            swapped.insert(r, at_t);
            init_rows.push(at_r as u32);
        }
        let init = init_rows
            .iter()
            .flat_map(|&r| points[r as usize * d..(r as usize + 1) * d].iter().copied())
            .collect();

        Ok(Blobs {
            n,
            d,
            k,
            points,
            blob,
            centers,
            init,
            init_rows,
        })
    }
}

/// What [`lloyd`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct LloydReport {
    pub n: usize,
    pub d: usize,
    pub k: usize,
    pub iters: usize,
    /// Wall time of each iteration (assign, labels, partial sums, update), seconds.
    pub iter_secs: Vec<f64>,
    /// Wall time of the labelling in each iteration, seconds: the `assign` call
    /// with [`Labelling::FullPass`], the `lloyd_round` call (labels and partial
    /// sums) with [`Labelling::Bounded`].
    pub assign_secs: Vec<f64>,
    /// Points whose distances were computed in each iteration.
    pub recomputed: Vec<usize>,
    /// With [`Labelling::FullPass`], iteration `t`'s assignment inertia: the sum
    /// of the squared distances to the nearest of `C_{t-1}` (f64, point order);
    /// empty with [`Labelling::Bounded`], which does not compute every distance.
    pub iter_inertia: Vec<f64>,
    /// The inertia of the final centroids `C_I` (see the module docs).
    pub inertia: f64,
    /// `C_I`, row-major `k x d`.
    pub centroids: Vec<f32>,
    /// Clusters that were empty in some iteration (summed over iterations).
    pub empty_clusters: usize,
}

impl LloydReport {
    /// Mean seconds per iteration.
    pub fn secs_per_iter(&self) -> f64 {
        mean(&self.iter_secs)
    }
    /// Mean seconds of the `assign` call per iteration.
    pub fn assign_secs_per_iter(&self) -> f64 {
        mean(&self.assign_secs)
    }
    /// Nominal FLOPs of one assignment pass: `2·n·k·d`.
    pub fn assign_flops(&self) -> f64 {
        2.0 * self.n as f64 * self.k as f64 * self.d as f64
    }
    /// [`LloydReport::assign_flops`] per second of a whole iteration, in GFLOP/s.
    pub fn gflops(&self) -> f64 {
        self.assign_flops() / self.secs_per_iter() / 1e9
    }
    /// [`LloydReport::assign_flops`] per second of the `assign` call, in GFLOP/s.
    pub fn assign_gflops(&self) -> f64 {
        self.assign_flops() / self.assign_secs_per_iter() / 1e9
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Sum of the best distances in point order, and the labels.
fn labels_and_inertia(near: &[Nearest], labels: &mut [u32]) -> f64 {
    let mut inertia = 0.0f64;
    for (l, s) in labels.iter_mut().zip(near) {
        *l = s.best;
        inertia += f64::from(s.best_dist);
    }
    inertia
}

/// How [`lloyd`] labels the points each iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Labelling {
    /// [`Backend::lloyd_round`]: exact labels, skipping the points whose label
    /// provably cannot have changed, and their partial sums.
    Bounded,
    /// A full [`Backend::assign`] pass every iteration: measures the distance
    /// kernel itself.
    FullPass,
}

/// Runs `iters` Lloyd iterations of the points resident in `backend` from the `k`
/// centroids `init`, timing each. Runs in the calling rayon pool.
pub fn lloyd(
    backend: &dyn Backend,
    points: &Resident,
    init: &[f32],
    k: usize,
    iters: usize,
    labelling: Labelling,
) -> Result<LloydReport, KernelError> {
    let (n, d) = (points.n(), points.d());
    if k == 0 {
        return Err(KernelError::EmptyCentroids);
    }
    if init.len() != k * d {
        return Err(KernelError::Shape(format!(
            "{} initial centroid values are not k x d = {k} x {d}",
            init.len()
        )));
    }
    let mut centroids = init.to_vec();
    let mut near = vec![Nearest::default(); n];
    let mut labels = vec![0u32; n];
    let mut bounds = backend.lloyd_bounds(points)?;
    let mut report = LloydReport {
        n,
        d,
        k,
        iters,
        iter_secs: Vec::with_capacity(iters),
        assign_secs: Vec::with_capacity(iters),
        recomputed: Vec::with_capacity(iters),
        iter_inertia: Vec::with_capacity(iters),
        inertia: f64::NAN,
        centroids: Vec::new(),
        empty_clusters: 0,
    };
    for _ in 0..iters {
        let start = Instant::now();
        let (recomputed, sums, assigned) = match labelling {
            Labelling::FullPass => {
                backend.assign(points, &centroids, k, &mut near)?;
                let assigned = Instant::now();
                report
                    .iter_inertia
                    .push(labels_and_inertia(&near, &mut labels));
                (n, backend.partial_sums(points, &labels, k)?, assigned)
            }
            Labelling::Bounded => {
                let (stats, sums) =
                    backend.lloyd_round(points, &mut bounds, &centroids, k, &mut labels)?;
                (stats.recomputed, sums, Instant::now())
            }
        };
        for (j, c) in centroids.chunks_exact_mut(d).enumerate() {
            let count = sums.counts[j];
            if count == 0 {
                report.empty_clusters += 1;
                continue;
            }
            for (v, &s) in c.iter_mut().zip(&sums.sums[j * d..(j + 1) * d]) {
                *v = (s / count as f64) as f32;
            }
        }
        let end = Instant::now();
        report.iter_secs.push((end - start).as_secs_f64());
        report.assign_secs.push((assigned - start).as_secs_f64());
        report.recomputed.push(recomputed);
    }
    backend.assign(points, &centroids, k, &mut near)?;
    report.inertia = labels_and_inertia(&near, &mut labels);
    report.centroids = centroids;
    Ok(report)
}

/// Runs `f` inside a new rayon pool of `threads` threads, so that the backend's
/// parallel work uses exactly that many.
pub fn in_thread_pool<T: Send>(
    threads: usize,
    f: impl FnOnce() -> T + Send,
) -> Result<T, rayon::ThreadPoolBuildError> {
    Ok(rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?
        .install(f))
}

/// Writes a row-major `rows x cols` f32 matrix as a `.npy` file (format 1.0,
/// little-endian `<f4`, C order), readable by `numpy.load`.
pub fn write_npy_f32(path: &Path, values: &[f32], rows: usize, cols: usize) -> std::io::Result<()> {
    assert_eq!(
        values.len(),
        rows * cols,
        "npy shape does not match the data"
    );
    let file = std::fs::File::create(path)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&npy_header_f32(rows, cols))?;
    for chunk in values.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_all(&bytes)?;
    }
    w.flush()
}

/// The magic, version and header of a 2-D `<f4` array, padded with spaces and a
/// newline so that the data starts at a multiple of 64 bytes.
fn npy_header_f32(rows: usize, cols: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let unpadded = 6 + 2 + 2 + dict.len() + 1;
    let pad = unpadded.next_multiple_of(64) - unpadded;
    let header_len = dict.len() + pad + 1;
    let mut out = Vec::with_capacity(unpadded + pad);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header_len as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.extend(std::iter::repeat_n(b' ', pad));
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_kernels::{CpuBackend, reference};

    fn run(blobs: &Blobs, iters: usize) -> LloydReport {
        let cpu = CpuBackend::new();
        let resident = cpu.upload(&blobs.points, blobs.d).unwrap();
        lloyd(
            &cpu,
            &resident,
            &blobs.init,
            blobs.k,
            iters,
            Labelling::FullPass,
        )
        .unwrap()
    }

    fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        in_thread_pool(threads, f).unwrap()
    }

    #[test]
    fn data_is_deterministic_for_a_seed_and_differs_across_seeds() {
        let a = in_pool(1, || Blobs::generate(3000, 20, 7, 42).unwrap());
        let b = in_pool(2, || Blobs::generate(3000, 20, 7, 42).unwrap());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.points), bits(&b.points));
        assert_eq!(a.blob, b.blob);
        assert_eq!(a.init_rows, b.init_rows);
        assert_eq!(bits(&a.init), bits(&b.init));
        let c = Blobs::generate(3000, 20, 7, 43).unwrap();
        assert_ne!(bits(&a.points), bits(&c.points));
        assert_ne!(a.init_rows, c.init_rows);
    }

    #[test]
    fn points_are_spread_around_their_blob_center() {
        let (n, d, k) = (20_000, 8, 5);
        let b = Blobs::generate(n, d, k, 7).unwrap();
        // Every blob is used, roughly uniformly.
        let mut sizes = vec![0usize; k];
        for &j in &b.blob {
            sizes[j as usize] += 1;
        }
        assert!(sizes.iter().all(|&s| s > n / k / 2), "{sizes:?}");
        // Offsets from the center are standard normal: mean ~ 0, variance ~ 1.
        let offsets: Vec<f64> = b
            .points
            .chunks_exact(d)
            .zip(&b.blob)
            .flat_map(|(x, &j)| {
                let c = &b.centers[j as usize * d..(j as usize + 1) * d];
                x.iter()
                    .zip(c)
                    .map(|(&v, &m)| f64::from(v - m))
                    .collect::<Vec<_>>()
            })
            .collect();
        let m = offsets.iter().sum::<f64>() / offsets.len() as f64;
        let var = offsets.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / offsets.len() as f64;
        assert!(m.abs() < 0.02, "mean {m}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
    }

    #[test]
    fn init_rows_are_distinct_points_of_the_data() {
        let b = Blobs::generate(100, 3, 100, 9).unwrap();
        let mut rows = b.init_rows.clone();
        rows.sort_unstable();
        rows.dedup();
        assert_eq!(rows.len(), 100, "k = n picks every row once");
        let b = Blobs::generate(5000, 3, 40, 9).unwrap();
        for (t, &r) in b.init_rows.iter().enumerate() {
            assert_eq!(
                &b.init[t * 3..t * 3 + 3],
                &b.points[r as usize * 3..r as usize * 3 + 3]
            );
        }
        assert!(Blobs::generate(5, 3, 6, 9).is_err());
    }

    #[test]
    fn inertia_decreases_and_matches_an_independent_recomputation() {
        let b = Blobs::generate(6000, 24, 10, 3).unwrap();
        let r = run(&b, 8);
        assert_eq!(r.iter_inertia.len(), 8);
        for w in r.iter_inertia.windows(2) {
            // Lloyd never increases the inertia; allow f32 rounding of the sums.
            assert!(w[1] <= w[0] * (1.0 + 1e-6), "{:?}", r.iter_inertia);
        }
        assert!(r.inertia <= r.iter_inertia[7] * (1.0 + 1e-6));
        assert!(r.inertia < 0.8 * r.iter_inertia[0], "{:?}", r.iter_inertia);

        // The same Lloyd rounds with the reference twin, in f64 for the distances.
        let (d, k) = (b.d, b.k);
        let mut c = b.init.clone();
        for _ in 0..8 {
            let near = reference::assign(&b.points, d, &c, k);
            let labels: Vec<u32> = near.iter().map(|s| s.best).collect();
            let sums = reference::partial_sums(&b.points, d, &labels, k);
            for j in 0..k {
                if sums.counts[j] > 0 {
                    for f in 0..d {
                        c[j * d + f] = (sums.sums[j * d + f] / sums.counts[j] as f64) as f32;
                    }
                }
            }
        }
        let want: f64 = b
            .points
            .chunks_exact(d)
            .map(|x| {
                c.chunks_exact(d)
                    .map(|m| {
                        x.iter()
                            .zip(m)
                            .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                            .sum::<f64>()
                    })
                    .fold(f64::INFINITY, f64::min)
            })
            .sum();
        assert!(
            (r.inertia - want).abs() <= 1e-5 * want,
            "{} vs {want}",
            r.inertia
        );
    }

    #[test]
    fn lloyd_recovers_well_separated_blobs() {
        // Centers far apart relative to the unit spread, one initial centroid in
        // every blob: every blob becomes one cluster.
        let (d, k) = (16, 4);
        let mut b = Blobs::generate(4000, d, k, 11).unwrap();
        for (x, &j) in b.points.chunks_exact_mut(d).zip(&b.blob) {
            x[0] += 50.0 * j as f32;
        }
        b.init = (0..k as u32)
            .flat_map(|j| {
                let r = b.blob.iter().position(|&q| q == j).unwrap();
                b.points[r * d..(r + 1) * d].to_vec()
            })
            .collect();
        let r = run(&b, 5);
        let cpu = CpuBackend::new();
        let resident = cpu.upload(&b.points, d).unwrap();
        let mut near = vec![Nearest::default(); b.n];
        cpu.assign(&resident, &r.centroids, k, &mut near).unwrap();
        for (s, &j) in near.iter().zip(&b.blob) {
            assert_eq!(s.best, j);
        }
        // Mean squared distance to the own blob's mean is ~ d per point.
        let per_point = r.inertia / b.n as f64;
        assert!((per_point - d as f64).abs() < 0.5, "{per_point}");
        assert!(r.iter_inertia[0] > r.inertia);
    }

    #[test]
    fn same_result_with_one_and_two_threads() {
        let b = Blobs::generate(3 * 4096 + 123, 64, 12, 5).unwrap();
        let one = in_pool(1, || run(&b, 4));
        let two = in_pool(2, || run(&b, 4));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one.centroids), bits(&two.centroids));
        assert_eq!(one.inertia.to_bits(), two.inertia.to_bits());
        assert_eq!(one.iter_inertia, two.iter_inertia);
    }

    #[test]
    fn the_reported_inertia_is_that_of_a_fresh_assignment() {
        let b = Blobs::generate(5000, 64, 16, 8).unwrap();
        let r = run(&b, 6);
        let cpu = CpuBackend::new();
        let fresh = cpu.upload(&b.points, b.d).unwrap();
        let mut near = vec![Nearest::default(); b.n];
        cpu.assign(&fresh, &r.centroids, b.k, &mut near).unwrap();
        let mut labels = vec![0; b.n];
        assert_eq!(
            labels_and_inertia(&near, &mut labels).to_bits(),
            r.inertia.to_bits()
        );
    }

    #[test]
    fn empty_clusters_keep_their_centroid() {
        let cpu = CpuBackend::new();
        let points = [0.0f32, 0.0, 1.0, 0.0, 0.0, 1.0];
        let resident = cpu.upload(&points, 2).unwrap();
        let init = [0.0f32, 0.0, 100.0, 100.0];
        let r = lloyd(&cpu, &resident, &init, 2, 2, Labelling::Bounded).unwrap();
        assert_eq!(&r.centroids[2..], &[100.0, 100.0]);
        assert_eq!(r.empty_clusters, 2);
        let third = 1.0f32 / 3.0;
        assert_eq!(&r.centroids[..2], &[third, third]);
    }

    #[test]
    fn npy_header_is_aligned_and_parsable() {
        let h = npy_header_f32(1_000_000, 64);
        assert_eq!(h.len() % 64, 0);
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([h[8], h[9]]) as usize;
        assert_eq!(10 + len, h.len());
        let text = std::str::from_utf8(&h[10..]).unwrap();
        assert!(
            text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 64), }")
        );
        assert!(text.ends_with('\n'));

        let dir = std::env::temp_dir().join(format!("shoal-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.npy");
        write_npy_f32(&path, &[1.0, -2.5, 3.0, 4.0, 5.0, 6.0], 2, 3).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let body = &bytes[npy_header_f32(2, 3).len()..];
        assert_eq!(body.len(), 24);
        assert_eq!(f32::from_le_bytes(body[4..8].try_into().unwrap()), -2.5);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bounded_iterations_give_the_full_passes_results_bit_for_bit() {
        let b = Blobs::generate(20_000, 64, 16, 4).unwrap();
        let cpu = CpuBackend::new();
        let resident = cpu.upload(&b.points, b.d).unwrap();
        let full = lloyd(&cpu, &resident, &b.init, b.k, 12, Labelling::FullPass).unwrap();
        let bounded = lloyd(&cpu, &resident, &b.init, b.k, 12, Labelling::Bounded).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&full.centroids), bits(&bounded.centroids));
        assert_eq!(full.inertia.to_bits(), bounded.inertia.to_bits());
        assert_eq!(full.empty_clusters, bounded.empty_clusters);
        assert!(full.recomputed.iter().all(|&m| m == b.n));
        assert_eq!(bounded.recomputed[0], b.n);
        // Once the centroids settle, most points keep a certified label.
        let last = *bounded.recomputed.last().unwrap();
        assert!(last < b.n / 2, "{:?}", bounded.recomputed);
        assert!(bounded.iter_inertia.is_empty());
    }
}
