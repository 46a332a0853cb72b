//! `kiln plot`: a run's curves against the optimizer step, as one SVG.
//!
//! Panels, top to bottom, sharing the step axis:
//! - loss: training loss (raw, faint, and smoothed with a debiased exponential moving
//!   average, as TensorBoard smooths) and evaluation loss (points);
//! - learning rate;
//! - tokens per second;
//! - router path usage, when a run has routers (MoA): the fraction of tokens that keep each
//!   path, averaged over the layers' routers of one kind;
//! - dream LR multipliers, when a run has `dream.jsonl`: their mean, and min-max band.
//!
//! Several runs are overlaid, one colour each, with a legend. Phase boundaries are dashed
//! vertical lines labelled with the phase's name. Text is SVG `<text>` in the viewer's
//! sans-serif font, so no font file is read or embedded.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use plotters::prelude::*;
use serde_json::Value;

use kiln_train::RunDir;

/// Colours of the runs, in order (Tableau 10).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Path names of MoA's routers, by router kind.
const MIXER_PATHS: [&str; 4] = [
    "local conv",
    "metric attention",
    "channel mixing",
    "multi-query",
];
const FFN_PATHS: [&str; 3] = ["SwiGLU", "conv", "low-rank"];

type Points = Vec<(f64, f64)>;
/// Which curve of a run a panel shows.
type Pick = fn(&RunCurves) -> &Points;

/// What one run contributes to the plot.
struct RunCurves {
    name: String,
    train: Points,
    smoothed: Points,
    eval: Points,
    lr: Points,
    tokens_per_s: Points,
    /// First step of every phase after the first, with the phase's name.
    phases: Vec<(f64, String)>,
    /// `(router kind, path name)` -> usage per step, averaged over the layers.
    routers: BTreeMap<(String, String), Points>,
    /// Per dream cycle: step, min, mean, max multiplier.
    dream: Vec<(f64, f64, f64, f64)>,
}

/// TensorBoard's smoothing: an exponential moving average, debiased for its start.
fn smooth(points: &[(f64, f64)], weight: f64) -> Points {
    let mut avg = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            avg = avg * weight + (1.0 - weight) * y;
            (x, avg / (1.0 - weight.powi(i as i32 + 1)))
        })
        .collect()
}

fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    Ok(kiln_train::read_metrics(path)?)
}

fn load(dir: &Path) -> Result<RunCurves> {
    RunDir::open(dir)?;
    let rows = read_jsonl(&dir.join("metrics.jsonl"))?;
    let kind = |r: &Value, k: &str| r.get("kind").and_then(Value::as_str) == Some(k);
    let num = |r: &Value, k: &str| r.get(k).and_then(Value::as_f64);
    let mut c = RunCurves {
        name: dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        train: Vec::new(),
        smoothed: Vec::new(),
        eval: Vec::new(),
        lr: Vec::new(),
        tokens_per_s: Vec::new(),
        phases: Vec::new(),
        routers: BTreeMap::new(),
        dream: Vec::new(),
    };
    let mut last_phase: Option<String> = None;
    for r in &rows {
        let Some(step) = num(r, "step") else { continue };
        if kind(r, "eval") {
            if let Some(l) = num(r, "eval_loss") {
                c.eval.push((step, l));
            }
            continue;
        }
        if !kind(r, "train") {
            continue;
        }
        if let Some(l) = num(r, "loss") {
            c.train.push((step, l));
        }
        if let Some(v) = num(r, "lr") {
            c.lr.push((step, v));
        }
        if let Some(v) = num(r, "tokens_per_s") {
            c.tokens_per_s.push((step, v));
        }
        let phase = r.get("phase").and_then(Value::as_str).map(str::to_string);
        if phase.is_some() && last_phase.is_some() && phase != last_phase {
            c.phases.push((step, phase.clone().unwrap_or_default()));
        }
        if phase.is_some() {
            last_phase = phase;
        }
        if let Some(Value::Object(routers)) = r.get("router_usage") {
            // Average each path's usage over the routers of one kind (`...moa.router`).
            let mut sums: BTreeMap<(String, String), (f64, usize)> = BTreeMap::new();
            for (name, usage) in routers {
                let (kind, names): (&str, &[&str]) = if name.contains("ffn") {
                    ("HyperFFN", &FFN_PATHS)
                } else {
                    ("mixer", &MIXER_PATHS)
                };
                let values: Vec<f64> = usage
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default();
                // The last value is the mean top probability, not a path.
                for (p, v) in values
                    .iter()
                    .take(values.len().saturating_sub(1))
                    .enumerate()
                {
                    let path = names
                        .get(p)
                        .map_or_else(|| format!("path {p}"), |s| s.to_string());
                    let e = sums.entry((kind.to_string(), path)).or_insert((0.0, 0));
                    e.0 += v;
                    e.1 += 1;
                }
            }
            for (key, (sum, n)) in sums {
                c.routers
                    .entry(key)
                    .or_default()
                    .push((step, sum / n as f64));
            }
        }
    }
    if c.train.is_empty() {
        bail!(
            "`{}` has no training steps in metrics.jsonl yet",
            dir.display()
        );
    }
    c.smoothed = smooth(&c.train, 0.8);
    for r in read_jsonl(&dir.join("dream.jsonl"))? {
        if let (Some(s), Some(lo), Some(mean), Some(hi)) = (
            num(&r, "step"),
            num(&r, "multiplier_min"),
            num(&r, "multiplier_mean"),
            num(&r, "multiplier_max"),
        ) {
            c.dream.push((s, lo, mean, hi));
        }
    }
    Ok(c)
}

/// `lo..hi` padded by 5% (a flat series gets a unit-wide range).
fn padded(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else {
        lo.abs().max(1.0) * 0.5
    };
    (lo - pad)..(hi + pad)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A panel's chart with its axes, title and phase boundaries drawn.
fn panel<'a, 'b>(
    area: &'a Area<'b>,
    title: &str,
    y_desc: &str,
    steps: &Range<f64>,
    y: Range<f64>,
    runs: &[RunCurves],
) -> Result<Chart<'a, 'b>> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(70)
        .build_cartesian_2d(steps.clone(), y.clone())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y_desc)
        .light_line_style(BLACK.mix(0.05))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    // Phase boundaries: dashed (drawn as short segments), labelled at the top.
    for (i, run) in runs.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        for (step, name) in &run.phases {
            let x = step - 0.5;
            let dash = (y.end - y.start) / 40.0;
            let segments = (0..40).step_by(2).map(|k| {
                let y0 = y.start + k as f64 * dash;
                PathElement::new(
                    vec![(x, y0), (x, y0 + dash)],
                    colour.mix(0.7).stroke_width(1),
                )
            });
            chart.draw_series(segments).map_err(|e| anyhow!("{e}"))?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!(" {name} →"),
                    (x, y.end - (y.end - y.start) * (0.04 + 0.08 * i as f64)),
                    ("sans-serif", 12).into_font().color(&colour),
                )))
                .map_err(|e| anyhow!("{e}"))?;
        }
    }
    Ok(chart)
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>) -> Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(|e| anyhow!("{e}"))
}

fn line<'a, 'b>(
    chart: &mut Chart<'a, 'b>,
    points: &Points,
    style: ShapeStyle,
    label: Option<String>,
) -> Result<()> {
    let series = chart
        .draw_series(LineSeries::new(points.iter().copied(), style))
        .map_err(|e| anyhow!("{e}"))?;
    if let Some(label) = label {
        series
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    Ok(())
}

/// `kiln plot`: plots `runs` into `out`, by default RUN_DIR/plot.svg for one run and
/// kiln-plot.svg for several, and says where on stderr.
pub fn run(runs: &[PathBuf], out: Option<PathBuf>) -> Result<()> {
    let out = out.unwrap_or_else(|| match runs {
        [one] => one.join("plot.svg"),
        _ => PathBuf::from("kiln-plot.svg"),
    });
    plot(runs, &out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// Draws the plot of `dirs` into `out` (SVG).
fn plot(dirs: &[PathBuf], out: &Path) -> Result<()> {
    match out.extension().and_then(|e| e.to_str()) {
        Some("svg") => {}
        Some("png") => bail!(
            "`{}`: kiln writes SVG only (PNG would need a font file to draw text with); use a \
             `.svg` name, and e.g. `rsvg-convert` or a browser for a PNG",
            out.display()
        ),
        _ => bail!("`{}`: the output must be a `.svg` file", out.display()),
    }
    let runs: Vec<RunCurves> = dirs.iter().map(|d| load(d)).collect::<Result<_>>()?;
    let steps = {
        let r = padded(runs.iter().flat_map(|r| r.train.iter().map(|p| p.0)));
        r.start.max(0.0)..r.end
    };
    let router_run = runs.iter().position(|r| !r.routers.is_empty());
    let dream = runs.iter().any(|r| !r.dream.is_empty());
    let panels = 3 + usize::from(router_run.is_some()) + usize::from(dream);
    let (width, panel_height) = (1100u32, 300u32);
    let root = SVGBackend::new(out, (width, panel_height * panels as u32 + 40)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let title = format!(
        "kiln: {}",
        runs.iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let root = root
        .titled(&title, ("sans-serif", 22))
        .map_err(|e| anyhow!("{e}"))?;
    let areas = root.split_evenly((panels, 1));
    let colour = |i: usize| PALETTE[i % PALETTE.len()];

    let mut next = areas.iter();
    let mut area = || next.next().expect("one area per panel");

    // Loss.
    let y = padded(
        runs.iter()
            .flat_map(|r| r.train.iter().chain(&r.eval).map(|p| p.1)),
    );
    let mut chart = panel(area(), "loss", "loss (nats/token)", &steps, y, &runs)?;
    for (i, r) in runs.iter().enumerate() {
        let c = colour(i);
        line(&mut chart, &r.train, c.mix(0.25).stroke_width(1), None)?;
        line(
            &mut chart,
            &r.smoothed,
            c.stroke_width(2),
            Some(format!("{} train (smoothed)", r.name)),
        )?;
        if !r.eval.is_empty() {
            line(&mut chart, &r.eval, c.mix(0.8).stroke_width(1), None)?;
            chart
                .draw_series(r.eval.iter().map(|&p| Circle::new(p, 4, c.filled())))
                .map_err(|e| anyhow!("{e}"))?
                .label(format!("{} eval", r.name))
                .legend(move |(x, y)| Circle::new((x + 9, y), 4, c.filled()));
        }
    }
    legend(&mut chart)?;

    // Learning rate and throughput: one line per run, from zero.
    let panels: [(&str, &str, Pick); 2] = [
        ("learning rate", "lr", |r| &r.lr),
        ("throughput", "tokens/s", |r| &r.tokens_per_s),
    ];
    for (title, y_desc, pick) in panels {
        let y = padded(
            runs.iter()
                .flat_map(|r| pick(r).iter().map(|p| p.1))
                .chain([0.0]),
        );
        let mut chart = panel(area(), title, y_desc, &steps, y, &runs)?;
        for (i, r) in runs.iter().enumerate() {
            line(
                &mut chart,
                pick(r),
                colour(i).stroke_width(2),
                Some(r.name.clone()),
            )?;
        }
        legend(&mut chart)?;
    }

    // Router usage of the first run that has routers.
    if let Some(k) = router_run {
        let r = &runs[k];
        let title = format!(
            "router path usage of {} (fraction of tokens keeping each path, mean over layers)",
            r.name
        );
        let y = padded(
            r.routers
                .values()
                .flat_map(|p| p.iter().map(|q| q.1))
                .chain([0.0]),
        );
        let mut chart = panel(area(), &title, "usage", &steps, y, &runs)?;
        for (j, ((kind, path), points)) in r.routers.iter().enumerate() {
            let c = PALETTE[(j + 1) % PALETTE.len()];
            // Mixer paths solid, HyperFFN experts thinner.
            let width = if kind == "mixer" { 2 } else { 1 };
            line(
                &mut chart,
                points,
                c.stroke_width(width),
                Some(format!("{kind}: {path}")),
            )?;
        }
        legend(&mut chart)?;
    }

    // Dream multipliers.
    if dream {
        let y = padded(
            runs.iter()
                .flat_map(|r| r.dream.iter().flat_map(|d| [d.1, d.3]))
                .chain([0.0, 1.0]),
        );
        let mut chart = panel(
            area(),
            "dream: LR multipliers per cycle (mean; min and max faint)",
            "multiplier",
            &steps,
            y,
            &runs,
        )?;
        for (i, r) in runs.iter().enumerate().filter(|(_, r)| !r.dream.is_empty()) {
            let c = colour(i);
            let pick = |f: fn(&(f64, f64, f64, f64)) -> f64| -> Points {
                r.dream.iter().map(|d| (d.0, f(d))).collect()
            };
            line(&mut chart, &pick(|d| d.1), c.mix(0.4).stroke_width(1), None)?;
            line(&mut chart, &pick(|d| d.3), c.mix(0.4).stroke_width(1), None)?;
            line(
                &mut chart,
                &pick(|d| d.2),
                c.stroke_width(2),
                Some(format!("{} mean", r.name)),
            )?;
            chart
                .draw_series(
                    r.dream
                        .iter()
                        .map(|d| Circle::new((d.0, d.2), 3, c.filled())),
                )
                .map_err(|e| anyhow!("{e}"))?;
        }
        legend(&mut chart)?;
    }
    root.present()
        .with_context(|| format!("writing `{}`", out.display()))?;
    Ok(())
}
