//! A synthetic implicit-ALS benchmark of a [`Backend`]: a seeded interaction
//! matrix with skewed item popularity, and full ALS iterations (user half-step,
//! item half-step, the Gram matrices and the loss) timed one by one on one
//! process. It measures the kernels the workers call, without the distribution
//! around them; `shoal bench als` prints its [`AlsReport`].
//!
//! Definitions:
//! - `pairs` draws of (user uniform, item with probability ∝ 1 / (rank + 10)),
//!   duplicates summed; the confidence of a pair is `1 + alpha · count`;
//! - initial factors uniform in [0, 0.01), one stream per row;
//! - iteration `t` solves the users against the items of `t − 1`, then the items
//!   against the new users (each half-step, as on a worker: [`Backend::als_solve`]
//!   against the fixed side's Gram, then the Gram of the solved side, which the
//!   next half-step uses); the loss after it is the objective's data term plus
//!   `λ (‖X‖² + ‖Y‖²)`, divided by the number of cells.

use std::time::Instant;

use super::{SplitMix, stream};
use shoal_kernels::{Backend, CgParams, Csr, KernelError, Resident};

const TAG_PAIRS: u64 = 11;
const TAG_USER_ROWS: u64 = 12;
const TAG_ITEM_ROWS: u64 = 13;

/// Draws per parallel-free generation stream: the data do not depend on threads.
const PAIRS_PER_STREAM: usize = 1 << 16;

/// A seeded implicit-feedback problem, stored both ways.
#[derive(Debug, Clone)]
pub struct AlsProblem {
    pub users: usize,
    pub items: usize,
    /// Users x items confidences.
    pub by_user: Csr,
    /// Items x users, the same values.
    pub by_item: Csr,
}

impl AlsProblem {
    /// `pairs` draws over `users x items` (see the module's definitions).
    pub fn generate(
        users: usize,
        items: usize,
        pairs: usize,
        alpha: f32,
        seed: u64,
    ) -> Result<AlsProblem, KernelError> {
        if users == 0 || items == 0 || pairs == 0 {
            return Err(KernelError::Shape(
                "users, items and pairs must be at least 1".to_string(),
            ));
        }
        if items >= u32::MAX as usize || users >= u32::MAX as usize {
            return Err(KernelError::Shape(format!(
                "{users} users x {items} items do not fit 32-bit indices"
            )));
        }
        // Item popularity ∝ 1 / (rank + 10): inverse-CDF table over the items.
        let weights: Vec<f64> = (0..items).map(|r| 1.0 / (r as f64 + 10.0)).collect();
        let total: f64 = weights.iter().sum();
        let mut cdf = Vec::with_capacity(items);
        let mut acc = 0.0;
        for w in &weights {
            acc += w / total;
            cdf.push(acc);
        }
        let mut drawn: Vec<(u32, u32)> = Vec::with_capacity(pairs);
        for s in 0..pairs.div_ceil(PAIRS_PER_STREAM) {
            let mut rng: SplitMix = stream(seed, TAG_PAIRS, s as u64);
            let count = PAIRS_PER_STREAM.min(pairs - s * PAIRS_PER_STREAM);
            for _ in 0..count {
                let u = rng.below(users) as u32;
                let p = rng.open_unit();
                let i = cdf.partition_point(|&c| c < p).min(items - 1) as u32;
                drawn.push((u, i));
            }
        }
        drawn.sort_unstable();
        let by_user = csr_of(users, items, drawn.iter().copied(), alpha);
        let mut flipped: Vec<(u32, u32)> = drawn.iter().map(|&(u, i)| (i, u)).collect();
        flipped.sort_unstable();
        let by_item = csr_of(items, users, flipped.into_iter(), alpha);
        Ok(AlsProblem {
            users,
            items,
            by_user,
            by_item,
        })
    }

    /// Stored (user, item) pairs after summing duplicates.
    pub fn nnz(&self) -> usize {
        self.by_user.values.len()
    }
}

/// The CSR of sorted `(row, col)` draws, duplicates counted.
fn csr_of(rows: usize, cols: usize, sorted: impl Iterator<Item = (u32, u32)>, alpha: f32) -> Csr {
    // (row, col, count) of each distinct pair, in order
    let mut pairs: Vec<(u32, u32, u32)> = Vec::new();
    for (r, c) in sorted {
        match pairs.last_mut() {
            Some(last) if (last.0, last.1) == (r, c) => last.2 += 1,
            _ => pairs.push((r, c, 1)),
        }
    }
    let indptr = (0..=rows)
        .map(|r| pairs.partition_point(|p| (p.0 as usize) < r) as u64)
        .collect();
    Csr {
        rows,
        cols,
        indptr,
        indices: pairs.iter().map(|p| p.1).collect(),
        values: pairs.iter().map(|p| 1.0 + alpha * p.2 as f32).collect(),
    }
}

/// Timings and losses of [`run`].
#[derive(Debug, Clone, Default)]
pub struct AlsReport {
    /// Seconds of each iteration's user half-step (solve + Gram of the users).
    pub user_secs: Vec<f64>,
    /// Seconds of each iteration's item half-step (solve with the pair loss + Gram
    /// of the items).
    pub item_secs: Vec<f64>,
    /// The loss after each iteration.
    pub loss: Vec<f64>,
}

impl AlsReport {
    /// Median seconds of a whole iteration.
    pub fn secs_per_iter(&self) -> f64 {
        let v: Vec<f64> = self
            .user_secs
            .iter()
            .zip(&self.item_secs)
            .map(|(a, b)| a + b)
            .collect();
        median(&v)
    }

    pub fn user_secs_per_iter(&self) -> f64 {
        median(&self.user_secs)
    }

    pub fn item_secs_per_iter(&self) -> f64 {
        median(&self.item_secs)
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Initial factors: `rows x f`, uniform in [0, 0.01), one stream per row.
fn initial(rows: usize, f: usize, seed: u64, tag: u64) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * f];
    for (r, row) in out.chunks_exact_mut(f).enumerate() {
        let mut rng = stream(seed, tag, r as u64);
        for v in row {
            *v = (0.01 * rng.open_unit()) as f32;
        }
    }
    out
}

/// What [`run`] runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlsSettings {
    pub factors: usize,
    pub iters: usize,
    pub regularization: f32,
    pub cg_steps: u32,
    /// Seed of the initial factors.
    pub seed: u64,
}

/// `settings.iters` ALS iterations of `problem` on `backend`.
pub fn run(
    backend: &dyn Backend,
    problem: &AlsProblem,
    settings: AlsSettings,
) -> Result<AlsReport, KernelError> {
    run_on(backend, problem, settings).map(|r| r.0)
}

/// [`run`], also returning the final user and item factors.
fn run_on(
    backend: &dyn Backend,
    problem: &AlsProblem,
    settings: AlsSettings,
) -> Result<(AlsReport, Resident, Resident), KernelError> {
    let AlsSettings {
        factors: f,
        iters,
        regularization,
        cg_steps,
        seed,
    } = settings;
    let mut x = backend.upload(&initial(problem.users, f, seed, TAG_USER_ROWS), f)?;
    let mut y = backend.upload(&initial(problem.items, f, seed, TAG_ITEM_ROWS), f)?;
    let by_user = backend.upload_sparse(&problem.by_user)?;
    let by_item = backend.upload_sparse(&problem.by_item)?;
    let mut report = AlsReport::default();
    let cells = problem.users as f64 * problem.items as f64;
    let params = |pair_loss| CgParams {
        regularization,
        cg_steps,
        pair_loss,
    };
    // each Gram is computed once, right after its side is solved
    let mut yty = backend.gram(&y)?;
    for _ in 0..iters {
        let t = Instant::now();
        backend.als_solve(&mut x, &y, &yty, &by_user, params(false))?;
        let xtx = backend.gram(&x)?;
        report.user_secs.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let pairs = backend.als_solve(&mut y, &x, &xtx, &by_item, params(true))?;
        yty = backend.gram(&y)?;
        report.item_secs.push(t.elapsed().as_secs_f64());
        let quad: f64 = xtx.iter().zip(&yty).map(|(a, b)| a * b).sum();
        let trace = |g: &[f64]| (0..f).map(|i| g[i * f + i]).sum::<f64>();
        let reg = f64::from(regularization) * (trace(&xtx) + trace(&yty));
        report
            .loss
            .push((quad + pairs.unwrap_or(0.0) + reg) / cells);
    }
    Ok((report, x, y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_is_deterministic_and_both_layouts_agree() {
        let a = AlsProblem::generate(300, 80, 5_000, 40.0, 7).unwrap();
        let b = AlsProblem::generate(300, 80, 5_000, 40.0, 7).unwrap();
        assert_eq!(a.by_user, b.by_user);
        a.by_user.validate().unwrap();
        a.by_item.validate().unwrap();
        // every (user, item, value) is in the item layout too
        let mut from_users = Vec::new();
        for u in 0..a.users {
            let (c, v) = a.by_user.row(u);
            from_users.extend(c.iter().zip(v).map(|(&i, &v)| (u as u32, i, v.to_bits())));
        }
        let mut from_items = Vec::new();
        for i in 0..a.items {
            let (c, v) = a.by_item.row(i);
            from_items.extend(c.iter().zip(v).map(|(&u, &v)| (u, i as u32, v.to_bits())));
        }
        from_items.sort_unstable();
        assert_eq!(from_users, from_items);
        // duplicates were summed: fewer stored pairs than draws, confidences above 1 + alpha
        assert!(a.nnz() < 5_000);
        assert!(a.by_user.values.iter().any(|&v| v > 41.5));
        // popular items are drawn more often than the tail
        let head = a.by_item.row(0).0.len();
        let tail = a.by_item.row(79).0.len();
        assert!(head > 2 * tail, "{head} vs {tail}");
        let c = AlsProblem::generate(300, 80, 5_000, 40.0, 8).unwrap();
        assert_ne!(a.by_user, c.by_user);
    }

    #[test]
    fn loss_matches_the_dense_objective_and_falls() {
        let p = AlsProblem::generate(40, 25, 300, 10.0, 3).unwrap();
        let backend = shoal_kernels::CpuBackend::new();
        let (f, lambda) = (4, 0.1f32);
        let mut last = f64::INFINITY;
        for iters in 1..=4 {
            let settings = AlsSettings {
                factors: f,
                iters,
                regularization: lambda,
                cg_steps: 3,
                seed: 5,
            };
            let (r, x, y) = run_on(&backend, &p, settings).unwrap();
            assert_eq!(r.loss.len(), iters);
            let got = r.loss[iters - 1];
            assert!(got <= last * (1.0 + 1e-6), "{:?}", r.loss);
            last = got;
            // every cell of the objective, from the factors the run ended with
            let rows = |m: &Resident| {
                let all: Vec<u32> = (0..m.n() as u32).collect();
                backend.download_rows(m, &all).unwrap()
            };
            let (x, y) = (rows(&x), rows(&y));
            let mut total = 0.0f64;
            for u in 0..p.users {
                let (cols, conf) = p.by_user.row(u);
                for i in 0..p.items {
                    let s: f64 = (0..f)
                        .map(|k| f64::from(x[u * f + k]) * f64::from(y[i * f + k]))
                        .sum();
                    let (c, pref) = match cols.iter().position(|&c| c as usize == i) {
                        Some(k) => (f64::from(conf[k]), 1.0),
                        None => (1.0, 0.0),
                    };
                    total += c * (pref - s) * (pref - s);
                }
            }
            let norms: f64 = x.iter().chain(&y).map(|&v| f64::from(v).powi(2)).sum();
            let dense = (total + f64::from(lambda) * norms) / (p.users * p.items) as f64;
            assert!((got - dense).abs() <= 1e-5 * dense, "{got} vs {dense}");
        }
    }
}
