//! Tolerances from the numerics, shared by the kernel-family tests (loss, optim, coeffs).
#![allow(dead_code)]

use lora_compose::check::compare_with;
use lora_compose::kernels::Element;

/// u for f32 (round to nearest).
pub const U32: f64 = 1.0 / (1u64 << 24) as f64;

/// Checks a low-precision (bf16) kernel output `got` against the f64 reference `want` the
/// flash-attention way: its largest error must be at most twice the largest error of the same
/// math done on the CPU in the same precision (`cpu`: f32 arithmetic on the stored inputs, the
/// result rounded to the storage type), plus `floor` (f32 noise, for outputs where the CPU's
/// rounding happens to be exact). NaN anywhere fails.
pub fn within_twice_cpu(name: &str, got: &[f64], want: &[f64], cpu: &[f64], floor: f64) -> Result<(), String> {
    let kernel_err = compare_with(name, got, want, |_| f64::INFINITY)?.max_abs;
    let cpu_err = compare_with(&format!("{name} on the CPU"), cpu, want, |_| f64::INFINITY)
        .expect("the CPU's low-precision result is finite")
        .max_abs;
    if kernel_err > 2.0 * cpu_err + floor {
        return Err(format!(
            "{name}: max error {kernel_err:.3e} exceeds twice the CPU's low-precision error {cpu_err:.3e} (+ floor {floor:.1e})"
        ));
    }
    Ok(())
}

/// A stored value widened for comparisons.
pub fn wide<T: Element>(xs: &[T]) -> Vec<f64> {
    xs.iter().map(|x| f64::from(x.to_f32())).collect()
}

/// Rounds an f32 result to storage T and widens it: what a kernel storing T returns.
pub fn stored<T: Element>(x: f32) -> f64 {
    f64::from(T::from_f32(x).to_f32())
}
