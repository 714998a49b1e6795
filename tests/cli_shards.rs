//! Sweeps split across processes (`fewshot --shard`, Slurm and Kubernetes indices) and merged
//! by `report`: the merged report and plots equal the single-process run's byte for byte;
//! reruns are idempotent; duplicates are dropped, conflicts and mixed plans refused, missing
//! units listed. And files the crate writes get the permissions the user's umask gives.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use lora_compose::experiment::methods::{unit_key, Method, UnitResult};
use lora_compose::experiment::shard::{self, Plan, Shard};

const BIN: &str = env!("CARGO_BIN_EXE_lora-compose");

/// Environment variables that would pick a shard: cleared for every child, so a test run
/// inside a Slurm array or a Kubernetes Job behaves as anywhere else.
const SHARD_ENV: [&str; 5] = [
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_STEP",
    "JOB_COMPLETION_INDEX",
];

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(name)
}

/// `lora-compose ARGS` with `env` set (and no inherited shard variables), under `umask` when
/// given (through `sh`, so only the child's mask changes).
fn command(args: &[&str], env: &[(&str, &str)], umask: Option<&str>) -> Command {
    let mut c = match umask {
        Some(mask) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!("umask {mask} && exec \"$0\" \"$@\"")).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    c.args(args);
    for v in SHARD_ENV {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(args, env, None).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) -> String {
    let e = stderr(o);
    assert!(o.status.success(), "exit {:?}: {e}", o.status.code());
    e
}

/// A small sweep of the committed data that runs in seconds: 2 tasks (two task kinds), K ∈
/// {1, 4}, 2 seeds, all 7 methods (56 units), 4 steps each.
fn sweep_args(out: &Path) -> Vec<String> {
    let mut a: Vec<String> = [
        "fewshot",
        "--tasks",
        "mnist-01567,digits8x8-01234",
        "--shots",
        "1,4",
        "--seeds",
        "2",
        "--steps",
        "4",
        "--test-per-class",
        "8",
        "--es-population",
        "3",
        "--es-generations",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (flag, file) in [
        ("--base", "base.safetensors"),
        ("--library", "library"),
        ("--data", "downstream.safetensors.gz"),
    ] {
        a.push(flag.into());
        a.push(data(file).display().to_string());
    }
    a.push("--out".into());
    a.push(out.display().to_string());
    a
}

/// `args` with the value of `flag` replaced.
fn with(args: &[String], flag: &str, value: &str) -> Vec<String> {
    let mut a = args.to_vec();
    let i = a.iter().position(|x| x == flag).expect("flag present");
    a[i + 1] = value.into();
    a
}

fn spawn(args: &[String], extra: &[&str], env: &[(&str, &str)]) -> Child {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    command(&all, env, None)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn read_units(path: &Path) -> Vec<UnitResult> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A unit's result without what may differ between runs of it (timing) or between a sharded
/// and a single-process run (the plan tag).
fn comparable(r: &UnitResult) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("seconds");
    o.remove("plan");
    v
}

/// Three shards as separate processes — one from `--shard`, one from a Slurm array task's
/// environment, one from a Kubernetes completion index — merge to the single-process report
/// and plots byte for byte; a rerun redoes nothing and a rerun after a lost unit redoes just it.
#[test]
fn three_shards_merge_to_the_single_process_report_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    let sharded = tmp.path().join("sharded");
    let single_args = sweep_args(&single.join("fewshot.jsonl"));
    let shard_args = sweep_args(&sharded.join("fewshot.jsonl"));

    let children = vec![
        spawn(&shard_args, &["--shard", "0/3"], &[]),
        spawn(
            &shard_args,
            &[],
            &[
                ("SLURM_ARRAY_TASK_ID", "11"),
                ("SLURM_ARRAY_TASK_MIN", "10"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
            ],
        ),
        spawn(&shard_args, &["--shard-count", "3"], &[("JOB_COMPLETION_INDEX", "2")]),
    ];
    let outputs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (i, o) in outputs.iter().enumerate() {
        let e = ok(o);
        assert!(e.contains(&format!("shard {i}/3")), "shard {i}: {e}");
    }
    let single_out = spawn(&single_args, &[], &[]).wait_with_output().unwrap();
    ok(&single_out);

    // Every unit in exactly one shard file, with the single run's result.
    let want: BTreeMap<String, serde_json::Value> = read_units(&single.join("fewshot.jsonl"))
        .iter()
        .map(|r| (r.unit_key(), comparable(r)))
        .collect();
    assert_eq!(want.len(), 56);
    let mut seen = BTreeMap::new();
    for i in 0..3 {
        let file = sharded.join(format!("fewshot.shard-{i:03}-of-003.jsonl"));
        for r in read_units(&file) {
            assert!(r.plan.is_some(), "{}: shard lines carry the plan", r.unit_key());
            if let Some(other) = seen.insert(r.unit_key(), i) {
                panic!("unit {} in shards {other} and {i}", r.unit_key());
            }
            assert_eq!(
                Some(&comparable(&r)),
                want.get(&r.unit_key()),
                "unit {} of shard {i} differs from the single-process run",
                r.unit_key()
            );
        }
    }
    assert_eq!(seen.len(), want.len(), "units missing from the shards");

    // Idempotent: a finished shard reruns nothing; a shard that lost units reruns just those.
    let file1 = sharded.join("fewshot.shard-001-of-003.jsonl");
    let before = fs::read(&file1).unwrap();
    let e = ok(&spawn(&shard_args, &["--shard", "1/3"], &[]).wait_with_output().unwrap());
    assert!(e.contains("0 units to run"), "{e}");
    assert_eq!(fs::read(&file1).unwrap(), before, "a rerun rewrites nothing");
    let file2 = sharded.join("fewshot.shard-002-of-003.jsonl");
    let lines: Vec<String> = fs::read_to_string(&file2).unwrap().lines().map(String::from).collect();
    fs::write(&file2, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
    let e = ok(&spawn(&shard_args, &["--shard", "2/3"], &[]).wait_with_output().unwrap());
    assert!(
        e.contains(&format!("{} units to run, 2 already", lines.len() - 2)),
        "{e}"
    );
    assert_eq!(read_units(&file2).len(), lines.len());

    // The same directory with other settings is refused before any unit runs.
    let o = spawn(&with(&shard_args, "--steps", "5"), &["--shard", "0/3"], &[])
        .wait_with_output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("fewshot.plan.json") && e.contains("steps: 4 vs 5"), "{e}");

    ok(&run(&["report", "--dir", single.to_str().unwrap()], &[]));
    let e = ok(&run(&["report", "--dir", sharded.to_str().unwrap()], &[]));
    assert!(!e.contains("warning"), "{e}");
    for name in ["report.md", "accuracy_vs_shots.svg", "learned_coefficients.svg"] {
        let a = fs::read(single.join(name)).unwrap();
        let b = fs::read(sharded.join(name)).unwrap();
        assert!(
            a == b,
            "{name}: the merged shards' differs from the single-process run's\n--- single\n{}\n--- sharded\n{}",
            String::from_utf8_lossy(&a),
            String::from_utf8_lossy(&b)
        );
    }
}

fn result(task: &str, method: Method, k: usize, seed: u64, acc: f64, plan: Option<&str>) -> UnitResult {
    UnitResult {
        task: task.into(),
        kind: "label shift".into(),
        method,
        k,
        seed,
        accuracy: Some(acc),
        diverged: false,
        final_loss: 0.5,
        trainable: 10,
        train_images: 5,
        test_images: 50,
        seconds: 0.25,
        coeffs: Default::default(),
        modules: 0,
        plan: plan.map(String::from),
    }
}

fn write_lines(path: &Path, rs: &[UnitResult]) {
    let text: String = rs.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
    fs::write(path, text).unwrap();
}

/// A plan of 2 methods × 2 seeds × K ∈ {1, 4} on task `t`: 8 units.
fn toy_plan(settings: serde_json::Value) -> (Plan, Vec<UnitResult>) {
    let mut units = Vec::new();
    let mut rs = Vec::new();
    for k in [1, 4] {
        for seed in 0..2 {
            for m in [Method::Head, Method::Learned] {
                units.push(unit_key("t", k, seed, m));
                rs.push(result("t", m, k, seed, 0.5 + 0.01 * (k as f64 + seed as f64), None));
            }
        }
    }
    let plan = Plan::new(settings, units);
    for r in &mut rs {
        r.plan = Some(plan.id.clone());
    }
    (plan, rs)
}

/// `report` over shard files: an exact duplicate (other timing) is dropped, a conflicting one
/// is refused naming the unit and both files, files of different plans are refused, and
/// planned units without a result are listed with the shard that runs them.
#[test]
fn report_drops_duplicates_refuses_conflicts_and_lists_missing_units() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (plan, rs) = toy_plan(serde_json::json!({"steps": 4}));
    fs::write(dir.join("fewshot.plan.json"), plan.to_text()).unwrap();
    let f0 = dir.join("fewshot.shard-000-of-002.jsonl");
    let f1 = dir.join("fewshot.shard-001-of-002.jsonl");
    // Units 0–3 in shard 0, 3–6 in shard 1 (unit 3 twice, differently timed); unit 7 missing.
    let mut dup = rs[3].clone();
    dup.seconds = 9.0;
    write_lines(&f0, &rs[..4]);
    write_lines(&f1, &[dup.clone(), rs[4].clone(), rs[5].clone(), rs[6].clone()]);
    let d = dir.to_str().unwrap();
    let e = ok(&run(&["report", "--dir", d], &[]));
    assert!(e.contains("dropped 1 duplicate"), "{e}");
    assert!(e.contains("1 of 8 planned units have no result"), "{e}");
    let md = fs::read_to_string(dir.join("report.md")).unwrap();
    let missing = &plan.units[7];
    let owner = (0..2)
        .find(|&i| shard::units_of(&plan.units, Shard::new(i, 2).unwrap()).contains(&7))
        .unwrap();
    assert!(md.contains("## Warning: 1 of 8 planned units missing"), "{md}");
    assert!(md.contains(&format!("- `{missing}` (shard {owner}/2)")), "{md}");
    // With the missing unit there, no warning; the same report as from one file.
    let f2 = dir.join("late.jsonl");
    write_lines(&f2, &rs[7..]);
    let args = |files: &[&Path]| {
        let mut a = vec!["report".to_string(), "--dir".into(), d.into()];
        a.extend(files.iter().map(|f| f.display().to_string()));
        a
    };
    let run_files = |files: &[&Path]| {
        let a = args(files);
        run(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[])
    };
    let e = ok(&run_files(&[&f0, &f1, &f2]));
    assert!(!e.contains("warning"), "{e}");
    let complete = fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(!complete.contains("Warning"), "{complete}");
    let all = dir.join("all.jsonl");
    write_lines(&all, &rs);
    ok(&run_files(&[&all]));
    assert_eq!(fs::read_to_string(dir.join("report.md")).unwrap(), complete);

    // A conflicting unit: exit 1, the unit and both files named; the report is not rewritten.
    let mut bad = rs[3].clone();
    bad.accuracy = Some(0.9);
    write_lines(&f1, &[bad, rs[4].clone()]);
    let o = run(&["report", "--dir", d], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    for want in [
        "conflicting results for unit",
        rs[3].unit_key().as_str(),
        f0.to_str().unwrap(),
        f1.to_str().unwrap(),
        "accuracy",
    ] {
        assert!(e.contains(want), "`{want}` not in: {e}");
    }
    assert_eq!(fs::read_to_string(dir.join("report.md")).unwrap(), complete);

    // Files of another plan (other settings), or of a run without --shard, are refused.
    let (other, ors) = toy_plan(serde_json::json!({"steps": 5}));
    assert_ne!(other.id, plan.id);
    write_lines(&f1, &ors[4..7]);
    let o = run(&["report", "--dir", d], &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("different sweeps") && e.contains(&plan.id) && e.contains(&other.id),
        "{e}"
    );
    let mut plain = rs[4].clone();
    plain.plan = None;
    write_lines(&f1, &[plain]);
    let o = run(&["report", "--dir", d], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no plan"), "{}", stderr(&o));
    // The plan file of another plan beside the results is refused too.
    write_lines(&f1, &rs[4..7]);
    fs::write(dir.join("fewshot.plan.json"), other.to_text()).unwrap();
    let o = run(&["report", "--dir", d], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("fewshot.plan.json"), "{}", stderr(&o));
}

/// The shard index and count from the flag, a Slurm job array or a Kubernetes Indexed Job.
#[test]
fn slurm_and_kubernetes_environments_pick_the_shard() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    };
    let pick = |flag: Option<&str>, count: Option<usize>, vars: &'static [(&'static str, &'static str)]| {
        shard::resolve(flag.map(|f| f.parse().unwrap()), count, &env(vars))
            .map(|s| s.map(|(s, _)| (s.index, s.count)))
            .map_err(|e| e.to_string())
    };
    assert_eq!(pick(None, None, &[]), Ok(None));
    // Slurm: the index is relative to SLURM_ARRAY_TASK_MIN (`--array=3-6`), in steps.
    let slurm = &[
        ("SLURM_ARRAY_TASK_ID", "5"),
        ("SLURM_ARRAY_TASK_MIN", "3"),
        ("SLURM_ARRAY_TASK_COUNT", "4"),
    ];
    assert_eq!(pick(None, None, slurm), Ok(Some((2, 4))));
    assert_eq!(pick(Some("1/2"), None, slurm), Ok(Some((1, 2))), "the flag wins");
    assert_eq!(pick(None, Some(4), slurm), Ok(Some((2, 4))));
    assert!(pick(None, Some(5), slurm).unwrap_err().contains("disagree"));
    let stepped = &[
        ("SLURM_ARRAY_TASK_ID", "7"),
        ("SLURM_ARRAY_TASK_MIN", "1"),
        ("SLURM_ARRAY_TASK_STEP", "2"),
        ("SLURM_ARRAY_TASK_COUNT", "4"),
    ];
    assert_eq!(pick(None, None, stepped), Ok(Some((3, 4))));
    let no_count = &[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_MIN", "0")];
    let e = pick(None, None, no_count).unwrap_err();
    assert!(
        e.contains("SLURM_ARRAY_TASK_COUNT") && e.contains("--shard-count"),
        "{e}"
    );
    assert_eq!(pick(None, Some(8), no_count), Ok(Some((2, 8))));
    // `--array=1,5,7`: 3 tasks, but task 7 is 6 above the minimum.
    let gaps = &[
        ("SLURM_ARRAY_TASK_ID", "7"),
        ("SLURM_ARRAY_TASK_MIN", "1"),
        ("SLURM_ARRAY_TASK_COUNT", "3"),
    ];
    let e = pick(None, None, gaps).unwrap_err();
    assert!(e.contains("without gaps"), "{e}");
    let e = pick(
        None,
        None,
        &[("SLURM_ARRAY_TASK_ID", "x"), ("SLURM_ARRAY_TASK_COUNT", "3")],
    )
    .unwrap_err();
    assert!(e.contains("SLURM_ARRAY_TASK_ID"), "{e}");
    // Kubernetes gives only the index.
    let k8s = &[("JOB_COMPLETION_INDEX", "2")];
    assert_eq!(pick(None, Some(3), k8s), Ok(Some((2, 3))));
    let e = pick(None, None, k8s).unwrap_err();
    assert!(e.contains("JOB_COMPLETION_INDEX") && e.contains("--shard-count"), "{e}");
    assert!(pick(None, Some(2), k8s).unwrap_err().contains("out of range"));
    // A count alone, or a bad flag.
    assert!(pick(None, Some(3), &[]).unwrap_err().contains("--shard I/3"));
    assert!(pick(Some("1/2"), Some(3), &[]).unwrap_err().contains("disagree"));
    for bad in ["3/3", "1", "x/2", "0/0"] {
        assert!(bad.parse::<Shard>().is_err(), "{bad}");
    }
    // The binary says what is wrong with its environment, with exit 1.
    let o = run(
        &[
            "fewshot",
            "--out",
            "/nonexistent/x.jsonl",
            "--base",
            data("base.safetensors").to_str().unwrap(),
        ],
        &[("JOB_COMPLETION_INDEX", "1")],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--shard-count"), "{}", stderr(&o));
}

/// Every unit of a full-size sweep is in exactly one shard for several shard counts, shard
/// sizes differ by at most one, and the expensive full fine-tuning units spread over the shards.
#[test]
fn every_unit_is_in_exactly_one_shard() {
    let mut keys = Vec::new();
    for task in ["mnist-01567", "mnist-rot45", "digits8x8-01234", "fashion-0246"] {
        for k in [1, 2, 4, 8, 16, 0] {
            for seed in 0..5 {
                for m in Method::ALL {
                    keys.push(unit_key(task, k, seed, m));
                }
            }
        }
    }
    assert_eq!(keys.iter().collect::<BTreeSet<_>>().len(), 840, "keys are distinct");
    for n in [1, 2, 3, 7, 16, 32, 1000] {
        let mut owner = vec![None; keys.len()];
        let mut sizes = Vec::new();
        for i in 0..n {
            let s = Shard::new(i, n).unwrap();
            let mine = shard::units_of(&keys, s);
            assert_eq!(mine, shard::units_of(&keys, s), "deterministic");
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "in table order");
            for &u in &mine {
                if let Some(j) = owner[u].replace(i) {
                    panic!("n = {n}: unit {} in shards {j} and {i}", keys[u]);
                }
            }
            sizes.push(mine.len());
        }
        if let Some(u) = owner.iter().position(Option::is_none) {
            panic!("n = {n}: unit {} in no shard", keys[u]);
        }
        let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(hi - lo <= 1, "n = {n}: shard sizes {lo}..{hi}");
        if n == 7 {
            // `u mod 7` over the table would give every full fine-tuning unit to shard 1.
            for i in 0..n {
                let full = shard::units_of(&keys, Shard::new(i, n).unwrap())
                    .iter()
                    .filter(|&&u| keys[u].ends_with("/full"))
                    .count();
                assert!(
                    (5..=40).contains(&full),
                    "shard {i}/7 has {full} of 120 full fine-tuning units"
                );
            }
        }
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Files and directories the crate writes (results, run log, report, merged adapter) get the
/// mode the user's umask gives; a file the crate replaces keeps its mode.
#[test]
fn written_files_get_the_umask_mode_and_replaced_files_keep_theirs() {
    let tmp = tempfile::tempdir().unwrap();
    for (mask, file_mode, dir_mode) in [("022", 0o644, 0o755), ("027", 0o640, 0o750)] {
        let dir = tmp.path().join(format!("umask-{mask}"));
        let out = dir.join("fewshot.jsonl");
        let mut args = sweep_args(&out);
        // One unit: the linear probe, one shot, one seed, one step.
        for (flag, v) in [
            ("--tasks", "mnist-01567"),
            ("--shots", "1"),
            ("--seeds", "1"),
            ("--steps", "1"),
        ] {
            args = with(&args, flag, v);
        }
        args.extend(["--methods".into(), "head".into()]);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&command(&a, &[], Some(mask)).output().unwrap());
        ok(&command(&["report", "--dir", dir.to_str().unwrap()], &[], Some(mask))
            .output()
            .unwrap());
        for f in ["fewshot.jsonl", "runs.jsonl", "report.md", "accuracy_vs_shots.svg"] {
            assert_eq!(
                mode(&dir.join(f)),
                file_mode,
                "umask {mask}: {f} has mode {:o}",
                mode(&dir.join(f))
            );
        }
        let demo = dir.join("demo");
        ok(
            &command(&["demo-adapters", demo.to_str().unwrap(), "--n", "2"], &[], Some(mask))
                .output()
                .unwrap(),
        );
        let merged = dir.join("merged");
        let (a0, a1) = (demo.join("adapter_0"), demo.join("adapter_1"));
        let merge_args = [
            "merge",
            "--adapter",
            a0.to_str().unwrap(),
            "--adapter",
            a1.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ];
        ok(&command(&merge_args, &[], Some(mask)).output().unwrap());
        assert_eq!(
            mode(&merged),
            dir_mode,
            "umask {mask}: merged adapter directory {:o}",
            mode(&merged)
        );
        let st = merged.join("adapter_model.safetensors");
        assert_eq!(mode(&st), file_mode, "umask {mask}: {:o}", mode(&st));
        // Replaced under a narrower mask, an existing file keeps its mode.
        let report = dir.join("report.md");
        fs::set_permissions(&report, fs::Permissions::from_mode(0o604)).unwrap();
        fs::write(&report, "old").unwrap();
        ok(&command(&["report", "--dir", dir.to_str().unwrap()], &[], Some("077"))
            .output()
            .unwrap());
        assert_ne!(fs::read_to_string(&report).unwrap(), "old", "replaced");
        assert_eq!(
            mode(&report),
            0o604,
            "a replaced report.md keeps 0604: {:o}",
            mode(&report)
        );
        let folded = dir.join("folded.safetensors");
        fs::write(&folded, "old").unwrap();
        fs::set_permissions(&folded, fs::Permissions::from_mode(0o640)).unwrap();
        let base = demo.join("base_model.safetensors");
        let fold_args = [
            "merge",
            "--adapter",
            a0.to_str().unwrap(),
            "--base",
            base.to_str().unwrap(),
            "--out",
            folded.to_str().unwrap(),
        ];
        ok(&command(&fold_args, &[], Some("000")).output().unwrap());
        assert_eq!(
            mode(&folded),
            0o640,
            "a replaced base keeps its mode: {:o}",
            mode(&folded)
        );
    }
}
