//! Tests of the Gram matrix and the implicit-ALS solver of the CPU backend.

use super::*;
use crate::cpu::testing::{Rng, bits};
use crate::{Backend, CpuBackend, Resident, reference};

/// Every backend the tests run on (one test body, every backend).
fn backends() -> Vec<Box<dyn Backend>> {
    vec![Box::new(CpuBackend::new())]
}

fn params(regularization: f32, cg_steps: u32) -> CgParams {
    CgParams {
        regularization,
        cg_steps,
        pair_loss: false,
    }
}

/// `x` after one `als_solve` on `backend`.
fn solve_on(
    backend: &dyn Backend,
    x: &[f32],
    y: &[f32],
    d: usize,
    yty: &[f64],
    conf: &Csr,
    p: CgParams,
) -> Vec<f32> {
    let mut xr = backend.upload(x, d).unwrap();
    let yr = backend.upload(y, d).unwrap();
    let cr = backend.upload_sparse(conf).unwrap();
    backend.als_solve(&mut xr, &yr, yty, &cr, p).unwrap();
    let all: Vec<u32> = (0..xr.n() as u32).collect();
    backend.download_rows(&xr, &all).unwrap()
}

fn norm(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().map(|x| x * x).sum::<f64>().sqrt()
}

// -----------------------------------------------------------------------
// gram

#[test]
fn gram_matches_reference() {
    let mut rng = Rng(101);
    for backend in backends() {
        for &n in &[
            0,
            1,
            GRAM_BLOCK_ROWS - 1,
            GRAM_BLOCK_ROWS,
            GRAM_BLOCK_ROWS + 1,
            3000,
        ] {
            for &d in &[1, 3, 16, 33] {
                // Columns with different offsets and scales, so that some
                // entries cancel and some do not.
                let a: Vec<f32> = (0..n * d)
                    .map(|k| rng.unit() * (1 + k % d) as f32 + (k % 3) as f32 - 1.0)
                    .collect();
                let got = backend.gram(&backend.upload(&a, d).unwrap()).unwrap();
                let want = reference::gram(&a, d);
                assert_eq!(got.len(), d * d);
                for i in 0..d {
                    for j in 0..d {
                        let (g, w) = (got[i * d + j], want[i * d + j]);
                        // |AᵀA_ij| <= sqrt(AᵀA_ii AᵀA_jj): the entries' own scale.
                        let scale = (want[i * d + i] * want[j * d + j]).sqrt().max(1e-30);
                        assert!(
                            (g - w).abs() <= 1e-6 * scale,
                            "n={n} d={d} ({i}, {j}): {g} vs {w}"
                        );
                        assert_eq!(g.to_bits(), got[j * d + i].to_bits(), "not symmetric");
                    }
                }
            }
        }
    }
}

// -----------------------------------------------------------------------
// als_solve

/// A random implicit-ALS problem: `users x d` warm start, `items x d` fixed
/// factors, and confidences.
struct Problem {
    x: Vec<f32>,
    y: Vec<f32>,
    yty: Vec<f64>,
    conf: Csr,
}

impl Problem {
    /// Appends a row with confidences `values` at items `cols` and the
    /// starting factors `x_row`.
    fn push_row(&mut self, cols: &[u32], values: &[f32], x_row: Vec<f32>) {
        let last = *self.conf.indptr.last().unwrap();
        self.conf.indptr.push(last + cols.len() as u64);
        self.conf.indices.extend(cols);
        self.conf.values.extend(values);
        self.conf.rows += 1;
        self.x.extend(x_row);
    }
}

fn problem(rng: &mut Rng, users: usize, items: usize, d: usize, density: f32) -> Problem {
    let y = rng.values(items * d, 0.5);
    let yty = reference::gram(&y, d);
    Problem {
        x: rng.values(users * d, 0.3),
        yty,
        conf: rng.confidences(users, items, density),
        y,
    }
}

#[test]
fn als_solve_matches_reference_cg() {
    let mut rng = Rng(102);
    for backend in backends() {
        for &(users, items, d) in &[(1, 5, 1), (40, 60, 3), (300, 200, 16), (50, 120, 37)] {
            // Few steps: two f32 CGs that round differently drift apart in the
            // middle of convergence (by ~1e-3 after a dozen steps here, before
            // both settle on the solution), so longer runs are compared with the
            // exact solve instead.
            for &(lambda, steps) in &[(0.1, 3), (1.0, 1), (0.0, 3), (0.5, 5)] {
                let pb = problem(&mut rng, users, items, d, 0.1);
                let p = params(lambda, steps);
                let got = solve_on(&*backend, &pb.x, &pb.y, d, &pb.yty, &pb.conf, p);
                let mut want = pb.x.clone();
                reference::als_solve(&mut want, &pb.y, d, &pb.yty, &pb.conf, p);
                for (u, (g, w)) in got.chunks_exact(d).zip(want.chunks_exact(d)).enumerate() {
                    let scale = w.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                    for (a, b) in g.iter().zip(w) {
                        assert!(
                            (a - b).abs() <= 1e-4 * scale,
                            "users={users} d={d} λ={lambda} steps={steps} row {u}: {g:?} vs {w:?}"
                        );
                    }
                }
                // The solve moved the rows that had somewhere to go.
                assert_ne!(bits(&got), bits(&pb.x));
            }
        }
    }
}

#[test]
fn every_kernel_set_matches_the_reference_cg_and_loss() {
    // Each set this CPU runs (on an AVX-512 machine all three), on the
    // shapes where its registers end: d around 16, 64 and 128 (the AVX-512
    // kernels' widths, groups of four rows up to 64, one row above, masked
    // tails), rows of 0 to 9 items (group remainders), odd row counts (the
    // block products' last row alone), and a `y` over the gather threshold
    // with a row over the gather budget.
    let mut rng = Rng(131);
    let cases: &[(usize, usize, usize, f32)] = &[
        (31, 9, 1, 0.5),
        (31, 9, 15, 0.5),
        (31, 9, 16, 0.5),
        (31, 9, 17, 0.5),
        (41, 60, 48, 0.1),
        (41, 60, 64, 0.1),
        (41, 60, 65, 0.1),
        (31, 40, 90, 0.15),
        (31, 40, 100, 0.15),
        (31, 40, 128, 0.15),
        (31, 40, 129, 0.15),
        (12, 9000, 64, 0.05),
        (6, 70_000, 64, 0.001),
    ];
    for &(users, items, d, density) in cases {
        let mut pb = problem(&mut rng, users, items, d, density);
        // Rows of exactly 0..=9 items (the first ones), and thereby an odd
        // row count on both sides of every block product.
        for len in 0..=9.min(items) {
            let cols: Vec<u32> = (0..len as u32).collect();
            let values: Vec<f32> = rng
                .values(len, 20.0)
                .iter()
                .map(|v| 1.0 + v.abs())
                .collect();
            pb.push_row(&cols, &values, rng.values(d, 0.3));
        }
        if items == 9000 {
            // One row with every item: over the block budget, gathered alone
            // (above the smaller kernels' gather threshold).
            let full = rng.confidences(1, items, 1.0);
            pb.push_row(&full.indices, &full.values, rng.values(d, 0.3));
            assert!(items * d * 4 > GATHER_MIN_Y_BYTES && items * d > CG_GATHER_BUDGET);
        }
        if items == 70_000 {
            // A y over every kernel set's gather threshold: one row with
            // every item (over the largest gather: read in place), one with a
            // third of them (gathered alone).
            let full = rng.confidences(1, items, 1.0);
            pb.push_row(&full.indices, &full.values, rng.values(d, 0.3));
            let third = rng.confidences(1, items, 0.33);
            pb.push_row(&third.indices, &third.values, rng.values(d, 0.3));
            assert!(items * d * 4 > GATHER_MIN_Y_BYTES && items * d > CG_GATHER_MAX);
            assert!(third.indices.len() * d > CG_GATHER_BUDGET);
        }
        let p = CgParams {
            regularization: 0.1,
            cg_steps: 3,
            pair_loss: true,
        };
        let mut want = pb.x.clone();
        reference::als_solve(&mut want, &pb.y, d, &pb.yty, &pb.conf, p);
        let want_loss = reference::pair_loss(&want, &pb.y, d, &pb.conf);
        for isa in Isa::available(d) {
            let mut got = pb.x.clone();
            let loss = als_solve(isa, &mut got, &pb.y, d, d, &pb.yty, &pb.conf, p)
                .unwrap()
                .unwrap();
            for (u, (g, w)) in got.chunks_exact(d).zip(want.chunks_exact(d)).enumerate() {
                let scale = w.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                for (a, b) in g.iter().zip(w) {
                    assert!(
                        (a - b).abs() <= 1e-4 * scale,
                        "{isa:?} d={d} row {u}: {g:?} vs {w:?}"
                    );
                }
            }
            let tolerance = 1e-4 * want_loss.abs().max(1.0);
            assert!(
                (loss - want_loss).abs() <= tolerance,
                "{isa:?} d={d}: loss {loss} vs {want_loss}"
            );
        }
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        assert_eq!(Isa::best(64), Isa::Avx512);
        assert_eq!(Isa::best(129), Isa::Fma);
    }
}

#[test]
fn als_solve_converges_to_the_exact_solution() {
    let mut rng = Rng(103);
    for backend in backends() {
        for &d in &[1, 4, 16, 32] {
            let pb = problem(&mut rng, 60, 150, d, 0.15);
            let lambda = 0.5;
            let p = params(lambda, 2 * d as u32);
            let got = solve_on(&*backend, &pb.x, &pb.y, d, &pb.yty, &pb.conf, p);
            for (u, g) in got.chunks_exact(d).enumerate() {
                let (cols, conf) = pb.conf.row(u);
                let exact = reference::als_exact_row(&pb.yty, lambda, &pb.y, d, cols, conf);
                let err = norm(g.iter().zip(&exact).map(|(&a, &b)| f64::from(a) - b));
                assert!(
                    err <= 1e-3 * norm(exact.iter().copied()).max(1e-3),
                    "d={d} row {u} ({} items): {g:?} vs {exact:?}",
                    cols.len()
                );
            }
        }
    }
}

#[test]
fn als_solve_lowers_the_objective() {
    let mut rng = Rng(104);
    for backend in backends() {
        let (users, items, d, lambda) = (40, 100, 12, 0.3);
        let pb = problem(&mut rng, users, items, d, 0.1);
        let objective = |x: &[f32]| -> Vec<f64> {
            x.chunks_exact(d)
                .enumerate()
                .map(|(u, xu)| {
                    let (cols, conf) = pb.conf.row(u);
                    reference::als_row_objective(&pb.y, d, cols, conf, lambda, xu)
                })
                .collect()
        };
        let minimum: Vec<f64> = (0..users)
            .map(|u| {
                let (cols, conf) = pb.conf.row(u);
                let exact = reference::als_exact_row(&pb.yty, lambda, &pb.y, d, cols, conf);
                let exact: Vec<f32> = exact.iter().map(|&v| v as f32).collect();
                reference::als_row_objective(&pb.y, d, cols, conf, lambda, &exact)
            })
            .collect();

        let mut x = pb.x.clone();
        let mut before = objective(&x);
        for half_step in 0..4 {
            x = solve_on(
                &*backend,
                &x,
                &pb.y,
                d,
                &pb.yty,
                &pb.conf,
                params(lambda, 3),
            );
            let after = objective(&x);
            for u in 0..users {
                let (b, a, m) = (before[u], after[u], minimum[u]);
                if half_step == 0 {
                    assert!(a < b, "row {u}: {b} -> {a}");
                } else {
                    // Near the optimum f32 rounding may leave it where it is.
                    assert!(
                        a <= b + 1e-6 * b,
                        "half-step {half_step}, row {u}: {b} -> {a}"
                    );
                }
                assert!(a >= m - 1e-5 * m, "row {u}: {a} is below the minimum {m}");
            }
            before = after;
        }
    }
}

#[test]
fn als_row_without_interactions_goes_to_zero() {
    let mut rng = Rng(105);
    for backend in backends() {
        let d = 10;
        let y = rng.values(80 * d, 0.5);
        let yty = reference::gram(&y, d);
        // Row 1 has interactions, rows 0 and 2 none; row 2 starts at zero.
        let conf = Csr {
            rows: 3,
            cols: 80,
            indptr: vec![0, 0, 2, 2],
            indices: vec![3, 50],
            values: vec![4.0, 2.0],
        };
        let mut x = rng.values(3 * d, 1.0);
        x[2 * d..].fill(0.0);
        let got = solve_on(&*backend, &x, &y, d, &yty, &conf, params(0.2, 2 * d as u32));
        let exact = reference::als_exact_row(&yty, 0.2, &y, d, &[], &[]);
        assert!(exact.iter().all(|&v| v == 0.0), "{exact:?}");
        let start = norm(x[..d].iter().map(|&v| f64::from(v)));
        let end = norm(got[..d].iter().map(|&v| f64::from(v)));
        assert!(end <= 1e-3 * start, "{start} -> {end}: {:?}", &got[..d]);
        assert!(
            got[2 * d..].iter().all(|&v| v == 0.0),
            "{:?}",
            &got[2 * d..]
        );
        assert!(norm(got[d..2 * d].iter().map(|&v| f64::from(v))) > 1e-2);
    }
}

#[test]
fn als_rows_do_not_depend_on_other_rows() {
    let mut rng = Rng(106);
    for backend in backends() {
        let (users, items, d) = (200, 90, 24);
        let pb = problem(&mut rng, users, items, d, 0.2);
        let p = params(0.4, 3);
        let all = solve_on(&*backend, &pb.x, &pb.y, d, &pb.yty, &pb.conf, p);
        for &u in &[0, 1, 63, 64, 199] {
            let (cols, conf) = pb.conf.row(u);
            let alone = Csr {
                rows: 1,
                cols: items,
                indptr: vec![0, cols.len() as u64],
                indices: cols.to_vec(),
                values: conf.to_vec(),
            };
            let x = &pb.x[u * d..(u + 1) * d];
            let got = solve_on(&*backend, x, &pb.y, d, &pb.yty, &alone, p);
            assert_eq!(bits(&got), bits(&all[u * d..(u + 1) * d]), "row {u}");
        }
    }
}

#[test]
fn als_solve_with_zero_steps_leaves_x_unchanged() {
    let mut rng = Rng(107);
    for backend in backends() {
        let pb = problem(&mut rng, 20, 30, 5, 0.3);
        let got = solve_on(
            &*backend,
            &pb.x,
            &pb.y,
            5,
            &pb.yty,
            &pb.conf,
            params(0.1, 0),
        );
        assert_eq!(bits(&got), bits(&pb.x));
    }
}

// -----------------------------------------------------------------------
// Uploads, writes and errors

#[test]
fn sparse_upload_rejects_non_finite_values_naming_row_and_column() {
    let mut rng = Rng(112);
    for backend in backends() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut m = rng.confidences(6, 20, 0.4);
            // The first stored value of row 2 (row 2 has some at this density).
            let pos = m.indptr[2] as usize;
            assert!(pos < m.indptr[3] as usize);
            let col = m.indices[pos] as usize;
            m.values[pos] = bad;
            // A later bad value must not hide the first one.
            let last = m.values.len() - 1;
            m.values[last] = f32::NAN;
            match backend.upload_sparse(&m) {
                Err(KernelError::NonFinitePoint { row, col: c, value }) => {
                    assert_eq!((row, c), (2, col));
                    assert_eq!(value.to_bits(), bad.to_bits());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[test]
fn sparse_upload_rejects_malformed_structure() {
    for backend in backends() {
        let good = Csr {
            rows: 3,
            cols: 4,
            indptr: vec![0, 2, 2, 3],
            indices: vec![0, 3, 1],
            values: vec![1.0, 2.0, 3.0],
        };
        let r = backend.upload_sparse(&good).unwrap();
        assert_eq!((r.n(), r.d()), (3, 4));

        let broken = [
            Csr {
                indptr: vec![0, 2, 3],
                ..good.clone()
            },
            Csr {
                indptr: vec![0, 5, 2, 3],
                ..good.clone()
            },
            Csr {
                indptr: vec![1, 2, 2, 3],
                ..good.clone()
            },
            Csr {
                indices: vec![3, 0, 1],
                ..good.clone()
            },
            Csr {
                indices: vec![0, 0, 1],
                ..good.clone()
            },
            Csr {
                indices: vec![0, 4, 1],
                ..good.clone()
            },
            Csr {
                values: vec![1.0, 2.0],
                ..good.clone()
            },
        ];
        for m in &broken {
            assert!(
                matches!(backend.upload_sparse(m), Err(KernelError::Shape(_))),
                "{m:?}"
            );
        }
    }
}

#[test]
fn write_rows_overwrites_rows_and_validates() {
    let mut rng = Rng(113);
    for backend in backends() {
        let d = 3;
        let start = rng.values(6 * d, 1.0);
        let mut r = backend.upload(&start, d).unwrap();
        let new = rng.values(3 * d, 1.0);
        backend.write_rows(&mut r, &[4, 1, 4], &new).unwrap();
        let all: Vec<u32> = (0..6).collect();
        let got = backend.download_rows(&r, &all).unwrap();
        let mut want = start.clone();
        want[d..2 * d].copy_from_slice(&new[d..2 * d]);
        // Row 4 is written twice: the last values win.
        want[4 * d..5 * d].copy_from_slice(&new[2 * d..3 * d]);
        assert_eq!(got, want);

        // Errors leave the rows as they were.
        assert!(matches!(
            backend.write_rows(&mut r, &[0, 6], &new[..2 * d]),
            Err(KernelError::Shape(_))
        ));
        assert!(matches!(
            backend.write_rows(&mut r, &[0, 1], &new[..2 * d - 1]),
            Err(KernelError::Shape(_))
        ));
        let mut bad = new.clone();
        bad[d + 2] = f32::NAN;
        match backend.write_rows(&mut r, &[0, 5, 2], &bad) {
            Err(KernelError::NonFinitePoint { row: 5, col: 2, .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(backend.download_rows(&r, &all).unwrap(), want);

        // A sparse resident is not a dense target.
        let mut sparse = backend.upload_sparse(&rng.confidences(6, 3, 0.5)).unwrap();
        assert!(matches!(
            backend.write_rows(&mut sparse, &[0], &new[..d]),
            Err(KernelError::Shape(_))
        ));
    }
}

#[test]
fn als_solve_rejects_bad_shapes_and_values() {
    let mut rng = Rng(114);
    for backend in backends() {
        let (users, items, d) = (5, 7, 3);
        let pb = problem(&mut rng, users, items, d, 0.5);
        let mut x = backend.upload(&pb.x, d).unwrap();
        let y = backend.upload(&pb.y, d).unwrap();
        let conf = backend.upload_sparse(&pb.conf).unwrap();
        let p = params(0.1, 3);
        let shape = |r: Result<Option<f64>, KernelError>| matches!(r, Err(KernelError::Shape(_)));

        let y_wide = backend
            .upload(&rng.values(items * (d + 1), 1.0), d + 1)
            .unwrap();
        assert!(shape(backend.als_solve(&mut x, &y_wide, &pb.yty, &conf, p)));
        let y_short = backend.upload(&pb.y[..(items - 1) * d], d).unwrap();
        assert!(shape(
            backend.als_solve(&mut x, &y_short, &pb.yty, &conf, p)
        ));
        let mut x_short = backend.upload(&pb.x[..(users - 1) * d], d).unwrap();
        assert!(shape(backend.als_solve(
            &mut x_short,
            &y,
            &pb.yty,
            &conf,
            p
        )));
        assert!(shape(backend.als_solve(
            &mut x,
            &y,
            &pb.yty[..d * d - 1],
            &conf,
            p
        )));
        let mut yty_nan = pb.yty.clone();
        yty_nan[4] = f64::NAN;
        assert!(shape(backend.als_solve(&mut x, &y, &yty_nan, &conf, p)));
        assert!(shape(backend.als_solve(
            &mut x,
            &y,
            &pb.yty,
            &conf,
            params(-1.0, 3)
        )));
        assert!(shape(backend.als_solve(
            &mut x,
            &y,
            &pb.yty,
            &conf,
            params(f32::NAN, 3)
        )));
        // Dense where sparse is expected, and the other way round.
        assert!(shape(backend.als_solve(&mut x, &y, &pb.yty, &y, p)));
        assert!(shape(backend.als_solve(&mut x, &conf, &pb.yty, &conf, p)));

        // A confidence below 1, named by row and item.
        let mut low = pb.conf.clone();
        let pos = low.indptr[3] as usize;
        assert!(pos < low.indptr[4] as usize);
        low.values[pos] = 0.5;
        let low_r = backend.upload_sparse(&low).unwrap();
        let err = backend
            .als_solve(&mut x, &y, &pb.yty, &low_r, p)
            .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains(&format!("row 3, item {}", low.indices[pos])),
            "{message}"
        );

        // None of the failures touched x.
        let all: Vec<u32> = (0..users as u32).collect();
        assert_eq!(backend.download_rows(&x, &all).unwrap(), pb.x);
    }
}

#[test]
fn top_n_and_gram_reject_bad_shapes() {
    let mut rng = Rng(115);
    for backend in backends() {
        let q = backend.upload(&rng.values(4 * 3, 1.0), 3).unwrap();
        let i = backend.upload(&rng.values(9 * 3, 1.0), 3).unwrap();
        let i_wide = backend.upload(&rng.values(9 * 4, 1.0), 4).unwrap();
        assert!(matches!(
            backend.top_n(&q, &i_wide, 2, None),
            Err(KernelError::Shape(_))
        ));
        for (rows, cols) in [(3, 9), (4, 8), (4, 10)] {
            let ex = backend
                .upload_sparse(&rng.confidences(rows, cols, 0.3))
                .unwrap();
            assert!(
                matches!(
                    backend.top_n(&q, &i, 2, Some(&ex)),
                    Err(KernelError::Shape(_))
                ),
                "{rows} x {cols}"
            );
        }
        // Dense where the exclusions should be sparse, sparse where items should be.
        assert!(matches!(
            backend.top_n(&q, &i, 2, Some(&q)),
            Err(KernelError::Shape(_))
        ));
        let ex = backend.upload_sparse(&rng.confidences(4, 9, 0.3)).unwrap();
        assert!(matches!(
            backend.top_n(&q, &ex, 2, None),
            Err(KernelError::Shape(_))
        ));
        assert!(matches!(backend.gram(&ex), Err(KernelError::Shape(_))));
        assert!(backend.top_n(&q, &i, 2, Some(&ex)).is_ok());
    }
}

#[test]
fn residents_of_another_backend_are_rejected() {
    let cpu = CpuBackend::new();
    let foreign = Resident::new(2, 2, "cuda:0", Box::new(()));
    let mine = cpu.upload(&[1.0; 4], 2).unwrap();
    assert!(matches!(
        cpu.gram(&foreign),
        Err(KernelError::ForeignPoints("cuda:0"))
    ));
    assert!(matches!(
        cpu.top_n(&mine, &foreign, 1, None),
        Err(KernelError::ForeignPoints("cuda:0"))
    ));
    let mut foreign_mut = Resident::new(2, 2, "cuda:0", Box::new(()));
    assert!(matches!(
        cpu.write_rows(&mut foreign_mut, &[0], &[1.0, 1.0]),
        Err(KernelError::ForeignPoints("cuda:0"))
    ));
}

// -----------------------------------------------------------------------
// Threads

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut rng = Rng(116);
    let cpu = CpuBackend::new();
    let d = 16;
    // Magnitudes from 2^-20 to 2^20 make the f64 sums round, so the order of
    // additions shows.
    let n = 3 * GRAM_BLOCK_ROWS + 77;
    let a: Vec<f32> = (0..n * d)
        .map(|_| rng.unit() * 2f32.powi(rng.below(41) as i32 - 20))
        .collect();
    let a = cpu.upload(&a, d).unwrap();
    let pb = problem(&mut rng, 500, 300, d, 0.05);
    let (x, y) = (cpu.upload(&pb.x, d).unwrap(), cpu.upload(&pb.y, d).unwrap());
    let conf = cpu.upload_sparse(&pb.conf).unwrap();
    let ex = cpu.upload_sparse(&rng.confidences(500, 300, 0.05)).unwrap();
    let all: Vec<u32> = (0..500).collect();

    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let g = cpu.gram(&a).unwrap();
            let mut xs = cpu
                .upload(&cpu.download_rows(&x, &all).unwrap(), d)
                .unwrap();
            cpu.als_solve(&mut xs, &y, &pb.yty, &conf, params(0.1, 3))
                .unwrap();
            let t = cpu.top_n(&xs, &y, 20, Some(&ex)).unwrap();
            (g, cpu.download_rows(&xs, &all).unwrap(), t)
        })
    };
    let (g1, x1, t1) = run(1);
    for threads in [2, 3] {
        let (g, x, t) = run(threads);
        let g_bits = |g: &[f64]| g.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(g_bits(&g1), g_bits(&g), "gram, {threads} threads");
        assert_eq!(bits(&x1), bits(&x), "als_solve, {threads} threads");
        assert_eq!(t1.items, t.items, "top_n, {threads} threads");
        assert_eq!(
            bits(&t1.scores),
            bits(&t.scores),
            "top_n, {threads} threads"
        );
    }
}
