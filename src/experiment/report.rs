//! The report: markdown tables (method × shots, mean ± 95% interval over seeds) per task kind
//! and overall, trainable-parameter counts, and an SVG plot of accuracy vs shots per kind.
//!
//! The interval is the t-distribution's: mean ± t₀.₉₇₅(n−1)·s/√n over the units of a cell (seeds
//! and, for "overall", tasks). Diverged units are counted and left out of the mean.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use super::methods::{read_results, Method, UnitResult};
use super::shard::{self, Plan};
use crate::{Error, Result};

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct ReportArgs {
    /// Directory the report and plots are written to; its `fewshot.jsonl` and
    /// `fewshot.shard-*-of-*.jsonl` are the results when no RESULTS files are named.
    #[arg(long, default_value = "results/default")]
    pub dir: PathBuf,
    /// Results files to merge (shards of one plan, reruns): exact duplicates are dropped,
    /// conflicting results for one unit are refused.
    #[arg(value_name = "RESULTS")]
    pub results: Vec<PathBuf>,
}

/// t₀.₉₇₅ with `df` degrees of freedom.
fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    if df == 0 {
        f64::NAN
    } else {
        T.get(df - 1).copied().unwrap_or(1.96)
    }
}

/// (mean, half-width of the 95% interval, n).
pub fn mean_ci(xs: &[f64]) -> (f64, f64, usize) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, 0);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, f64::NAN, 1);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, t975(n - 1) * (var / n as f64).sqrt(), n)
}

fn shots_label(k: usize) -> String {
    if k == 0 {
        "all".into()
    } else {
        format!("K={k}")
    }
}

/// Cells: method → k → accuracies.
type Cells = BTreeMap<Method, BTreeMap<usize, Vec<f64>>>;

fn cells<'a>(rs: impl Iterator<Item = &'a UnitResult>) -> (Cells, usize) {
    let mut out = Cells::new();
    let mut diverged = 0;
    for r in rs {
        match r.accuracy {
            Some(a) => out.entry(r.method).or_default().entry(r.k).or_default().push(a),
            None => diverged += 1,
        }
    }
    (out, diverged)
}

/// Shots in plotting order: 1, 2, 4, …, then "all".
fn shot_order(ks: &BTreeSet<usize>) -> Vec<usize> {
    let mut v: Vec<usize> = ks.iter().copied().filter(|&k| k > 0).collect();
    if ks.contains(&0) {
        v.push(0);
    }
    v
}

fn table(title: &str, c: &Cells, ks: &[usize], params: &BTreeMap<Method, usize>, diverged: usize) -> String {
    let mut s = format!("### {title}\n\n| method | trainable |");
    for &k in ks {
        let _ = write!(s, " {} |", shots_label(k));
    }
    s.push_str("\n|---|---:|");
    for _ in ks {
        s.push_str("---:|");
    }
    s.push('\n');
    for (m, row) in c {
        let _ = write!(
            s,
            "| {} | {} |",
            m.name(),
            params.get(m).map_or("?".into(), |p| p.to_string())
        );
        for k in ks {
            let (mean, ci, n) = mean_ci(row.get(k).map_or(&[][..], |v| &v[..]));
            if n == 0 {
                s.push_str(" – |");
            } else if ci.is_nan() {
                let _ = write!(s, " {:.1} (n=1) |", 100.0 * mean);
            } else {
                let _ = write!(s, " {:.1} ± {:.1} |", 100.0 * mean, 100.0 * ci);
            }
        }
        s.push('\n');
    }
    if diverged > 0 {
        let _ = writeln!(s, "\n{diverged} diverged runs (NaN loss) left out of the means.");
    }
    s
}

/// The markdown report of `results`.
pub fn render(results: &[UnitResult]) -> String {
    let ks = shot_order(&results.iter().map(|r| r.k).collect());
    // Head and composition counts differ by task only through the head's class count; show the
    // largest count seen.
    let mut params = BTreeMap::new();
    for r in results {
        let e = params.entry(r.method).or_insert(0);
        *e = (*e).max(r.trainable);
    }
    let mut s = String::from(
        "## Few-shot test accuracy (%), mean ± 95% interval over seeds\n\n\
         trainable = parameters fitted on the downstream task (LoraHub: head + global row, the row found without gradients).\n\n",
    );
    let kinds: BTreeSet<&str> = results.iter().map(|r| r.kind.as_str()).collect();
    for kind in &kinds {
        let tasks: BTreeSet<&str> = results
            .iter()
            .filter(|r| r.kind == *kind)
            .map(|r| r.task.as_str())
            .collect();
        let (c, d) = cells(results.iter().filter(|r| r.kind == *kind));
        let names: Vec<&str> = tasks.into_iter().collect();
        s.push_str(&table(&format!("{kind} ({})", names.join(", ")), &c, &ks, &params, d));
        s.push('\n');
    }
    let (c, d) = cells(results.iter());
    s.push_str(&table("overall (all tasks and seeds)", &c, &ks, &params, d));
    s
}

/// Accuracy vs shots, one panel per task kind plus "overall".
pub fn plot(results: &[UnitResult], path: &Path) -> Result<()> {
    let ks = shot_order(&results.iter().map(|r| r.k).collect());
    let mut panels: Vec<(String, Cells)> = results
        .iter()
        .map(|r| r.kind.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|kind| {
            let c = cells(results.iter().filter(|r| r.kind == kind)).0;
            (kind, c)
        })
        .collect();
    panels.push(("overall".into(), cells(results.iter()).0));
    let cols = 3;
    let rows = panels.len().div_ceil(cols);
    let err = |e: String| Error::File {
        path: path.into(),
        msg: format!("plot: {e}"),
    };
    let root = SVGBackend::new(path, (420 * cols as u32, 330 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let areas = root.split_evenly((rows, cols));
    for ((title, c), area) in panels.iter().zip(areas.iter()) {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(36)
            .build_cartesian_2d(-0.3f64..(ks.len() as f64 - 0.7), 0f64..100f64)
            .map_err(|e| err(e.to_string()))?;
        let labels = ks.clone();
        chart
            .configure_mesh()
            .x_labels(ks.len())
            .x_label_formatter(&|x| {
                let i = x.round() as usize;
                if (x - i as f64).abs() < 1e-6 && i < labels.len() {
                    shots_label(labels[i])
                } else {
                    String::new()
                }
            })
            .y_desc("accuracy %")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (mi, (m, row)) in c.iter().enumerate() {
            let color = Palette99::pick(mi).to_rgba();
            let pts: Vec<(f64, f64)> = ks
                .iter()
                .enumerate()
                .filter_map(|(i, k)| row.get(k).map(|v| (i as f64, 100.0 * mean_ci(v).0)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(m.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Mean learned coefficients (softmax, per layer) over every learned-composition unit, as a
/// layer × module heatmap; blue below the uniform 1/N, red above.
pub fn plot_coeffs(results: &[UnitResult], path: &Path) -> Result<bool> {
    let mut sum: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut count = 0usize;
    for r in results.iter().filter(|r| r.method == Method::Learned && !r.diverged) {
        count += 1;
        for (layer, c) in &r.coeffs {
            let e = sum.entry(layer.clone()).or_insert_with(|| vec![0.0; c.len()]);
            e.iter_mut().zip(c).for_each(|(a, b)| *a += b);
        }
    }
    let Some(n) = sum.values().next().map(Vec::len) else {
        return Ok(false);
    };
    let err = |e: String| Error::File {
        path: path.into(),
        msg: format!("plot: {e}"),
    };
    let layers: Vec<(&String, &Vec<f64>)> = sum.iter().collect();
    let (cell, left, top) = (28i32, 300i32, 40i32);
    let width = (left + cell * n as i32 + 20) as u32;
    let height = (top + cell * layers.len() as i32 + 20) as u32;
    let root = SVGBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let title = format!(
        "learned composition: mean softmax coefficient ({count} runs; uniform = {:.3})",
        1.0 / n as f64
    );
    root.draw(&Text::new(title, (10, 12), ("sans-serif", 14)))
        .map_err(|e| err(e.to_string()))?;
    let uniform = 1.0 / n as f64;
    for (row, (layer, vals)) in layers.iter().enumerate() {
        let y = top + cell * row as i32;
        let short = layer.replace("encoder.layer.", "L").replace(".attention.attention", "");
        root.draw(&Text::new(short, (10, y + 8), ("sans-serif", 12)))
            .map_err(|e| err(e.to_string()))?;
        for (j, v) in vals.iter().enumerate() {
            let mean = v / count as f64;
            // ±uniform maps to full colour
            let t = ((mean - uniform) / uniform).clamp(-1.0, 1.0);
            let fade = |x: f64| (255.0 * (1.0 - x.abs())) as u8;
            let color = if t >= 0.0 {
                RGBColor(255, fade(t), fade(t))
            } else {
                RGBColor(fade(t), fade(t), 255)
            };
            let x = left + cell * j as i32;
            root.draw(&Rectangle::new([(x, y), (x + cell - 1, y + cell - 1)], color.filled()))
                .map_err(|e| err(e.to_string()))?;
        }
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(true)
}

/// The results files `report --dir DIR` reads when given none: `DIR/fewshot.jsonl` when it
/// exists, then every `DIR/fewshot.shard-III-of-NNN.jsonl`, by name.
pub fn default_inputs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let single = dir.join("fewshot.jsonl");
    if single.exists() {
        out.push(single);
    }
    let mut shards = Vec::new();
    if dir.is_dir() {
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let e = e.map_err(|e| Error::io(dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if matches!(shard::parse_results_name(&name), Some((stem, _)) if stem == "fewshot") {
                shards.push(e.path());
            }
        }
    }
    shards.sort();
    out.extend(shards);
    Ok(out)
}

/// The results of several files merged into one set.
#[derive(Debug)]
pub struct Merged {
    /// One result per unit, sorted by unit.
    pub results: Vec<UnitResult>,
    /// Exact duplicates dropped (equal but for timing).
    pub duplicates: usize,
    /// The plan the files belong to (`None`: results of runs without `--shard`).
    pub plan: Option<String>,
}

/// A result as JSON without its timing (`seconds`), the part two runs of a unit must agree on.
fn comparable(r: &UnitResult) -> serde_json::Value {
    let mut v = serde_json::to_value(r).expect("results serialise");
    if let Some(o) = v.as_object_mut() {
        o.remove("seconds");
    }
    v
}

/// Merges results files: every file must belong to one plan (or all to none), a unit found
/// twice must agree but for its timing (the copy is dropped), and conflicting units are an
/// error naming the unit, both files and the fields that differ.
pub fn merge_results(files: &[PathBuf]) -> Result<Merged> {
    let mut by_unit: BTreeMap<(String, Method, usize, u64), (UnitResult, usize)> = BTreeMap::new();
    let mut plan: Option<(Option<String>, usize)> = None;
    let mut duplicates = 0;
    let describe = |p: &Option<String>| match p {
        Some(id) => format!("plan {id}"),
        None => "no plan (a run without --shard)".to_string(),
    };
    for (fi, file) in files.iter().enumerate() {
        for r in read_results(file)? {
            match &plan {
                None => plan = Some((r.plan.clone(), fi)),
                Some((p, first)) if *p != r.plan => {
                    return Err(Error::Input(format!(
                        "results of different sweeps: {} holds {} and {} holds {} (unit {}); \
                         merge only the shards of one plan",
                        files[*first].display(),
                        describe(p),
                        file.display(),
                        describe(&r.plan),
                        r.unit_key()
                    )));
                }
                Some(_) => {}
            }
            match by_unit.entry(r.key()) {
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert((r, fi));
                }
                std::collections::btree_map::Entry::Occupied(e) => {
                    let (old, ofi) = e.get();
                    let (a, b) = (comparable(old), comparable(&r));
                    if a != b {
                        let fields: Vec<String> = a
                            .as_object()
                            .into_iter()
                            .flatten()
                            .filter(|(k, v)| b.get(k.as_str()) != Some(*v))
                            .map(|(k, v)| {
                                let w = b.get(k.as_str()).unwrap_or(&serde_json::Value::Null);
                                let short = |x: &serde_json::Value| {
                                    let t = x.to_string();
                                    if t.chars().count() > 40 {
                                        format!("{}…", t.chars().take(40).collect::<String>())
                                    } else {
                                        t
                                    }
                                };
                                format!("{k} {} vs {}", short(v), short(w))
                            })
                            .collect();
                        return Err(Error::Input(format!(
                            "conflicting results for unit {}: {} and {} differ ({}); \
                             delete the wrong one and rerun its shard",
                            r.unit_key(),
                            files[*ofi].display(),
                            file.display(),
                            fields.join(", ")
                        )));
                    }
                    duplicates += 1;
                }
            }
        }
    }
    Ok(Merged {
        results: by_unit.into_values().map(|(r, _)| r).collect(),
        duplicates,
        plan: plan.and_then(|p| p.0),
    })
}

/// The plan file of a sharded sweep, looked up beside its results files
/// (`<stem>.plan.json` for `<stem>.shard-III-of-NNN.jsonl`, or for `<stem>.jsonl`).
fn find_plan(files: &[PathBuf], id: &str) -> Result<Option<(PathBuf, Plan)>> {
    let mut tried = BTreeSet::new();
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = match shard::parse_results_name(&name) {
            Some((stem, _)) => stem,
            None => name.trim_end_matches(".jsonl").to_string(),
        };
        let path = f.with_file_name(format!("{stem}.plan.json"));
        if !tried.insert(path.clone()) {
            continue;
        }
        if let Some(p) = Plan::load(&path)? {
            if p.id != id {
                return Err(Error::File {
                    path,
                    msg: format!(
                        "is plan {}, but the results beside it are of plan {id}; merge only the \
                         shards of one plan",
                        p.id
                    ),
                });
            }
            return Ok(Some((path, p)));
        }
    }
    Ok(None)
}

/// The warning section for planned units with no result, each with the shard that runs it
/// for every shard count among the files' names.
fn missing_section(plan: &Plan, have: &BTreeSet<String>, counts: &BTreeSet<usize>) -> Option<String> {
    let missing: Vec<usize> = (0..plan.units.len())
        .filter(|&u| !have.contains(&plan.units[u]))
        .collect();
    if missing.is_empty() {
        return None;
    }
    let mut owner: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for &n in counts {
        for i in 0..n {
            let s = shard::Shard { index: i, count: n };
            for u in shard::units_of(&plan.units, s) {
                owner.entry(u).or_default().push(s.to_string());
            }
        }
    }
    let mut s = format!(
        "\n## Warning: {} of {} planned units missing\n\n\
         The tables above leave them out. Rerun the shards that run them (a rerun skips the \
         units it has):\n\n",
        missing.len(),
        plan.units.len()
    );
    for u in missing {
        match owner.get(&u) {
            Some(sh) => {
                let _ = writeln!(s, "- `{}` (shard {})", plan.units[u], sh.join(", "));
            }
            None => {
                let _ = writeln!(s, "- `{}`", plan.units[u]);
            }
        }
    }
    Some(s)
}

pub fn run_report(args: ReportArgs) -> Result<()> {
    let files = if args.results.is_empty() {
        default_inputs(&args.dir)?
    } else {
        for f in &args.results {
            if !f.is_file() {
                return Err(Error::File {
                    path: f.clone(),
                    msg: "no such results file".into(),
                });
            }
        }
        args.results.clone()
    };
    let path = args.dir.join("fewshot.jsonl");
    // Units are sorted by key: sums over them do not depend on the order they finished in.
    let merged = merge_results(&files)?;
    if merged.duplicates > 0 {
        eprintln!(
            "report: dropped {} duplicate units (equal but for timing)",
            merged.duplicates
        );
    }
    let results = merged.results;
    if results.is_empty() {
        return Err(Error::File {
            path,
            msg: "no results yet; run `lora-compose fewshot` first".into(),
        });
    }
    let mut md = render(&results);
    if let Some(id) = &merged.plan {
        match find_plan(&files, id)? {
            Some((plan_path, plan)) => {
                let have: BTreeSet<String> = results.iter().map(UnitResult::unit_key).collect();
                if let Some(extra) = have.iter().find(|k| !plan.units.contains(*k)) {
                    return Err(Error::File {
                        path: plan_path,
                        msg: format!("does not list unit {extra}, which the results hold"),
                    });
                }
                let counts: BTreeSet<usize> = files
                    .iter()
                    .filter_map(|f| shard::parse_results_name(&f.file_name()?.to_string_lossy()))
                    .map(|(_, s)| s.count)
                    .collect();
                if let Some(section) = missing_section(&plan, &have, &counts) {
                    eprintln!(
                        "report: warning: {} of {} planned units have no result (listed in the report)",
                        plan.units.len() - have.len(),
                        plan.units.len()
                    );
                    md.push_str(&section);
                }
            }
            None => eprintln!(
                "report: warning: the plan file of plan {id} is not beside the results; missing \
                 units cannot be listed"
            ),
        }
    }
    println!("{md}");
    super::write_atomic(&args.dir.join("report.md"), md.as_bytes())?;
    let svg = args.dir.join("accuracy_vs_shots.svg");
    plot(&results, &svg)?;
    eprintln!("wrote {} and {}", args.dir.join("report.md").display(), svg.display());
    let heat = args.dir.join("learned_coefficients.svg");
    if plot_coeffs(&results, &heat)? {
        eprintln!("wrote {}", heat.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_matches_hand_computation() {
        let (m, ci, n) = mean_ci(&[0.5, 0.7, 0.9]);
        assert_eq!(n, 3);
        assert!((m - 0.7).abs() < 1e-12);
        // s = 0.2, t(2) = 4.303: 4.303 · 0.2 / √3
        assert!((ci - 4.303 * 0.2 / 3f64.sqrt()).abs() < 1e-9);
        assert!(mean_ci(&[0.4]).1.is_nan());
    }

    #[test]
    fn diverged_runs_are_counted_not_averaged() {
        let r = |method, acc: Option<f64>| UnitResult {
            task: "t".into(),
            kind: "label shift".into(),
            method,
            k: 4,
            seed: 0,
            accuracy: acc,
            diverged: acc.is_none(),
            final_loss: 0.0,
            trainable: 10,
            train_images: 20,
            test_images: 100,
            seconds: 0.1,
            coeffs: Default::default(),
            modules: 0,
            plan: None,
        };
        let rs = vec![
            r(Method::Head, Some(0.5)),
            r(Method::Head, Some(0.7)),
            r(Method::Full, None),
        ];
        let md = render(&rs);
        assert!(md.contains("60.0 ±"), "{md}");
        assert!(md.contains("1 diverged"), "{md}");
        let dir = tempfile::tempdir().unwrap();
        plot(&rs, &dir.path().join("p.svg")).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("p.svg")).unwrap();
        assert!(svg.contains("<svg"));
        assert!(
            !plot_coeffs(&rs, &dir.path().join("h.svg")).unwrap(),
            "no learned runs, no heatmap"
        );
        let mut learned = r(Method::Learned, Some(0.6));
        learned
            .coeffs
            .insert("encoder.layer.0.attention.attention.query".into(), vec![0.2, 0.8]);
        assert!(plot_coeffs(&[learned], &dir.path().join("h.svg")).unwrap());
    }
}
