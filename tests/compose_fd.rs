//! The reference backward against f64 central differences of the reference forward, for every
//! gradient and every coefficient parametrisation. Loss `L = Σ G ∘ Y` with random G, so
//! `∂L/∂Y = G`. Central differences in f64 with h = 1e-6 err by ~h²·|L'''| + ε/h ≈ 1e-10.

mod common;

use common::*;
use lora_compose::check::{compare, Tol};
use lora_compose::compose::{
    coefficients, coefficients_backward, reduce_rows, reference, Mode, ModuleStack, Param, Rows, Train,
};
use proptest::prelude::*;

const H: f64 = 1e-6;
const TOL: Tol = Tol::new(1e-7, 1e-6);

/// Everything that the loss depends on, in f64.
#[derive(Clone)]
struct P {
    w: Vec<f64>,
    bias: Vec<f64>,
    x: Vec<f64>,
    m: ModuleStack<f64>,
    /// trainable coefficient values (S × N), mapped through `param`
    v: Vec<f64>,
}

struct Setup {
    mode: Mode,
    param: Param,
    with_bias: bool,
    sample_of: Vec<usize>,
    n_samples: usize,
    g: Vec<f64>,
}

fn loss(s: &Setup, p: &P) -> f64 {
    let rows = Rows {
        sample_of: &s.sample_of,
        n_samples: s.n_samples,
    };
    let c = coefficients(s.param, &p.v, p.m.n());
    let layer = reference::Layer {
        w: &p.w,
        bias: s.with_bias.then_some(&p.bias[..]),
        modules: &p.m,
        mode: s.mode,
    };
    let y = reference::forward(&layer, &p.x, &c, rows).unwrap();
    y.iter().zip(&s.g).map(|(y, g)| y * g).sum()
}

/// Central difference of the loss along every element that `field` selects.
fn numeric(s: &Setup, p: &P, field: impl Fn(&mut P) -> &mut Vec<f64>) -> Vec<f64> {
    let len = field(&mut p.clone()).len();
    (0..len)
        .map(|i| {
            let (mut plus, mut minus) = (p.clone(), p.clone());
            field(&mut plus)[i] += H;
            field(&mut minus)[i] -= H;
            (loss(s, &plus) - loss(s, &minus)) / (2.0 * H)
        })
        .collect()
}

fn setup(seed: u64, mode: Mode, param: Param, assign: Assign) -> (Setup, P) {
    let case = make_case(seed, 5, 4, 3, 3, mode, true, assign, CoeffKind::Random);
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed ^ 0x5eed);
    // Small ranks keep the number of perturbed elements low.
    let ranks: Vec<usize> = match mode {
        Mode::Product => vec![1, 3, 2],
        Mode::Factor => vec![2, 2, 2],
    };
    let mods: Vec<(Vec<f64>, Vec<f64>, f64)> = ranks
        .iter()
        .zip([0.5, 2.0, 1.25])
        .map(|(&r, s)| {
            (
                to_f64(&randn(&mut rng, r * 4, 0.7)),
                to_f64(&randn(&mut rng, 3 * r, 0.7)),
                s,
            )
        })
        .collect();
    let refs: Vec<(&[f64], &[f64], f64)> = mods.iter().map(|(a, b, s)| (&a[..], &b[..], *s)).collect();
    let m = ModuleStack::from_modules(4, 3, &refs).unwrap();
    let s = Setup {
        mode,
        param,
        with_bias: true,
        sample_of: case.sample_of.clone(),
        n_samples: case.n_samples,
        g: to_f64(&case.g),
    };
    let p = P {
        w: to_f64(&case.w),
        bias: to_f64(&case.bias),
        x: to_f64(&case.x),
        m,
        v: to_f64(&case.c),
    };
    (s, p)
}

fn check_all(s: &Setup, p: &P) -> Result<(), String> {
    let rows = Rows {
        sample_of: &s.sample_of,
        n_samples: s.n_samples,
    };
    let n = p.m.n();
    let c = coefficients(s.param, &p.v, n);
    let layer = reference::Layer {
        w: &p.w,
        bias: Some(&p.bias),
        modules: &p.m,
        mode: s.mode,
    };
    let gr = reference::backward(&layer, &p.x, &c, rows, &s.g, Train::ALL).map_err(|e| e.to_string())?;
    compare("dX", &gr.dx, &numeric(s, p, |p| &mut p.x), TOL)?;
    compare("dW", &gr.dw, &numeric(s, p, |p| &mut p.w), TOL)?;
    compare("db", &gr.dbias, &numeric(s, p, |p| &mut p.bias), TOL)?;
    compare("dA_cat", &gr.da_cat, &numeric(s, p, |p| &mut p.m.a_cat), TOL)?;
    compare("dB_cat", &gr.db_cat, &numeric(s, p, |p| &mut p.m.b_cat), TOL)?;
    let dv = coefficients_backward(s.param, &p.v, &gr.dc, n);
    compare(&format!("dV ({:?})", s.param), &dv, &numeric(s, p, |p| &mut p.v), TOL)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn every_gradient_matches_central_differences(
        seed in any::<u64>(),
        mode in prop::sample::select(vec![Mode::Product, Mode::Factor]),
        param in prop::sample::select(vec![Param::Raw, Param::Softmax, Param::Uniform]),
        assign in prop::sample::select(vec![Assign::AllSame, Assign::AllDistinct, Assign::Uniform, Assign::Zipf]),
    ) {
        let (s, p) = setup(seed, mode, param, assign);
        check_all(&s, &p).map_err(TestCaseError::fail)?;
    }
}

/// One coefficient row shared by every sample (the ordinary, global case): its gradient is the
/// sum of the per-sample rows.
#[test]
fn shared_row_gradient_is_the_sum_of_sample_rows() {
    for (seed, param) in [(1, Param::Softmax), (2, Param::Raw)] {
        let (s, p) = setup(seed, Mode::Product, param, Assign::AllDistinct);
        let n = p.m.n();
        let shared = p.v[..n].to_vec();
        let broadcast = |row: &[f64]| row.repeat(s.n_samples);
        let mut p = p;
        p.v = broadcast(&shared);
        let rows = Rows {
            sample_of: &s.sample_of,
            n_samples: s.n_samples,
        };
        let c = coefficients(param, &p.v, n);
        let layer = reference::Layer {
            w: &p.w,
            bias: Some(&p.bias),
            modules: &p.m,
            mode: s.mode,
        };
        let gr = reference::backward(&layer, &p.x, &c, rows, &s.g, Train::COEFFS).unwrap();
        let dv_rows = coefficients_backward(param, &p.v, &gr.dc, n);
        let numeric_shared: Vec<f64> = (0..n)
            .map(|i| {
                let (mut plus, mut minus) = (shared.clone(), shared.clone());
                plus[i] += H;
                minus[i] -= H;
                let lp = loss(
                    &s,
                    &P {
                        v: broadcast(&plus),
                        ..p.clone()
                    },
                );
                let lm = loss(
                    &s,
                    &P {
                        v: broadcast(&minus),
                        ..p.clone()
                    },
                );
                (lp - lm) / (2.0 * H)
            })
            .collect();
        compare("shared dV", &reduce_rows(&dv_rows, n), &numeric_shared, TOL).unwrap();
    }
}

#[test]
fn parametrisations() {
    let v = [1.0, 2.0, 3.0, -1.0, -1.0, -1.0];
    let c = coefficients(Param::Softmax, &v, 3);
    for row in c.chunks(3) {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-15);
    }
    assert!((c[3] - 1.0 / 3.0).abs() < 1e-15 && c[2] > c[1] && c[1] > c[0]);
    // Large logits must not overflow.
    let big = coefficients(Param::Softmax, &[1000.0, 0.0], 2);
    assert!((big[0] - 1.0).abs() < 1e-15 && big[1] >= 0.0);
    assert_eq!(coefficients(Param::Uniform, &v, 3), vec![1.0 / 3.0; 6]);
    assert_eq!(coefficients_backward(Param::Uniform, &v, &[1.0; 6], 3), vec![0.0; 6]);
    assert_eq!(coefficients(Param::Raw, &v, 3), v.to_vec());
}
