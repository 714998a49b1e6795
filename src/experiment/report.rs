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
use crate::{Error, Result};

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct ReportArgs {
    /// Directory with `fewshot.jsonl`; the report and plots are written there.
    #[arg(long, default_value = "results/default")]
    pub dir: PathBuf,
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

pub fn run_report(args: ReportArgs) -> Result<()> {
    let path = args.dir.join("fewshot.jsonl");
    let mut results = read_results(&path)?;
    // Units are saved in the order they finish; sums over them should not depend on it.
    results.sort_by_key(UnitResult::key);
    if results.is_empty() {
        return Err(Error::File {
            path,
            msg: "no results yet; run `lora-compose fewshot` first".into(),
        });
    }
    let md = render(&results);
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
