//! Small models, inputs and the f32-vs-f64 gradient comparison shared by the model tests.
#![allow(dead_code)]

use lora_compose::check::{compare, Tol};
use lora_compose::model::{Arch, Batch, Config, Grads};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A ViT on 12×12 images, patch 4 (9 patches + CLS), 2 layers, 2 heads.
pub fn vit(width: usize, labels: usize) -> Config {
    Config {
        image_size: 12,
        patch_size: 4,
        ..Config::vit(width, 2, 2, labels)
    }
}

/// A 2-layer BERT of width 16 (vocabulary 50, 16 positions), 4 labels.
pub fn bert() -> Config {
    Config {
        hidden: 16,
        heads: 2,
        intermediate: 32,
        layers: 2,
        vocab_size: 50,
        max_positions: 16,
        ..Config::minilm(4)
    }
}

/// `n` 12×12 images of 4 classes: class k lights up quadrant k (learnable from a few examples).
pub fn images(n: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut px = vec![0.0f32; n * 144];
    let labels: Vec<usize> = (0..n).map(|_| rng.random_range(0..4)).collect();
    for (i, &y) in labels.iter().enumerate() {
        for p in 0..144 {
            let (r, c) = (p / 12, p % 12);
            let quad = (r / 6) * 2 + c / 6;
            px[i * 144 + p] = rng.random_range(0.0f32..0.3) + if quad == y { 0.7 } else { 0.0 };
        }
    }
    (px, labels)
}

/// Six inputs for `arch` (for BERT: random token sequences of 1 to 16 tokens).
pub fn six_inputs(arch: Arch, rng: &mut ChaCha8Rng) -> Batch {
    match arch {
        Arch::Vit => Batch::images(&images(6, 1).0, 12).unwrap(),
        Arch::Bert => {
            let seqs: Vec<Vec<u32>> = [9usize, 4, 16, 1, 7, 12]
                .iter()
                .map(|&n| (0..n).map(|_| rng.random_range(0..50)).collect())
                .collect();
            Batch::tokens(&seqs).unwrap()
        }
    }
}

/// Every f32 gradient against the f64 one: `1e-4·scale + 1e-3·|g|`, the scale being the
/// tensor's largest f64 gradient. A bias's gradient Σ_t G_t can cancel to ~0 (exactly, for key
/// biases: softmax ignores a shift shared by a whole row), so its rounding error scales with
/// its terms, whose size the matching weight's gradient Σ_t G_t x_tᵀ shows.
pub fn compare_grads(g32: &Grads<f32>, g64: &Grads<f64>, ctx: &str) {
    assert_eq!(g32.map.len(), g64.map.len(), "{ctx}: the same parameters get gradients");
    let scale_of = |name: &str| {
        g64.get(name)
            .map_or(0.0, |g| g.iter().fold(0.0f64, |a, &x| a.max(x.abs())))
    };
    for (name, want) in &g64.map {
        let weight = name.strip_suffix(".bias").map(|s| format!("{s}.weight"));
        let scale = scale_of(name).max(weight.map_or(0.0, |w| scale_of(&w)));
        compare(name, g32.get(name).unwrap(), want, Tol::new(1e-4 * scale, 1e-3))
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    }
}
