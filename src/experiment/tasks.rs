//! The experiment's tasks (DESIGN §5), fixed in advance: 16 upstream MNIST tasks (class subsets ×
//! transforms) and four held-out downstream tasks, one per kind of shift.
//!
//! Splits (seeded, disjoint): MNIST's 10k images → upstream train 50% | upstream test 10% |
//! downstream pool 15% | downstream test 25%; Fashion-MNIST test → downstream pool 50% | test
//! 50% (pretraining uses Fashion-MNIST train only); 8×8 digits → pool 50% | test 50%. The
//! downstream bundle keeps at most [`POOL_PER_CLASS`] pool and [`TEST_PER_CLASS`] test images a
//! class, labels mapped to 0..C, pixels as u8.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::data::{split, Images, Sources, Transform, PIXELS};
use crate::{Error, Result};

pub const SPLIT_SEED: u64 = 20_240_215;
pub const POOL_PER_CLASS: usize = 100;
pub const TEST_PER_CLASS: usize = 100;

/// Which data a task draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    Mnist,
    Fashion,
    Digits,
}

/// The shift a downstream task makes from the upstream library.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Upstream,
    /// Unseen class subset of MNIST.
    Label,
    /// Unseen transform of MNIST.
    Covariate,
    /// Upsampled 8×8 digits.
    Domain,
    /// Fashion-MNIST classes.
    Task,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Upstream => "upstream",
            Kind::Label => "label shift",
            Kind::Covariate => "covariate shift",
            Kind::Domain => "domain shift",
            Kind::Task => "task shift",
        }
    }
}

/// One classification task: the images of `classes` (label i for `classes[i]`) transformed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub name: String,
    pub kind: Kind,
    pub source: Source,
    pub classes: Vec<u8>,
    pub transform: Transform,
}

const SUBSETS: [[u8; 5]; 4] = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 2, 4, 6, 8], [1, 3, 5, 7, 9]];
const UP_TRANSFORMS: [Transform; 4] = [
    Transform::Identity,
    Transform::Rot90,
    Transform::Transpose,
    Transform::Invert,
];

/// The 16 upstream tasks, in library order.
pub fn upstream_tasks() -> Vec<TaskSpec> {
    let mut out = Vec::new();
    for t in UP_TRANSFORMS {
        for s in SUBSETS {
            let digits: String = s.iter().map(|d| char::from(b'0' + d)).collect();
            out.push(TaskSpec {
                name: format!("mnist-{digits}-{}", t.name()),
                kind: Kind::Upstream,
                source: Source::Mnist,
                classes: s.to_vec(),
                transform: t,
            });
        }
    }
    out
}

/// The held-out downstream tasks, one per kind.
pub fn downstream_tasks() -> Vec<TaskSpec> {
    let spec = |name: &str, kind, source, classes: &[u8], transform| TaskSpec {
        name: name.into(),
        kind,
        source,
        classes: classes.to_vec(),
        transform,
    };
    vec![
        spec(
            "mnist-01567",
            Kind::Label,
            Source::Mnist,
            &[0, 1, 5, 6, 7],
            Transform::Identity,
        ),
        spec(
            "mnist-01234-rot180",
            Kind::Covariate,
            Source::Mnist,
            &[0, 1, 2, 3, 4],
            Transform::Rot180,
        ),
        spec(
            "digits8x8-01234",
            Kind::Domain,
            Source::Digits,
            &[0, 1, 2, 3, 4],
            Transform::Identity,
        ),
        spec(
            "fashion-02468",
            Kind::Task,
            Source::Fashion,
            &[0, 2, 4, 6, 8],
            Transform::Identity,
        ),
    ]
}

/// The images of `idx` whose class is in `spec.classes`, relabelled and transformed, at most
/// `per_class` a class (in `idx` order).
pub fn task_images(all: &Images, idx: &[usize], spec: &TaskSpec, per_class: usize) -> Images {
    let mut count = vec![0usize; spec.classes.len()];
    let mut keep = Vec::new();
    let mut labels = Vec::new();
    for &i in idx {
        if let Some(c) = spec.classes.iter().position(|&c| c == all.labels[i]) {
            if count[c] < per_class {
                count[c] += 1;
                keep.push(i);
                labels.push(c as u8);
            }
        }
    }
    let mut out = spec.transform.apply_all(&all.select(&keep));
    out.labels = labels;
    out
}

/// MNIST split: (upstream train, upstream test, downstream pool, downstream test).
pub fn mnist_split(n: usize) -> [Vec<usize>; 4] {
    let p = split(n, SPLIT_SEED, &[0.5, 0.1, 0.15]);
    [p[0].clone(), p[1].clone(), p[2].clone(), p[3].clone()]
}

/// One downstream task's data: a pool to draw shots from and a test set, disjoint.
#[derive(Clone, Debug)]
pub struct TaskData {
    pub spec: TaskSpec,
    pub pool: Images,
    pub test: Images,
}

/// Builds every downstream task's pool and test set from the full sources.
pub fn build_downstream(src: &Sources) -> Vec<TaskData> {
    let [_, _, m_pool, m_test] = mnist_split(src.mnist.len());
    let f = split(src.fashion_test.len(), SPLIT_SEED + 1, &[0.5]);
    let d = split(src.digits.len(), SPLIT_SEED + 2, &[0.5]);
    downstream_tasks()
        .into_iter()
        .map(|spec| {
            let (all, pool, test) = match spec.source {
                Source::Mnist => (&src.mnist, &m_pool, &m_test),
                Source::Fashion => (&src.fashion_test, &f[0], &f[1]),
                Source::Digits => (&src.digits, &d[0], &d[1]),
            };
            TaskData {
                pool: task_images(all, pool, &spec, POOL_PER_CLASS),
                test: task_images(all, test, &spec, TEST_PER_CLASS),
                spec,
            }
        })
        .collect()
}

/// Writes the bundle as gzipped safetensors: `<task>.{pool,test}.{pixels,labels}` (u8), the
/// specs in the metadata.
pub fn save_bundle(path: &Path, tasks: &[TaskData]) -> Result<()> {
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in tasks {
        for (part, im) in [("pool", &t.pool), ("test", &t.test)] {
            bufs.push((
                format!("{}.{part}.pixels", t.spec.name),
                vec![im.len(), 28, 28],
                im.to_u8(),
            ));
            bufs.push((
                format!("{}.{part}.labels", t.spec.name),
                vec![im.len()],
                im.labels.clone(),
            ));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = bufs
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::U8, s.clone(), b).expect("sizes match"),
            )
        })
        .collect();
    let specs: Vec<&TaskSpec> = tasks.iter().map(|t| &t.spec).collect();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "lora-compose-downstream/1".to_string());
    meta.insert(
        "tasks".to_string(),
        serde_json::to_string(&specs).expect("specs serialise"),
    );
    super::write_safetensors_gz(path, views, meta)
}

/// Reads what [`save_bundle`] wrote.
pub fn load_bundle(path: &Path) -> Result<Vec<TaskData>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = super::data::gunzip_if_gz(path, raw)?;
    let bad = |msg: String| Error::Safetensors { path: path.into(), msg };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let specs: Vec<TaskSpec> = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("tasks"))
        .ok_or_else(|| bad("no `tasks` metadata: not a downstream bundle".into()))
        .and_then(|t| serde_json::from_str(t).map_err(|e| bad(format!("tasks: {e}"))))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let tensor = |name: String, len: usize| -> Result<Vec<u8>> {
        let t = st.tensor(&name).map_err(|e| bad(format!("{name}: {e}")))?;
        if t.dtype() != Dtype::U8 || t.data().len() != len {
            return Err(bad(format!("{name}: expected {len} u8 values")));
        }
        Ok(t.data().to_vec())
    };
    let mut out = Vec::new();
    for spec in specs {
        let mut parts = BTreeMap::new();
        for part in ["pool", "test"] {
            let ln = format!("{}.{part}.labels", spec.name);
            let n = st.tensor(&ln).map_err(|e| bad(format!("{ln}: {e}")))?.shape()[0];
            let labels = tensor(ln, n)?;
            if let Some(&y) = labels.iter().find(|&&y| y as usize >= spec.classes.len()) {
                return Err(bad(format!("{}: label {y} outside the task's classes", spec.name)));
            }
            let px = tensor(format!("{}.{part}.pixels", spec.name), n * PIXELS)?;
            parts.insert(part, Images::from_u8(&px, labels));
        }
        out.push(TaskData {
            pool: parts.remove("pool").expect("inserted"),
            test: parts.remove("test").expect("inserted"),
            spec,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_round_trip_and_disjoint_splits() {
        let [a, b, c, d] = mnist_split(1000);
        let mut all: Vec<usize> = [a, b, c, d].concat();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 1000);

        let n = 40;
        let imgs = Images {
            pixels: (0..n * PIXELS).map(|i| (i % 255) as f32 / 255.0).collect(),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
        };
        let spec = downstream_tasks()[1].clone();
        let idx: Vec<usize> = (0..n).collect();
        let t = TaskData {
            pool: task_images(&imgs, &idx[..20], &spec, 1),
            test: task_images(&imgs, &idx[20..], &spec, 3),
            spec,
        };
        assert_eq!(t.pool.len(), 5);
        assert_eq!(t.test.len(), 10);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.safetensors.gz");
        save_bundle(&path, std::slice::from_ref(&t)).unwrap();
        let back = load_bundle(&path).unwrap();
        assert_eq!(back[0].spec, t.spec);
        assert_eq!(back[0].test.labels, t.test.labels);
        assert_eq!(back[0].pool.to_u8(), t.pool.to_u8());
        std::fs::write(&path, b"garbage").unwrap();
        assert!(load_bundle(&path).unwrap_err().to_string().contains("b.safetensors.gz"));
    }
}
