//! Embedding kernels (`cuda/embedding.cu`) against the f64 references in `kernels::embedding`:
//! the BERT forward and its scatter backward (every ∂word variant), ViT patch extraction,
//! assembly and its backward, × storage type × shape × thread order through the CPU harness,
//! and the same bodies through the GPU in `gpu_matches_reference` (`#[ignore]`d: it needs a CUDA
//! GPU and fails when the GPU is not usable).
//!
//! Tolerances come from the numerics (u = 2⁻²⁴, n the number of terms of a sum, m the sum of
//! their magnitudes): f32 per element `2·(n + 8)·u·m`; bf16 per element one bf16 ulp plus that,
//! and overall at most twice the error of the same math done on the CPU (f32 arithmetic on the
//! stored inputs, rounded to bf16). Copies (patches, ∂pe) must be exact.

mod kernel_tol;

use kernel_tol::{stored, wide, within_twice_cpu, U32};
use lora_compose::check::compare_with;
use lora_compose::gpu::GpuBackend;
use lora_compose::harness::CpuHarness;
use lora_compose::kernels::embedding::{self, BertShape, Entry, TokenIndex, Variant, VitShape};
use lora_compose::kernels::{Backend, DType, Element, KernelError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SEEDS: &[u64] = &[0, 1, 2, 7];

/// (batch, seq, hidden, vocab, positions, types): T ∈ {1, 7, 17, 128}, D not a multiple of 32,
/// vocabularies larger than the ids drawn (ids unused) and much smaller than the rows (ids
/// repeated), a one-id vocabulary, position tables longer than T (zero rows in ∂position).
const BERT_SHAPES: &[(usize, usize, usize, usize, usize, usize)] = &[
    (3, 1, 40, 11, 4, 2),
    (2, 7, 100, 50, 7, 3),
    (3, 17, 40, 97, 20, 2),
    (2, 128, 40, 300, 130, 2),
    (1, 128, 100, 61, 128, 1),
    (4, 5, 33, 1, 9, 2),
];

/// (batch, side, patch, hidden): the task's 28/7 and 12/4, one patch per image, a side that
/// patches do not divide (the last pixel rows and columns are unused).
const VIT_SHAPES: &[(usize, usize, usize, usize)] = &[(2, 28, 7, 40), (3, 12, 4, 100), (2, 4, 4, 7), (1, 13, 4, 33)];

fn bert_shape(
    &(batch, seq, hidden, vocab, positions, types): &(usize, usize, usize, usize, usize, usize),
) -> BertShape {
    BertShape {
        rows: batch * seq,
        seq,
        hidden,
        vocab,
        positions,
        types,
    }
}

fn vit_shape(&(batch, side, patch, hidden): &(usize, usize, usize, usize)) -> VitShape {
    VitShape {
        batch,
        side,
        patch,
        hidden,
    }
}

fn values<T: Element>(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.random_range(-scale..scale))).collect()
}

/// f32 forward error bound of a quantity made from n terms of total magnitude m.
fn f32_bound(n: usize, m: f64) -> f64 {
    2.0 * (n as f64 + 8.0) * U32 * m + 1e-30
}

/// One ulp of T at |x|.
fn ulp<T: Element>(x: f64) -> f64 {
    let mantissa_bits = match T::DTYPE {
        DType::F32 => 23,
        DType::F16 => 10,
        DType::BF16 => 7,
    };
    let exponent = x.abs().max(f64::MIN_POSITIVE).log2().floor().max(-126.0);
    2f64.powf(exponent - f64::from(mantissa_bits))
}

/// The f32 bound per element for f32 storage; for bf16 one ulp plus it per element and at most
/// twice the CPU's low-precision error overall (`cpu`).
fn check_output<T: Element>(name: &str, got: &[T], want: &[f64], cpu: &[f64], bounds: &[f64]) -> Result<(), String> {
    let got = wide(got);
    if T::DTYPE == DType::F32 {
        compare_with(name, &got, want, |i| bounds[i])?;
        return Ok(());
    }
    compare_with(name, &got, want, |i| ulp::<T>(want[i]) + bounds[i])?;
    let floor = bounds.iter().copied().fold(0.0, f64::max);
    within_twice_cpu(name, &got, want, cpu, floor)
}

/// A copy must be exact (also for bf16: the values are already representable, or rounded once
/// exactly as the CPU does).
fn check_exact(name: &str, got: &[f64], want: &[f64]) -> Result<(), String> {
    compare_with(name, got, want, |_| 0.0).map(|_| ())
}

struct BertInputs<T> {
    ids: Vec<u32>,
    type_ids: Vec<u32>,
    word: Vec<T>,
    position: Vec<T>,
    token_type: Vec<T>,
    de: Vec<T>,
}

/// Ids skewed towards small values (many repeats) from the lower half of the vocabulary, plus
/// the last id now and then: the ids between stay unused.
fn bert_inputs<T: Element>(shape: &BertShape, seed: u64) -> BertInputs<T> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xe3b0);
    let BertShape {
        rows,
        hidden: d,
        vocab,
        positions,
        types,
        ..
    } = *shape;
    let half = vocab.div_ceil(2);
    let ids = (0..rows)
        .map(|_| {
            if rng.random_range(0..10) == 0 {
                (vocab - 1) as u32
            } else {
                let u: f64 = rng.random();
                ((u * u * half as f64) as usize).min(half - 1) as u32
            }
        })
        .collect();
    let type_ids = (0..rows).map(|_| rng.random_range(0..types as u32)).collect();
    BertInputs {
        ids,
        type_ids,
        word: values(&mut rng, vocab * d, 1.0),
        position: values(&mut rng, positions * d, 0.5),
        token_type: values(&mut rng, types * d, 0.25),
        de: values(&mut rng, rows * d, 1.0),
    }
}

fn i32s(v: &[u32]) -> Vec<i32> {
    v.iter().map(|&x| x as i32).collect()
}

fn check_bert_forward<T: Element, B: Backend>(backend: &B, shape: &BertShape, seed: u64) -> Result<(), String> {
    let inp = bert_inputs::<T>(shape, seed);
    let BertShape {
        rows, seq, hidden: d, ..
    } = *shape;
    let context = |e: &dyn std::fmt::Display| {
        format!(
            "{} bert_forward {:?} {shape:?} seed {seed}: {e}",
            backend.name(),
            T::DTYPE
        )
    };
    let run = || -> Result<Vec<T>, KernelError> {
        let ids = backend.upload(&i32s(&inp.ids))?;
        let type_ids = backend.upload(&i32s(&inp.type_ids))?;
        let word = backend.upload(&inp.word)?;
        let position = backend.upload(&inp.position)?;
        let token_type = backend.upload(&inp.token_type)?;
        let mut out = backend.upload(&vec![T::poison(); rows * d])?;
        embedding::bert_forward::<T, B>(backend, shape, &ids, &type_ids, &word, &position, &token_type, &mut out)?;
        backend.download(&out)
    };
    let out = run().map_err(|e| context(&e))?;
    let (word, position, token_type) = (wide(&inp.word), wide(&inp.position), wide(&inp.token_type));
    let want = embedding::reference_bert_forward(shape, &inp.ids, &inp.type_ids, &word, &position, &token_type);
    let mut cpu = vec![0.0; rows * d];
    let mut bounds = vec![0.0; rows * d];
    for r in 0..rows {
        let (w, p, t) = (inp.ids[r] as usize * d, (r % seq) * d, inp.type_ids[r] as usize * d);
        for j in 0..d {
            let f = |v: &[T], at: usize| v[at].to_f32();
            cpu[r * d + j] = stored::<T>(f(&inp.word, w + j) + f(&inp.position, p + j) + f(&inp.token_type, t + j));
            bounds[r * d + j] = f32_bound(3, word[w + j].abs() + position[p + j].abs() + token_type[t + j].abs());
        }
    }
    check_output("out", &out, &want, &cpu, &bounds).map_err(|e| context(&e))
}

/// The backward of `variant` against the reference; returns ∂word, ∂position, ∂token_type for
/// the determinism checks.
fn check_bert_backward<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &BertShape,
    seed: u64,
) -> Result<[Vec<T>; 3], String> {
    let inp = bert_inputs::<T>(shape, seed);
    let BertShape {
        rows,
        seq,
        hidden: d,
        vocab,
        positions,
        types,
    } = *shape;
    let context = |e: &dyn std::fmt::Display| {
        format!(
            "{} bert_backward {variant:?} {:?} {shape:?} seed {seed}: {e}",
            backend.name(),
            T::DTYPE
        )
    };
    let run = || -> Result<[Vec<T>; 3], KernelError> {
        let index = TokenIndex::upload(backend, &inp.ids, vocab)?;
        let type_ids = backend.upload(&i32s(&inp.type_ids))?;
        let de = backend.upload(&inp.de)?;
        let mut dword = backend.upload(&vec![T::poison(); vocab * d])?;
        let mut dposition = backend.upload(&vec![T::poison(); positions * d])?;
        let mut dtoken_type = backend.upload(&vec![T::poison(); types * d])?;
        embedding::bert_backward_variant::<T, B>(
            backend,
            shape,
            variant,
            &index,
            &type_ids,
            &de,
            &mut dword,
            &mut dposition,
            &mut dtoken_type,
        )?;
        Ok([
            backend.download(&dword)?,
            backend.download(&dposition)?,
            backend.download(&dtoken_type)?,
        ])
    };
    let grads = run().map_err(|e| context(&e))?;
    let de = wide(&inp.de);
    let want = embedding::reference_bert_backward(shape, &inp.ids, &inp.type_ids, &de);
    // The same sums on the CPU in f32 (rows ascending), rounded to T; the terms' magnitudes and
    // counts for the bounds.
    let mut cpu = [vec![0f32; vocab * d], vec![0f32; positions * d], vec![0f32; types * d]];
    let mut mag = [vec![0.0; vocab * d], vec![0.0; positions * d], vec![0.0; types * d]];
    let mut count = [vec![0usize; vocab], vec![0usize; positions], vec![0usize; types]];
    for r in 0..rows {
        let table_rows = [inp.ids[r] as usize, r % seq, inp.type_ids[r] as usize];
        for (k, &at) in table_rows.iter().enumerate() {
            count[k][at] += 1;
            for j in 0..d {
                cpu[k][at * d + j] += inp.de[r * d + j].to_f32();
                mag[k][at * d + j] += de[r * d + j].abs();
            }
        }
    }
    for (k, name) in ["dword", "dposition", "dtoken_type"].iter().enumerate() {
        let cpu: Vec<f64> = cpu[k].iter().map(|&v| stored::<T>(v)).collect();
        let bounds: Vec<f64> = (0..mag[k].len())
            .map(|i| f32_bound(count[k][i / d], mag[k][i]))
            .collect();
        check_output(name, &grads[k], &want[k], &cpu, &bounds).map_err(|e| context(&e))?;
    }
    Ok(grads)
}

struct VitInputs<T> {
    pixels: Vec<f32>,
    pe: Vec<T>,
    cls: Vec<T>,
    position: Vec<T>,
    dh: Vec<T>,
}

fn vit_inputs<T: Element>(shape: &VitShape, seed: u64) -> VitInputs<T> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x51f7);
    let (b, np, t, d) = (shape.batch, shape.patches(), shape.tokens(), shape.hidden);
    VitInputs {
        // Pixels with more mantissa than bf16 holds: the conversion's rounding is checked too.
        pixels: (0..b * shape.side * shape.side)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect(),
        pe: values(&mut rng, b * np * d, 1.0),
        cls: values(&mut rng, d, 1.0),
        position: values(&mut rng, t * d, 0.5),
        dh: values(&mut rng, b * t * d, 1.0),
    }
}

fn check_vit_patches<T: Element, B: Backend>(backend: &B, shape: &VitShape, seed: u64) -> Result<(), String> {
    let inp = vit_inputs::<T>(shape, seed);
    let n = shape.batch * shape.patches() * shape.patch * shape.patch;
    let context = |e: &dyn std::fmt::Display| {
        format!(
            "{} vit_patches {:?} {shape:?} seed {seed}: {e}",
            backend.name(),
            T::DTYPE
        )
    };
    let run = || -> Result<Vec<T>, KernelError> {
        let pixels = backend.upload(&inp.pixels)?;
        let mut patches = backend.upload(&vec![T::poison(); n])?;
        embedding::vit_patches::<T, B>(backend, shape, &pixels, &mut patches)?;
        backend.download(&patches)
    };
    let got = run().map_err(|e| context(&e))?;
    let pixels: Vec<f64> = inp.pixels.iter().map(|&p| f64::from(p)).collect();
    // The reference picks the pixels; storing them in T rounds each once.
    let want: Vec<f64> = embedding::reference_vit_patches(shape, &pixels)
        .into_iter()
        .map(|p| stored::<T>(p as f32))
        .collect();
    check_exact("patches", &wide(&got), &want).map_err(|e| context(&e))
}

fn check_vit_assemble<T: Element, B: Backend>(backend: &B, shape: &VitShape, seed: u64) -> Result<(), String> {
    let inp = vit_inputs::<T>(shape, seed);
    let (b, np, t, d) = (shape.batch, shape.patches(), shape.tokens(), shape.hidden);
    let context = |e: &dyn std::fmt::Display| {
        format!(
            "{} vit_assemble {:?} {shape:?} seed {seed}: {e}",
            backend.name(),
            T::DTYPE
        )
    };
    let run = || -> Result<Vec<T>, KernelError> {
        let pe = backend.upload(&inp.pe)?;
        let cls = backend.upload(&inp.cls)?;
        let position = backend.upload(&inp.position)?;
        let mut h = backend.upload(&vec![T::poison(); b * t * d])?;
        embedding::vit_assemble::<T, B>(backend, shape, &pe, &cls, &position, &mut h)?;
        backend.download(&h)
    };
    let h = run().map_err(|e| context(&e))?;
    let want = embedding::reference_vit_assemble(shape, &wide(&inp.pe), &wide(&inp.cls), &wide(&inp.position));
    let mut cpu = vec![0.0; b * t * d];
    let mut bounds = vec![0.0; b * t * d];
    for img in 0..b {
        for tok in 0..t {
            for j in 0..d {
                let src = if tok == 0 {
                    inp.cls[j]
                } else {
                    inp.pe[(img * np + tok - 1) * d + j]
                };
                let pos = inp.position[tok * d + j];
                let i = (img * t + tok) * d + j;
                cpu[i] = stored::<T>(src.to_f32() + pos.to_f32());
                bounds[i] = f32_bound(2, f64::from(src.to_f32().abs() + pos.to_f32().abs()));
            }
        }
    }
    check_output("h", &h, &want, &cpu, &bounds).map_err(|e| context(&e))
}

/// Returns ∂cls and ∂position for the determinism check.
fn check_vit_assemble_backward<T: Element, B: Backend>(
    backend: &B,
    shape: &VitShape,
    seed: u64,
) -> Result<[Vec<T>; 2], String> {
    let inp = vit_inputs::<T>(shape, seed);
    let (b, np, t, d) = (shape.batch, shape.patches(), shape.tokens(), shape.hidden);
    let context = |e: &dyn std::fmt::Display| {
        format!(
            "{} vit_assemble_backward {:?} {shape:?} seed {seed}: {e}",
            backend.name(),
            T::DTYPE
        )
    };
    let run = || -> Result<[Vec<T>; 3], KernelError> {
        let dh = backend.upload(&inp.dh)?;
        let mut dpe = backend.upload(&vec![T::poison(); b * np * d])?;
        let mut dcls = backend.upload(&vec![T::poison(); d])?;
        let mut dposition = backend.upload(&vec![T::poison(); t * d])?;
        embedding::vit_assemble_backward::<T, B>(backend, shape, &dh, &mut dpe, &mut dcls, &mut dposition)?;
        Ok([
            backend.download(&dpe)?,
            backend.download(&dcls)?,
            backend.download(&dposition)?,
        ])
    };
    let [dpe, dcls, dposition] = run().map_err(|e| context(&e))?;
    let dh = wide(&inp.dh);
    let [want_dpe, want_dcls, want_dpos] = embedding::reference_vit_assemble_backward(shape, &dh);
    check_exact("dpe", &wide(&dpe), &want_dpe).map_err(|e| context(&e))?;
    let (mut cpu, mut mag) = (vec![0f32; t * d], vec![0.0; t * d]);
    for img in 0..b {
        for i in 0..t * d {
            cpu[i] += inp.dh[img * t * d + i].to_f32();
            mag[i] += dh[img * t * d + i].abs();
        }
    }
    let cpu: Vec<f64> = cpu.into_iter().map(stored::<T>).collect();
    let bounds: Vec<f64> = mag.iter().map(|&m| f32_bound(b, m)).collect();
    check_output("dposition", &dposition, &want_dpos, &cpu, &bounds).map_err(|e| context(&e))?;
    check_output("dcls", &dcls, &want_dcls, &cpu[..d], &bounds[..d]).map_err(|e| context(&e))?;
    Ok([dcls, dposition])
}

fn check_all_bert<B: Backend>(backend: &B, shape: &BertShape, seed: u64) -> Result<(), String> {
    check_bert_forward::<f32, B>(backend, shape, seed)?;
    check_bert_forward::<half::bf16, B>(backend, shape, seed)?;
    for &variant in embedding::ALL {
        check_bert_backward::<f32, B>(backend, variant, shape, seed)?;
        check_bert_backward::<half::bf16, B>(backend, variant, shape, seed)?;
    }
    Ok(())
}

fn check_all_vit<B: Backend>(backend: &B, shape: &VitShape, seed: u64) -> Result<(), String> {
    check_vit_patches::<f32, B>(backend, shape, seed)?;
    check_vit_patches::<half::bf16, B>(backend, shape, seed)?;
    check_vit_assemble::<f32, B>(backend, shape, seed)?;
    check_vit_assemble::<half::bf16, B>(backend, shape, seed)?;
    check_vit_assemble_backward::<f32, B>(backend, shape, seed)?;
    check_vit_assemble_backward::<half::bf16, B>(backend, shape, seed)?;
    Ok(())
}

/// The reference backward is the adjoint of the reference forward: for the linear map
/// E = F(word, position, token_type), Σ ∂E ∘ F(x) = Σ ∂x ∘ x over the three tables (exact up to
/// f64 rounding); likewise for ViT assembly.
#[test]
fn reference_backwards_are_adjoints_of_the_forwards() {
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for (i, s) in BERT_SHAPES.iter().enumerate() {
        let shape = bert_shape(s);
        let inp = bert_inputs::<f32>(&shape, i as u64);
        let (word, position, token_type, de) = (
            wide(&inp.word),
            wide(&inp.position),
            wide(&inp.token_type),
            wide(&inp.de),
        );
        let out = embedding::reference_bert_forward(&shape, &inp.ids, &inp.type_ids, &word, &position, &token_type);
        let [dword, dpos, dtype] = embedding::reference_bert_backward(&shape, &inp.ids, &inp.type_ids, &de);
        let (lhs, rhs) = (
            dot(&de, &out),
            dot(&dword, &word) + dot(&dpos, &position) + dot(&dtype, &token_type),
        );
        assert!(
            (lhs - rhs).abs() <= 1e-9 * (1.0 + lhs.abs()),
            "{shape:?}: {lhs} vs {rhs}"
        );
        assert!(dpos[shape.seq * shape.hidden..].iter().all(|&v| v == 0.0));
    }
    for (i, s) in VIT_SHAPES.iter().enumerate() {
        let shape = vit_shape(s);
        let inp = vit_inputs::<f32>(&shape, i as u64);
        let (pe, cls, position, dh) = (wide(&inp.pe), wide(&inp.cls), wide(&inp.position), wide(&inp.dh));
        let h = embedding::reference_vit_assemble(&shape, &pe, &cls, &position);
        let [dpe, dcls, dpos] = embedding::reference_vit_assemble_backward(&shape, &dh);
        let (lhs, rhs) = (dot(&dh, &h), dot(&dpe, &pe) + dot(&dcls, &cls) + dot(&dpos, &position));
        assert!(
            (lhs - rhs).abs() <= 1e-9 * (1.0 + lhs.abs()),
            "{shape:?}: {lhs} vs {rhs}"
        );
    }
}

/// The reference patch layout is pass.rs's: pixel value = its own (img, y, x) code.
#[test]
fn reference_patches_follow_the_model_layout() {
    let shape = VitShape {
        batch: 2,
        side: 4,
        patch: 2,
        hidden: 1,
    };
    let pixels: Vec<f64> = (0..2 * 16).map(f64::from).collect();
    let patches = embedding::reference_vit_patches(&shape, &pixels);
    // Image 1, patch (gy 1, gx 0): rows 2..4, columns 0..2 of image 1 (offset 16).
    assert_eq!(&patches[6 * 4..7 * 4], &[24.0, 25.0, 28.0, 29.0]);
    assert_eq!(&patches[..4], &[0.0, 1.0, 4.0, 5.0]);
}

#[test]
fn harness_bert_every_variant_shape_and_thread_order() {
    for &seed in SEEDS {
        let harness = CpuHarness::new(seed);
        for s in BERT_SHAPES {
            check_all_bert(&harness, &bert_shape(s), seed).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn harness_vit_every_shape_and_thread_order() {
    for &seed in SEEDS {
        let harness = CpuHarness::new(seed);
        for s in VIT_SHAPES {
            check_all_vit(&harness, &vit_shape(s), seed).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// Every gradient is a fixed-order sum: the same bits in every thread and block order, and the
/// two ∂word variants (both rows ascending) agree bit for bit.
#[test]
fn harness_gradients_are_deterministic() {
    let shape = bert_shape(&(3, 17, 40, 97, 20, 2));
    let bits = |grads: &[Vec<f32>]| -> Vec<Vec<u32>> {
        grads.iter().map(|g| g.iter().map(|v| v.to_bits()).collect()).collect()
    };
    let bert = |seed: u64, variant: Variant| {
        bits(
            &check_bert_backward::<f32, _>(&CpuHarness::new(seed), variant, &shape, 5)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    };
    let first = bert(0, Variant::Naive);
    for seed in [1, 2, 3] {
        for &variant in embedding::ALL {
            assert_eq!(
                bert(seed, variant),
                first,
                "{variant:?}: thread order {seed} differs from naive, order 0"
            );
        }
    }
    let vit_shape = vit_shape(&(3, 12, 4, 100));
    let vit = |seed: u64| {
        bits(
            &check_vit_assemble_backward::<f32, _>(&CpuHarness::new(seed), &vit_shape, 5)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    };
    let first = vit(0);
    for seed in [1, 2, 3] {
        assert_eq!(
            vit(seed),
            first,
            "∂cls, ∂position differ between thread orders 0 and {seed}"
        );
    }
}

fn expect_argument_error(result: Result<(), KernelError>, needle: &str) {
    match result {
        Err(KernelError::Argument { message, .. }) => {
            assert!(
                message.contains(needle),
                "error {message:?} does not mention {needle:?}"
            )
        }
        other => panic!("expected an argument error mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn token_index_rejects_ids_outside_the_vocabulary() {
    let harness = CpuHarness::new(0);
    match TokenIndex::upload(&harness, &[0, 3, 5, 1], 5) {
        Err(KernelError::Argument { message, .. }) => {
            assert!(message.contains("token id 5 of row 2"), "{message}")
        }
        Err(e) => panic!("wrong error {e:?}"),
        Ok(_) => panic!("id 5 accepted in a vocabulary of 5"),
    }
    assert!(TokenIndex::upload(&harness, &[], 5).is_err());
    let index = TokenIndex::upload(&harness, &[4, 4, 0], 5).unwrap();
    assert_eq!((index.len(), index.vocab()), (3, 5));
}

#[test]
fn launchers_reject_wrong_shapes_and_lengths() {
    let h = CpuHarness::new(0);
    let shape = bert_shape(&(2, 3, 4, 5, 6, 2));
    let ids = h.upload(&[0i32, 1, 2, 3, 4, 0]).unwrap();
    let types = h.upload(&[0i32; 6]).unwrap();
    let word = h.upload(&[0f32; 20]).unwrap();
    let position = h.upload(&[0f32; 24]).unwrap();
    let token_type = h.upload(&[0f32; 8]).unwrap();
    let mut out = h.upload(&[0f32; 24]).unwrap();
    let mut short = h.upload(&[0f32; 23]).unwrap();
    expect_argument_error(
        embedding::bert_forward::<f32, _>(&h, &shape, &ids, &types, &word, &position, &token_type, &mut short),
        "out has 23 elements, needs 24",
    );
    expect_argument_error(
        embedding::bert_forward::<f32, _>(&h, &shape, &ids, &types, &position, &position, &token_type, &mut out),
        "word has 24 elements, needs 20",
    );
    let long_seq = BertShape {
        seq: 6,
        positions: 5,
        ..shape
    };
    expect_argument_error(
        embedding::bert_forward::<f32, _>(&h, &long_seq, &ids, &types, &word, &position, &token_type, &mut out),
        "exceed the 5 positions",
    );
    let ragged = BertShape { seq: 4, ..shape };
    expect_argument_error(
        embedding::bert_forward::<f32, _>(&h, &ragged, &ids, &types, &word, &position, &token_type, &mut out),
        "not a whole number of sequences",
    );
    embedding::bert_forward::<f32, _>(&h, &shape, &ids, &types, &word, &position, &token_type, &mut out).unwrap();

    let index = TokenIndex::upload(&h, &[0, 1, 2, 3, 4, 0], 5).unwrap();
    let small_index = TokenIndex::upload(&h, &[0, 1, 2, 3, 0, 0], 4).unwrap();
    let short_index = TokenIndex::upload(&h, &[0, 1, 2, 3, 4], 5).unwrap();
    let de = h.upload(&[0f32; 24]).unwrap();
    let (mut dword, mut dpos, mut dtype) = (
        h.upload(&[0f32; 20]).unwrap(),
        h.upload(&[0f32; 24]).unwrap(),
        h.upload(&[0f32; 8]).unwrap(),
    );
    expect_argument_error(
        embedding::bert_backward::<f32, _>(&h, &shape, &small_index, &types, &de, &mut dword, &mut dpos, &mut dtype),
        "vocabulary of 4",
    );
    expect_argument_error(
        embedding::bert_backward::<f32, _>(&h, &shape, &short_index, &types, &de, &mut dword, &mut dpos, &mut dtype),
        "index has 5 elements, needs 6",
    );
    let mut dpos_short = h.upload(&[0f32; 20]).unwrap();
    expect_argument_error(
        embedding::bert_backward::<f32, _>(&h, &shape, &index, &types, &de, &mut dword, &mut dpos_short, &mut dtype),
        "dposition has 20 elements, needs 24",
    );
    embedding::bert_backward::<f32, _>(&h, &shape, &index, &types, &de, &mut dword, &mut dpos, &mut dtype).unwrap();

    let vit = vit_shape(&(2, 12, 4, 5));
    let pixels = h.upload(&[0f32; 2 * 144 - 1]).unwrap();
    let mut patches = h.upload(&[0f32; 2 * 9 * 16]).unwrap();
    expect_argument_error(
        embedding::vit_patches::<f32, _>(&h, &vit, &pixels, &mut patches),
        "pixels has 287 elements, needs 288",
    );
    let big_patch = VitShape { patch: 13, ..vit };
    expect_argument_error(
        embedding::vit_patches::<f32, _>(&h, &big_patch, &pixels, &mut patches),
        "do not fit",
    );
    let pe = h.upload(&[0f32; 2 * 9 * 5]).unwrap();
    let cls = h.upload(&[0f32; 4]).unwrap();
    let pos = h.upload(&[0f32; 10 * 5]).unwrap();
    let mut hid = h.upload(&[0f32; 2 * 10 * 5]).unwrap();
    expect_argument_error(
        embedding::vit_assemble::<f32, _>(&h, &vit, &pe, &cls, &pos, &mut hid),
        "cls has 4 elements, needs 5",
    );
    let (mut dpe, mut dcls, mut dpos_short) = (
        h.upload(&[0f32; 2 * 9 * 5]).unwrap(),
        h.upload(&[0f32; 5]).unwrap(),
        h.upload(&[0f32; 9 * 5]).unwrap(),
    );
    expect_argument_error(
        embedding::vit_assemble_backward::<f32, _>(&h, &vit, &hid, &mut dpe, &mut dcls, &mut dpos_short),
        "dposition has 45 elements, needs 50",
    );
    assert!(embedding::kernel(Entry::BertForward, DType::F16).is_err());
}

/// Ids the host failed to check never make the forward read outside a table (the harness would
/// report it): their rows come out NaN, the others stay right.
#[test]
fn harness_forward_writes_nan_rows_for_ids_outside_the_tables() {
    let h = CpuHarness::new(1);
    let shape = bert_shape(&(1, 4, 3, 5, 4, 2));
    let ids = h.upload(&[0i32, 5, -1, 4]).unwrap();
    let types = h.upload(&[0i32, 0, 1, 2]).unwrap();
    let word = h.upload(&[1f32; 15]).unwrap();
    let position = h.upload(&[2f32; 12]).unwrap();
    let token_type = h.upload(&[4f32; 6]).unwrap();
    let mut out = h.upload(&[0f32; 12]).unwrap();
    embedding::bert_forward::<f32, _>(&h, &shape, &ids, &types, &word, &position, &token_type, &mut out).unwrap();
    let out = h.download(&out).unwrap();
    assert_eq!(&out[..3], &[7.0; 3]);
    assert!(out[3..].iter().all(|v| v.is_nan()), "{out:?}");
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine (gpu-bundle/gpu-check.sh does)"]
fn gpu_matches_reference() {
    let gpu = GpuBackend::probe().unwrap_or_else(|reason| panic!("this test needs a usable CUDA GPU: {reason}"));
    println!("GPU tests on {}", gpu.name());
    // The shared memory the driver reports must match what the launch config budgets.
    let dtype = gpu
        .function(&embedding::kernel(Entry::BertDtokenType, DType::BF16).unwrap())
        .unwrap();
    assert_eq!(dtype.shared_size_bytes().unwrap() as u32, embedding::DTYPE_SHARED_BYTES);
    for (i, s) in BERT_SHAPES.iter().enumerate() {
        check_all_bert(&gpu, &bert_shape(s), i as u64).unwrap_or_else(|e| panic!("{e}"));
    }
    for (i, s) in VIT_SHAPES.iter().enumerate() {
        check_all_vit(&gpu, &vit_shape(s), i as u64).unwrap_or_else(|e| panic!("{e}"));
    }
    // Model-sized: a BERT-base vocabulary over 8 × 128 tokens, a 224² ViT with 16² patches.
    check_all_bert(&gpu, &bert_shape(&(8, 128, 768, 30522, 512, 2)), 9).unwrap_or_else(|e| panic!("{e}"));
    check_all_vit(&gpu, &vit_shape(&(8, 224, 16, 768)), 9).unwrap_or_else(|e| panic!("{e}"));
}
