//! The harness's tensor-core and async-copy emulations (`lc::mma_m16n8k16`, `lc::ldmatrix`,
//! `lc::cp_async*` in `cuda/common.cuh`) against a second, independent statement of their
//! layouts: CUTLASS/CuTe's MMA and copy traits (`cute/atom/mma_traits_sm80.hpp`,
//! `cute/atom/copy_traits_sm75.hpp`), written here as data. The harness's own maps come from
//! the PTX ISA's fragment tables (`cuda/harness/runtime.cpp`, `memcheck.cpp`); a kernel that
//! disagrees with either gives wrong numbers here.
//!
//! A CuTe thread-value layout maps (thread, value) to an index of the tile: each of the two
//! modes is a list of (extent, stride) sub-modes, the first varying fastest; the index is
//! Σ coordinate·stride. For MMA the tile index is column-major: (M, K) → m + M·k. For the
//! ldmatrix copies the index is a bit of the 32 source rows of 128 bits, source thread t
//! providing bits [128 t, 128 t + 128). A fragment's value v is register v / 2, half v % 2
//! (16-bit elements, the lower value in the low half), as CuTe's atoms pack them.

use super::*;

struct TvLayout {
    thread: &'static [(usize, usize)],
    value: &'static [(usize, usize)],
}

pub(super) fn mode_index(modes: &[(usize, usize)], mut coordinate: usize) -> usize {
    let mut index = 0;
    for &(extent, stride) in modes {
        index += (coordinate % extent) * stride;
        coordinate /= extent;
    }
    assert_eq!(coordinate, 0, "coordinate past the mode's size");
    index
}

impl TvLayout {
    fn at(&self, thread: usize, value: usize) -> usize {
        mode_index(self.thread, thread) + mode_index(self.value, value)
    }
    fn values(&self) -> usize {
        self.value.iter().map(|&(e, _)| e).product()
    }
}

// MMA_Traits<SM80_16x8x16_F16F16F16F16_TN>, inherited by SM80_16x8x16_F32F16F16F32_TN and
// SM80_16x8x16_F32BF16BF16F32_TN.
/// ALayout: (T32, V8) → (M16, K16).
const MMA_A: TvLayout = TvLayout {
    thread: &[(4, 32), (8, 1)],
    value: &[(2, 16), (2, 8), (2, 128)],
};
/// BLayout: (T32, V4) → (N8, K16).
const MMA_B: TvLayout = TvLayout {
    thread: &[(4, 16), (8, 1)],
    value: &[(2, 8), (2, 64)],
};
/// CLayout = SM80_16x8_Row: (T32, V4) → (M16, N8).
const MMA_C: TvLayout = TvLayout {
    thread: &[(4, 32), (8, 1)],
    value: &[(2, 16), (2, 8)],
};

/// Copy_Traits<SM75_U32x{1,2,4}_LDSM_N>::DstLayout and Copy_Traits<SM75_U16x{2,4,8}_LDSM_T>::
/// DstLayout, (thread, value bit) → source bit, by matrix count.
fn ldsm_dst(count: usize, trans: bool) -> TvLayout {
    match (count, trans) {
        (1, false) => TvLayout {
            thread: &[(32, 32)],
            value: &[(32, 1)],
        },
        (2, false) => TvLayout {
            thread: &[(32, 32)],
            value: &[(32, 1), (2, 1024)],
        },
        (4, false) => TvLayout {
            thread: &[(32, 32)],
            value: &[(32, 1), (4, 1024)],
        },
        (1, true) => TvLayout {
            thread: &[(4, 256), (8, 16)],
            value: &[(16, 1), (2, 128)],
        },
        (2, true) => TvLayout {
            thread: &[(4, 256), (8, 16)],
            value: &[(16, 1), (2, 128), (2, 1024)],
        },
        (4, true) => TvLayout {
            thread: &[(4, 256), (8, 16)],
            value: &[(16, 1), (2, 128), (4, 1024)],
        },
        _ => unreachable!("ldmatrix .x1, .x2, .x4"),
    }
}

/// Each layout must be a bijection onto its tile: every index hit exactly once.
fn assert_bijective(layout: &TvLayout, threads: usize, size: usize) {
    let mut hit = vec![0u32; size];
    for t in 0..threads {
        for v in 0..layout.values() {
            hit[layout.at(t, v)] += 1;
        }
    }
    assert!(hit.iter().all(|&h| h == 1), "not a bijection: {hit:?}");
}

#[test]
fn cute_layouts_as_written_are_bijections() {
    assert_bijective(&MMA_A, 32, 16 * 16);
    assert_bijective(&MMA_B, 32, 8 * 16);
    assert_bijective(&MMA_C, 32, 16 * 8);
    for count in [1, 2, 4] {
        for trans in [false, true] {
            assert_bijective(&ldsm_dst(count, trans), 32, 32 * 32 * count);
        }
    }
}

/// Packs 16-bit elements into per-lane registers: `element(index)` for value v of thread t at
/// `layout.at(t, v)`, in register v / 2, half v % 2.
fn pack(layout: &TvLayout, regs_per_lane: usize, element: impl Fn(usize) -> u16) -> Vec<u32> {
    let mut regs = vec![0u32; 32 * regs_per_lane];
    for t in 0..32 {
        for v in 0..layout.values() {
            regs[t * regs_per_lane + v / 2] |= u32::from(element(layout.at(t, v))) << (16 * (v % 2));
        }
    }
    regs
}

/// D = A·B + C on one warp through the harness, fragments placed by CuTe's layouts, against f64.
fn check_mma(kernel: Kernel, to_bits: fn(f32) -> u16, from_bits: fn(u16) -> f32) {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut random = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    // Rounded to the input type first, so the f64 reference multiplies exactly what the kernel does.
    let a: Vec<f32> = (0..16 * 16).map(|_| from_bits(to_bits(random()))).collect(); // (M16, K16) row-major
    let b: Vec<f32> = (0..16 * 8).map(|_| from_bits(to_bits(random()))).collect(); // (K16, N8) row-major
    let c: Vec<f32> = (0..16 * 8).map(|_| random()).collect(); // (M16, N8) row-major
    let a_regs = pack(&MMA_A, 4, |i| to_bits(a[(i % 16) * 16 + i / 16]));
    let b_regs = pack(&MMA_B, 2, |i| to_bits(b[(i / 8) * 8 + i % 8]));
    let mut c_frag = vec![0f32; 32 * 4];
    for t in 0..32 {
        for v in 0..4 {
            let i = MMA_C.at(t, v);
            c_frag[t * 4 + v] = c[(i % 16) * 8 + i / 16];
        }
    }
    for seed in SEEDS {
        let (ab, bb, cb) = (buf(&a_regs), buf(&b_regs), buf(&c_frag));
        let d = buf(&[f32::NAN; 32 * 4]);
        run(
            seed,
            &kernel,
            one_block(32, 0),
            &[arg(&ab), arg(&bb), arg(&cb), arg(&d)],
        )
        .unwrap();
        for t in 0..32 {
            for v in 0..4 {
                let i = MMA_C.at(t, v);
                let (m, n) = (i % 16, i / 16);
                let dot: f64 = (0..16)
                    .map(|k| f64::from(a[m * 16 + k]) * f64::from(b[k * 8 + n]))
                    .sum();
                let magnitude: f64 = (0..16)
                    .map(|k| f64::from((a[m * 16 + k] * b[k * 8 + n]).abs()))
                    .sum::<f64>()
                    + f64::from(c[m * 8 + n].abs());
                let want = dot + f64::from(c[m * 8 + n]);
                let got = f64::from(d.as_slice()[t * 4 + v]);
                // 16 exact products and C summed in f32: at most 17 roundings of the magnitude.
                let bound = 17.0 * magnitude / (1u64 << 24) as f64;
                assert!(
                    (got - want).abs() <= bound,
                    "{}: lane {t} value {v} = D[{m}][{n}]: got {got}, want {want} (±{bound:.1e})",
                    kernel.name
                );
            }
        }
    }
}

#[test]
fn mma_bf16_fragments_follow_cute_sm80_16x8x16() {
    check_mma(
        k!(lc_run_selftest_mma_bf16),
        |x| half::bf16::from_f32(x).to_bits(),
        |b| half::bf16::from_bits(b).to_f32(),
    );
}

#[test]
fn mma_f16_fragments_follow_cute_sm80_16x8x16() {
    check_mma(
        k!(lc_run_selftest_mma_f16),
        |x| half::f16::from_f32(x).to_bits(),
        |b| half::f16::from_bits(b).to_f32(),
    );
}

/// Lane l passes the address of staged row `source_row[l]`: a permutation, so a row taken from
/// the wrong lane shows.
fn source_rows() -> Vec<i32> {
    (0..32).map(|l| (l * 5 + 3) % 32).collect()
}

fn ldmatrix_args(
    rows: &HostBuffer<u16>,
    source: &HostBuffer<i32>,
    out: &HostBuffer<u32>,
    count: i32,
    trans: bool,
    mode: i32,
) -> Vec<KernelArg> {
    vec![
        arg(rows),
        arg(source),
        arg(out),
        i32_arg(count),
        i32_arg(trans as i32),
        i32_arg(mode),
    ]
}

#[test]
fn ldmatrix_follows_cute_sm75_ldsm_traits() {
    let k = k!(lc_run_selftest_ldmatrix);
    let staged: Vec<u16> = (0..32 * 8).map(|i| 1000 + i as u16).collect(); // (row, col) → 1000 + 8 row + col
    let source = source_rows();
    let (rows, src) = (buf(&staged), buf(&source));
    for count in [1usize, 2, 4] {
        for trans in [false, true] {
            let dst = ldsm_dst(count, trans);
            for seed in SEEDS {
                let out = buf(&[0u32; 32 * 4]);
                run(
                    seed,
                    &k,
                    one_block(64, 0),
                    &ldmatrix_args(&rows, &src, &out, count as i32, trans, 0),
                )
                .unwrap();
                for t in 0..32 {
                    for reg in 0..count {
                        for half in 0..2 {
                            // Source bit of this 16-bit element: thread bit / 128 supplied the row.
                            let bit = dst.at(t, 32 * reg + 16 * half);
                            let (thread, col) = (bit / 128, (bit % 128) / 16);
                            let want = staged[source[thread] as usize * 8 + col];
                            let got = (out.as_slice()[t * 4 + reg] >> (16 * half)) as u16;
                            assert_eq!(got, want, "x{count} trans={trans}: lane {t} register {reg} half {half}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn ldmatrix_misuse_is_reported() {
    let k = k!(lc_run_selftest_ldmatrix);
    let staged: Vec<u16> = (0..32 * 8).map(|i| i as u16).collect();
    let (rows, src) = (buf(&staged), buf(&source_rows()));
    let out = buf(&[0u32; 32 * 4]);
    for seed in SEEDS {
        // Warp 1 stages the rows, warp 0 loads them: without the barrier, a race.
        fails(
            run(
                seed,
                &k,
                one_block(64, 0),
                &ldmatrix_args(&rows, &src, &out, 4, true, 1),
            ),
            &["selftest_ldmatrix", "data race on shared `staged`"],
        );
    }
    fails(
        run(0, &k, one_block(64, 0), &ldmatrix_args(&rows, &src, &out, 2, false, 2)),
        &["ldmatrix", "not 16-byte aligned"],
    );
}

#[test]
fn cp_async_destination_is_poisoned_until_its_group_is_waited_on() {
    let k = k!(lc_run_selftest_cp_async);
    let n = 64;
    let xs: Vec<f32> = (0..11 * n).map(|i| i as f32 * 0.5 - 7.0).collect();
    let x = buf(&xs);
    // Thread t's output slices hold thread (n - 1 - t)'s input slices.
    let mut want = vec![0f32; 11 * n];
    for t in 0..n {
        let u = n - 1 - t;
        for j in 0..4 {
            want[4 * t + j] = xs[4 * u + j];
            want[4 * n + 4 * t + j] = xs[4 * n + 4 * u + j];
        }
        for j in 0..2 {
            want[8 * n + 2 * t + j] = xs[8 * n + 2 * u + j];
        }
        want[10 * n + t] = xs[10 * n + u];
    }
    for seed in SEEDS {
        let out = buf(&vec![f32::NAN; 11 * n]);
        run(seed, &k, one_block(n as u32, 0), &[arg(&x), arg(&out), i32_arg(0)]).unwrap();
        assert_eq!(out.as_slice(), want.as_slice());
        let out = buf(&vec![f32::NAN; 11 * n]);
        fails(
            run(seed, &k, one_block(n as u32, 0), &[arg(&x), arg(&out), i32_arg(1)]),
            &["selftest_cp_async", "uninitialised shared-memory read", "`staged`"],
        );
        fails(
            run(seed, &k, one_block(n as u32, 0), &[arg(&x), arg(&out), i32_arg(2)]),
            &["selftest_cp_async", "data race on shared `staged`"],
        );
        // wait_group 1 leaves the second group (the 8- and 4-byte copies) in flight.
        let message = fails(
            run(seed, &k, one_block(n as u32, 0), &[arg(&x), arg(&out), i32_arg(3)]),
            &["uninitialised shared-memory read", "`staged`"],
        );
        let element: usize = message
            .split("`staged`[")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("no element in: {message}"));
        assert!(
            element >= 8 * n,
            "group 0 (elements < {}) was waited on: {message}",
            8 * n
        );
    }
}
