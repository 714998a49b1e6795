//! Tests of the CPU harness itself, with the kernels in `cuda/harness_selftest.cu`: each
//! feature gives the GPU's answer, and each error it promises (races within and between blocks,
//! lost atomics, out-of-bounds and uninitialised accesses, writes to inputs, barrier and warp
//! divergence, bad warp masks) is reported, naming the kernel, the buffer and the threads.

use super::entries::harness_selftest as e;
use super::{CpuHarness, HarnessLaunch, HostBuffer};
use crate::launch::{Backend, HarnessEntry, Kernel, KernelArg, KernelError, LaunchDims, Scalar};

const SEEDS: [u64; 4] = [0, 1, 2, 3];

/// The selftest kernel `$name` (its harness entry `lc_run_$name`).
macro_rules! k {
    ($name:ident) => {
        paste_kernel(stringify!($name), e::$name)
    };
}

fn paste_kernel(symbol: &'static str, harness_entry: HarnessEntry) -> Kernel {
    Kernel {
        family: "harness_selftest",
        name: &symbol["lc_run_".len()..],
        harness_entry,
        cooperative: false,
    }
}

fn grid(blocks: u32, threads: u32, dynamic_shared_bytes: u32) -> LaunchDims {
    LaunchDims {
        grid: [blocks, 1, 1],
        block: [threads, 1, 1],
        dynamic_shared_bytes,
    }
}

fn one_block(threads: u32, dynamic_shared_bytes: u32) -> LaunchDims {
    grid(1, threads, dynamic_shared_bytes)
}

fn buf<T: Scalar>(v: &[T]) -> HostBuffer<T> {
    HostBuffer::from_slice(v).unwrap()
}

fn arg<T: Scalar>(b: &HostBuffer<T>) -> KernelArg {
    CpuHarness::default().arg_in(b)
}

fn i32_arg(v: i32) -> KernelArg {
    KernelArg::I32(v)
}

fn run(seed: u64, kernel: &Kernel, dims: LaunchDims, args: &[KernelArg]) -> Result<(), KernelError> {
    // SAFETY: every test passes harness buffers of the size its kernel's comment states, in the
    // kernel's parameter order (the harness itself refuses any other pointer).
    unsafe { CpuHarness::new(seed).launch(kernel, &dims, args) }
}

/// The error of a launch that must fail, checked to contain every one of `words`.
fn fails(result: Result<(), KernelError>, words: &[&str]) -> String {
    let message = result.expect_err("the harness must report this launch").to_string();
    for w in words {
        assert!(message.contains(w), "missing {w:?} in: {message}");
    }
    message
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
    let k = k!(lc_run_selftest_warp_sum);
    let threads = 40; // one full warp and 8 lanes of a second
    let x = buf(&input(threads));
    for seed in SEEDS {
        let out = buf(&vec![f32::NAN; threads]);
        run(seed, &k, one_block(threads as u32, 0), &[arg(&x), arg(&out)]).unwrap();
        let out = out.as_slice();
        let full: f32 = x.as_slice()[..32].iter().sum();
        assert!(out[..32].iter().all(|&v| v == full), "{out:?}");
        // Lanes past the partial warp hold no value: the xor partners 8..31 are absent, so
        // the harness hands back poison (NaN), which a kernel must not rely on.
        assert!(out[32..].iter().all(|v| v.is_nan()), "{out:?}");
    }
}

#[test]
fn shuffles_match_cuda_semantics() {
    let k = k!(lc_run_selftest_shuffles);
    let threads = 64;
    let xs = input(threads);
    let x = buf(&xs);
    for seed in SEEDS {
        let out = buf(&vec![f32::NAN; 4 * threads]);
        run(seed, &k, one_block(threads as u32, 0), &[arg(&x), arg(&out)]).unwrap();
        let out = out.as_slice();
        for t in 0..threads {
            let (warp, lane) = (t / 32 * 32, t % 32);
            assert_eq!(out[4 * t], xs[warp + (lane + 3) % 32], "shfl t={t}");
            let down = if lane + 1 < 32 { xs[t + 1] } else { xs[t] };
            assert_eq!(out[4 * t + 1], down, "shfl_down t={t}");
            let up = if lane >= 2 { xs[t - 2] } else { xs[t] };
            assert_eq!(out[4 * t + 2], up, "shfl_up t={t}");
            assert_eq!(out[4 * t + 3], xs[warp + lane / 8 * 8], "shfl width 8 t={t}");
        }
    }
}

#[test]
fn votes_over_full_and_partial_warps() {
    let k = k!(lc_run_selftest_votes);
    let threads = 40;
    // positive on even lanes of warp 0; everywhere in the partial warp 1
    let x: Vec<f32> = (0..threads)
        .map(|t| if t >= 32 || t % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let (x, votes) = (buf(&x), buf(&[0u32; 6]));
    run(2, &k, one_block(threads as u32, 0), &[arg(&x), arg(&votes)]).unwrap();
    assert_eq!(votes.as_slice(), [0x5555_5555, 1, 0, 0xff, 1, 1]);
}

#[test]
fn partial_masks_shuffle_and_vote_within_their_lanes() {
    let k = k!(lc_run_selftest_half_warps);
    let threads = 64;
    let xs: Vec<f32> = (0..threads)
        .map(|t| if t % 3 == 0 { 1.0 + t as f32 } else { -1.0 })
        .collect();
    let x = buf(&xs);
    for seed in SEEDS {
        let out = buf(&vec![f32::NAN; 2 * threads]);
        run(seed, &k, one_block(threads as u32, 0), &[arg(&x), arg(&out)]).unwrap();
        let out = out.as_slice();
        for t in 0..threads {
            let (warp, lane) = (t / 32 * 32, t % 32);
            let base = if lane < 16 { 0 } else { 16 };
            assert_eq!(out[2 * t], xs[warp + base + (lane - base + 1) % 16], "shfl t={t}");
            let ballot: u32 = (0..32)
                .filter(|&l| (l < 16) == (lane < 16) && xs[warp + l] > 0.0)
                .map(|l| 1u32 << l)
                .sum();
            assert_eq!(out[2 * t + 1], ballot as f32, "ballot t={t}");
        }
    }
}

#[test]
fn bad_warp_masks_are_errors() {
    let k = k!(lc_run_selftest_bad_masks);
    let out = buf(&[0.0f32; 32]);
    fails(
        run(0, &k, one_block(32, 0), &[arg(&out), i32_arg(0)]),
        &["selftest_bad_masks", "thread (5,0,0)", "excludes its own lane"],
    );
    fails(
        run(3, &k, one_block(32, 0), &[arg(&out), i32_arg(1)]),
        &["warp divergence", "another mask"],
    );
}

/// Atomics are atomic and recorded as such: every increment lands and no race is reported,
/// within a block and across blocks; the same increments done with `+=` are reported.
#[test]
fn atomic_increments_land_and_plain_ones_are_races() {
    let k = k!(lc_run_selftest_increments);
    for (blocks, threads) in [(1, 256), (3, 64), (5, 1)] {
        for seed in SEEDS {
            let count = buf(&[0i32]);
            run(seed, &k, grid(blocks, threads, 0), &[arg(&count), i32_arg(1)]).unwrap();
            assert_eq!(count.as_slice()[0], (blocks * threads) as i32);
            let count = buf(&[0i32]);
            let across = if threads == 1 {
                "no release/acquire orders them"
            } else {
                "data race"
            };
            fails(
                run(seed, &k, grid(blocks, threads, 0), &[arg(&count), i32_arg(0)]),
                &["selftest_increments", "data race on `count`[0]", across],
            );
        }
    }
}

#[test]
fn float_atomic_add_sums_every_thread() {
    let k = k!(lc_run_selftest_atomics);
    let threads = 256;
    let x = buf(&vec![0.5f32; threads]);
    let (total, count) = (buf(&[0.0f32]), buf(&[0i32]));
    run(
        3,
        &k,
        one_block(threads as u32, 0),
        &[arg(&x), arg(&total), arg(&count)],
    )
    .unwrap();
    assert_eq!((total.as_slice()[0], count.as_slice()[0]), (128.0, 256));
}

#[test]
fn atomic_max_min_exch_cas() {
    let k = k!(lc_run_selftest_atomic_ops);
    let threads = 96;
    for seed in SEEDS {
        let (ops, claims) = (buf(&[-1i32, 1000, -1, -1]), buf(&[0i32]));
        run(seed, &k, one_block(threads, 0), &[arg(&ops), arg(&claims)]).unwrap();
        let ops = ops.as_slice();
        assert_eq!((ops[0], ops[1]), (threads as i32 - 1, 0));
        assert!((0..threads as i32).contains(&ops[2]));
        // exactly one CAS won, and it was the thread now stored
        assert_eq!(claims.as_slice()[0], ops[3] + 1);
    }
}

#[test]
fn dynamic_shared_memory_with_barrier() {
    let k = k!(lc_run_selftest_reverse);
    let threads = 100;
    let xs = input(threads);
    let x = buf(&xs);
    for seed in SEEDS {
        let out = buf(&vec![f32::NAN; threads]);
        let dims = one_block(threads as u32, 4 * threads as u32);
        run(seed, &k, dims, &[arg(&x), arg(&out), i32_arg(1)]).unwrap();
        let reversed: Vec<f32> = xs.iter().rev().copied().collect();
        assert_eq!(out.as_slice(), reversed);
    }
}

/// A removed barrier between a shared-memory write and another thread's read is a race in
/// every thread order (not only in the orders that happen to read poison).
#[test]
fn missing_barrier_is_a_race() {
    let k = k!(lc_run_selftest_reverse);
    let threads = 100;
    let x = buf(&input(threads));
    for seed in SEEDS {
        let out = buf(&vec![0.0f32; threads]);
        let dims = one_block(threads as u32, 4 * threads as u32);
        let message = fails(
            run(seed, &k, dims, &[arg(&x), arg(&out), i32_arg(0)]),
            &["data race on dynamic shared memory", "no __syncthreads"],
        );
        assert!(message.contains("write by") || message.contains("read by"), "{message}");
    }
    // Dynamic shared memory past the launched size.
    let out = buf(&vec![0.0f32; threads]);
    fails(
        run(
            0,
            &k,
            one_block(threads as u32, 4 * threads as u32 - 4),
            &[arg(&x), arg(&out), i32_arg(1)],
        ),
        &["out-of-bounds shared-memory write", "launched with 396 bytes"],
    );
}

#[test]
fn warp_synchronous_handoff_needs_syncwarp() {
    let k = k!(lc_run_selftest_warp_handoff);
    for seed in SEEDS {
        let out = buf(&[f32::NAN; 2]);
        run(seed, &k, one_block(64, 0), &[arg(&out), i32_arg(1), i32_arg(0)]).unwrap();
        assert_eq!(out.as_slice(), [0.0, 1.0]);
        // Without __syncwarp the same lanes race, whichever runs first.
        fails(
            run(seed, &k, one_block(64, 0), &[arg(&out), i32_arg(0), i32_arg(0)]),
            &["data race on shared `flag`"],
        );
        // __syncwarp does not order lanes of different warps.
        fails(
            run(seed, &k, one_block(64, 0), &[arg(&out), i32_arg(1), i32_arg(1)]),
            &["data race on shared `flag`"],
        );
    }
    // Who and why, in the forward order.
    let out = buf(&[f32::NAN; 2]);
    fails(
        run(0, &k, one_block(64, 0), &[arg(&out), i32_arg(0), i32_arg(0)]),
        &[
            "data race on shared `flag`[0]",
            "thread (0,0,0)",
            "thread (1,0,0)",
            "_sync intrinsic",
        ],
    );
    fails(
        run(0, &k, one_block(64, 0), &[arg(&out), i32_arg(1), i32_arg(1)]),
        &[
            "data race on shared `flag`[1]",
            "write by thread (32,0,0)",
            "read by thread (1,0,0)",
            "no __syncthreads orders them",
        ],
    );
}

#[test]
fn a_block_writing_its_neighbours_tile_is_a_race() {
    let k = k!(lc_run_selftest_block_tiles);
    for seed in SEEDS {
        let out = buf(&vec![f32::NAN; 4 * 32]);
        run(seed, &k, grid(4, 32, 0), &[arg(&out), i32_arg(0)]).unwrap();
        fails(
            run(seed, &k, grid(4, 32, 0), &[arg(&out), i32_arg(1)]),
            &["data race on `out`[", "no release/acquire orders them"],
        );
    }
}

#[test]
fn shared_array_overrun_is_caught() {
    let k = k!(lc_run_selftest_shared_past_end);
    let x = buf(&input(64));
    let out = buf(&[0.0f32; 64]);
    run(2, &k, one_block(64, 0), &[arg(&x), arg(&out), i32_arg(0)]).unwrap();
    assert_eq!(out.as_slice(), x.as_slice());
    fails(
        run(2, &k, one_block(64, 0), &[arg(&x), arg(&out), i32_arg(1)]),
        &[
            "out-of-bounds shared-memory write of 4 bytes",
            "shared `tile`[64] (256 bytes)",
        ],
    );
}

#[test]
fn global_overrun_is_caught_whatever_the_distance() {
    let k = k!(lc_run_selftest_copy);
    let n = 100;
    let x = buf(&input(n));
    let out = buf(&vec![f32::NAN; n]);
    run(
        0,
        &k,
        grid(4, 32, 0),
        &[arg(&x), arg(&out), i32_arg(n as i32), i32_arg(0)],
    )
    .unwrap();
    assert_eq!(out.as_slice(), x.as_slice());
    fails(
        run(
            0,
            &k,
            grid(4, 32, 0),
            &[arg(&x), arg(&out), i32_arg(n as i32), i32_arg(1)],
        ),
        &[
            "out-of-bounds write of 4 bytes",
            "`out`[100] (400-byte buffer): past the end",
        ],
    );
    // Far past the end: no guard zone would cover it.
    let small = buf(&[f32::NAN; 4]);
    fails(
        run(
            1,
            &k,
            grid(4, 32, 0),
            &[arg(&x), arg(&small), i32_arg(n as i32), i32_arg(0)],
        ),
        &["out-of-bounds write", "`out`["],
    );
}

#[test]
fn writes_to_inputs_are_caught() {
    let k = k!(lc_run_selftest_write_input);
    let (x, out) = (buf(&input(32)), buf(&[0.0f32; 32]));
    fails(
        run(0, &k, one_block(32, 0), &[arg(&x), arg(&out)]),
        &["write of 4 bytes at `in`[0]", "only through pointers to const"],
    );
}

#[test]
fn uninitialised_device_memory_reads_are_caught() {
    let k = k!(lc_run_selftest_workspace);
    let harness = CpuHarness::default();
    let out = buf(&[0.0f32; 64]);
    // The kernel fills its workspace first: fine, and the workspace counts as written after.
    let workspace: HostBuffer<f32> = harness.alloc(64).unwrap();
    assert!(!workspace.is_written());
    run(0, &k, grid(2, 32, 0), &[arg(&workspace), arg(&out), i32_arg(1)]).unwrap();
    assert!(workspace.is_written());
    assert_eq!(out.as_slice()[63], 64.0);
    // A workspace the host did not fill and the kernel reads first.
    let workspace: HostBuffer<f32> = harness.alloc(64).unwrap();
    fails(
        run(0, &k, grid(2, 32, 0), &[arg(&workspace), arg(&out), i32_arg(0)]),
        &[
            "uninitialised read of 4 bytes at `workspace`[",
            "neither the host nor a kernel",
        ],
    );
    // A read of shared memory nobody wrote, with no write racing it.
    let k = k!(lc_run_selftest_shared_unwritten);
    run(1, &k, one_block(32, 0), &[arg(&out)]).unwrap();
    fails(
        run(1, &k, one_block(64, 0), &[arg(&out)]),
        &[
            "uninitialised shared-memory read",
            "shared `tile`[",
            "no thread of this block has written it",
        ],
    );
}

/// `prefetch.global.L2` records no access (prefetching an element another thread writes is no
/// race, and an unwritten one no uninitialised read), but an address no buffer of the launch
/// holds is reported (a GPU would ignore it: wrong address arithmetic, as a tile's rows past M).
#[test]
fn prefetches_access_nothing_but_must_point_into_a_buffer() {
    let k = k!(lc_run_selftest_prefetch);
    let n = 96;
    let x = buf(&input(n));
    let out = buf(&vec![f32::NAN; n]);
    run(
        0,
        &k,
        one_block(128, 0),
        &[arg(&x), arg(&out), i32_arg(n as i32), i32_arg(0)],
    )
    .unwrap();
    assert_eq!(out.as_slice(), x.as_slice());
    fails(
        run(
            0,
            &k,
            one_block(128, 0),
            &[arg(&x), arg(&out), i32_arg(n as i32), i32_arg(1)],
        ),
        &[
            "prefetch.global.L2 by thread (0,0,0)",
            "no buffer of the launch holds the address",
        ],
    );
}

#[test]
fn pointers_that_are_not_harness_buffers_are_refused() {
    let k = k!(lc_run_selftest_copy);
    let host = [0.0f32; 8];
    let out = buf(&[0.0f32; 8]);
    fails(
        run(
            0,
            &k,
            one_block(8, 0),
            &[KernelArg::Ptr(host.as_ptr() as u64), arg(&out), i32_arg(8), i32_arg(0)],
        ),
        &["`in` is not a harness buffer"],
    );
}

#[test]
fn barrier_divergence_is_an_error_not_a_hang() {
    let k = k!(lc_run_selftest_barrier_divergence);
    let out = buf(&[0.0f32; 64]);
    fails(
        run(0, &k, one_block(64, 0), &[arg(&out), i32_arg(5)]),
        &["barrier divergence"],
    );
    // No thread exits early: fine.
    run(0, &k, one_block(64, 0), &[arg(&out), i32_arg(0)]).unwrap();
    assert!(out.as_slice().iter().all(|&v| v == 1.0));
}

#[test]
fn divergent_barriers_are_an_error() {
    let k = k!(lc_run_selftest_divergent_barriers);
    let out = buf(&[0.0f32; 32]);
    fails(
        run(1, &k, one_block(32, 0), &[arg(&out)]),
        &["divergent barrier", "harness_selftest.cu:"],
    );
}

#[test]
fn warp_divergence_is_an_error() {
    let k = k!(lc_run_selftest_warp_divergence);
    let out = buf(&[0.0f32; 32]);
    fails(run(1, &k, one_block(32, 0), &[arg(&out)]), &["warp divergence"]);
}

#[test]
fn harness_survives_an_aborted_launch() {
    // After an error the abandoned fibers are dropped; the next launch on this thread works.
    barrier_divergence_is_an_error_not_a_hang();
    atomic_increments_land_and_plain_ones_are_races();
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

mod tensorcore;
mod wgmma;

/// The selftest kernel `selftest_grid_sync`, launched cooperatively or (`cooperative` false) not.
fn grid_sync_kernel(cooperative: bool) -> Kernel {
    Kernel {
        cooperative,
        ..k!(lc_run_selftest_grid_sync)
    }
}

/// `selftest_grid_sync`'s out for `blocks` × `n` threads and `rounds` rounds of `x`.
fn grid_sync_want(x: &[f32], blocks: usize, n: usize, rounds: usize) -> Vec<f32> {
    let mut want = vec![0.0f32; blocks * n];
    for (i, w) in want.iter_mut().enumerate() {
        let (b, t) = (i / n, i % n);
        for r in 0..rounds {
            let at = |block: usize, thread: usize| x[(r * blocks + block) * n + thread];
            for o in 0..blocks {
                *w += at(o, (t + 1) % n);
            }
            *w += at(b, (t + 1) % n) + 2.0 * at(b, (t + 2) % n);
        }
    }
    want
}

#[test]
fn grid_barriers_order_blocks_and_keep_their_state() {
    // Blocks set aside at each barrier keep their locals (stacks), static and dynamic shared
    // memory; what other blocks wrote before a barrier is read after it without a race.
    let k = grid_sync_kernel(true);
    for (blocks, n, rounds) in [(5usize, 64usize, 3usize), (2, 200, 2), (8, 32, 1), (1, 96, 2)] {
        let x = input(rounds * blocks * n);
        let x_buf = buf(&x);
        for seed in SEEDS {
            let (partial, out) = (buf(&vec![f32::NAN; blocks * n]), buf(&vec![f32::NAN; blocks * n]));
            let dims = grid(blocks as u32, n as u32, 4 * n as u32);
            let args = [
                arg(&x_buf),
                arg(&partial),
                arg(&out),
                i32_arg(rounds as i32),
                i32_arg(0),
            ];
            run(seed, &k, dims, &args).unwrap_or_else(|e| panic!("{blocks}×{n}, seed {seed}: {e}"));
            let want = grid_sync_want(&x, blocks, n, rounds);
            for (i, (&got, &want)) in out.as_slice().iter().zip(&want).enumerate() {
                // The same f32 sums in the same order.
                assert_eq!(got, want, "{blocks}×{n}, seed {seed}: out[{i}]");
            }
        }
    }
}

#[test]
fn missing_grid_barriers_and_divergence_are_reported() {
    let k = grid_sync_kernel(true);
    let (blocks, n) = (4usize, 64usize);
    let x = buf(&input(2 * blocks * n));
    let launch = |seed: u64, kernel: &Kernel, mode: i32| {
        let (partial, out) = (buf(&vec![0.0f32; blocks * n]), buf(&vec![0.0f32; blocks * n]));
        let args = [arg(&x), arg(&partial), arg(&out), i32_arg(2), i32_arg(mode)];
        run(seed, kernel, grid(blocks as u32, n as u32, 4 * n as u32), &args)
    };
    for seed in SEEDS {
        fails(
            launch(seed, &k, 1),
            &[
                "selftest_grid_sync",
                "data race on `partial`[",
                "no grid barrier or release/acquire orders them",
            ],
        );
        fails(
            launch(seed, &k, 2),
            &[
                "selftest_grid_sync",
                "data race on `partial`[",
                "no grid barrier or release/acquire orders them",
            ],
        );
        fails(
            launch(seed, &k, 3),
            &["grid barrier divergence", "block (1,0,0) has exited", "every block"],
        );
        fails(
            launch(seed, &k, 4),
            &["grid barrier divergence", "thread (0,0,0) has exited", "every thread"],
        );
        // Launched as an ordinary kernel, its blocks need not be co-resident on a GPU.
        fails(
            launch(seed, &grid_sync_kernel(false), 0),
            &["grid barrier at", "not cooperative"],
        );
    }
    // The harness sets aside at most 64 blocks.
    let x = buf(&input(65 * 32));
    let (partial, out) = (buf(&vec![0.0f32; 65 * 32]), buf(&vec![0.0f32; 65 * 32]));
    let args = [arg(&x), arg(&partial), arg(&out), i32_arg(1), i32_arg(0)];
    fails(
        run(0, &k, grid(65, 32, 128), &args),
        &["cooperative launch of 65 blocks", "at most 64"],
    );
}

/// `selftest_last_block` over `blocks` × `n` threads: the last block to draw a ticket sums the
/// blocks' partials, ordered by the release (`__threadfence`, atomic) and acquire (atomic,
/// `__threadfence`) between blocks; each broken step is reported.
fn last_block(seed: u64, x: &HostBuffer<f32>, blocks: usize, n: usize, mode: i32) -> Result<(f32, u32), KernelError> {
    let k = k!(lc_run_selftest_last_block);
    let partial = HostBuffer::<f32>::from_slice(&vec![f32::NAN; blocks]).unwrap();
    let (ticket, total) = (buf(&[0u32]), buf(&[f32::NAN]));
    let args = [arg(x), arg(&partial), arg(&ticket), arg(&total), i32_arg(mode)];
    run(seed, &k, grid(blocks as u32, n as u32, 0), &args)?;
    Ok((total.as_slice()[0], ticket.as_slice()[0]))
}

#[test]
fn the_last_block_acquires_what_the_others_released() {
    for (blocks, n) in [(5usize, 64usize), (9, 33), (2, 256), (1, 32), (3, 1)] {
        let x = input(blocks * n);
        let x_buf = buf(&x);
        // The partials in block order, each a sum over its block's elements in thread order.
        let want = (0..blocks)
            .map(|b| x[b * n..(b + 1) * n].iter().fold(0.0f32, |s, &v| s + v))
            .fold(0.0f32, |s, p| s + p);
        for seed in SEEDS {
            let (total, ticket) =
                last_block(seed, &x_buf, blocks, n, 0).unwrap_or_else(|e| panic!("{blocks}×{n}, seed {seed}: {e}"));
            assert_eq!(total, want, "{blocks}×{n}, seed {seed}");
            assert_eq!(ticket, 0, "the last block resets the ticket");
        }
    }
    let (blocks, n) = (4usize, 64usize);
    let x = buf(&input(blocks * n));
    for seed in SEEDS {
        let race = [
            "selftest_last_block",
            "data race on `partial`[",
            "no release/acquire orders them",
        ];
        // No release fence; no acquire fence; the partial written after the fence.
        for mode in [1, 2, 3] {
            fails(last_block(seed, &x, blocks, n, mode).map(drop), &race);
        }
    }
}

/// `Backend::tickets` on the harness checks, at every call, that the launches since the last one
/// left each ticket zero (a kernel whose last block did not reset its tile's ticket).
#[test]
fn tickets_left_drawn_are_reported() {
    let h = CpuHarness::new(0);
    let KernelArg::Ptr(pool) = h.tickets(16).unwrap() else {
        panic!("the tickets are a pointer")
    };
    assert!(h.tickets(16).is_ok());
    let ticket = (pool as *mut u32).wrapping_add(3);
    // SAFETY: the pool is this thread's live harness allocation of at least 16 u32.
    unsafe { ticket.write(2) };
    let e = h.tickets(16).unwrap_err().to_string();
    assert!(e.contains("ticket 3 is 2") && e.contains("last_split"), "{e}");
    // SAFETY: as above.
    unsafe { ticket.write(0) };
    assert!(h.tickets(16).is_ok());
}
