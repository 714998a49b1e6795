//! Weighted composition of a [`Library`] written back as one adapter, or folded into base
//! weights.
//!
//! With weights `w_i`, per-layer scales `s_i`, and the factors of adapter i at one layer:
//!
//! - [`Mode::Cat`] (exact product sum, DESIGN §2 and PEFT `combination_type="cat"`):
//!   `A = [w_1 s_1 A_1; …; w_N s_N A_N]` (rows), `B = [B_1 … B_N]` (columns), so
//!   `B A = Σ_i w_i s_i B_i A_i`; rank `Σ_i r_i`.
//! - [`Mode::Linear`] (factor sum, PEFT `combination_type="linear"`): with `c_i = w_i s_i`,
//!   `A = Σ_i sgn(c_i) √|c_i| A_i`, `B = Σ_i √|c_i| B_i`, so
//!   `B A = (Σ_i √|c_i| B_i)(Σ_j sgn(c_j) √|c_j| A_j)`, which has cross terms `i ≠ j` and is
//!   not the product sum; it needs equal ranks per layer.
//!
//! - [`Mode::Lorahub`] (LoraHub's factor merge, its paper and released code):
//!   `A = Σ_i w_i s_i A_i`, `B = Σ_i w_i B_i`, so `B A = (Σ_i w_i B_i)(Σ_j w_j s_j A_j)`; equal
//!   ranks per layer.
//!
//! Like PEFT, the merged adapter has one global rank `R` (cat: `Σ_i max_layer r_i`, linear:
//! the largest layer rank) and `lora_alpha = R`; layers whose rank is below `R` are padded with
//! zero rows of A and zero columns of B, which leaves `B A` unchanged. `rank_pattern` and
//! `alpha_pattern` are cleared. Unlike PEFT, which copies `use_rslora` from the first adapter
//! (giving scale `R/√R = √R` when it was set), the merged adapter has `use_rslora = false`, so
//! its scale is exactly 1 and `ΔW = B A`.

use std::fs;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::peft::{
    decode_f32, parse_safetensors, serialize_tensors, Adapter, Library, LoraLayer, StoreDtype, TargetModules,
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Exact product sum Σ w_i s_i B_i A_i, rank Σ r_i.
    #[default]
    Cat,
    /// Factor sum (Σ √|c_i| B_i)(Σ sgn(c_i) √|c_i| A_i), c_i = w_i s_i; equal ranks only.
    Linear,
    /// LoraHub's factor merge (Σ w_i B_i)(Σ w_i s_i A_i) (its paper and code; the crate's
    /// `compose::Mode::Factor`); equal ranks only.
    Lorahub,
}

/// Parses `w1,w2,...`; every entry must be a finite number.
pub fn parse_weights(text: &str) -> Result<Vec<f64>> {
    text.split(',')
        .map(|item| {
            let item = item.trim();
            let w: f64 = item
                .parse()
                .map_err(|_| Error::Arg(format!("--weights: `{item}` is not a number")))?;
            if !w.is_finite() {
                return Err(Error::Arg(format!("--weights: `{item}` is not finite")));
            }
            Ok(w)
        })
        .collect()
}

/// The given weights checked against the adapter count, or uniform `1/N`.
pub fn resolve_weights(n_adapters: usize, weights: Option<&[f64]>) -> Result<Vec<f64>> {
    match weights {
        None => Ok(vec![1.0 / n_adapters as f64; n_adapters]),
        Some(w) if w.len() != n_adapters => Err(Error::Arg(format!(
            "--weights has {} values but {n_adapters} adapters were given",
            w.len()
        ))),
        Some(w) => match w.iter().position(|x| !x.is_finite()) {
            Some(i) => Err(Error::Arg(format!("weight {i} is {}, not a finite number", w[i]))),
            None => Ok(w.to_vec()),
        },
    }
}

/// The composed adapter, in PEFT layout (see the module docs for what each mode computes).
pub fn merge(library: &Library, weights: &[f64], mode: Mode) -> Result<Adapter> {
    let adapters = &library.adapters;
    let weights = resolve_weights(adapters.len(), Some(weights))?;
    let max_rank = |a: &Adapter| a.layers.values().map(|l| l.r).max().unwrap_or(0);
    let global_rank = match mode {
        Mode::Cat => adapters.iter().map(max_rank).sum(),
        Mode::Linear | Mode::Lorahub => adapters.iter().map(max_rank).max().unwrap_or(0),
    };
    let mut layers = std::collections::BTreeMap::new();
    for path in library.layer_paths() {
        let parts: Vec<&LoraLayer> = adapters.iter().map(|a| &a.layers[path]).collect();
        let merged = match mode {
            Mode::Cat => cat_layer(path, &parts, &weights, global_rank),
            Mode::Linear | Mode::Lorahub => linear_layer(path, &parts, &weights, global_rank, adapters, mode)?,
        };
        layers.insert(path.to_string(), merged);
    }
    let first = &adapters[0].config;
    let mut config = first.clone();
    config.r = global_rank;
    config.lora_alpha = global_rank as f64;
    config.use_rslora = false;
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    config.target_modules = merged_targets(library);
    Ok(Adapter {
        dir: None,
        name: "merged".into(),
        config,
        layers,
    })
}

/// PEFT's rule: list ∪ list, or `(t1)|(t2)|…` for regex strings. A mix, which PEFT refuses,
/// becomes the exact list of merged module paths.
fn merged_targets(library: &Library) -> TargetModules {
    let configs: Vec<_> = library.adapters.iter().map(|a| &a.config.target_modules).collect();
    if configs.iter().all(|t| matches!(t, TargetModules::List(_))) {
        let mut all: Vec<String> = configs
            .iter()
            .flat_map(|t| match t {
                TargetModules::List(items) => items.clone(),
                TargetModules::Regex(_) => unreachable!("all lists"),
            })
            .collect();
        all.sort();
        all.dedup();
        TargetModules::List(all)
    } else if let [TargetModules::Regex(only)] = configs.as_slice() {
        TargetModules::Regex(only.clone())
    } else if configs.iter().all(|t| matches!(t, TargetModules::Regex(_))) {
        let joined = configs
            .iter()
            .map(|t| match t {
                TargetModules::Regex(s) => format!("({s})"),
                TargetModules::List(_) => unreachable!("all regexes"),
            })
            .collect::<Vec<_>>()
            .join("|");
        TargetModules::Regex(joined)
    } else {
        TargetModules::List(library.layer_paths().map(String::from).collect())
    }
}

/// A layer with given factors, zero-padded to rank `rank`, scale 1.
fn padded_layer(path: &str, part: &LoraLayer, a_rows: Vec<f32>, b_cols: Vec<Vec<f32>>, rank: usize) -> LoraLayer {
    let (d_in, d_out) = (part.d_in, part.d_out);
    let used = a_rows.len() / d_in;
    let mut a = a_rows;
    a.resize(rank * d_in, 0.0);
    // b_cols holds one (d_out, r_i) block per contributor; interleave them row by row.
    let mut b = Vec::with_capacity(d_out * rank);
    for o in 0..d_out {
        for block in &b_cols {
            let r_i = block.len() / d_out;
            b.extend_from_slice(&block[o * r_i..(o + 1) * r_i]);
        }
        b.resize(b.len() + rank - used, 0.0);
    }
    LoraLayer {
        path: path.to_string(),
        a,
        b,
        r: rank,
        d_in,
        d_out,
        alpha: rank as f32,
        scale: 1.0,
    }
}

fn cat_layer(path: &str, parts: &[&LoraLayer], weights: &[f64], rank: usize) -> LoraLayer {
    let mut a_rows = Vec::new();
    for (part, &w) in parts.iter().zip(weights) {
        let c = w * f64::from(part.scale);
        a_rows.extend(part.a.iter().map(|&x| (c * f64::from(x)) as f32));
    }
    let b_cols = parts.iter().map(|p| p.b.clone()).collect();
    padded_layer(path, parts[0], a_rows, b_cols, rank)
}

fn linear_layer(
    path: &str,
    parts: &[&LoraLayer],
    weights: &[f64],
    rank: usize,
    adapters: &[Adapter],
    mode: Mode,
) -> Result<LoraLayer> {
    let r = parts[0].r;
    if parts.iter().any(|p| p.r != r) {
        let ranks = parts
            .iter()
            .zip(adapters)
            .map(|(p, a)| format!("{} (`{}`)", p.r, a.name))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Error::Shape(format!(
            "layer `{path}`: --mode {} needs equal ranks across adapters, got r = {ranks}; use --mode cat",
            if mode == Mode::Linear { "linear" } else { "lorahub" }
        )));
    }
    let (d_in, d_out) = (parts[0].d_in, parts[0].d_out);
    let mut a = vec![0f64; r * d_in];
    let mut b = vec![0f64; d_out * r];
    for (part, &w) in parts.iter().zip(weights) {
        let (a_coef, root) = if mode == Mode::Lorahub {
            (w * f64::from(part.scale), w)
        } else {
            let c = w * f64::from(part.scale);
            let root = c.abs().sqrt();
            // The sign goes on A only, so that it is applied once in B A.
            (if c >= 0.0 { root } else { -root }, root)
        };
        for (dst, &x) in a.iter_mut().zip(&part.a) {
            *dst += a_coef * f64::from(x);
        }
        for (dst, &x) in b.iter_mut().zip(&part.b) {
            *dst += root * f64::from(x);
        }
    }
    let to_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    Ok(padded_layer(path, parts[0], to_f32(a), vec![to_f32(b)], rank))
}

/// Candidate base tensor names for adapter layer `path`, most specific first.
fn base_tensor_name(base_path: &Path, names: &[&str], path: &str) -> Result<String> {
    let wanted = format!("{path}.weight");
    let mut exact = vec![wanted.clone(), format!("model.{wanted}")];
    if let Some(stripped) = wanted.strip_prefix("model.") {
        exact.insert(1, stripped.to_string());
    }
    if let Some(hit) = exact.iter().find(|c| names.contains(&c.as_str())) {
        return Ok(hit.clone());
    }
    // One name being a dot-separated suffix of the other, e.g. `bert.encoder…` vs `encoder…`.
    let is_dot_suffix = |long: &str, short: &str| {
        long.len() > short.len() && long.ends_with(short) && long.as_bytes()[long.len() - short.len() - 1] == b'.'
    };
    let hits: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| is_dot_suffix(n, &wanted) || is_dot_suffix(&wanted, n))
        .collect();
    match hits.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(Error::Tensor {
            path: base_path.to_path_buf(),
            tensor: wanted,
            msg: format!(
                "no base tensor for adapter layer `{path}` (tried {} and dot-suffix matches)",
                exact.join(", ")
            ),
        }),
        many => Err(Error::Tensor {
            path: base_path.to_path_buf(),
            tensor: wanted,
            msg: format!(
                "adapter layer `{path}` matches several base tensors: {}",
                many.join(", ")
            ),
        }),
    }
}

/// `W + ΔW` for every layer of `delta` (ΔW = scale · B A), all other base tensors copied
/// unchanged; names, dtypes and `__metadata__` are kept. Returns the new file's bytes.
pub fn fold_into_base(base_path: &Path, base_bytes: &[u8], delta: &Adapter) -> Result<Vec<u8>> {
    let st = parse_safetensors(base_path, base_bytes)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(base_bytes).map_err(|e| Error::Safetensors {
        path: base_path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let names: Vec<&str> = st.iter().map(|(n, _)| n).collect();
    let mut replaced: std::collections::HashMap<String, (Vec<u8>, String)> = Default::default();
    for layer in delta.layers.values() {
        let name = base_tensor_name(base_path, &names, &layer.path)?;
        if let Some((_, other)) = replaced.get(&name) {
            return Err(Error::Tensor {
                path: base_path.to_path_buf(),
                tensor: name.clone(),
                msg: format!("adapter layers `{other}` and `{}` both map to it", layer.path),
            });
        }
        let view = st.tensor(&name).map_err(|e| Error::Safetensors {
            path: base_path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let transposed = delta.config.fan_in_fan_out;
        let expected = if transposed {
            [layer.d_in, layer.d_out]
        } else {
            [layer.d_out, layer.d_in]
        };
        if view.shape() != expected {
            return Err(Error::Tensor {
                path: base_path.to_path_buf(),
                tensor: name,
                msg: format!(
                    "shape {:?} but adapter layer `{}` needs {:?}{}",
                    view.shape(),
                    layer.path,
                    expected,
                    if transposed {
                        " (fan_in_fan_out: d_in×d_out)"
                    } else {
                        " (d_out×d_in)"
                    }
                ),
            });
        }
        let mut w = decode_f32(base_path, &name, &view)?;
        let dw = layer.delta_weight(); // (d_out, d_in)
        for o in 0..layer.d_out {
            for i in 0..layer.d_in {
                let at = if transposed {
                    i * layer.d_out + o
                } else {
                    o * layer.d_in + i
                };
                w[at] += dw[o * layer.d_in + i];
            }
        }
        let store = match view.dtype() {
            Dtype::F16 => StoreDtype::F16,
            Dtype::BF16 => StoreDtype::Bf16,
            _ => StoreDtype::F32,
        };
        replaced.insert(name, (crate::peft::encode(&w, store), layer.path.clone()));
    }
    let tensors: Vec<_> = st
        .iter()
        .map(|(name, view)| {
            let data = replaced.get(name).map_or(view.data(), |(bytes, _)| bytes.as_slice());
            (name, view.dtype(), view.shape().to_vec(), data)
        })
        .collect();
    serialize_tensors(base_path, tensors.into_iter(), header.metadata().clone())
}

/// Where the temporary sibling of `out` goes: `out`'s parent (the current directory for a bare
/// name), so the final rename stays on one file system.
fn out_parent(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Temporary siblings of `out` are created with mode 0666 (file) or 0777 (directory) so that
/// the user's umask decides their permissions, as it would for a file written in place
/// (`tempfile`'s default, 0600 / 0700, would hide results from the rest of a group).
#[cfg(unix)]
fn umask_mode(is_dir: bool) -> fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    fs::Permissions::from_mode(if is_dir { 0o777 } else { 0o666 })
}

/// An output that replaces an existing `out` keeps that file's mode; a new one keeps the
/// umask-derived mode it was created with.
fn keep_previous_mode(tmp: &Path, out: &Path) -> Result<()> {
    #[cfg(unix)]
    if let Ok(m) = fs::metadata(out) {
        fs::set_permissions(tmp, m.permissions()).map_err(|e| Error::io(tmp, e))?;
    }
    #[cfg(not(unix))]
    let _ = (tmp, out);
    Ok(())
}

fn temp_prefix(out: &Path) -> String {
    let stem = out
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    format!(".{stem}.lora-compose-tmp-")
}

/// Writes `bytes` to `out` via a temporary file in the same directory and a rename, so an
/// existing `out` is replaced whole or not at all. The one atomic file write of the crate
/// (adapters, folded bases, experiment results and reports): a new file gets the mode the
/// user's umask gives, a replaced one keeps its mode.
pub fn write_file_atomic(out: &Path, bytes: &[u8]) -> Result<()> {
    if out.is_dir() {
        return Err(Error::File {
            path: out.to_path_buf(),
            msg: "is a directory; a file path is needed here".into(),
        });
    }
    let parent = out_parent(out);
    let prefix = temp_prefix(out);
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    #[cfg(unix)]
    builder.permissions(umask_mode(false));
    let mut tmp = builder.tempfile_in(&parent).map_err(|e| Error::io(&parent, e))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(tmp.path(), e))?;
    keep_previous_mode(tmp.path(), out)?;
    // On failure the NamedTempFile inside the error is dropped, which deletes it.
    tmp.persist(out).map_err(|e| Error::io(out, e.error))?;
    Ok(())
}

/// Writes `adapter` as a directory at `out` via a temporary directory beside it. An existing
/// `out` directory is moved aside, replaced, then deleted; if the swap fails it is put back.
pub fn write_adapter_atomic(out: &Path, adapter: &Adapter, dtype: StoreDtype) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::File {
            path: out.to_path_buf(),
            msg: "exists and is not a directory; --out without --base must be a directory".into(),
        });
    }
    let parent = out_parent(out);
    let prefix = temp_prefix(out);
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    #[cfg(unix)]
    builder.permissions(umask_mode(true));
    let tmp = builder.tempdir_in(&parent).map_err(|e| Error::io(&parent, e))?;
    adapter.save(tmp.path(), dtype)?;
    keep_previous_mode(tmp.path(), out)?;
    if !out.exists() {
        fs::rename(tmp.path(), out).map_err(|e| Error::io(out, e))?;
        // Already renamed; keep the TempDir guard from deleting the new `out`.
        let _ = tmp.keep();
        return Ok(());
    }
    let aside = tempfile::Builder::new()
        .prefix(&temp_prefix(out))
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    let old = aside.path().join("previous");
    fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
    if let Err(e) = fs::rename(tmp.path(), out) {
        // Put the previous output back before reporting; the guards clean up the rest.
        let _ = fs::rename(&old, out);
        return Err(Error::io(out, e));
    }
    let _ = tmp.keep();
    // Dropping `aside` removes the previous output.
    drop(aside);
    Ok(())
}
