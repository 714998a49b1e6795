//! all-MiniLM-L6-v2: its `config.json`, its `model.safetensors` (names without a `bert.`
//! prefix), its WordPiece tokenizer (`tokenizer.json`, through Hugging Face's `tokenizers`),
//! and its sentence embedding: mean of the last hidden states over real tokens, then L2
//! normalisation (sentence-transformers' Pooling + Normalize).
//!
//! Texts longer than the position table (512 tokens with `[CLS]` and `[SEP]`) are cut to
//! `[CLS]` + their first 510 word pieces + `[SEP]`, as Hugging Face's truncation does, and the
//! cut is reported. (sentence-transformers' own default for this model stops at 256 tokens;
//! pass `max_tokens = 256` to reproduce that.)

use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::{Arch, Config, Kind, Model, Pool, Real};
use crate::{Error, Result};

/// The fields of a Hugging Face BERT `config.json` this model reads.
#[derive(Debug, Deserialize)]
struct HfBertConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default = "two")]
    type_vocab_size: usize,
    #[serde(default = "bert_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    position_embedding_type: Option<String>,
}

fn two() -> usize {
    2
}
fn bert_eps() -> f64 {
    1e-12
}

/// A BERT configuration (mean pooling, `num_labels` classes) from a Hugging Face `config.json`.
pub fn config_from_json(path: &Path, num_labels: usize) -> Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let hf: HfBertConfig = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.into(),
        msg: e.to_string(),
    })?;
    if let Some(act) = hf.hidden_act.as_deref().filter(|&a| a != "gelu") {
        return Err(Error::Json {
            path: path.into(),
            msg: format!("hidden_act `{act}` is not supported (only `gelu`, the exact erf form)"),
        });
    }
    if let Some(p) = hf.position_embedding_type.as_deref().filter(|&p| p != "absolute") {
        return Err(Error::Json {
            path: path.into(),
            msg: format!("position_embedding_type `{p}` is not supported (only `absolute`)"),
        });
    }
    let config = Config {
        arch: Arch::Bert,
        hidden: hf.hidden_size,
        layers: hf.num_hidden_layers,
        heads: hf.num_attention_heads,
        intermediate: hf.intermediate_size,
        max_positions: hf.max_position_embeddings,
        vocab_size: hf.vocab_size,
        type_vocab_size: hf.type_vocab_size,
        image_size: 0,
        patch_size: 0,
        layer_norm_eps: hf.layer_norm_eps,
        pool: Pool::Mean,
        num_labels,
    };
    config.validate().map_err(|e| Error::Json {
        path: path.into(),
        msg: e.to_string(),
    })?;
    Ok(config)
}

/// Reads tensor `name` of `shape` as f32 (from F32, F16 or BF16), naming the tensor and both
/// shapes when they differ. `hint` explains where the expected shape comes from.
pub(crate) fn read_tensor(st: &SafeTensors, path: &Path, name: &str, shape: &[usize], hint: &str) -> Result<Vec<f32>> {
    let err = |msg: String| Error::Tensor {
        path: path.into(),
        tensor: name.to_string(),
        msg,
    };
    let view = st.tensor(name).map_err(|_| {
        let prefixed = st.names().into_iter().any(|n| n.strip_prefix("bert.") == Some(name));
        if prefixed {
            err("missing; the file has it as `bert.…`: tensor names must not carry the `bert.` prefix".into())
        } else {
            err(format!("missing from the file ({hint})"))
        }
    })?;
    if view.shape() != shape {
        return Err(err(format!(
            "shape {:?} in the file, but {hint} gives {:?}",
            view.shape(),
            shape
        )));
    }
    let bytes = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => return Err(err(format!("dtype {other:?}; expected F32, F16 or BF16"))),
    })
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

pub(crate) fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        path: path.into(),
        msg: e.to_string(),
    })
}

/// Loads every base weight of `model` from a Hugging Face BERT `model.safetensors`; other
/// tensors in the file (pooler, position ids) are ignored.
pub fn load_base_weights<T: Real>(model: &mut Model<T>, path: &Path) -> Result<()> {
    model.sync_host()?;
    let bytes = read_file(path)?;
    let st = parse_safetensors(path, &bytes)?;
    for p in model.params_mut() {
        if p.kind != Kind::Base {
            continue;
        }
        let data = read_tensor(&st, path, &p.name, &p.shape, "config.json")?;
        for (d, x) in p.data.iter_mut().zip(data) {
            *d = T::of(x as f64);
        }
    }
    model.sync_device()
}

/// Loads `config.json` and `model.safetensors` from `dir` into an f32 model with a head of
/// `num_labels` classes (random, seeded).
pub fn load_bert(dir: &Path, num_labels: usize, seed: u64) -> Result<Model<f32>> {
    let config = config_from_json(&dir.join("config.json"), num_labels)?;
    let mut model = Model::init(config, seed)?;
    load_base_weights(&mut model, &dir.join("model.safetensors"))?;
    Ok(model)
}

/// The WordPiece tokenizer of `tokenizer.json`, with the file's padding and truncation off.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    sep: u32,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)));
        }
        let json_err = |msg: String| Error::Json { path: path.into(), msg };
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| json_err(e.to_string()))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| json_err(e.to_string()))?;
        let sep = inner
            .token_to_id("[SEP]")
            .ok_or_else(|| json_err("the vocabulary has no [SEP] token".into()))?;
        Ok(Tokenizer { inner, sep })
    }

    /// `[CLS] pieces… [SEP]`, untruncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| Error::Input(format!("tokenizer failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn sep_id(&self) -> u32 {
        self.sep
    }
}

/// Token ids per text, and (text index, token count before truncation) per truncated text.
pub type Tokenized = (Vec<Vec<u32>>, Vec<(usize, usize)>);

/// A sentence encoder: the model and its tokenizer.
pub struct Encoder {
    pub model: Model<f32>,
    pub tokenizer: Tokenizer,
}

/// Sentence embeddings and what had to be cut.
#[derive(Clone, Debug, Default)]
pub struct Embeddings {
    /// One unit-length vector (D) per text, in input order.
    pub vectors: Vec<Vec<f32>>,
    /// (text index, its token count before truncation) for every truncated text.
    pub truncated: Vec<(usize, usize)>,
}

impl Encoder {
    /// `config.json`, `model.safetensors` and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(dir, std::io::Error::from(std::io::ErrorKind::NotFound)));
        }
        let model = load_bert(dir, 0, 0)?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        Ok(Encoder { model, tokenizer })
    }

    /// Token ids of each text, cut to `max_tokens` (`[CLS]` … `[SEP]` kept), and the
    /// (index, original length) of every text that was cut.
    pub fn tokenize(&self, texts: &[String], max_tokens: usize) -> Result<Tokenized> {
        let limit = self.model.config.max_positions;
        if max_tokens < 2 || max_tokens > limit {
            return Err(Error::Arg(format!(
                "max tokens {max_tokens} must be between 2 and the model's {limit} positions"
            )));
        }
        let mut truncated = Vec::new();
        let mut all = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            if text.trim().is_empty() {
                return Err(Error::Input(format!("text {i} is empty")));
            }
            let mut ids = self.tokenizer.encode(text)?;
            if ids.len() > max_tokens {
                truncated.push((i, ids.len()));
                ids.truncate(max_tokens - 1);
                ids.push(self.tokenizer.sep_id());
            }
            all.push(ids);
        }
        Ok((all, truncated))
    }

    /// Unit-length sentence embeddings, `batch_size` texts per forward (grouped by length so
    /// little padding is computed).
    pub fn embed(&self, texts: &[String], max_tokens: usize, batch_size: usize) -> Result<Embeddings> {
        if self.model.config.pool != Pool::Mean {
            return Err(Error::Arg("sentence embeddings need mean pooling".into()));
        }
        let (ids, truncated) = self.tokenize(texts, max_tokens)?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let d = self.model.config.hidden;
        let chunks: Vec<&[usize]> = order.chunks(batch_size.max(1)).collect();
        let pooled_of = |chunk: &&[usize]| -> Result<Vec<f32>> {
            let seqs: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            self.model.encode(&super::Batch::tokens(&seqs)?)
        };
        // On the CPU the batches run on the thread pool (each is independent, and the same
        // batches as one after another, so the vectors are too); a kernel device takes them in turn.
        let pooled: Vec<Vec<f32>> = if self.model.device().is_cpu() {
            use rayon::prelude::*;
            chunks.par_iter().map(pooled_of).collect::<Result<_>>()?
        } else {
            chunks.iter().map(pooled_of).collect::<Result<_>>()?
        };
        let mut vectors = vec![Vec::new(); ids.len()];
        for (chunk, pooled) in chunks.iter().zip(&pooled) {
            for (&i, row) in chunk.iter().zip(pooled.chunks(d)) {
                let norm = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt().max(1e-12);
                vectors[i] = row.iter().map(|&x| (x as f64 / norm) as f32).collect();
            }
        }
        Ok(Embeddings { vectors, truncated })
    }
}
