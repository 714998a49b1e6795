//! Tests of the CPU harness itself, with the kernels in `cuda/harness_selftest.cu`: each
//! feature gives the GPU's answer, and each error it promises (barrier divergence, warp
//! divergence, a missing barrier) is reported.

use super::entries::harness_selftest as e;
use super::{CpuHarness, HarnessLaunch};
use crate::kernels::{Backend, HarnessEntry, Kernel, KernelArg, KernelError, LaunchDims};

const SEEDS: [u64; 4] = [0, 1, 2, 3];

fn kernel(name: &'static str, harness_entry: HarnessEntry) -> Kernel {
    Kernel {
        family: "harness_selftest",
        name,
        harness_entry,
    }
}

fn one_block(threads: u32, dynamic_shared_bytes: u32) -> LaunchDims {
    LaunchDims {
        grid: [1, 1, 1],
        block: [threads, 1, 1],
        dynamic_shared_bytes,
    }
}

fn ptr<T>(v: &[T]) -> KernelArg {
    KernelArg::Ptr(v.as_ptr() as u64)
}

fn ptr_mut<T>(v: &mut [T]) -> KernelArg {
    KernelArg::Ptr(v.as_mut_ptr() as u64)
}

fn run(seed: u64, kernel: &Kernel, dims: LaunchDims, args: &[KernelArg]) -> Result<(), KernelError> {
    // SAFETY: every test passes buffers of one element per thread (or the documented size)
    // in the kernel's parameter order.
    unsafe { CpuHarness::new(seed).launch(kernel, &dims, args) }
}

fn input(threads: usize) -> Vec<f32> {
    (0..threads).map(|t| (t as f32 * 0.75) - 9.0).collect()
}

#[test]
fn launch_struct_matches_the_cpp_layout() {
    assert_eq!(std::mem::size_of::<HarnessLaunch>(), 40);
}

#[test]
fn warp_sum_over_full_and_partial_warps() {
    let k = kernel("selftest_warp_sum", e::lc_run_selftest_warp_sum);
    let threads = 40; // one full warp and 8 lanes of a second
    let x = input(threads);
    for seed in SEEDS {
        let mut out = vec![f32::NAN; threads];
        run(seed, &k, one_block(threads as u32, 0), &[ptr(&x), ptr_mut(&mut out)]).unwrap();
        let full: f32 = x[..32].iter().sum();
        assert!(out[..32].iter().all(|&v| v == full), "{out:?}");
        // Lanes past the partial warp hold no value: the xor partners 8..31 are absent, so
        // the harness hands back poison (NaN), which a kernel must not rely on.
        assert!(out[32..].iter().all(|v| v.is_nan()), "{out:?}");
    }
}

#[test]
fn shuffles_match_cuda_semantics() {
    let k = kernel("selftest_shuffles", e::lc_run_selftest_shuffles);
    let threads = 64;
    let x = input(threads);
    for seed in SEEDS {
        let mut out = vec![f32::NAN; 4 * threads];
        run(seed, &k, one_block(threads as u32, 0), &[ptr(&x), ptr_mut(&mut out)]).unwrap();
        for t in 0..threads {
            let (warp, lane) = (t / 32 * 32, t % 32);
            assert_eq!(out[4 * t], x[warp + (lane + 3) % 32], "shfl t={t}");
            let down = if lane + 1 < 32 { x[t + 1] } else { x[t] };
            assert_eq!(out[4 * t + 1], down, "shfl_down t={t}");
            let up = if lane >= 2 { x[t - 2] } else { x[t] };
            assert_eq!(out[4 * t + 2], up, "shfl_up t={t}");
            assert_eq!(out[4 * t + 3], x[warp + lane / 8 * 8], "shfl width 8 t={t}");
        }
    }
}

#[test]
fn votes_over_full_and_partial_warps() {
    let k = kernel("selftest_votes", e::lc_run_selftest_votes);
    let threads = 40;
    // positive on even lanes of warp 0; everywhere in the partial warp 1
    let x: Vec<f32> = (0..threads)
        .map(|t| if t >= 32 || t % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let mut votes = vec![0u32; 6];
    run(2, &k, one_block(threads as u32, 0), &[ptr(&x), ptr_mut(&mut votes)]).unwrap();
    assert_eq!(votes, vec![0x5555_5555, 1, 0, 0xff, 1, 1]);
}

#[test]
fn atomics_accumulate_every_thread() {
    let k = kernel("selftest_atomics", e::lc_run_selftest_atomics);
    let threads = 256;
    let x = vec![0.5f32; threads];
    let (mut total, mut count) = (vec![0.0f32], vec![0i32]);
    run(
        3,
        &k,
        one_block(threads as u32, 0),
        &[ptr(&x), ptr_mut(&mut total), ptr_mut(&mut count)],
    )
    .unwrap();
    assert_eq!((total[0], count[0]), (128.0, 256));
}

#[test]
fn dynamic_shared_memory_with_barrier() {
    let k = kernel("selftest_reverse", e::lc_run_selftest_reverse);
    let threads = 100;
    let x = input(threads);
    for seed in SEEDS {
        let mut out = vec![f32::NAN; threads];
        let dims = one_block(threads as u32, 4 * threads as u32);
        run(seed, &k, dims, &[ptr(&x), ptr_mut(&mut out), KernelArg::I32(1)]).unwrap();
        let reversed: Vec<f32> = x.iter().rev().copied().collect();
        assert_eq!(out, reversed);
    }
}

#[test]
fn missing_barrier_reads_poison() {
    let k = kernel("selftest_reverse", e::lc_run_selftest_reverse);
    let threads = 100;
    let x = input(threads);
    for seed in SEEDS {
        let mut out = vec![0.0f32; threads];
        let dims = one_block(threads as u32, 4 * threads as u32);
        run(seed, &k, dims, &[ptr(&x), ptr_mut(&mut out), KernelArg::I32(0)]).unwrap();
        assert!(out.iter().any(|v| v.is_nan()), "seed {seed}: the race went unnoticed");
    }
}

#[test]
fn barrier_divergence_is_an_error_not_a_hang() {
    let k = kernel("selftest_barrier_divergence", e::lc_run_selftest_barrier_divergence);
    let mut out = vec![0.0f32; 64];
    let err = run(0, &k, one_block(64, 0), &[ptr_mut(&mut out), KernelArg::I32(5)]).unwrap_err();
    assert!(err.to_string().contains("barrier divergence"), "{err}");
    // No thread exits early: fine.
    run(0, &k, one_block(64, 0), &[ptr_mut(&mut out), KernelArg::I32(0)]).unwrap();
    assert!(out.iter().all(|&v| v == 1.0));
}

#[test]
fn warp_divergence_is_an_error() {
    let k = kernel("selftest_warp_divergence", e::lc_run_selftest_warp_divergence);
    let mut out = vec![0.0f32; 32];
    let err = run(1, &k, one_block(32, 0), &[ptr_mut(&mut out)]).unwrap_err();
    assert!(err.to_string().contains("warp divergence"), "{err}");
}

#[test]
fn harness_survives_an_aborted_launch() {
    // After an error the abandoned fibers are dropped; the next launch on this thread works.
    barrier_divergence_is_an_error_not_a_hang();
    dynamic_shared_memory_with_barrier();
}

/// Checks the harness's conversions of one 16-bit type against the `half` crate (round to
/// nearest even): every 16-bit pattern to f32, and `conversion_inputs()` from f32.
fn check_conversions(
    harness_to_f32: fn(u16) -> f32,
    harness_from_f32: fn(f32) -> u16,
    crate_to_f32: fn(u16) -> f32,
    crate_from_f32: fn(f32) -> u16,
) {
    let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
    for bits in 0..=u16::MAX {
        let (got, want) = (harness_to_f32(bits), crate_to_f32(bits));
        assert!(same(got, want), "{bits:#06x}: {got} vs {want}");
    }
    for x in conversion_inputs() {
        let (got, want) = (harness_from_f32(x), crate_from_f32(x));
        assert!(
            same(crate_to_f32(got), crate_to_f32(want)),
            "{x:e}: {got:#06x} vs {want:#06x}"
        );
    }
}

#[test]
fn f16_conversions_match_round_to_nearest_even() {
    check_conversions(
        super::f16_bits_to_f32,
        super::f32_to_f16_bits,
        |bits| half::f16::from_bits(bits).to_f32(),
        |x| half::f16::from_f32(x).to_bits(),
    );
}

#[test]
fn bf16_conversions_match_round_to_nearest_even() {
    check_conversions(
        super::bf16_bits_to_f32,
        super::f32_to_bf16_bits,
        |bits| half::bf16::from_bits(bits).to_f32(),
        |x| half::bf16::from_f32(x).to_bits(),
    );
}

/// Specials, ties at every f16/bf16 boundary, and a sweep of f32 bit patterns.
fn conversion_inputs() -> Vec<f32> {
    let mut inputs = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        65504.0,
        65519.99,
        65520.0,
        5.960_464_5e-8, // 2^-24, smallest f16 subnormal
        2.980_232_2e-8, // 2^-25, tie between 0 and it
        2.980_232_4e-8, // just above the tie
        6.103_515_6e-5, // 2^-14, smallest f16 normal
        f32::MIN_POSITIVE,
        f32::MAX,
    ];
    inputs.extend((0..=u32::MAX).step_by(65_537).map(f32::from_bits));
    // exact ties: an f16 mantissa plus half an f16 ulp, and the bf16 equivalent
    inputs.extend((0u32..4096).map(|i| f32::from_bits(0x3f80_0000 + (i << 13) + 0x1000)));
    inputs.extend((0u32..4096).map(|i| f32::from_bits(0x3f80_0000 + (i << 16) + 0x8000)));
    inputs
}
