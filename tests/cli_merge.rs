//! The `lora-compose` binary: merge math against independent f64 loops, folding into a base
//! model, and every bad input → non-zero exit, a message naming the file or tensor, an
//! untouched `--out`, and no temporary files left beside it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lora_compose::check::{compare, compare_with, Tol};
use lora_compose::peft::Adapter;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_lora-compose");

/// (module path, d_in, d_out)
const LAYERS: [(&str, usize, usize); 3] = [("enc.0.query", 7, 5), ("enc.0.value", 7, 7), ("enc.1.dense", 7, 11)];

/// One test adapter, described independently of the crate: per layer its rank and scale.
struct Spec {
    r: usize,
    alpha: f64,
    rslora: bool,
    /// (regex key, rank, alpha) applied to layers whose path ends with `.value`.
    value_override: Option<(usize, f64)>,
}

impl Spec {
    fn rank_alpha(&self, path: &str) -> (usize, f64) {
        match self.value_override {
            Some((r, a)) if path.ends_with(".value") => (r, a),
            _ => (self.r, self.alpha),
        }
    }
    fn scale(&self, path: &str) -> f64 {
        let (r, a) = self.rank_alpha(path);
        if self.rslora {
            a / (r as f64).sqrt()
        } else {
            a / r as f64
        }
    }
}

/// Factors in f64 as the reference sees them: path → (A r×d_in, B d_out×r, r).
type Factors = BTreeMap<String, (Vec<f64>, Vec<f64>, usize)>;

fn f32_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect()
}

/// Writes a PEFT adapter with the `safetensors` crate and plain JSON, not the crate's writer.
fn write_adapter(dir: &Path, spec: &Spec, seed: u64) -> Factors {
    fs::create_dir_all(dir).unwrap();
    let mut config = json!({
        "peft_type": "LORA", "r": spec.r, "lora_alpha": spec.alpha, "use_rslora": spec.rslora,
        "target_modules": ["query", "value", "dense"], "bias": "none",
    });
    if let Some((r, a)) = spec.value_override {
        config["rank_pattern"] = json!({"value": r});
        config["alpha_pattern"] = json!({"value": a});
    }
    fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut factors = Factors::new();
    let mut tensors = Vec::new();
    for (path, d_in, d_out) in LAYERS {
        let (r, _) = spec.rank_alpha(path);
        // Round through f32 so the reference uses exactly the stored values.
        let mut draw = |n: usize| {
            (0..n)
                .map(|_| f64::from(rng.random_range(-1.0f32..1.0)))
                .collect::<Vec<_>>()
        };
        let a = draw(r * d_in);
        let b = draw(d_out * r);
        tensors.push((
            format!("base_model.model.{path}.lora_A.weight"),
            vec![r, d_in],
            f32_bytes(&a),
        ));
        tensors.push((
            format!("base_model.model.{path}.lora_B.weight"),
            vec![d_out, r],
            f32_bytes(&b),
        ));
        factors.insert(path.to_string(), (a, b, r));
    }
    write_f32_tensors(&dir.join("adapter_model.safetensors"), &tensors);
    factors
}

/// Writes `(name, shape, f32 bytes)` with the `safetensors` crate.
fn write_f32_tensors(file: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, s, b)| (n, TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    fs::write(file, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// (d_out, d_in) row-major `Σ_k B[o,k] A[k,i]` in f64.
fn product(a: &[f64], b: &[f64], r: usize, d_in: usize, d_out: usize) -> Vec<f64> {
    let mut out = vec![0.0; d_out * d_in];
    for o in 0..d_out {
        for i in 0..d_in {
            out[o * d_in + i] = (0..r).map(|k| b[o * r + k] * a[k * d_in + i]).sum();
        }
    }
    out
}

/// Every tensor of an f32 safetensors file: name → (values, shape).
fn read_f32_tensors(file: &Path) -> BTreeMap<String, (Vec<f64>, Vec<usize>)> {
    let bytes = fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), Dtype::F32, "{name}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
                .collect();
            (name.to_string(), (v, t.shape().to_vec()))
        })
        .collect()
}

/// ΔW of a merged adapter on disk, recomputed here from its raw tensors and config.
fn merged_delta(dir: &Path) -> BTreeMap<String, Vec<f64>> {
    let config: Value = serde_json::from_str(&fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    let r = config["r"].as_u64().unwrap() as f64;
    let alpha = config["lora_alpha"].as_f64().unwrap();
    let scale = if config["use_rslora"].as_bool().unwrap_or(false) {
        alpha / r.sqrt()
    } else {
        alpha / r
    };
    assert_eq!(config["rank_pattern"].as_object().map_or(0, |m| m.len()), 0);
    let tensors = read_f32_tensors(&dir.join("adapter_model.safetensors"));
    let read = |name: &str| tensors[name].clone();
    LAYERS
        .iter()
        .map(|&(path, d_in, d_out)| {
            let (a, sa) = read(&format!("base_model.model.{path}.lora_A.weight"));
            let (b, sb) = read(&format!("base_model.model.{path}.lora_B.weight"));
            assert_eq!((sa[1], sb[0], sa[0]), (d_in, d_out, sb[1]), "{path}");
            let dw = product(&a, &b, sa[0], d_in, d_out)
                .into_iter()
                .map(|x| scale * x)
                .collect();
            (path.to_string(), dw)
        })
        .collect()
}

/// One adapter layer as read back here: A (r×d_in), B (d_out×r), r, and its scale.
type ReadLayer = (Vec<f64>, Vec<f64>, usize, f64);

/// An adapter directory read with `serde_json` and `safetensors` only: module path → layer. r is
/// A's row count, checked against `r` / `rank_pattern`; the scale is alpha / r (alpha / √r with
/// rsLoRA), alpha from `lora_alpha` or the `alpha_pattern` entry that names the path. Pattern
/// keys are taken as literal dot-suffixes of the path, which the keys this file meets are.
fn read_adapter(dir: &Path) -> BTreeMap<String, ReadLayer> {
    let config: Value = serde_json::from_str(&fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    let pattern = |field: &str, path: &str| {
        let entries = config[field].as_object()?;
        for key in entries.keys() {
            let plain = key.chars().all(|c| c.is_ascii_alphanumeric() || "._".contains(c));
            assert!(
                plain,
                "{field} key `{key}`: this reader takes keys as literal dot-suffixes"
            );
        }
        entries
            .iter()
            .find(|(key, _)| path == key.as_str() || path.ends_with(&format!(".{key}")))
            .map(|(_, v)| v.as_f64().unwrap())
    };
    let tensors = read_f32_tensors(&dir.join("adapter_model.safetensors"));
    let mut layers = BTreeMap::new();
    for (name, (a, shape_a)) in &tensors {
        let Some(path) = name
            .strip_prefix("base_model.model.")
            .and_then(|n| n.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        let (b, shape_b) = &tensors[&format!("base_model.model.{path}.lora_B.weight")];
        let r = shape_a[0];
        assert_eq!(shape_b[1], r, "{path}");
        let r_config = pattern("rank_pattern", path).unwrap_or_else(|| config["r"].as_f64().unwrap());
        assert_eq!(r as f64, r_config, "{path}: rank of the tensors vs the config");
        let alpha = pattern("alpha_pattern", path).unwrap_or_else(|| config["lora_alpha"].as_f64().unwrap());
        let scale = if config["use_rslora"].as_bool().unwrap_or(false) {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        layers.insert(path.to_string(), (a.clone(), b.clone(), r, scale));
    }
    assert_eq!(
        layers.len() * 2,
        tensors.len(),
        "{}: only lora_A/lora_B pairs",
        dir.display()
    );
    layers
}

/// Per element `|x − ref| ≤ 1e-5 · max|ref|` through the crate's comparison helper; the
/// reference must not be all zero (the bound would then be exact equality with zero).
fn assert_close(got: &[f64], want: &[f64], what: &str) {
    let peak = want.iter().fold(0f64, |m, x| m.max(x.abs()));
    assert!(peak > 0.0, "{what}: the reference is all zero");
    compare(what, got, want, Tol::new(1e-5 * peak, 0.0)).unwrap_or_else(|e| panic!("{e}"));
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn run_ok(args: &[&str]) {
    let res = run(args);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{args:?}: {stderr}");
}

fn dir_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn spec(r: usize, alpha: f64, rslora: bool) -> Spec {
    Spec {
        r,
        alpha,
        rslora,
        value_override: None,
    }
}

fn mixed_specs() -> Vec<Spec> {
    let patterned = Spec {
        value_override: Some((4, 2.0)),
        ..spec(3, 7.0, false)
    };
    vec![spec(2, 4.0, false), spec(5, 3.0, true), patterned]
}

/// Writes one adapter per spec as `root/a{i}`; returns their factors and directories.
fn write_adapters(root: &Path, specs: &[Spec], seed: u64) -> (Vec<Factors>, Vec<PathBuf>) {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let dir = root.join(format!("a{i}"));
            (write_adapter(&dir, s, seed + i as u64), dir)
        })
        .unzip()
}

/// `merge --adapter DIR …` followed by `extra`.
fn merge_args<'a>(dirs: &'a [PathBuf], extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["merge"];
    for d in dirs {
        args.extend(["--adapter", dir_str(d)]);
    }
    args.extend(extra);
    args
}

/// `Σ_i w_i s_i B_i A_i` at one layer, (d_out, d_in), in f64.
fn product_sum(specs: &[Spec], factors: &[Factors], w: &[f64], layer: (&str, usize, usize)) -> Vec<f64> {
    let (path, d_in, d_out) = layer;
    let mut sum = vec![0.0; d_out * d_in];
    for (i, spec) in specs.iter().enumerate() {
        let (a, b, r) = &factors[i][path];
        let c = w[i] * spec.scale(path);
        for (dst, x) in sum.iter_mut().zip(product(a, b, *r, d_in, d_out)) {
            *dst += c * x;
        }
    }
    sum
}

#[test]
fn merge_cat_equals_weighted_product_sum() {
    let tmp = tempfile::tempdir().unwrap();
    let specs = mixed_specs();
    let (factors, dirs) = write_adapters(tmp.path(), &specs, 0);
    for (weights, label) in [(Some([0.7, -1.3, 0.0]), "0.7,-1.3,0"), (None, "uniform")] {
        let out = tmp.path().join(format!("merged-{label}"));
        let mut args = merge_args(&dirs, &["--out", dir_str(&out)]);
        if weights.is_some() {
            args.extend(["--weights", label]);
        }
        run_ok(&args);
        let w = weights.unwrap_or([1.0 / 3.0; 3]);
        let got = merged_delta(&out);
        for layer in LAYERS {
            let want = product_sum(&specs, &factors, &w, layer);
            assert_close(&got[layer.0], &want, &format!("cat {label} {}", layer.0));
        }
        // PEFT's global rank for cat: Σ_i (largest rank of adapter i) = 2 + 5 + 4.
        let config: Value =
            serde_json::from_str(&fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(
            (config["r"].as_u64(), config["lora_alpha"].as_f64()),
            (Some(11), Some(11.0))
        );
    }
}

/// `merge --mode MODE --weights W` of three equal-rank adapters against
/// `(Σ_i b_i B_i)(Σ_j a_j A_j)` with `(a_i, b_i) = coefs(w_i, s_i)`, in f64 over the factors.
fn check_factor_merge(mode: &str, w: [f64; 3], seed: u64, coefs: fn(f64, f64) -> (f64, f64)) {
    let tmp = tempfile::tempdir().unwrap();
    let specs = [spec(4, 8.0, false), spec(4, 3.0, true), spec(4, 1.0, false)];
    let (factors, dirs) = write_adapters(tmp.path(), &specs, seed);
    let out = tmp.path().join(mode);
    let weights = w.map(|x| x.to_string()).join(",");
    let extra = ["--mode", mode, "--weights", weights.as_str(), "--out", dir_str(&out)];
    run_ok(&merge_args(&dirs, &extra));
    let got = merged_delta(&out);
    for (path, d_in, d_out) in LAYERS {
        let mut a_sum = vec![0.0; 4 * d_in];
        let mut b_sum = vec![0.0; d_out * 4];
        for (i, spec) in specs.iter().enumerate() {
            let (ca, cb) = coefs(w[i], spec.scale(path));
            let (a, b, _) = &factors[i][path];
            a_sum.iter_mut().zip(a).for_each(|(s, x)| *s += ca * x);
            b_sum.iter_mut().zip(b).for_each(|(s, x)| *s += cb * x);
        }
        assert_close(
            &got[path],
            &product(&a_sum, &b_sum, 4, d_in, d_out),
            &format!("{mode} {path}"),
        );
    }
}

#[test]
fn merge_linear_equals_peft_factor_sum() {
    // (Σ_i √|c_i| B_i)(Σ_j sgn(c_j) √|c_j| A_j), c_i = w_i s_i
    check_factor_merge("linear", [0.6, -0.9, 0.0], 10, |w, s| {
        let c = w * s;
        (c.signum() * c.abs().sqrt(), c.abs().sqrt())
    });
}

#[test]
fn merge_lorahub_equals_the_factor_merge_of_lorahub() {
    // (Σ_i w_i B_i)(Σ_j w_j s_j A_j)
    check_factor_merge("lorahub", [0.6, -0.9, 0.3], 11, |w, s| (w * s, w));
}

/// A base model as the test writes it: `model.<path>.weight` (f32 for the first two layers,
/// bf16 for the third), a bias and an unrelated f16 tensor.
fn write_base(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let mut tensors = BTreeMap::new();
    for (k, (layer, d_in, d_out)) in LAYERS.iter().enumerate() {
        let w: Vec<f32> = (0..d_in * d_out).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let (dtype, bytes) = if k == 2 {
            (
                Dtype::BF16,
                w.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            )
        } else {
            (Dtype::F32, w.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        tensors.insert(format!("model.{layer}.weight"), (dtype, vec![*d_out, *d_in], bytes));
        tensors.insert(
            format!("model.{layer}.bias"),
            (Dtype::F32, vec![*d_out], vec![0u8; 4 * d_out]),
        );
    }
    let emb: Vec<u8> = (0..12u16)
        .flat_map(|i| half::f16::from_f32(f32::from(i)).to_le_bytes())
        .collect();
    tensors.insert("model.embed.weight".into(), (Dtype::F16, vec![3, 4], emb));
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    tensors
}

fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f64::from(half::bf16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        _ => unreachable!(),
    }
}

#[test]
fn fold_into_base_is_w_plus_delta() {
    let tmp = tempfile::tempdir().unwrap();
    let specs = mixed_specs();
    let (factors, dirs) = write_adapters(tmp.path(), &specs, 20);
    let base_path = tmp.path().join("base.safetensors");
    let base = write_base(&base_path);
    let out = tmp.path().join("folded.safetensors");
    let extra = [
        "--weights",
        "1,0.5,-2",
        "--base",
        dir_str(&base_path),
        "--out",
        dir_str(&out),
    ];
    run_ok(&merge_args(&dirs, &extra));
    let w = [1.0, 0.5, -2.0];
    let bytes = fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), base.len());
    for (name, (dtype, shape, data)) in &base {
        let t = st.tensor(name).unwrap();
        assert_eq!((t.dtype(), t.shape()), (*dtype, shape.as_slice()), "{name}");
        let Some(&layer) = LAYERS.iter().find(|l| *name == format!("model.{}.weight", l.0)) else {
            assert_eq!(t.data(), data.as_slice(), "{name} must be copied unchanged");
            continue;
        };
        let delta = product_sum(&specs, &factors, &w, layer);
        let want: Vec<f64> = decode(*dtype, data).iter().zip(delta).map(|(w, d)| w + d).collect();
        let got = decode(*dtype, t.data());
        if *dtype == Dtype::BF16 {
            // bf16 has 8 significant bits: compare to the reference rounded the same way.
            let rounded: Vec<f64> = want
                .iter()
                .map(|&x| f64::from(half::bf16::from_f64(x).to_f32()))
                .collect();
            compare_with(name, &got, &rounded, |i| 1e-2 * rounded[i].abs().max(1e-3))
                .unwrap_or_else(|e| panic!("off by more than 1e-2·max(|ref|, 1e-3), about one bf16 ulp: {e}"));
        } else {
            assert_close(&got, &want, name);
        }
    }
}

/// Everything under `dir`, path → bytes (directories as empty entries).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                out.insert(p.clone(), Vec::new());
                stack.push(p);
            } else {
                out.insert(p.clone(), fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Runs `args` (merge into `out_dir/out`, an existing dir or file) and checks the failure
/// contract: exit status 1 or 2, stderr starts with `error` and names `needle`, and the out
/// folder is byte-identical afterwards (no partial output, no temporary files).
fn assert_fails(args: &[&str], out_dir: &Path, needle: &str) {
    let before = snapshot(out_dir);
    let res = run(args);
    let stderr = String::from_utf8_lossy(&res.stderr);
    let code = res.status.code();
    assert!(matches!(code, Some(1 | 2)), "{args:?}: exit {code:?}, stderr: {stderr}");
    assert!(stderr.starts_with("error"), "{args:?}: stderr: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: stderr lacks `{needle}`: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(snapshot(out_dir), before, "{args:?}: out folder changed");
}

struct BadInputs {
    tmp: tempfile::TempDir,
}

impl BadInputs {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        for (i, spec) in mixed_specs().iter().enumerate() {
            write_adapter(&tmp.path().join(format!("good{i}")), spec, 30 + i as u64);
        }
        // An existing output of each kind, to prove failures leave it alone.
        let out = tmp.path().join("out");
        fs::create_dir_all(out.join("adapter")).unwrap();
        fs::write(out.join("adapter/adapter_config.json"), "previous output\n").unwrap();
        fs::write(out.join("folded.safetensors"), "previous folded output\n").unwrap();
        write_base(&tmp.path().join("base.safetensors"));
        BadInputs { tmp }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    /// A copy of good0 under `name`, then `edit` applied to it.
    fn variant(&self, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
        let dir = self.path(name);
        fs::create_dir_all(&dir).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            fs::copy(self.path("good0").join(f), dir.join(f)).unwrap();
        }
        edit(&dir);
        dir
    }
    fn merge_fails(&self, adapters: &[&Path], extra: &[&str], needle: &str) {
        let out_dir = self.path("out");
        let out = out_dir.join("adapter");
        let mut args = vec!["merge", "--out", dir_str(&out)];
        for a in adapters {
            args.extend(["--adapter", dir_str(a)]);
        }
        args.extend(extra);
        assert_fails(&args, &out_dir, needle);
    }
}

/// Rewrites good0's tensors: `edit(name, shape, values)` may change shapes and values.
fn rewrite_tensors(dir: &Path, edit: impl Fn(&str, &mut Vec<usize>, &mut Vec<f32>)) {
    let file = dir.join("adapter_model.safetensors");
    let bytes = fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (name, view) in st.iter() {
        let mut shape = view.shape().to_vec();
        let mut values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        edit(name, &mut shape, &mut values);
        tensors.push((
            name.to_string(),
            shape,
            values.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
        ));
    }
    write_f32_tensors(&file, &tensors);
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let file = dir.join("adapter_config.json");
    let mut config: Value = serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    fs::write(&file, config.to_string()).unwrap();
}

const QUERY_A: &str = "base_model.model.enc.0.query.lora_A.weight";
const QUERY_B: &str = "base_model.model.enc.0.query.lora_B.weight";

#[test]
fn bad_adapter_files_fail_cleanly() {
    let t = BadInputs::new();
    let good1 = t.path("good1");
    let missing = t.path("does-not-exist");
    t.merge_fails(&[&missing, &good1], &[], "does-not-exist");

    let no_config = t.variant("no_config", |d| fs::remove_file(d.join("adapter_config.json")).unwrap());
    t.merge_fails(&[&no_config], &[], "no_config/adapter_config.json");

    let only_bin = t.variant("only_bin", |d| {
        fs::rename(d.join("adapter_model.safetensors"), d.join("adapter_model.bin")).unwrap()
    });
    t.merge_fails(&[&only_bin], &[], "adapter_model.bin");

    let garbage = t.variant("garbage", |d| {
        fs::write(d.join("adapter_model.safetensors"), b"not a tensor file").unwrap()
    });
    t.merge_fails(&[&garbage, &good1], &[], "garbage/adapter_model.safetensors");

    let truncated = t.variant("truncated", |d| {
        let f = d.join("adapter_model.safetensors");
        let bytes = fs::read(&f).unwrap();
        fs::write(&f, &bytes[..bytes.len() - 10]).unwrap();
    });
    t.merge_fails(&[&truncated], &[], "truncated/adapter_model.safetensors");

    let huge_header = t.variant("huge_header", |d| {
        let f = d.join("adapter_model.safetensors");
        let mut bytes = fs::read(&f).unwrap();
        bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        fs::write(&f, bytes).unwrap();
    });
    t.merge_fails(&[&huge_header], &[], "huge_header/adapter_model.safetensors");

    let bad_json = t.variant("bad_json", |d| {
        fs::write(d.join("adapter_config.json"), "{\"r\": 2,").unwrap()
    });
    t.merge_fails(&[&bad_json], &[], "bad_json/adapter_config.json");

    let no_r = t.variant("no_r", |d| edit_config(d, |c| drop(c.remove("r"))));
    t.merge_fails(&[&no_r], &[], "missing field `r`");

    let no_alpha = t.variant("no_alpha", |d| edit_config(d, |c| drop(c.remove("lora_alpha"))));
    t.merge_fails(&[&no_alpha], &[], "lora_alpha");

    let wrong_r = t.variant("wrong_r", |d| edit_config(d, |c| drop(c.insert("r".into(), json!(3)))));
    t.merge_fails(&[&wrong_r], &[], QUERY_A);

    let bad_pattern = t.variant("bad_pattern", |d| {
        edit_config(d, |c| drop(c.insert("rank_pattern".into(), json!({"value": 7}))))
    });
    t.merge_fails(&[&bad_pattern], &[], "base_model.model.enc.0.value.lora_A.weight");

    // A has 2 rows, B gets 3 columns.
    let ab_mismatch = t.variant("ab_mismatch", |d| {
        rewrite_tensors(d, |name, shape, values| {
            if name == QUERY_B {
                *shape = vec![shape[0], 3];
                values.resize(shape[0] * 3, 0.5);
            }
        })
    });
    t.merge_fails(&[&ab_mismatch], &[], QUERY_B);

    let missing_b = t.variant("missing_b", |d| {
        filter_tensors(d, |n| (n != QUERY_B).then(|| n.to_string()))
    });
    t.merge_fails(&[&missing_b], &[], QUERY_B);

    let unknown = t.variant("unknown", |d| {
        rewrite_keys(d, QUERY_B, "base_model.model.enc.0.query.lora_X.weight")
    });
    t.merge_fails(&[&unknown], &[], "lora_X");

    for (label, bad) in [("nan", f32::NAN), ("inf", f32::INFINITY)] {
        let dir = t.variant(label, |d| {
            rewrite_tensors(d, |name, _, values| {
                if name == QUERY_A {
                    values[3] = bad;
                }
            })
        });
        t.merge_fails(&[&dir, &good1], &[], QUERY_A);
    }

    let wide = t.variant("wide", |d| {
        rewrite_tensors(d, |name, shape, values| {
            if name == QUERY_B {
                *shape = vec![shape[0] + 1, shape[1]];
                values.resize(shape[0] * shape[1], 0.5);
            }
        })
    });
    t.merge_fails(&[&good1, &wide], &[], "enc.0.query");

    let fewer_layers = t.variant("fewer_layers", |d| {
        drop_layer(d, "enc.1.dense");
    });
    t.merge_fails(&[&good1, &fewer_layers], &[], "enc.1.dense");
    t.merge_fails(&[&fewer_layers, &good1], &[], "enc.1.dense");
}

/// Renames tensor `from` to `to`.
fn rewrite_keys(dir: &Path, from: &str, to: &str) {
    filter_tensors(dir, |name| {
        Some(if name == from { to.to_string() } else { name.to_string() })
    });
}

fn drop_layer(dir: &Path, layer: &str) {
    filter_tensors(dir, |name| {
        (!name.contains(&format!(".{layer}."))).then(|| name.to_string())
    });
}

fn filter_tensors(dir: &Path, rename: impl Fn(&str) -> Option<String>) {
    let file = dir.join("adapter_model.safetensors");
    let bytes = fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st.iter().filter_map(|(n, v)| rename(n).map(|n| (n, v))).collect();
    let out = safetensors::serialize(kept, None).unwrap();
    fs::write(&file, out).unwrap();
}

#[test]
fn bad_arguments_fail_cleanly() {
    let t = BadInputs::new();
    let (g0, g1) = (t.path("good0"), t.path("good1"));
    t.merge_fails(
        &[&g0, &g1],
        &["--weights", "1,2,3"],
        "--weights has 3 values but 2 adapters",
    );
    t.merge_fails(&[&g0, &g1], &["--weights", "1,NaN"], "NaN");
    t.merge_fails(&[&g0, &g1], &["--weights", "1,inf"], "inf");
    t.merge_fails(&[&g0, &g1], &["--weights", "1,abc"], "abc");
    t.merge_fails(&[&g0, &g1], &["--mode", "svd"], "svd");
    t.merge_fails(&[&g0, &t.path("good2")], &["--mode", "linear"], "enc.0.query");
    // An existing file where an adapter directory should go.
    let out_dir = t.path("out");
    let file_out = out_dir.join("folded.safetensors");
    assert_fails(
        &["merge", "--adapter", dir_str(&g0), "--out", dir_str(&file_out)],
        &out_dir,
        "folded.safetensors",
    );
}

#[test]
fn bad_base_fails_cleanly() {
    let t = BadInputs::new();
    let g0 = t.path("good0");
    let out_dir = t.path("out");
    let out = out_dir.join("folded.safetensors");
    let fold = |base: &Path, needle: &str| {
        assert_fails(
            &[
                "merge",
                "--adapter",
                dir_str(&g0),
                "--base",
                dir_str(base),
                "--out",
                dir_str(&out),
            ],
            &out_dir,
            needle,
        )
    };
    fold(&t.path("no-base.safetensors"), "no-base.safetensors");
    let garbage = t.path("garbage.safetensors");
    fs::write(&garbage, [0xffu8; 64]).unwrap();
    fold(&garbage, "garbage.safetensors");
    // A base without the value layer's weight.
    let partial = t.path("partial.safetensors");
    let bytes = fs::read(t.path("base.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st.iter().filter(|(n, _)| *n != "model.enc.0.value.weight").collect();
    fs::write(&partial, safetensors::serialize(kept, None).unwrap()).unwrap();
    fold(&partial, "enc.0.value");
    // A base whose query weight has the wrong shape.
    let wrong = t.path("wrong.safetensors");
    let w = vec![0u8; 4 * 6 * 7];
    let reshaped: Vec<_> = st
        .iter()
        .map(|(n, v)| {
            if n == "model.enc.0.query.weight" {
                (n, TensorView::new(Dtype::F32, vec![6, 7], &w).unwrap())
            } else {
                (n, v)
            }
        })
        .collect();
    fs::write(&wrong, safetensors::serialize(reshaped, None).unwrap()).unwrap();
    fold(&wrong, "model.enc.0.query.weight");
}

#[test]
fn success_replaces_existing_output_and_leaves_no_temp_files() {
    let t = BadInputs::new();
    let out_dir = t.path("out");
    let out = out_dir.join("adapter");
    run_ok(&[
        "merge",
        "--adapter",
        dir_str(&t.path("good0")),
        "--adapter",
        dir_str(&t.path("good1")),
        "--out",
        dir_str(&out),
    ]);
    let names: Vec<String> = fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["adapter", "folded.safetensors"]);
    let merged = Adapter::load(&out).unwrap();
    assert_eq!(merged.config.r, 2 + 5);
    let folded = out_dir.join("folded.safetensors");
    run_ok(&[
        "merge",
        "--adapter",
        dir_str(&t.path("good0")),
        "--base",
        dir_str(&t.path("base.safetensors")),
        "--out",
        dir_str(&folded),
    ]);
    assert_eq!(fs::read_dir(&out_dir).unwrap().count(), 2);
    assert!(safetensors::SafeTensors::deserialize(&fs::read(&folded).unwrap()).is_ok());
}

#[test]
fn demo_adapters_are_deterministic_and_fold_as_w_plus_delta() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["d1", "d2"] {
        run_ok(&[
            "demo-adapters",
            dir_str(&tmp.path().join(name)),
            "--n",
            "3",
            "--seed",
            "7",
        ]);
    }
    assert_eq!(
        snapshot(&tmp.path().join("d1")).into_values().collect::<Vec<_>>(),
        snapshot(&tmp.path().join("d2")).into_values().collect::<Vec<_>>()
    );
    let d = tmp.path().join("d1");
    run_ok(&[
        "merge",
        "--adapter",
        dir_str(&d.join("adapter_0")),
        "--adapter",
        dir_str(&d.join("adapter_1")),
        "--adapter",
        dir_str(&d.join("adapter_2")),
        "--weights",
        "0.5,0.3,0.2",
        "--base",
        dir_str(&d.join("base_model.safetensors")),
        "--out",
        dir_str(&d.join("merged.safetensors")),
    ]);
    // The folded model: W + Σ_i w_i s_i B_i A_i on every adapted layer (the demo adapters have
    // mixed ranks, rsLoRA and rank/alpha patterns), every other tensor copied unchanged.
    let w = [0.5, 0.3, 0.2];
    let adapters: Vec<_> = (0..3).map(|i| read_adapter(&d.join(format!("adapter_{i}")))).collect();
    let base = read_f32_tensors(&d.join("base_model.safetensors"));
    let folded = read_f32_tensors(&d.join("merged.safetensors"));
    assert!(folded.keys().eq(base.keys()), "the folded file has the base's tensors");
    let mut adapted = 0;
    for (name, (w0, shape)) in &base {
        let (got, got_shape) = &folded[name];
        assert_eq!(got_shape, shape, "{name}");
        let Some(path) = name.strip_suffix(".weight").filter(|p| adapters[0].contains_key(*p)) else {
            assert_eq!(got, w0, "{name} must be copied unchanged");
            continue;
        };
        let (d_out, d_in) = (shape[0], shape[1]);
        let mut want = w0.clone();
        for (wi, adapter) in w.iter().zip(&adapters) {
            let (a, b, r, scale) = &adapter[path];
            for (dst, x) in want.iter_mut().zip(product(a, b, *r, d_in, d_out)) {
                *dst += wi * scale * x;
            }
        }
        assert_close(got, &want, name);
        adapted += 1;
    }
    assert_eq!(adapted, adapters[0].len(), "every adapted layer has a base weight");
}
