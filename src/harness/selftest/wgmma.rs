//! The harness's wgmma emulation (`lc::wgmma_*` in `cuda/wgmma.cuh`, emulated in
//! `cuda/harness/memcheck.cpp` from the PTX ISA's descriptor format and canonical layouts)
//! against a second, independent statement of the same layouts: CuTe's
//! (`cute/atom/mma_traits_sm90_gmma.hpp`), written here as data — the accumulator layout
//! `CLayout_64xN<128>` and `make_gmma_desc`'s no-swizzle ("INTERLEAVE") canonical layouts:
//!
//! * K-major: `((8,m),(T,2k)) : ((1T,SBO),(1,LBO))`
//! * MN-major: `((T,1,m),(8,k)) : ((1,T,SBO),(1T,LBO))`
//!
//! in elements, T = 8 (a 16-byte row of 16-bit elements). The test places A (64×16) and B
//! (16×128) in shared memory by those formulas, with strides and start offsets the GEMM
//! kernel never uses (gaps between core matrices, K groups before row groups), builds the
//! descriptors from them, and checks D against f64. It then checks that each misuse of the
//! protocol is caught.

use super::*;
use crate::harness::entries::gemm_wgmma as w;

use super::tensorcore::mode_index;

/// `CLayout_64xN<128>`: (thread 128, value 64) → m + 64·n.
const C_THREAD: &[(usize, usize)] = &[(4, 128), (8, 1), (4, 16)];
const C_VALUE: &[(usize, usize)] = &[(2, 64), (2, 8), (16, 512)];

fn c_index(thread: usize, value: usize) -> (usize, usize) {
    let i = mode_index(C_THREAD, thread) + mode_index(C_VALUE, value);
    (i % 64, i / 64)
}

/// Where an operand lies in shared memory: its start (bytes into its staging area), LBO and SBO
/// (bytes), and its major.
#[derive(Clone, Copy, Debug)]
struct Placement {
    start: usize,
    lbo: usize,
    sbo: usize,
    mn_major: bool,
}

impl Placement {
    /// CuTe's canonical no-swizzle layout: the element offset of (x, k), x along M (or N).
    fn element(&self, x: usize, k: usize) -> usize {
        const T: usize = 8;
        let (lbo, sbo) = (self.lbo / 2, self.sbo / 2);
        let offset = if self.mn_major {
            // ((T,1,m),(8,k)) : ((1,T,SBO),(1T,LBO))
            mode_index(&[(T, 1), (1, T), (64, sbo)], x) + mode_index(&[(8, T), (2, lbo)], k)
        } else {
            // ((8,m),(T,2k)) : ((1T,SBO),(1,LBO))
            mode_index(&[(8, T), (64, sbo)], x) + mode_index(&[(T, 1), (2, lbo)], k)
        };
        self.start / 2 + offset
    }
}

struct Case {
    a: Placement,
    b: Placement,
    scale_d: bool,
}

fn lcg(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed;
    move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Stages an operand of `rows` × 16 (x, k) by its placement into words (garbage elsewhere).
fn stage(
    p: &Placement,
    rows: usize,
    value: impl Fn(usize, usize) -> u16,
    garbage: &mut impl FnMut() -> f32,
) -> Vec<u16> {
    let mut len = 0;
    for x in 0..rows {
        for k in 0..16 {
            len = len.max(p.element(x, k) + 1);
        }
    }
    let len = len.div_ceil(8) * 8;
    let mut words: Vec<u16> = (0..len)
        .map(|_| half::bf16::from_f32(garbage() * 1e3).to_bits())
        .collect();
    for x in 0..rows {
        for k in 0..16 {
            words[p.element(x, k)] = value(x, k);
        }
    }
    words
}

struct Launch {
    kernel: Kernel,
    a_words: Vec<u16>,
    b_words: Vec<u16>,
    desc_args: Vec<u32>,
    d_in: Vec<f32>,
}

impl Launch {
    fn run(&self, seed: u64, mode: i32) -> Result<Vec<f32>, KernelError> {
        let (a, b) = (buf(&self.a_words), buf(&self.b_words));
        let (args, d_in) = (buf(&self.desc_args), buf(&self.d_in));
        let mut d = buf(&vec![f32::NAN; 128 * 64]);
        let shared = u32::try_from(2 * (self.a_words.len() + self.b_words.len())).unwrap();
        run(
            seed,
            &self.kernel,
            one_block(128, shared),
            &[
                arg(&a),
                i32_arg(self.a_words.len() as i32),
                arg(&b),
                i32_arg(self.b_words.len() as i32),
                arg(&args),
                arg(&d_in),
                CpuHarness::default().arg_out(&mut d),
                i32_arg(mode),
            ],
        )?;
        Ok(d.as_slice().to_vec())
    }
}

/// D = A·B (+ C) on one warpgroup through the emulation, operands placed and the accumulators
/// read by CuTe's layouts, against f64.
fn check_wgmma(kernel: Kernel, case: &Case, to_bits: fn(f32) -> u16, from_bits: fn(u16) -> f32, seed: u64) -> Launch {
    let mut random = lcg(seed);
    let a: Vec<f32> = (0..64 * 16).map(|_| from_bits(to_bits(random()))).collect(); // (M64, K16) row-major
    let b: Vec<f32> = (0..16 * 128).map(|_| from_bits(to_bits(random()))).collect(); // (K16, N128) row-major
    let c: Vec<f32> = (0..64 * 128).map(|_| random()).collect(); // (M64, N128) row-major
    let a_words = stage(&case.a, 64, |m, k| to_bits(a[m * 16 + k]), &mut random);
    let b_words = stage(&case.b, 128, |n, k| to_bits(b[k * 128 + n]), &mut random);
    let mut d_in = vec![0f32; 128 * 64];
    for t in 0..128 {
        for v in 0..64 {
            let (m, n) = c_index(t, v);
            d_in[t * 64 + v] = c[m * 128 + n];
        }
    }
    let u = |x: usize| u32::try_from(x).unwrap();
    let desc_args = vec![
        u(case.a.start),
        u(case.a.lbo),
        u(case.a.sbo),
        u32::from(case.a.mn_major),
        u(case.b.start),
        u(case.b.lbo),
        u(case.b.sbo),
        u32::from(case.b.mn_major),
        u32::from(case.scale_d),
    ];
    let launch = Launch {
        kernel,
        a_words,
        b_words,
        desc_args,
        d_in,
    };
    for run_seed in SEEDS {
        let d = launch.run(run_seed, 0).unwrap();
        for t in 0..128 {
            for v in 0..64 {
                let (m, n) = c_index(t, v);
                let products = (0..16).map(|k| f64::from(a[m * 16 + k]) * f64::from(b[k * 128 + n]));
                let old = if case.scale_d { f64::from(c[m * 128 + n]) } else { 0.0 };
                let want = products.clone().sum::<f64>() + old;
                let magnitude = products.map(f64::abs).sum::<f64>() + old.abs();
                let got = f64::from(d[t * 64 + v]);
                // 16 exact products and C summed in f32: at most 17 roundings of the magnitude.
                let bound = 17.0 * magnitude / (1u64 << 24) as f64;
                assert!(
                    (got - want).abs() <= bound,
                    "{} {case:?}: thread {t} value {v} = D[{m}][{n}]: got {got}, want {want} (±{bound:.1e})",
                    kernel.name
                );
            }
        }
    }
    launch
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "A {:?}, B {:?}, scale_d {}", self.a, self.b, self.scale_d)
    }
}

/// Placements the GEMM kernel does not use: K groups adjacent (LBO = 128) with row groups
/// further apart (SBO = 256), row groups with gaps between them, non-zero starts.
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (i, (a_mn, b_mn)) in [(false, false), (false, true), (true, false), (true, true)]
        .into_iter()
        .enumerate()
    {
        // A: 8 row groups × 2 K groups of 128-byte core matrices.
        let a_rows_first = Placement {
            start: 256,
            lbo: 8 * 128 + 128,
            sbo: 128,
            mn_major: a_mn,
        };
        let a_k_first = Placement {
            start: 0,
            lbo: 128,
            sbo: 256 + 128,
            mn_major: a_mn,
        };
        // B: 16 column groups × 2 K groups.
        let b_k_first = Placement {
            start: 512,
            lbo: 128,
            sbo: 256,
            mn_major: b_mn,
        };
        let b_cols_first = Placement {
            start: 0,
            lbo: 16 * 128,
            sbo: 128,
            mn_major: b_mn,
        };
        cases.push(Case {
            a: if i % 2 == 0 { a_rows_first } else { a_k_first },
            b: if i < 2 { b_k_first } else { b_cols_first },
            scale_d: i != 1,
        });
        cases.push(Case {
            a: if i % 2 == 0 { a_k_first } else { a_rows_first },
            b: if i < 2 { b_cols_first } else { b_k_first },
            scale_d: i == 1,
        });
    }
    cases
}

fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}
fn bf16_value(b: u16) -> f32 {
    half::bf16::from_bits(b).to_f32()
}

#[test]
fn cute_accumulator_layout_is_a_bijection() {
    let mut seen = vec![false; 64 * 128];
    for t in 0..128 {
        for v in 0..64 {
            let (m, n) = c_index(t, v);
            assert!(!seen[m + 64 * n], "({m}, {n}) twice");
            seen[m + 64 * n] = true;
        }
    }
}

#[test]
fn wgmma_bf16_follows_cute_gmma_layouts() {
    for (i, case) in cases().iter().enumerate() {
        check_wgmma(
            k_w(w::lc_run_selftest_wgmma_bf16, "selftest_wgmma_bf16"),
            case,
            bf16_bits,
            bf16_value,
            11 + i as u64,
        );
    }
}

#[test]
fn wgmma_f16_follows_cute_gmma_layouts() {
    for (i, case) in cases().iter().enumerate() {
        check_wgmma(
            k_w(w::lc_run_selftest_wgmma_f16, "selftest_wgmma_f16"),
            case,
            |x| half::f16::from_f32(x).to_bits(),
            |b| half::f16::from_bits(b).to_f32(),
            29 + i as u64,
        );
    }
}

#[test]
fn wgmma_protocol_misuse_is_reported() {
    let launch = check_wgmma(
        k_w(w::lc_run_selftest_wgmma_bf16, "selftest_wgmma_bf16"),
        &cases()[0],
        bf16_bits,
        bf16_value,
        7,
    );
    fails(launch.run(0, 1).map(drop), &["selftest_wgmma_bf16", "no wgmma.fence"]);
    // Accumulators read before the wait: the registers hold NaN while the MMA is in flight.
    let early = launch.run(0, 2).unwrap();
    assert!(
        early.iter().all(|x| x.is_nan()),
        "accumulators read before wgmma.wait_group must be poisoned"
    );
    fails(
        launch.run(0, 3).map(drop),
        &[
            "operand A",
            "changed while the wgmma.mma_async reading it was in flight",
        ],
    );
    fails(launch.run(0, 4).map(drop), &["no fence.proxy.async after the write"]);
    fails(
        launch.run(0, 5).map(drop),
        &["warps of warpgroup 0 give different operands", "wgmma number 0"],
    );
}

fn k_w(entry: HarnessEntry, name: &'static str) -> Kernel {
    Kernel {
        family: "gemm_wgmma",
        name,
        harness_entry: entry,
        cooperative: false,
    }
}
