//! LoRA adapters in PEFT's on-disk layout, and libraries of adapters that can be composed.
//!
//! An adapter directory holds
//! - `adapter_model.safetensors`: per adapted linear layer `P` (a module path such as
//!   `encoder.layer.0.attention.self.query`) the tensors
//!   `base_model.model.P.lora_A.weight` (A: r×d_in) and `base_model.model.P.lora_B.weight`
//!   (B: d_out×r). Some PEFT versions insert the adapter name (`P.lora_A.default.weight`);
//!   both spellings are read, the first one is written.
//! - `adapter_config.json`: `r`, `lora_alpha`, `target_modules`, `use_rslora`, and the
//!   optional per-module overrides `rank_pattern` / `alpha_pattern`.
//!
//! The layer's update is `ΔW = s · B A` with `s = alpha / r` (`alpha / √r` with rsLoRA), where
//! `r` and `alpha` come from the patterns when one matches `P` (see [`pattern_key`]).
//!
//! Tensors are read as f32, f16 or bf16 and held as f32; they are written as f32 unless asked
//! otherwise. Every error names the file and, where there is one, the tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use regex::Regex;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's pickle format; named in the error when it is the only weights file present.
pub const LEGACY_WEIGHTS_FILE: &str = "adapter_model.bin";
/// Prefix PEFT puts before every module path in a saved adapter.
pub const KEY_PREFIX: &str = "base_model.model.";
/// Header sizes above this are refused before any parsing (safetensors' own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Element type used when writing tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

/// `target_modules` as PEFT stores it: a list of module-name suffixes, or one regex that must
/// match the full module path.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

/// One `rank_pattern` / `alpha_pattern` entry, its key compiled the way PEFT uses it.
#[derive(Clone, Debug)]
pub struct PatternEntry<T> {
    pub key: String,
    pub value: T,
    matcher: Regex,
}

impl<T> PatternEntry<T> {
    fn new(config_path: &Path, field: &str, key: &str, value: T) -> Result<Self> {
        // PEFT's `get_pattern_key` runs `re.match(rf"(.*\.)?({key})$", module_path)`: the key is
        // a regex that must match a dot-separated suffix of the path (or the whole path).
        // Whether a full-string match exists does not depend on the engine's match semantics, so
        // Rust's `regex` agrees with Python's `re` on every key both accept.
        let matcher = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| Error::Config {
            path: config_path.to_path_buf(),
            msg: format!("{field} key `{key}` is not a regex this tool understands: {e}"),
        })?;
        Ok(PatternEntry {
            key: key.to_string(),
            value,
            matcher,
        })
    }
}

/// The first entry (in file order) whose key matches `module_path`, as PEFT picks it.
pub fn pattern_key<'a, T>(entries: &'a [PatternEntry<T>], module_path: &str) -> Option<&'a PatternEntry<T>> {
    entries.iter().find(|e| e.matcher.is_match(module_path))
}

/// `adapter_config.json`, with the fields this crate uses parsed and every other field kept.
#[derive(Clone, Debug)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    /// GPT-2 style `Conv1D` layers store the base weight as d_in×d_out; only folding cares.
    pub fan_in_fan_out: bool,
    pub rank_pattern: Vec<PatternEntry<usize>>,
    pub alpha_pattern: Vec<PatternEntry<f64>>,
    /// Every field as read, in file order. Written back with the fields above overriding it,
    /// so fields this crate does not know survive a round trip.
    pub raw: Map<String, Value>,
}

impl AdapterConfig {
    /// A config with PEFT's defaults for the fields this crate does not use.
    pub fn new(r: usize, lora_alpha: f64, target_modules: TargetModules) -> Self {
        let mut raw = Map::new();
        raw.insert("peft_type".into(), "LORA".into());
        raw.insert("task_type".into(), Value::Null);
        raw.insert("base_model_name_or_path".into(), Value::Null);
        raw.insert("bias".into(), "none".into());
        raw.insert("lora_dropout".into(), 0.0.into());
        raw.insert("inference_mode".into(), true.into());
        raw.insert("init_lora_weights".into(), true.into());
        raw.insert("modules_to_save".into(), Value::Null);
        AdapterConfig {
            r,
            lora_alpha,
            target_modules,
            use_rslora: false,
            fan_in_fan_out: false,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            raw,
        }
    }

    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let Value::Object(raw) = value else {
            return Err(config_err(path, "expected a JSON object at the top level"));
        };
        let field = |name: &str| raw.get(name).filter(|v| !v.is_null());
        if let Some(t) = field("peft_type") {
            if t.as_str() != Some("LORA") {
                return Err(config_err(
                    path,
                    format!("peft_type is {t}, only LORA adapters are supported"),
                ));
            }
        }
        if field("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(config_err(path, "use_dora is true: DoRA adapters are not supported"));
        }
        let r = positive_int(path, "r", field("r"))?;
        let lora_alpha = finite_number(path, "lora_alpha", field("lora_alpha"))?;
        let target_modules = match field("target_modules") {
            None => return Err(config_err(path, "missing field `target_modules`")),
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(items)) => TargetModules::List(
                items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| config_err(path, format!("target_modules entry {v} is not a string")))
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(v) => {
                return Err(config_err(
                    path,
                    format!("target_modules must be a list or a string, got {v}"),
                ))
            }
        };
        let use_rslora = optional_bool(path, "use_rslora", field("use_rslora"))?;
        let fan_in_fan_out = optional_bool(path, "fan_in_fan_out", field("fan_in_fan_out"))?;
        let rank_pattern = pattern_entries(path, "rank_pattern", field("rank_pattern"), |k, v| {
            positive_int(path, &format!("rank_pattern[{k}]"), Some(v))
        })?;
        let alpha_pattern = pattern_entries(path, "alpha_pattern", field("alpha_pattern"), |k, v| {
            finite_number(path, &format!("alpha_pattern[{k}]"), Some(v))
        })?;
        Ok(AdapterConfig {
            r,
            lora_alpha,
            target_modules,
            use_rslora,
            fan_in_fan_out,
            rank_pattern,
            alpha_pattern,
            raw,
        })
    }

    pub fn to_json(&self) -> Value {
        let mut out = self.raw.clone();
        out.insert("r".into(), self.r.into());
        out.insert("lora_alpha".into(), json_number(self.lora_alpha));
        out.insert(
            "target_modules".into(),
            match &self.target_modules {
                TargetModules::List(items) => items.clone().into(),
                TargetModules::Regex(s) => s.clone().into(),
            },
        );
        out.insert("use_rslora".into(), self.use_rslora.into());
        out.insert("fan_in_fan_out".into(), self.fan_in_fan_out.into());
        let ranks: Map<String, Value> = self
            .rank_pattern
            .iter()
            .map(|e| (e.key.clone(), e.value.into()))
            .collect();
        let alphas: Map<String, Value> = self
            .alpha_pattern
            .iter()
            .map(|e| (e.key.clone(), json_number(e.value)))
            .collect();
        out.insert("rank_pattern".into(), Value::Object(ranks));
        out.insert("alpha_pattern".into(), Value::Object(alphas));
        Value::Object(out)
    }

    /// Rank PEFT gives the module at `module_path`: `rank_pattern`'s first match, else `r`.
    pub fn rank_for(&self, module_path: &str) -> usize {
        pattern_key(&self.rank_pattern, module_path).map_or(self.r, |e| e.value)
    }

    /// `lora_alpha` PEFT gives the module: `alpha_pattern`'s first match, else `lora_alpha`.
    pub fn alpha_for(&self, module_path: &str) -> f64 {
        pattern_key(&self.alpha_pattern, module_path).map_or(self.lora_alpha, |e| e.value)
    }

    /// `s = alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// Replaces `rank_pattern` / `alpha_pattern`; keys are checked as [`PatternEntry`] does.
    pub fn set_patterns(&mut self, ranks: &[(&str, usize)], alphas: &[(&str, f64)]) -> Result<()> {
        let here = Path::new("<in memory>");
        self.rank_pattern = ranks
            .iter()
            .map(|&(k, v)| PatternEntry::new(here, "rank_pattern", k, v))
            .collect::<Result<_>>()?;
        self.alpha_pattern = alphas
            .iter()
            .map(|&(k, v)| PatternEntry::new(here, "alpha_pattern", k, v))
            .collect::<Result<_>>()?;
        Ok(())
    }
}

fn config_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Integral alphas are written as JSON integers, as PEFT's configs usually have them.
fn json_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        (x as i64).into()
    } else {
        x.into()
    }
}

fn positive_int(path: &Path, name: &str, v: Option<&Value>) -> Result<usize> {
    match v {
        None => Err(config_err(path, format!("missing field `{name}`"))),
        Some(v) => v
            .as_u64()
            .filter(|&n| n >= 1 && n <= u32::MAX as u64)
            .map(|n| n as usize)
            .ok_or_else(|| config_err(path, format!("`{name}` must be a positive integer, got {v}"))),
    }
}

fn finite_number(path: &Path, name: &str, v: Option<&Value>) -> Result<f64> {
    match v {
        None => Err(config_err(path, format!("missing field `{name}`"))),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| config_err(path, format!("`{name}` must be a finite number, got {v}"))),
    }
}

fn optional_bool(path: &Path, name: &str, v: Option<&Value>) -> Result<bool> {
    match v {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(config_err(path, format!("`{name}` must be true or false, got {v}"))),
    }
}

fn pattern_entries<T>(
    path: &Path,
    name: &str,
    v: Option<&Value>,
    parse: impl Fn(&str, &Value) -> Result<T>,
) -> Result<Vec<PatternEntry<T>>> {
    match v {
        None => Ok(Vec::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| PatternEntry::new(path, name, k, parse(k, v)?))
            .collect(),
        Some(v) => Err(config_err(path, format!("`{name}` must be an object, got {v}"))),
    }
}

/// One adapted linear layer: `ΔW = scale · B A`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraLayer {
    /// Module path in the base model, e.g. `encoder.layer.0.attention.self.query`.
    pub path: String,
    /// (r, d_in) row-major.
    pub a: Vec<f32>,
    /// (d_out, r) row-major.
    pub b: Vec<f32>,
    pub r: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub alpha: f32,
    pub scale: f32,
}

impl LoraLayer {
    /// `scale · B A` as (d_out, d_in) row-major, accumulated in f64.
    pub fn delta_weight(&self) -> Vec<f32> {
        let (r, d_in) = (self.r, self.d_in);
        let mut out = vec![0f32; self.d_out * d_in];
        let mut row = vec![0f64; d_in];
        for (o, out_row) in out.chunks_exact_mut(d_in).enumerate() {
            row.iter_mut().for_each(|x| *x = 0.0);
            // Row o of B A is Σ_k B[o,k] · A[k,:]; walking A row by row keeps both streams
            // contiguous, which is fast enough for d = 4096 without a GEMM library.
            for k in 0..r {
                let bk = f64::from(self.b[o * r + k]);
                if bk == 0.0 {
                    continue;
                }
                for (acc, &a) in row.iter_mut().zip(&self.a[k * d_in..(k + 1) * d_in]) {
                    *acc += bk * f64::from(a);
                }
            }
            let s = f64::from(self.scale);
            for (dst, &acc) in out_row.iter_mut().zip(&row) {
                *dst = (s * acc) as f32;
            }
        }
        out
    }
}

/// One adapter: its config and its layers keyed by module path.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// Directory it was read from, if any.
    pub dir: Option<PathBuf>,
    /// Short name for messages: the directory's last component, or what the creator chose.
    pub name: String,
    pub config: AdapterConfig,
    pub layers: BTreeMap<String, LoraLayer>,
}

impl Adapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Adapter> {
        let dir = dir.as_ref();
        let meta = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
        if !meta.is_dir() {
            return Err(Error::File {
                path: dir.to_path_buf(),
                msg: "not a directory (expected a PEFT adapter directory)".into(),
            });
        }
        let config_path = dir.join(CONFIG_FILE);
        let text = fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = AdapterConfig::from_json(&config_path, &text)?;

        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.exists() && dir.join(LEGACY_WEIGHTS_FILE).exists() {
            return Err(Error::File {
                path: weights_path,
                msg: format!(
                    "missing; only {LEGACY_WEIGHTS_FILE} is present, and lora-compose reads \
                     safetensors only (re-save with PEFT's save_pretrained(..., safe_serialization=True))"
                ),
            });
        }
        let bytes = fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let layers = layers_from_safetensors(&weights_path, &bytes, &config)?;
        let name = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        Ok(Adapter {
            dir: Some(dir.to_path_buf()),
            name,
            config,
            layers,
        })
    }

    /// Writes both files into `dir` (created if missing). Not atomic: see
    /// [`crate::merge::write_adapter_atomic`].
    pub fn save(&self, dir: impl AsRef<Path>, dtype: StoreDtype) -> Result<()> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let config_path = dir.join(CONFIG_FILE);
        let mut text = serde_json::to_string_pretty(&self.config.to_json()).map_err(|e| Error::Json {
            path: config_path.clone(),
            msg: e.to_string(),
        })?;
        text.push('\n');
        fs::write(&config_path, text).map_err(|e| Error::io(&config_path, e))?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let bytes = self.to_safetensors(dtype, &weights_path)?;
        fs::write(&weights_path, bytes).map_err(|e| Error::io(&weights_path, e))
    }

    /// The bytes of `adapter_model.safetensors`; `path` is only used in messages.
    pub fn to_safetensors(&self, dtype: StoreDtype, path: &Path) -> Result<Vec<u8>> {
        let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(2 * self.layers.len());
        for layer in self.layers.values() {
            let prefix = format!("{KEY_PREFIX}{}", layer.path);
            named.push((
                format!("{prefix}.lora_A.weight"),
                vec![layer.r, layer.d_in],
                encode(&layer.a, dtype),
            ));
            named.push((
                format!("{prefix}.lora_B.weight"),
                vec![layer.d_out, layer.r],
                encode(&layer.b, dtype),
            ));
        }
        let st_dtype = match dtype {
            StoreDtype::F32 => Dtype::F32,
            StoreDtype::F16 => Dtype::F16,
            StoreDtype::Bf16 => Dtype::BF16,
        };
        serialize_tensors(
            path,
            named
                .iter()
                .map(|(n, shape, data)| (n.as_str(), st_dtype, shape.clone(), data.as_slice())),
            Some(HashMap::from([("format".to_string(), "pt".to_string())])),
        )
    }
}

/// Serialises `(name, dtype, shape, bytes)` tuples; `path` is only used in messages.
pub(crate) fn serialize_tensors<'a>(
    path: &Path,
    tensors: impl Iterator<Item = (&'a str, Dtype, Vec<usize>, &'a [u8])>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views = tensors
        .map(|(name, dtype, shape, data)| {
            TensorView::new(dtype, shape, data)
                .map(|v| (name, v))
                .map_err(|e| Error::Tensor {
                    path: path.to_path_buf(),
                    tensor: name.to_string(),
                    msg: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    serialize_sorted(path, views, metadata)
}

/// `safetensors::serialize` with the `__metadata__` keys in sorted order. The crate hands its
/// metadata over as a `HashMap`, whose iteration order (and so the header's bytes) changes from
/// run to run; sorting makes every file we write a function of its contents, so a regenerated
/// artefact can be compared with the committed one byte for byte.
pub(crate) fn serialize_sorted<S: AsRef<str> + Ord + std::fmt::Display>(
    path: &Path,
    views: Vec<(S, TensorView<'_>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let err = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let raw = safetensors::serialize(views, metadata).map_err(|e| err(e.to_string()))?;
    let n = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes")) as usize;
    let mut header: Map<String, Value> =
        serde_json::from_slice(&raw[8..8 + n]).map_err(|e| err(format!("own header: {e}")))?;
    if let Some(Value::Object(meta)) = header.get_mut("__metadata__") {
        let mut pairs: Vec<(String, Value)> = std::mem::take(meta).into_iter().collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        meta.extend(pairs);
    }
    let mut text = serde_json::to_string(&header)
        .expect("a JSON map serialises")
        .into_bytes();
    // The header stays padded with spaces to a multiple of 8 bytes, as safetensors writes it.
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + text.len() + raw.len() - 8 - n);
    out.extend((text.len() as u64).to_le_bytes());
    out.extend(text);
    out.extend(&raw[8 + n..]);
    Ok(out)
}

pub(crate) fn encode(values: &[f32], dtype: StoreDtype) -> Vec<u8> {
    match dtype {
        StoreDtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        StoreDtype::F16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        StoreDtype::Bf16 => values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
    }
}

/// Parses a whole safetensors file held in memory, with the header length checked against the
/// file size before the library sees it.
pub(crate) fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    let malformed = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(malformed(format!(
            "file is {} bytes, shorter than the 8-byte header length",
            bytes.len()
        )));
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().expect("slice of 8 bytes"));
    if header_len > MAX_HEADER_BYTES || header_len > bytes.len() as u64 - 8 {
        return Err(malformed(format!(
            "header length {header_len} does not fit in a {}-byte file",
            bytes.len()
        )));
    }
    SafeTensors::deserialize(bytes).map_err(|e| malformed(e.to_string()))
}

/// A tensor's values as f32, for the three float types PEFT writes.
pub(crate) fn decode_f32(path: &Path, name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::Tensor {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                msg: format!("dtype {other:?} is not supported (f32, f16 or bf16 only)"),
            })
        }
    };
    Ok(values)
}

/// Which factor a saved key holds, and for which module path.
fn classify_key(key: &str) -> Option<(String, bool)> {
    let stem = key.strip_suffix(".weight")?;
    let stem = stem.strip_prefix(KEY_PREFIX).unwrap_or(stem);
    for (factor, is_a) in [(".lora_A", true), (".lora_B", false)] {
        if let Some(path) = stem.strip_suffix(factor) {
            return Some((path.to_string(), is_a));
        }
        // `P.lora_A.<adapter name>.weight`, written by some PEFT versions.
        if let Some((head, adapter_name)) = stem.rsplit_once('.') {
            if !adapter_name.is_empty() {
                if let Some(path) = head.strip_suffix(factor) {
                    return Some((path.to_string(), is_a));
                }
            }
        }
    }
    None
}

struct Factor {
    key: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

fn layers_from_safetensors(path: &Path, bytes: &[u8], config: &AdapterConfig) -> Result<BTreeMap<String, LoraLayer>> {
    let st = parse_safetensors(path, bytes)?;
    let tensor_err = |tensor: &str, msg: String| Error::Tensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        msg,
    };
    let mut factors: BTreeMap<String, [Option<Factor>; 2]> = BTreeMap::new();
    for (key, view) in st.iter() {
        let Some((module, is_a)) = classify_key(key) else {
            return Err(tensor_err(
                key,
                "not a lora_A/lora_B weight; embedding LoRA, DoRA, LoRA biases and modules_to_save are not supported"
                    .into(),
            ));
        };
        if module.is_empty() {
            return Err(tensor_err(key, "empty module path".into()));
        }
        if view.shape().len() != 2 || view.shape().contains(&0) {
            return Err(tensor_err(
                key,
                format!("expected a non-empty 2-D tensor, got shape {:?}", view.shape()),
            ));
        }
        let values = decode_f32(path, key, &view)?;
        if let Some(i) = values.iter().position(|x| !x.is_finite()) {
            return Err(tensor_err(
                key,
                format!("non-finite value {} at flat index {i}", values[i]),
            ));
        }
        let slot = &mut factors.entry(module).or_default()[usize::from(!is_a)];
        if let Some(previous) = slot {
            return Err(tensor_err(key, format!("duplicate of `{}`", previous.key)));
        }
        *slot = Some(Factor {
            key: key.to_string(),
            shape: view.shape().to_vec(),
            values,
        });
    }
    if factors.is_empty() {
        return Err(Error::File {
            path: path.to_path_buf(),
            msg: "contains no LoRA tensors".into(),
        });
    }
    let mut layers = BTreeMap::new();
    for (module, [a, b]) in factors {
        let missing = |which: &str| {
            tensor_err(
                &format!("{KEY_PREFIX}{module}.{which}.weight"),
                "missing (its partner factor is present)".into(),
            )
        };
        let a = a.ok_or_else(|| missing("lora_A"))?;
        let b = b.ok_or_else(|| missing("lora_B"))?;
        let (r, d_in) = (a.shape[0], a.shape[1]);
        let (d_out, r_b) = (b.shape[0], b.shape[1]);
        if r_b != r {
            return Err(tensor_err(
                &b.key,
                format!("shape {:?} has {r_b} columns but `{}` has {r} rows", b.shape, a.key),
            ));
        }
        let r_config = config.rank_for(&module);
        if r != r_config {
            return Err(tensor_err(
                &a.key,
                format!(
                    "rank {r} (shape {:?}) but the config gives this module r = {r_config}",
                    a.shape
                ),
            ));
        }
        let alpha = config.alpha_for(&module);
        let scale = config.scale(r, alpha);
        layers.insert(
            module.clone(),
            LoraLayer {
                path: module,
                a: a.values,
                b: b.values,
                r,
                d_in,
                d_out,
                alpha: alpha as f32,
                scale: scale as f32,
            },
        );
    }
    Ok(layers)
}

/// Adapters that adapt the same layers with the same shapes, ready to be composed.
#[derive(Clone, Debug)]
pub struct Library {
    pub adapters: Vec<Adapter>,
}

impl Library {
    /// Checks that every adapter adapts the same set of layers, each with the same d_in/d_out,
    /// and names the first mismatch.
    pub fn new(adapters: Vec<Adapter>) -> Result<Library> {
        let Some(first) = adapters.first() else {
            return Err(Error::Arg("a library needs at least one adapter".into()));
        };
        for other in &adapters[1..] {
            if other.config.fan_in_fan_out != first.config.fan_in_fan_out {
                return Err(Error::Mismatch(format!(
                    "adapter `{}` has fan_in_fan_out = {} but `{}` has {}",
                    other.name, other.config.fan_in_fan_out, first.name, first.config.fan_in_fan_out
                )));
            }
            if let Some(path) = first.layers.keys().find(|p| !other.layers.contains_key(*p)) {
                return Err(Error::Mismatch(format!(
                    "adapter `{}` has no layer `{path}`, which adapter `{}` has",
                    other.name, first.name
                )));
            }
            if let Some(path) = other.layers.keys().find(|p| !first.layers.contains_key(*p)) {
                return Err(Error::Mismatch(format!(
                    "adapter `{}` has layer `{path}`, which adapter `{}` lacks",
                    other.name, first.name
                )));
            }
            for (path, l0) in &first.layers {
                let li = &other.layers[path];
                if (li.d_out, li.d_in) != (l0.d_out, l0.d_in) {
                    return Err(Error::Mismatch(format!(
                        "layer `{path}`: adapter `{}` has d_out×d_in = {}×{}, adapter `{}` has {}×{}",
                        first.name, l0.d_out, l0.d_in, other.name, li.d_out, li.d_in
                    )));
                }
            }
        }
        Ok(Library { adapters })
    }

    /// Loads each directory with [`Adapter::load`], then [`Library::new`].
    pub fn load<P: AsRef<Path>>(dirs: &[P]) -> Result<Library> {
        Library::new(dirs.iter().map(Adapter::load).collect::<Result<_>>()?)
    }

    /// Module paths of the adapted layers, sorted.
    pub fn layer_paths(&self) -> impl Iterator<Item = &str> {
        self.adapters[0].layers.keys().map(String::as_str)
    }
}

/// Layers of the demo model: (module path, d_in, d_out).
pub const DEMO_LAYERS: [(&str, usize, usize); 4] = [
    ("encoder.layer.0.attention.self.query", 48, 48),
    ("encoder.layer.0.attention.self.value", 48, 48),
    ("encoder.layer.0.intermediate.dense", 48, 64),
    ("encoder.layer.1.attention.self.query", 48, 48),
];

/// `n` small random adapters over [`DEMO_LAYERS`], deterministic in `seed`: ranks 2–8 cycle,
/// alphas differ, adapter 2 (mod 4) uses rsLoRA and adapter 1 (mod 4) a `rank_pattern` /
/// `alpha_pattern` for its query layers. B is random (not PEFT's zero init) so ΔW ≠ 0.
pub fn demo_adapters(n: usize, seed: u64) -> Result<Vec<Adapter>> {
    const RANKS: [usize; 4] = [4, 8, 2, 6];
    const ALPHAS: [f64; 4] = [8.0, 16.0, 4.0, 3.0];
    (0..n)
        .map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
            let targets = ["query", "value", "dense"].map(String::from).to_vec();
            let mut config = AdapterConfig::new(RANKS[i % 4], ALPHAS[i % 4], TargetModules::List(targets));
            config.use_rslora = i % 4 == 2;
            if i % 4 == 1 {
                config.set_patterns(&[("query", 3)], &[("layer.1.attention.self.query", 5.0)])?;
            }
            let layers = DEMO_LAYERS
                .iter()
                .map(|&(path, d_in, d_out)| {
                    let r = config.rank_for(path);
                    let alpha = config.alpha_for(path);
                    let a_bound = 1.0 / (d_in as f32).sqrt();
                    let a = (0..r * d_in).map(|_| rng.random_range(-a_bound..a_bound)).collect();
                    let b = (0..d_out * r).map(|_| rng.random_range(-0.1f32..0.1)).collect();
                    let layer = LoraLayer {
                        path: path.to_string(),
                        a,
                        b,
                        r,
                        d_in,
                        d_out,
                        alpha: alpha as f32,
                        scale: config.scale(r, alpha) as f32,
                    };
                    (path.to_string(), layer)
                })
                .collect();
            Ok(Adapter {
                dir: None,
                name: format!("adapter_{i}"),
                config,
                layers,
            })
        })
        .collect()
}

/// A random base model for [`DEMO_LAYERS`] as safetensors bytes: `P.weight` (d_out×d_in) and
/// `P.bias` for each layer, f32.
pub fn demo_base(seed: u64, path_for_messages: &Path) -> Result<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xba5e);
    let mut named = Vec::new();
    for &(path, d_in, d_out) in &DEMO_LAYERS {
        let bound = 1.0 / (d_in as f32).sqrt();
        let w: Vec<f32> = (0..d_out * d_in).map(|_| rng.random_range(-bound..bound)).collect();
        let b: Vec<f32> = (0..d_out).map(|_| rng.random_range(-bound..bound)).collect();
        named.push((format!("{path}.weight"), vec![d_out, d_in], encode(&w, StoreDtype::F32)));
        named.push((format!("{path}.bias"), vec![d_out], encode(&b, StoreDtype::F32)));
    }
    serialize_tensors(
        path_for_messages,
        named
            .iter()
            .map(|(n, s, d)| (n.as_str(), Dtype::F32, s.clone(), d.as_slice())),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(ranks: &[(&str, usize)]) -> AdapterConfig {
        let mut c = AdapterConfig::new(8, 16.0, TargetModules::List(vec!["query".into()]));
        c.set_patterns(ranks, &[]).unwrap();
        c
    }

    /// Files with the same tensors and metadata are the same bytes, whatever order the
    /// metadata's `HashMap` iterates in, and read back as written.
    #[test]
    fn serialized_metadata_is_sorted_and_the_bytes_repeat() {
        let data: Vec<u8> = (0..24).collect();
        let write = || {
            let meta: HashMap<String, String> = (0..12).map(|i| (format!("key{i}"), "v".repeat(i))).collect();
            let views = vec![
                ("b", TensorView::new(Dtype::U8, vec![4, 3], &data[..12]).unwrap()),
                ("a", TensorView::new(Dtype::U8, vec![12], &data[12..]).unwrap()),
            ];
            serialize_sorted(Path::new("t"), views, Some(meta)).unwrap()
        };
        let first = write();
        for _ in 0..8 {
            assert_eq!(write(), first);
        }
        let n = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let (_, meta) = SafeTensors::read_metadata(&first).unwrap();
        let meta = meta.metadata().as_ref().unwrap();
        assert_eq!(meta.len(), 12);
        assert_eq!(meta["key7"], "vvvvvvv");
        let header = std::str::from_utf8(&first[8..8 + n]).unwrap();
        let mut names: Vec<String> = (0..12).map(|i| format!("\"key{i}\"")).collect();
        names.sort();
        let at: Vec<usize> = names.iter().map(|k| header.find(k.as_str()).unwrap()).collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "metadata keys out of order: {header}"
        );
        let st = SafeTensors::deserialize(&first).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), &data[12..]);
        assert_eq!(st.tensor("b").unwrap().shape(), [4, 3]);
    }

    #[test]
    fn pattern_key_matches_dot_suffix_first_entry_wins() {
        let c = config_with(&[
            ("query", 2),
            (r"layer\.1\.attention\.self\.query", 5),
            ("self.value", 3),
        ]);
        // The first matching entry wins even when a later one is more specific (PEFT iterates
        // the dict in order and returns the first match).
        assert_eq!(c.rank_for("encoder.layer.1.attention.self.query"), 2);
        assert_eq!(c.rank_for("query"), 2);
        // A key must match a whole dot-separated suffix, not a substring.
        assert_eq!(c.rank_for("encoder.layer.0.attention.self.subquery"), 8);
        assert_eq!(c.rank_for("encoder.layer.0.attention.self.value"), 3);
        // Keys are regexes: `.` matches any character.
        assert_eq!(c.rank_for("encoder.layer.0.attention.selfXvalue"), 3);
        let c = config_with(&[(r"layer\.1\..*query", 5)]);
        assert_eq!(c.rank_for("encoder.layer.1.attention.self.query"), 5);
        assert_eq!(c.rank_for("encoder.layer.0.attention.self.query"), 8);
    }

    #[test]
    fn classify_key_accepts_both_spellings() {
        assert_eq!(
            classify_key("base_model.model.a.b.lora_A.weight"),
            Some(("a.b".into(), true))
        );
        assert_eq!(
            classify_key("base_model.model.a.b.lora_B.default.weight"),
            Some(("a.b".into(), false))
        );
        assert_eq!(classify_key("base_model.model.a.b.lora_magnitude_vector"), None);
        assert_eq!(classify_key("base_model.model.classifier.weight"), None);
    }
}
