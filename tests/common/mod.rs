//! Random composed-layer cases shared by the property tests.
#![allow(dead_code)]

use lora_compose::compose::{Mode, ModuleStack};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const RANKS: [usize; 5] = [1, 3, 8, 16, 64];

/// How tokens are assigned to coefficient rows (punica's adapter-assignment patterns).
#[derive(Clone, Copy, Debug)]
pub enum Assign {
    AllSame,
    AllDistinct,
    Uniform,
    Zipf,
}

/// What the coefficient values look like.
#[derive(Clone, Copy, Debug)]
pub enum CoeffKind {
    Random,
    Zero,
    Negative,
    OneHot,
}

#[derive(Clone, Debug)]
pub struct Case {
    pub t: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub mode: Mode,
    pub with_bias: bool,
    pub w: Vec<f32>,
    pub bias: Vec<f32>,
    pub x: Vec<f32>,
    pub g: Vec<f32>,
    pub modules: ModuleStack<f32>,
    pub c: Vec<f32>,
    pub sample_of: Vec<usize>,
    pub n_samples: usize,
}

pub fn normal(rng: &mut ChaCha8Rng) -> f32 {
    // Box–Muller; plenty for test data.
    let u1: f32 = rng.random_range(1e-7f32..1.0);
    let u2: f32 = rng.random_range(0.0f32..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

pub fn randn(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|_| normal(rng) * scale).collect()
}

/// Ranks for N modules: all one value from [`RANKS`], or mixed; total rank capped so the
/// f64 reference stays quick.
pub fn draw_ranks(rng: &mut ChaCha8Rng, n: usize, mixed: bool, cap: usize) -> Vec<usize> {
    let allowed: Vec<usize> = RANKS.iter().cloned().filter(|&r| r * n <= cap).collect();
    let allowed = if allowed.is_empty() { vec![1] } else { allowed };
    if mixed {
        (0..n).map(|_| allowed[rng.random_range(0..allowed.len())]).collect()
    } else {
        vec![allowed[rng.random_range(0..allowed.len())]; n]
    }
}

pub fn assign_rows(rng: &mut ChaCha8Rng, t: usize, assign: Assign) -> (Vec<usize>, usize) {
    match assign {
        Assign::AllSame => (vec![0; t], 1),
        Assign::AllDistinct => ((0..t).collect(), t),
        Assign::Uniform => {
            let s = rng.random_range(1..=t.max(1));
            ((0..t).map(|_| rng.random_range(0..s)).collect(), s)
        }
        Assign::Zipf => {
            let s = rng.random_range(1..=t.max(1));
            let weights: Vec<f64> = (0..s).map(|k| 1.0 / ((k + 1) as f64).powf(1.5)).collect();
            let total: f64 = weights.iter().sum();
            let rows = (0..t)
                .map(|_| {
                    let mut p = rng.random_range(0.0..total);
                    weights
                        .iter()
                        .position(|&w| {
                            p -= w;
                            p < 0.0
                        })
                        .unwrap_or(s - 1)
                })
                .collect();
            (rows, s)
        }
    }
}

pub fn coeffs(rng: &mut ChaCha8Rng, s: usize, n: usize, kind: CoeffKind) -> Vec<f32> {
    (0..s)
        .flat_map(|_| {
            let hot = rng.random_range(0..n.max(1));
            (0..n)
                .map(|i| match kind {
                    CoeffKind::Random => normal(rng),
                    CoeffKind::Zero => 0.0,
                    CoeffKind::Negative => -rng.random_range(0.05f32..1.5),
                    CoeffKind::OneHot => (i == hot) as u8 as f32,
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
pub fn make_case(
    seed: u64,
    t: usize,
    d_in: usize,
    d_out: usize,
    n: usize,
    mode: Mode,
    mixed: bool,
    assign: Assign,
    kind: CoeffKind,
) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ranks = match mode {
        Mode::Product => draw_ranks(&mut rng, n, mixed, 1024),
        Mode::Factor => draw_ranks(&mut rng, n, false, 1024),
    };
    finish_case(&mut rng, t, d_in, d_out, &ranks, mode, assign, kind)
}

/// A case with the given module ranks (e.g. 128 modules of rank 1).
#[allow(clippy::too_many_arguments)]
pub fn make_case_with_ranks(
    seed: u64,
    t: usize,
    d_in: usize,
    d_out: usize,
    ranks: &[usize],
    mode: Mode,
    assign: Assign,
    kind: CoeffKind,
) -> Case {
    finish_case(
        &mut ChaCha8Rng::seed_from_u64(seed),
        t,
        d_in,
        d_out,
        ranks,
        mode,
        assign,
        kind,
    )
}

#[allow(clippy::too_many_arguments)]
fn finish_case(
    rng: &mut ChaCha8Rng,
    t: usize,
    d_in: usize,
    d_out: usize,
    ranks: &[usize],
    mode: Mode,
    assign: Assign,
    kind: CoeffKind,
) -> Case {
    let n = ranks.len();
    let mods: Vec<(Vec<f32>, Vec<f32>, f32)> = ranks
        .iter()
        .map(|&r| {
            let a = randn(rng, r * d_in, 1.0 / (d_in as f32).sqrt());
            let b = randn(rng, d_out * r, 1.0 / (r as f32).sqrt());
            let alpha = [1.0f32, 8.0, 16.0][rng.random_range(0..3)];
            (a, b, alpha / r as f32)
        })
        .collect();
    let refs: Vec<(&[f32], &[f32], f32)> = mods.iter().map(|(a, b, s)| (&a[..], &b[..], *s)).collect();
    let modules = ModuleStack::from_modules(d_in, d_out, &refs).unwrap();
    let (sample_of, n_samples) = assign_rows(rng, t, assign);
    let c = coeffs(rng, n_samples, n, kind);
    Case {
        t,
        d_in,
        d_out,
        mode,
        with_bias: rng.random_bool(0.5),
        w: randn(rng, d_out * d_in, 1.0 / (d_in as f32).sqrt()),
        bias: randn(rng, d_out, 1.0),
        x: randn(rng, t * d_in, 1.0),
        g: randn(rng, t * d_out, 1.0),
        modules,
        c,
        sample_of,
        n_samples,
    }
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub fn abs64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| (x as f64).abs()).collect()
}

/// Proptest strategies over the assignment and coefficient kinds.
pub fn assign() -> impl proptest::strategy::Strategy<Value = Assign> {
    proptest::sample::select(vec![
        Assign::AllSame,
        Assign::AllDistinct,
        Assign::Uniform,
        Assign::Zipf,
    ])
}

pub fn coeff_kind() -> impl proptest::strategy::Strategy<Value = CoeffKind> {
    proptest::sample::select(vec![
        CoeffKind::Random,
        CoeffKind::Zero,
        CoeffKind::Negative,
        CoeffKind::OneHot,
    ])
}
