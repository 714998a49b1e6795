//! Our own checkpoints as safetensors (f32): any of base weights, head, adapters.
//!
//! Tensors carry the parameter names of [`Model::params`]. Adapters are the trainable LoRAs
//! (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`), composition values
//! (`<layer>.compose_logits`, `compose.global_logits`) and, so a composition checkpoint stands
//! alone, each composed layer's frozen library stacked as in [`crate::compose::ModuleStack`]
//! (`<layer>.compose.a_cat` (R, d_in), `<layer>.compose.b_cat` (d_out, R)). The header's
//! metadata holds the config, the parts, ranks and scales, and the composition settings.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::bert::{parse_safetensors, read_file, read_tensor};
use super::linear::{Adapter, Composition, Library, LoraModule};
use super::{Config, Kind, Model, Real};
use crate::compose::{Mode, ModuleStack, Param};
use crate::{Error, Result};

/// Which parts a checkpoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parts {
    pub base: bool,
    pub head: bool,
    pub adapters: bool,
}

impl Parts {
    pub const ALL: Parts = Parts {
        base: true,
        head: true,
        adapters: true,
    };
    pub const BASE: Parts = Parts {
        base: true,
        head: false,
        adapters: false,
    };
    pub const HEAD_ADAPTERS: Parts = Parts {
        base: false,
        head: true,
        adapters: true,
    };

    fn holds(&self, kind: Kind) -> bool {
        match kind {
            Kind::Base => self.base,
            Kind::Head => self.head,
            _ => self.adapters,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CompMeta {
    mode: String,
    param: String,
    global: bool,
    /// layer → (ranks, scales)
    layers: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Product => "product",
        Mode::Factor => "factor",
    }
}

fn param_name(p: Param) -> &'static str {
    match p {
        Param::Raw => "raw",
        Param::Softmax => "softmax",
        Param::Uniform => "uniform",
    }
}

fn le_bytes<T: Real>(v: &[T]) -> Vec<u8> {
    v.iter().flat_map(|&x| (x.into() as f32).to_le_bytes()).collect()
}

/// Writes the chosen parts of `model` to `path`.
pub fn save<T: Real>(model: &Model<T>, path: &Path, parts: Parts) -> Result<()> {
    if model.resident.is_stale() {
        return Err(Error::Device(
            "the model trained on the device since its host weights were refreshed; call Model::sync_host before saving".into(),
        ));
    }
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = model
        .params()
        .into_iter()
        .filter(|p| parts.holds(p.kind))
        .map(|p| (p.name, p.shape, le_bytes(p.data)))
        .collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "lora-compose/1".to_string());
    meta.insert(
        "config".into(),
        serde_json::to_string(&model.config).expect("config serialises"),
    );
    meta.insert("parts".into(), serde_json::to_string(&parts).expect("parts serialise"));
    if parts.adapters {
        let mut lora = BTreeMap::new();
        let mut layers = BTreeMap::new();
        for l in model.blocks.iter().flat_map(|b| b.linears()) {
            let scales: Vec<f32> = l.modules.scales.iter().map(|&s| s.into() as f32).collect();
            match l.adapter {
                Adapter::None => {}
                Adapter::Lora => {
                    lora.insert(l.name.clone(), scales[0]);
                }
                Adapter::Compose { .. } => {
                    let r = l.modules.total_rank();
                    tensors.push((
                        format!("{}.compose.a_cat", l.name),
                        vec![r, l.d_in],
                        le_bytes(&l.modules.a_cat),
                    ));
                    tensors.push((
                        format!("{}.compose.b_cat", l.name),
                        vec![l.d_out, r],
                        le_bytes(&l.modules.b_cat),
                    ));
                    layers.insert(l.name.clone(), (l.modules.ranks.clone(), scales));
                }
            }
        }
        meta.insert("lora".into(), serde_json::to_string(&lora).expect("scales serialise"));
        if let Some(c) = model.composition {
            let cm = CompMeta {
                mode: mode_name(c.mode).into(),
                param: param_name(c.param).into(),
                global: c.global,
                layers,
            };
            meta.insert("composition".into(), serde_json::to_string(&cm).expect("serialises"));
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes).expect("byte count matches the shape");
            (name.clone(), view)
        })
        .collect();
    let bytes = crate::peft::serialize_sorted(path, views, Some(meta))?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Loads a checkpoint written by [`save`] into `model`, whose config must match the saved one.
/// With adapters, the model's adapters are replaced by the checkpoint's. Returns the parts read.
pub fn load<T: Real>(model: &mut Model<T>, path: &Path) -> Result<Parts> {
    model.sync_host()?;
    let bytes = read_file(path)?;
    let st = parse_safetensors(path, &bytes)?;
    let bad = |msg: String| Error::Safetensors { path: path.into(), msg };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header
        .metadata()
        .clone()
        .filter(|m| m.get("format").map(String::as_str) == Some("lora-compose/1"))
        .ok_or_else(|| bad("not a lora-compose checkpoint (no `format: lora-compose/1` metadata)".into()))?;
    let field = |key: &str| meta.get(key).ok_or_else(|| bad(format!("metadata `{key}` missing")));
    let config: Config = serde_json::from_str(field("config")?).map_err(|e| bad(format!("config: {e}")))?;
    if config != model.config {
        let (a, b) = (
            serde_json::to_value(&config).expect("serialises"),
            serde_json::to_value(&model.config).expect("serialises"),
        );
        let diffs: Vec<String> = a
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| b.get(k.as_str()) != Some(v))
            .map(|(k, v)| format!("{k}: checkpoint {v}, model {}", b[k.as_str()]))
            .collect();
        return Err(Error::Mismatch(format!(
            "{}: checkpoint config differs from the model's ({})",
            path.display(),
            diffs.join("; ")
        )));
    }
    let parts: Parts = serde_json::from_str(field("parts")?).map_err(|e| bad(format!("parts: {e}")))?;
    if parts.adapters {
        attach_saved_adapters(model, &st, path, &meta)?;
    }
    let mut known = std::collections::HashSet::new();
    for p in model.params_mut() {
        if !parts.holds(p.kind) {
            continue;
        }
        known.insert(p.name.clone());
        let data = read_tensor(&st, path, &p.name, &p.shape, "the model")?;
        for (d, x) in p.data.iter_mut().zip(data) {
            *d = T::of(x as f64);
        }
    }
    if let Some(extra) = st
        .names()
        .into_iter()
        .find(|n| !known.contains(*n) && !n.ends_with(".compose.a_cat") && !n.ends_with(".compose.b_cat"))
    {
        return Err(Error::Tensor {
            path: path.into(),
            tensor: extra.to_string(),
            msg: "matches no parameter of this model".into(),
        });
    }
    model.sync_device()?;
    Ok(parts)
}

fn attach_saved_adapters<T: Real>(
    model: &mut Model<T>,
    st: &safetensors::SafeTensors,
    path: &Path,
    meta: &HashMap<String, String>,
) -> Result<()> {
    let bad = |msg: String| Error::Safetensors { path: path.into(), msg };
    model.detach_adapters()?;
    let lora: BTreeMap<String, f32> = match meta.get("lora") {
        Some(s) => serde_json::from_str(s).map_err(|e| bad(format!("lora: {e}")))?,
        None => BTreeMap::new(),
    };
    for (layer, scale) in lora {
        let lin = model
            .linear_mut(&layer)
            .ok_or_else(|| Error::Mismatch(format!("{}: LoRA for unknown layer `{layer}`", path.display())))?;
        let name = format!("{layer}.lora_A.weight");
        let info = st.tensor(&name).map_err(|_| Error::Tensor {
            path: path.into(),
            tensor: name.clone(),
            msg: "missing".into(),
        })?;
        let r = info.shape().first().copied().unwrap_or(0);
        // The values are read with every other parameter; shapes are what matters here.
        let (a, b) = (vec![T::zero(); r * lin.d_in], vec![T::zero(); lin.d_out * r]);
        lin.modules = ModuleStack::from_modules(lin.d_in, lin.d_out, &[(&a, &b, T::of(scale as f64))])?;
        lin.adapter = Adapter::Lora;
    }
    if let Some(s) = meta.get("composition") {
        let cm: CompMeta = serde_json::from_str(s).map_err(|e| bad(format!("composition: {e}")))?;
        let comp = Composition {
            mode: match cm.mode.as_str() {
                "product" => Mode::Product,
                "factor" => Mode::Factor,
                m => return Err(bad(format!("unknown composition mode `{m}`"))),
            },
            param: match cm.param.as_str() {
                "raw" => Param::Raw,
                "softmax" => Param::Softmax,
                "uniform" => Param::Uniform,
                p => return Err(bad(format!("unknown coefficient parametrisation `{p}`"))),
            },
            global: cm.global,
        };
        let mut lib = Library::new();
        for (layer, (ranks, scales)) in &cm.layers {
            if ranks.len() != scales.len() || ranks.is_empty() {
                return Err(bad(format!(
                    "composition on `{layer}`: {} ranks but {} scales",
                    ranks.len(),
                    scales.len()
                )));
            }
            let lin = model.linear(layer).ok_or_else(|| {
                Error::Mismatch(format!("{}: composition on unknown layer `{layer}`", path.display()))
            })?;
            let r: usize = ranks.iter().sum();
            let stack = ModuleStack {
                d_in: lin.d_in,
                d_out: lin.d_out,
                ranks: ranks.clone(),
                scales: scales.clone(),
                a_cat: read_tensor(st, path, &format!("{layer}.compose.a_cat"), &[r, lin.d_in], "its ranks")?,
                b_cat: read_tensor(
                    st,
                    path,
                    &format!("{layer}.compose.b_cat"),
                    &[lin.d_out, r],
                    "its ranks",
                )?,
            };
            let modules = (0..ranks.len())
                .map(|i| {
                    let (a, b) = stack.module(i);
                    LoraModule { a, b, scale: scales[i] }
                })
                .collect();
            lib.insert(layer.clone(), modules);
        }
        model.attach_composition(&lib, comp)?;
    }
    Ok(())
}
