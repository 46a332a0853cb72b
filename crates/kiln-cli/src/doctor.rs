//! `kiln doctor`: does a backend compute kiln's operations, and their gradients, as a CPU
//! reference does?
//!
//! The checks are kiln-ops' conformance table (`kiln_ops::conformance`, which `cargo test`
//! runs too): each builds its inputs on the host from a fixed seed, runs one operation (or
//! one QLoRA projection) forward and backward on the checked backend, and here every output
//! and input gradient is compared with the same computation on the reference CPU backend
//! (Flex, or NdArray when Flex itself is checked). The sizes are the QLoRA smoke recipe's.
//! Each check runs `repeat` times, to show results that vary from run to run (a race, or an
//! autotuned kernel choice that differs) next to results that are wrong every time.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kiln_models::KilnAutodiffBackend;
use kiln_models::backend::conformance::{CHECKS, Outputs, Path, Sizes, relative_error};
use kiln_recipe::BackendKind;

use crate::backend::{Job, dispatch_on};

/// The checks' sizes: the QLoRA smoke recipe's micro-batch (8 x 256 tokens, hidden 128,
/// intermediate 352).
const SIZES: Sizes = Sizes::QLORA_SMOKE;

/// What `kiln doctor` is asked.
pub struct DoctorOptions {
    /// The backend checked.
    pub backend: BackendKind,
    /// Its device (`cpu`, `cuda:N`, a wgpu device).
    pub device: String,
    /// burn-fusion on the GPU backends.
    pub fusion: bool,
    /// Runs of each check on the checked backend.
    pub repeat: usize,
    /// Largest accepted `max |a - b| / max |reference|` of an output.
    pub tolerance: f64,
    /// Where to write the results as JSON.
    pub json: Option<PathBuf>,
}

/// One compared output.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    check: &'static str,
    shapes: String,
    output: &'static str,
    /// The largest relative error over the repeats.
    error: f64,
    /// The largest relative difference between two repeats (0: the same every time).
    spread: f64,
    pass: bool,
}

/// Runs every check on the reference backend.
struct Reference;

impl Job for Reference {
    type Output = Vec<Outputs>;

    fn run<B: KilnAutodiffBackend>(self, device: B::Device) -> Result<Self::Output> {
        Ok(CHECKS
            .iter()
            .map(|c| c.run::<B>(Path::Kernel, &SIZES, &device))
            .collect())
    }
}

/// Runs every check on the checked backend, printing each as it ends.
struct Checked<'a> {
    reference: Vec<Outputs>,
    opts: &'a DoctorOptions,
}

impl Job for Checked<'_> {
    type Output = Vec<Row>;

    fn run<B: KilnAutodiffBackend>(self, device: B::Device) -> Result<Self::Output> {
        let mut rows = Vec::new();
        for (check, reference) in CHECKS.iter().zip(&self.reference) {
            let start = Instant::now();
            let runs: Vec<Outputs> = (0..self.opts.repeat.max(1))
                .map(|_| check.run::<B>(Path::Kernel, &SIZES, &device))
                .collect();
            for (k, (output, expected)) in reference.iter().enumerate() {
                let error = runs
                    .iter()
                    .map(|r| relative_error(&r[k].1, expected))
                    .fold(0f64, f64::max);
                let spread = runs
                    .iter()
                    .map(|r| relative_error(&r[k].1, &runs[0][k].1))
                    .fold(0f64, f64::max);
                let row = Row {
                    check: check.name(),
                    shapes: check.shapes(&SIZES),
                    output,
                    error,
                    spread,
                    pass: error <= self.opts.tolerance,
                };
                print_row(&row, (k == 0).then(|| start.elapsed().as_secs_f64()));
                rows.push(row);
            }
        }
        Ok(rows)
    }
}

fn print_row(row: &Row, seconds: Option<f64>) {
    if let Some(s) = seconds {
        println!("{}  {}  ({s:.1} s)", row.check, row.shapes);
    }
    let spread = if row.spread == 0.0 {
        "same every run".to_string()
    } else {
        format!("varies by {:.1e} between runs", row.spread)
    };
    println!(
        "  {:<4} {:<10} {:>9.2e}  {spread}",
        if row.pass { "ok" } else { "FAIL" },
        row.output,
        row.error
    );
}

/// Runs the checks; fails when an output differs from the reference beyond the tolerance.
pub fn doctor(opts: &DoctorOptions) -> Result<()> {
    let reference_kind = if opts.backend == BackendKind::Flex {
        BackendKind::Ndarray
    } else {
        BackendKind::Flex
    };
    if opts.tolerance.is_nan() || opts.tolerance <= 0.0 {
        bail!("--tolerance must be positive, got {}", opts.tolerance);
    }
    eprintln!(
        "kiln doctor: {}{} on {} against {} on the CPU, {} run(s) per check, tolerance {:.0e} \
         (max |a - b| / max |reference| per output)",
        opts.backend.as_str(),
        match opts.backend {
            BackendKind::Cuda | BackendKind::Wgpu if opts.fusion => " (fusion on)",
            BackendKind::Cuda | BackendKind::Wgpu => " (fusion off)",
            _ => "",
        },
        opts.device,
        reference_kind.as_str(),
        opts.repeat.max(1),
        opts.tolerance
    );
    let reference = dispatch_on(reference_kind, "cpu", true, Reference)?;
    let rows = dispatch_on(
        opts.backend,
        &opts.device,
        opts.fusion,
        Checked { reference, opts },
    )?;
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&rows)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.pass)
        .map(|r| format!("{} ({})", r.check, r.output))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} outputs on {} differ from the CPU reference beyond {:.0e}: {}",
            failed.len(),
            rows.len(),
            opts.backend.as_str(),
            opts.tolerance,
            failed.join(", ")
        );
    }
    eprintln!(
        "kiln doctor: all {} outputs match the reference",
        rows.len()
    );
    Ok(())
}
