//! The one comparison helper every test uses.
//!
//! Per element `|x − ref| ≤ atol + rtol·|ref|` ([`compare`]), or `|x − ref| ≤ bound(i)` with a
//! bound the test derives per element ([`compare_with`]). On failure the error reports the max
//! absolute and relative errors, the worst element (by how far past its bound it is, with that
//! bound) and a few pairs, so a failing property test says what went wrong without a debugger.

use std::fmt::Write as _;

/// Tolerance for [`compare`].
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub atol: f64,
    pub rtol: f64,
}

impl Tol {
    pub const fn new(atol: f64, rtol: f64) -> Self {
        Tol { atol, rtol }
    }
}

/// What a comparison saw, returned on success too so tests can print it.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub max_abs: f64,
    pub max_rel: f64,
    pub worst_index: usize,
}

/// Compares `got` against `want` element by element. NaN or infinity in `got` where `want` is
/// finite always fails (poisoned outputs that were never written show up this way).
pub fn compare(
    name: &str,
    got: &[impl Copy + Into<f64>],
    want: &[impl Copy + Into<f64>],
    tol: Tol,
) -> Result<Report, String> {
    let bound = |i: usize| tol.atol + tol.rtol * want[i].into().abs();
    let describe = || format!("|x-ref| <= {:e} + {:e}*|ref|", tol.atol, tol.rtol);
    compare_by(name, got, want, bound, describe)
}

/// [`compare`] with a bound of its own per element: element `i` passes when
/// `|got[i] − want[i]| ≤ bound(i)`, for bounds that come from each element's numerics (the
/// magnitudes of its terms, one ulp of its storage type) rather than from `atol + rtol·|ref|`.
/// The same NaN rule and report. A bound of infinity only measures the errors (NaN still fails).
pub fn compare_with(
    name: &str,
    got: &[impl Copy + Into<f64>],
    want: &[impl Copy + Into<f64>],
    bound: impl Fn(usize) -> f64,
) -> Result<Report, String> {
    compare_by(name, got, want, bound, || "their per-element bounds".to_string())
}

fn compare_by(
    name: &str,
    got: &[impl Copy + Into<f64>],
    want: &[impl Copy + Into<f64>],
    bound: impl Fn(usize) -> f64,
    describe: impl Fn() -> String,
) -> Result<Report, String> {
    if got.len() != want.len() {
        return Err(format!("{name}: length {} but reference has {}", got.len(), want.len()));
    }
    let mut rep = Report::default();
    let mut worst_excess = f64::NEG_INFINITY;
    let mut failures = 0usize;
    let mut first_bad: Vec<(usize, f64, f64)> = Vec::new();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w): (f64, f64) = (g.into(), w.into());
        let abs = (g - w).abs();
        let bound = bound(i);
        // `within` is false for NaN too.
        let within = abs <= bound;
        let bad = !within || (!g.is_finite() && w.is_finite());
        let rel = if w != 0.0 { abs / w.abs() } else { abs };
        let excess = if abs.is_nan() { f64::INFINITY } else { abs - bound };
        if excess > worst_excess {
            worst_excess = excess;
            rep.worst_index = i;
        }
        if abs.is_nan() || abs > rep.max_abs {
            rep.max_abs = if abs.is_nan() { f64::NAN } else { abs };
        }
        if rel > rep.max_rel {
            rep.max_rel = rel;
        }
        if bad {
            failures += 1;
            if first_bad.len() < 5 {
                first_bad.push((i, g, w));
            }
        }
    }
    if failures == 0 {
        return Ok(rep);
    }
    let worst = rep.worst_index;
    let mut msg = format!(
        "{name}: {failures} of {} elements outside {}; max abs {:e}, max rel {:e}; worst at [{worst}]: got {:e}, want {:e}, bound {:e}",
        got.len(),
        describe(),
        rep.max_abs,
        rep.max_rel,
        got[worst].into(),
        want[worst].into(),
        bound(worst),
    );
    msg.push_str("; first failures:");
    for (i, g, w) in first_bad {
        let _ = write!(msg, " [{i}] {g:e} vs {w:e};");
    }
    Err(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_within_bounds_and_reports_worst() {
        let rep = compare(
            "x",
            &[1.0f32, 2.0, 3.0],
            &[1.0f64, 2.0 + 1e-7, 3.0],
            Tol::new(1e-6, 0.0),
        )
        .unwrap();
        assert_eq!(rep.worst_index, 1);
    }

    #[test]
    fn fails_on_nan_length_and_excess() {
        assert!(compare("x", &[f32::NAN], &[0.0f64], Tol::new(1.0, 1.0)).is_err());
        assert!(compare("x", &[1.0f32], &[0.0f64, 1.0], Tol::new(1.0, 1.0)).is_err());
        let err = compare("x", &[1.0f32, 5.0], &[1.0f64, 4.0], Tol::new(0.1, 0.1)).unwrap_err();
        assert!(err.contains("worst at [1]"), "{err}");
    }

    #[test]
    fn per_element_bounds() {
        let (got, want) = ([1.0f64, 2.5, 3.0], [1.0f64, 2.0, 3.5]);
        let rep = compare_with("x", &got, &want, |i| [1.0, 0.5, 0.6][i]).unwrap();
        assert_eq!((rep.max_abs, rep.worst_index), (0.5, 1));
        let err = compare_with("x", &got, &want, |i| [1.0, 0.5, 0.4][i]).unwrap_err();
        assert!(err.contains("1 of 3") && err.contains("worst at [2]"), "{err}");
        // An infinite bound measures; NaN still fails.
        let rep = compare_with("x", &got, &want, |_| f64::INFINITY).unwrap();
        assert_eq!(rep.max_abs, 0.5);
        assert!(compare_with("x", &[f64::NAN], &[0.0f64], |_| f64::INFINITY).is_err());
    }
}
