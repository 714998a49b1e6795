//! The fused fast path against the f64 reference, on random shapes, ranks, coefficients and
//! token→row assignments. The tolerance is normwise from the numerics: f32 accumulation of K
//! products errs by about √K·ε·Σ|terms|, so each output may differ from the f64 reference by
//! 16·ε₃₂ times the largest Σ|terms| (the same formula evaluated on absolute values). Over
//! 500 random cases the worst error seen was 0.28 of that bound.

mod common;

use common::*;
use lora_compose::check::{compare, Tol};
use lora_compose::compose::{fast, reference, Mode, ModuleStack, Rows, Train};
use proptest::prelude::*;

const KAPPA: f64 = 16.0 * f32::EPSILON as f64;

fn tol_from(abs_ref: &[f64]) -> Tol {
    let scale = abs_ref.iter().cloned().fold(0.0, f64::max);
    Tol::new(KAPPA * scale + 1e-30, 0.0)
}

struct Refs {
    y: Vec<f64>,
    y_abs: Vec<f64>,
    grads: reference::Grads,
    grads_abs: reference::Grads,
}

fn reference_of(case: &Case) -> Refs {
    let rows = Rows {
        sample_of: &case.sample_of,
        n_samples: case.n_samples,
    };
    let run = |abs: bool| {
        let f = |v: &[f32]| if abs { abs64(v) } else { to_f64(v) };
        let m: ModuleStack<f64> = case.modules.map(|x| if abs { (x as f64).abs() } else { x as f64 });
        let (w, b, x, c, g) = (f(&case.w), f(&case.bias), f(&case.x), f(&case.c), f(&case.g));
        let layer = reference::Layer {
            w: &w,
            bias: case.with_bias.then_some(&b[..]),
            modules: &m,
            mode: case.mode,
        };
        let y = reference::forward(&layer, &x, &c, rows).unwrap();
        let grads = reference::backward(&layer, &x, &c, rows, &g, Train::ALL).unwrap();
        (y, grads)
    };
    let (y, grads) = run(false);
    let (y_abs, grads_abs) = run(true);
    Refs {
        y,
        y_abs,
        grads,
        grads_abs,
    }
}

fn fast_of(case: &Case, train: Train) -> (Vec<f32>, fast::Grads) {
    let rows = Rows {
        sample_of: &case.sample_of,
        n_samples: case.n_samples,
    };
    let layer = fast::Layer {
        w: &case.w,
        bias: case.with_bias.then_some(&case.bias[..]),
        modules: &case.modules,
        mode: case.mode,
    };
    let (y, cache) = fast::forward(&layer, &case.x, &case.c, rows).unwrap();
    let grads = fast::backward(&layer, &case.x, &cache, &case.c, rows, &case.g, train).unwrap();
    (y, grads)
}

fn check_case(case: &Case) -> Result<(), String> {
    let r = reference_of(case);
    let (y, gr) = fast_of(case, Train::ALL);
    compare("Y", &y, &r.y, tol_from(&r.y_abs))?;
    compare("dX", &gr.dx, &r.grads.dx, tol_from(&r.grads_abs.dx))?;
    compare("dC", &gr.dc, &r.grads.dc, tol_from(&r.grads_abs.dc))?;
    compare("dA_cat", &gr.da_cat, &r.grads.da_cat, tol_from(&r.grads_abs.da_cat))?;
    compare("dB_cat", &gr.db_cat, &r.grads.db_cat, tol_from(&r.grads_abs.db_cat))?;
    compare("dW", &gr.dw, &r.grads.dw, tol_from(&r.grads_abs.dw))?;
    compare("db", &gr.dbias, &r.grads.dbias, tol_from(&r.grads_abs.dbias))?;
    Ok(())
}

fn dims() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 3, 5, 7, 13, 17, 31, 32, 33, 61, 64, 67])
}

fn tokens() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 3, 7, 16, 17, 33])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn product_mode_matches_reference(
        seed in any::<u64>(), t in tokens(), d_in in dims(), d_out in dims(), n in 1usize..=64,
        mixed in any::<bool>(), assign in assign(), kind in coeff_kind(),
    ) {
        let case = make_case(seed, t, d_in, d_out, n, Mode::Product, mixed, assign, kind);
        check_case(&case).map_err(|e| TestCaseError::fail(format!("{e}\nranks {:?}", case.modules.ranks)))?;
    }

    #[test]
    fn factor_mode_matches_reference(
        seed in any::<u64>(), t in tokens(), d_in in dims(), d_out in dims(), n in 1usize..=16,
        assign in assign(), kind in coeff_kind(),
    ) {
        let case = make_case(seed, t, d_in, d_out, n, Mode::Factor, false, assign, kind);
        check_case(&case).map_err(|e| TestCaseError::fail(format!("{e}\nranks {:?}", case.modules.ranks)))?;
    }

    /// Asking for fewer gradients gives the same numbers for those asked, and nothing else.
    #[test]
    fn train_subsets_agree_with_full_backward(
        seed in any::<u64>(), input in any::<bool>(), coeffs in any::<bool>(), modules in any::<bool>(), base in any::<bool>(),
    ) {
        let case = make_case(seed, 9, 13, 11, 5, Mode::Product, true, Assign::Uniform, CoeffKind::Random);
        let (_, full) = fast_of(&case, Train::ALL);
        let (_, part) = fast_of(&case, Train { input, coeffs, modules, base });
        let check = || -> Result<(), String> {
            let exact = Tol::new(0.0, 0.0);
            let pick = |want: bool, v: &[f32]| if want { v.to_vec() } else { Vec::new() };
            compare("dX", &part.dx, &pick(input, &full.dx), exact)?;
            compare("dC", &part.dc, &if coeffs { full.dc.clone() } else { Vec::new() }, exact)?;
            compare("dA", &part.da_cat, &pick(modules, &full.da_cat), exact)?;
            compare("dB", &part.db_cat, &pick(modules, &full.db_cat), exact)?;
            compare("dW", &part.dw, &pick(base, &full.dw), exact)?;
            compare("db", &part.dbias, &pick(base, &full.dbias), exact)?;
            Ok(())
        };
        check().map_err(TestCaseError::fail)?;
    }
}

#[test]
fn one_by_one_and_rank_64_with_many_modules() {
    for (seed, t, d_in, d_out, n) in [(1, 1, 1, 1, 1), (2, 1, 1, 1, 64), (3, 2, 1, 3, 7), (4, 33, 67, 61, 16)] {
        for mode in [Mode::Product, Mode::Factor] {
            let case = make_case(seed, t, d_in, d_out, n, mode, true, Assign::Zipf, CoeffKind::Random);
            check_case(&case).unwrap();
        }
    }
}

/// The merged route (one coefficient row and many tokens: the modules merged into W first) on
/// both of its ∂C routes, beside the per-token route, each against the reference — with every
/// gradient asked for, and with ∂X and ∂C alone (the composition's training case).
#[test]
fn merged_route_matches_reference_on_both_dc_routes() {
    let seed: u64 = rand::random();
    // (T, d_in, d_out, ranks, merges, ∂C through P = Gᵀ X)
    type RouteCase = (usize, usize, usize, &'static [usize], bool, bool);
    let cases: [RouteCase; 4] = [
        (40, 33, 31, &[3, 5, 2], true, false),
        (40, 33, 31, &[8, 16, 4, 8], true, true),
        (67, 7, 64, &[1, 2, 3, 4, 5], true, true),
        (5, 33, 31, &[3, 5], false, false),
    ];
    for (k, &(t, d_in, d_out, ranks, merged, through_p)) in cases.iter().enumerate() {
        let case = make_case_with_ranks(
            seed + k as u64,
            t,
            d_in,
            d_out,
            ranks,
            Mode::Product,
            Assign::AllSame,
            CoeffKind::Random,
        );
        let rows = Rows {
            sample_of: &case.sample_of,
            n_samples: case.n_samples,
        };
        assert_eq!(fast::merges(&case.modules, Mode::Product, rows, t), merged, "case {k}");
        if merged {
            assert_eq!(fast::dc_through_p(&case.modules, t), through_p, "case {k}");
        }
        check_case(&case).unwrap_or_else(|e| panic!("seed {seed} case {k}: {e}"));
        let r = reference_of(&case);
        let train = Train {
            input: true,
            coeffs: true,
            modules: false,
            base: false,
        };
        let (_, gr) = fast_of(&case, train);
        compare("dX", &gr.dx, &r.grads.dx, tol_from(&r.grads_abs.dx))
            .unwrap_or_else(|e| panic!("seed {seed} case {k}: {e}"));
        compare("dC", &gr.dc, &r.grads.dc, tol_from(&r.grads_abs.dc))
            .unwrap_or_else(|e| panic!("seed {seed} case {k}: {e}"));
        assert!(gr.da_cat.is_empty() && gr.dw.is_empty());
    }
}

#[test]
fn shape_errors_are_reported_not_panicked() {
    let case = make_case(7, 4, 5, 6, 3, Mode::Product, true, Assign::Uniform, CoeffKind::Random);
    let layer = fast::Layer {
        w: &case.w,
        bias: None,
        modules: &case.modules,
        mode: Mode::Product,
    };
    let rows = Rows {
        sample_of: &case.sample_of,
        n_samples: case.n_samples,
    };
    let err = fast::forward(&layer, &case.x, &case.c[1..], rows)
        .unwrap_err()
        .to_string();
    assert!(err.contains("C has"), "{err}");
    let bad_rows = vec![case.n_samples; case.t];
    let err = fast::forward(
        &layer,
        &case.x,
        &case.c,
        Rows {
            sample_of: &bad_rows,
            n_samples: case.n_samples,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("token 0 maps to sample"), "{err}");
    let err = fast::forward(&layer, &case.x[1..], &case.c, rows)
        .unwrap_err()
        .to_string();
    assert!(err.contains("X has"), "{err}");
}

#[test]
fn factor_mode_refuses_unequal_ranks() {
    let (a1, b1) = (vec![0.0f32; 2 * 3], vec![0.0f32; 4 * 2]);
    let (a2, b2) = (vec![0.0f32; 3], vec![0.0f32; 4]);
    let m = ModuleStack::from_modules(3, 4, &[(&a1[..], &b1[..], 1.0), (&a2[..], &b2[..], 1.0)]).unwrap();
    let err = m.check_mode(Mode::Factor).unwrap_err().to_string();
    assert!(err.contains("module 1 has rank 1"), "{err}");
    let w = vec![0.0f32; 12];
    let layer = fast::Layer {
        w: &w,
        bias: None,
        modules: &m,
        mode: Mode::Factor,
    };
    let rows = Rows {
        sample_of: &[0],
        n_samples: 1,
    };
    assert!(fast::forward(&layer, &[0.0; 3], &[0.5, 0.5], rows).is_err());
}

#[test]
fn stacking_round_trips_each_module() {
    let case = make_case(11, 2, 7, 5, 6, Mode::Product, true, Assign::AllSame, CoeffKind::Random);
    let m = &case.modules;
    let unstacked: Vec<(Vec<f32>, Vec<f32>)> = (0..m.n()).map(|i| m.module(i)).collect();
    let refs: Vec<(&[f32], &[f32], f32)> = unstacked
        .iter()
        .zip(&m.scales)
        .map(|((a, b), &s)| (&a[..], &b[..], s))
        .collect();
    assert_eq!(&ModuleStack::from_modules(7, 5, &refs).unwrap(), m);
}
