//! Model inputs: token sequences (BERT) or square 1-channel images (ViT), batched.

use super::{Arch, Config};
use crate::{Error, Result};

/// One batch of inputs, right-padded to a common length T.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// B
    pub batch: usize,
    /// T; image batches leave it 0 (the model runs patches + 1 tokens)
    pub seq: usize,
    /// (B, T) token ids, BERT only.
    pub ids: Vec<u32>,
    /// (B, T) token-type ids, BERT only.
    pub type_ids: Vec<u32>,
    /// (B, T): true for real tokens.
    pub mask: Vec<bool>,
    /// (B, side, side) pixels, ViT only.
    pub pixels: Vec<f32>,
    /// (B, T, D), BERT only, usually empty: when set, the hidden states entering the model's
    /// first block, which then skips its embeddings (`ids` only name the rows, `mask` still
    /// marks the real tokens). See [`super::Model::hidden_states`] and [`super::Model::top`].
    pub hidden: Vec<f32>,
}

impl Batch {
    /// Token sequences (each non-empty), padded with id 0; token type 0 everywhere.
    pub fn tokens<S: AsRef<[u32]>>(seqs: &[S]) -> Result<Batch> {
        if let Some(i) = seqs.iter().position(|s| s.as_ref().is_empty()) {
            return Err(Error::Arg(format!("sequence {i} of the batch has no tokens")));
        }
        let t = seqs.iter().map(|s| s.as_ref().len()).max().unwrap_or(0);
        let mut b = Batch {
            batch: seqs.len(),
            seq: t,
            ids: vec![0; seqs.len() * t],
            type_ids: vec![0; seqs.len() * t],
            mask: vec![false; seqs.len() * t],
            pixels: Vec::new(),
            hidden: Vec::new(),
        };
        for (i, s) in seqs.iter().enumerate() {
            let s = s.as_ref();
            b.ids[i * t..i * t + s.len()].copy_from_slice(s);
            b.mask[i * t..i * t + s.len()].fill(true);
        }
        Ok(b)
    }

    /// Square 1-channel images, `side × side` each, row-major, one after another.
    pub fn images(pixels: &[f32], side: usize) -> Result<Batch> {
        if side == 0 || pixels.len() % (side * side) != 0 {
            return Err(Error::Shape(format!(
                "{} pixels are not a whole number of {side}×{side} images",
                pixels.len()
            )));
        }
        Ok(Batch {
            batch: pixels.len() / (side * side),
            pixels: pixels.to_vec(),
            ..Batch::default()
        })
    }

    /// Examples `range` of this batch as a batch of their own (same padded length T).
    pub fn rows(&self, range: std::ops::Range<usize>) -> Batch {
        assert!(
            range.start <= range.end && range.end <= self.batch,
            "rows {range:?} of a batch of {}",
            self.batch
        );
        // Every per-example field holds the same number of values for each example (or none).
        fn take<T: Clone>(v: &[T], batch: usize, range: &std::ops::Range<usize>) -> Vec<T> {
            let per = v.len() / batch.max(1);
            v[range.start * per..range.end * per].to_vec()
        }
        Batch {
            batch: range.len(),
            seq: self.seq,
            ids: take(&self.ids, self.batch, &range),
            type_ids: take(&self.type_ids, self.batch, &range),
            mask: take(&self.mask, self.batch, &range),
            pixels: take(&self.pixels, self.batch, &range),
            hidden: take(&self.hidden, self.batch, &range),
        }
    }

    /// Checks the batch against the model's config; returns the sequence length T the model
    /// will run (ViT: patches + 1).
    pub fn check(&self, c: &Config) -> Result<usize> {
        let batch = self;
        if batch.batch == 0 {
            return Err(Error::Arg("empty batch".into()));
        }
        match c.arch {
            Arch::Bert => {
                let n = batch.batch * batch.seq;
                if batch.ids.len() != n || batch.type_ids.len() != n || batch.mask.len() != n {
                    return Err(Error::Shape(format!(
                        "batch of {}×{} tokens has {} ids, {} type ids, {} mask entries",
                        batch.batch,
                        batch.seq,
                        batch.ids.len(),
                        batch.type_ids.len(),
                        batch.mask.len()
                    )));
                }
                if batch.seq > c.max_positions {
                    return Err(Error::Arg(format!(
                        "sequences of {} tokens exceed the model's {} positions",
                        batch.seq, c.max_positions
                    )));
                }
                if let Some(&id) = batch.ids.iter().find(|&&id| id as usize >= c.vocab_size) {
                    return Err(Error::Arg(format!(
                        "token id {id} is outside the vocabulary of {}",
                        c.vocab_size
                    )));
                }
                if let Some(&id) = batch.type_ids.iter().find(|&&id| id as usize >= c.type_vocab_size) {
                    return Err(Error::Arg(format!(
                        "token type {id} is outside the {} types",
                        c.type_vocab_size
                    )));
                }
                if !batch.hidden.is_empty() && batch.hidden.len() != n * c.hidden {
                    return Err(Error::Shape(format!(
                        "batch of {}×{} tokens has {} hidden values, not {}×{}×{}",
                        batch.batch,
                        batch.seq,
                        batch.hidden.len(),
                        batch.batch,
                        batch.seq,
                        c.hidden
                    )));
                }
                if let Some(b) = batch.mask.chunks(batch.seq.max(1)).position(|m| !m.iter().any(|&x| x)) {
                    return Err(Error::Arg(format!("sequence {b} of the batch has no real tokens")));
                }
                Ok(batch.seq)
            }
            Arch::Vit => {
                let side = c.image_size;
                if batch.pixels.len() != batch.batch * side * side {
                    return Err(Error::Shape(format!(
                        "{} pixels for {} images of {side}×{side}",
                        batch.pixels.len(),
                        batch.batch
                    )));
                }
                Ok(c.n_patches() + 1)
            }
        }
    }
}
