//! Sweeps split across machines (DESIGN §7): which units a shard runs, where it writes them,
//! and the plan that lets `report` tell a complete merge from a partial one.
//!
//! A sweep is the ordered table of units task × shots × seed × method. Shard `i` of `n` runs
//! the units dealt to it: the units sorted by a stable 64-bit FNV-1a hash of their key (ties by
//! key), then dealt round-robin, so every unit is in exactly one shard, shard sizes differ by
//! at most one, and the expensive methods (full fine-tuning, the whole pool) spread over all
//! shards instead of landing together as `u mod n` over the table would put them (7 methods
//! innermost). A unit's seed, shots and head come from the unit itself, never from the shard,
//! so a unit gives the same result wherever it runs.
//!
//! Shard `i` of `n` writes `<stem>.shard-III-of-NNN.jsonl` beside the usual results file, each
//! line tagged with the plan's id, and skips the units already there (Slurm requeues and
//! Kubernetes index retries are idempotent). `<stem>.plan.json` records the settings that
//! decide a unit's result and the full unit list; a shard refuses a directory whose plan
//! differs from its own.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Shard `index` of `count` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 {
            return Err(Error::Arg("shard count must be at least 1".into()));
        }
        if index >= count {
            return Err(Error::Arg(format!(
                "shard index {index} is out of range for {count} shards (0 to {})",
                count - 1
            )));
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = Error;

    /// `I/N`, 0 ≤ I < N.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Arg(format!("--shard `{s}`: expected I/N with 0 <= I < N, e.g. 3/16"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let i: usize = i.trim().parse().map_err(|_| bad())?;
        let n: usize = n.trim().parse().map_err(|_| bad())?;
        Shard::new(i, n)
    }
}

fn env_number(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>> {
    match env(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::Arg(format!("{name}={v:?} is not a non-negative integer"))),
    }
}

/// The shard to run: `--shard I/N` when given; else a Slurm job array's task
/// (`SLURM_ARRAY_TASK_ID` − `SLURM_ARRAY_TASK_MIN`, divided by `SLURM_ARRAY_TASK_STEP` when
/// that is above 1; the count from `SLURM_ARRAY_TASK_COUNT` or `--shard-count`); else a
/// Kubernetes Indexed Job's `JOB_COMPLETION_INDEX` with `--shard-count` (Kubernetes gives no
/// count); else none (the whole sweep). Returns the shard and where it came from.
pub fn resolve(
    flag: Option<Shard>,
    shard_count: Option<usize>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(Shard, String)>> {
    if let Some(s) = flag {
        if let Some(n) = shard_count.filter(|&n| n != s.count) {
            return Err(Error::Arg(format!("--shard {s} and --shard-count {n} disagree")));
        }
        return Ok(Some((s, format!("--shard {s}"))));
    }
    if let Some(id) = env_number(env, "SLURM_ARRAY_TASK_ID")? {
        let min = env_number(env, "SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let step = env_number(env, "SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
        let count = match (env_number(env, "SLURM_ARRAY_TASK_COUNT")?, shard_count) {
            (Some(c), Some(n)) if c != n => {
                return Err(Error::Arg(format!(
                    "SLURM_ARRAY_TASK_COUNT={c} and --shard-count {n} disagree"
                )))
            }
            (Some(c), _) | (None, Some(c)) => c,
            (None, None) => {
                return Err(Error::Arg(format!(
                    "SLURM_ARRAY_TASK_ID={id} is set but SLURM_ARRAY_TASK_COUNT is not: pass \
                     --shard-count N (the number of array tasks) or --shard {}/N",
                    id.saturating_sub(min) / step
                )))
            }
        };
        if id < min || (id - min) % step != 0 {
            return Err(Error::Arg(format!(
                "SLURM_ARRAY_TASK_ID={id} is not on the array's range (SLURM_ARRAY_TASK_MIN={min}, \
                 step {step}); use --array=A-B[:S] or pass --shard I/N"
            )));
        }
        let index = (id - min) / step;
        let shard = Shard::new(index, count).map_err(|_| {
            Error::Arg(format!(
                "SLURM_ARRAY_TASK_ID={id} (SLURM_ARRAY_TASK_MIN={min}, step {step}) gives shard \
                 {index}, beyond SLURM_ARRAY_TASK_COUNT={count}: the array must be one range \
                 without gaps (--array=0-{}), or pass --shard I/N",
                count.saturating_sub(1)
            ))
        })?;
        return Ok(Some((shard, format!("Slurm array task {id}"))));
    }
    if let Some(index) = env_number(env, "JOB_COMPLETION_INDEX")? {
        let count = shard_count.ok_or_else(|| {
            Error::Arg(format!(
                "JOB_COMPLETION_INDEX={index} is set but Kubernetes gives no shard count: pass \
                 --shard-count N (the Job's completions)"
            ))
        })?;
        let shard = Shard::new(index, count)
            .map_err(|e| Error::Arg(format!("JOB_COMPLETION_INDEX={index} with --shard-count {count}: {e}")))?;
        return Ok(Some((shard, format!("Kubernetes completion index {index}"))));
    }
    if let Some(n) = shard_count {
        return Err(Error::Arg(format!(
            "--shard-count {n} without a shard index: pass --shard I/{n}, or run as a Slurm array \
             task or a Kubernetes Indexed Job"
        )));
    }
    Ok(None)
}

/// 64-bit FNV-1a: a hash that stays the same across platforms and releases.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Positions (into `keys`) of the units shard `shard` runs, in table order.
pub fn units_of(keys: &[String], shard: Shard) -> Vec<usize> {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|&a, &b| (fnv1a64(keys[a].as_bytes()), &keys[a]).cmp(&(fnv1a64(keys[b].as_bytes()), &keys[b])));
    let mut mine: Vec<usize> = order
        .into_iter()
        .enumerate()
        .filter(|(dealt, _)| dealt % shard.count == shard.index)
        .map(|(_, u)| u)
        .collect();
    mine.sort_unstable();
    mine
}

/// `<dir>/<stem>.shard-III-of-NNN.jsonl` for results file `<dir>/<stem>.jsonl`.
pub fn results_path(out: &Path, shard: Shard) -> PathBuf {
    out.with_file_name(format!(
        "{}.shard-{:03}-of-{:03}.jsonl",
        stem(out),
        shard.index,
        shard.count
    ))
}

/// `<dir>/<stem>.plan.json` for results file `<dir>/<stem>.jsonl`.
pub fn plan_path(out: &Path) -> PathBuf {
    out.with_file_name(format!("{}.plan.json", stem(out)))
}

fn stem(out: &Path) -> String {
    out.file_stem()
        .map_or_else(|| "fewshot".into(), |s| s.to_string_lossy().into_owned())
}

/// For a shard results file `<stem>.shard-III-of-NNN.jsonl`: (`<stem>`, shard).
pub fn parse_results_name(name: &str) -> Option<(String, Shard)> {
    let rest = name.strip_suffix(".jsonl")?;
    let (stem, tail) = rest.rsplit_once(".shard-")?;
    let (i, n) = tail.split_once("-of-")?;
    let shard = Shard::new(i.parse().ok()?, n.parse().ok()?).ok()?;
    Some((stem.to_string(), shard))
}

/// What a sharded sweep runs: the settings that decide a unit's result and every unit's key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// [`Plan::id`] of the rest, stored so a reader can check it.
    pub id: String,
    pub settings: serde_json::Value,
    pub units: Vec<String>,
}

impl Plan {
    pub fn new(settings: serde_json::Value, units: Vec<String>) -> Self {
        let mut plan = Plan {
            id: String::new(),
            settings,
            units,
        };
        plan.id = plan.compute_id();
        plan
    }

    fn compute_id(&self) -> String {
        let text = serde_json::to_string(&(&self.settings, &self.units)).expect("plan serialises");
        format!("{:016x}", fnv1a64(text.as_bytes()))
    }

    pub fn to_text(&self) -> String {
        serde_json::to_string_pretty(self).expect("plan serialises") + "\n"
    }

    /// Reads a plan file; `None` when there is none.
    pub fn load(path: &Path) -> Result<Option<Plan>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        let plan: Plan = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.into(),
            msg: e.to_string(),
        })?;
        if plan.id != plan.compute_id() {
            return Err(Error::File {
                path: path.into(),
                msg: format!(
                    "plan id {} does not match its settings and units (edited by hand?)",
                    plan.id
                ),
            });
        }
        Ok(Some(plan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let s = Shard::new(3, 16).unwrap();
        let p = results_path(Path::new("results/full/fewshot.jsonl"), s);
        assert_eq!(p, Path::new("results/full/fewshot.shard-003-of-016.jsonl"));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_results_name(name), Some(("fewshot".into(), s)));
        assert_eq!(parse_results_name("fewshot.jsonl"), None);
        assert_eq!(
            plan_path(Path::new("results/full/fewshot.jsonl")),
            Path::new("results/full/fewshot.plan.json")
        );
        assert_eq!("3/16".parse::<Shard>().unwrap(), s);
        for bad in ["16/16", "3", "a/4", "0/0", "-1/4"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn fnv_is_the_published_function() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
