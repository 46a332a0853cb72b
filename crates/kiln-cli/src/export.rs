//! `kiln export`: a checkpoint as a Hugging Face model directory (`--format hf`, with
//! `--merged` for an adapter run, and the run's Hugging Face tokenizer beside the weights) or
//! as PEFT adapter files (`--format peft`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kiln_models::{KilnAutodiffBackend, Model};
use kiln_recipe::{AdapterSection, Recipe};
use kiln_train::checkpoint::find_checkpoint;
use kiln_train::{Checkpoint, RunDir};

use crate::backend::{self, Job};

/// `kiln export --format peft`: the adapters of an adapter run.
pub fn peft(run_dir: &Path, out: &Path, checkpoint: &str) -> Result<()> {
    let run = RunDir::open(run_dir)?;
    let recipe = run.load_recipe(&[])?.recipe;
    let Some(adapter) = &recipe.adapter else {
        bail!(
            "`{}` has no [adapter]: use `--format hf` to export the full model",
            run_dir.display()
        );
    };
    let ckpt = find_checkpoint(run_dir, checkpoint)?;
    let step = ckpt.state.step;
    let base = recipe
        .model
        .qwen2
        .as_ref()
        .and_then(|q| q.hf_dir.clone())
        .unwrap_or_else(|| format!("random base (run.seed {})", recipe.run.seed));
    let files = backend::on_cpu(ExportJob {
        recipe: &recipe,
        checkpoint: ckpt,
        out,
        format: Format::Peft {
            adapter,
            base: &base,
        },
    })?;
    eprintln!(
        "exported the adapters of step {step} of {} to {}:",
        run_dir.display(),
        out.display()
    );
    print_files(&files);
    Ok(())
}

/// `kiln export --format hf`: the whole model (an adapter run's only with `merged`) in
/// shards of at most `max_shard_size`, and the run's Hugging Face tokenizer files.
pub fn hf(
    run_dir: &Path,
    out: &Path,
    checkpoint: &str,
    max_shard_size: &str,
    merged: bool,
) -> Result<()> {
    let run = RunDir::open(run_dir)?;
    let recipe = run.load_recipe(&[])?.recipe;
    if recipe.adapter.is_some() && !merged {
        bail!(
            "`{}` is an adapter run: export its adapters with `--format peft`, or the merged model with `--format hf --merged`",
            run_dir.display()
        );
    }
    let ckpt = find_checkpoint(run_dir, checkpoint)?;
    let max_shard = parse_size(max_shard_size)?;
    let step = ckpt.state.step;
    let mut files = backend::on_cpu(ExportJob {
        recipe: &recipe,
        checkpoint: ckpt,
        out,
        format: Format::Hf { max_shard },
    })?;
    files.extend(copy_tokenizer(&recipe, out)?);
    eprintln!(
        "exported step {step} of {} to {}:",
        run_dir.display(),
        out.display()
    );
    print_files(&files);
    Ok(())
}

/// What an export writes.
enum Format<'a> {
    /// PEFT adapter files, naming `base` as the base model.
    Peft {
        adapter: &'a AdapterSection,
        base: &'a str,
    },
    /// A Hugging Face model directory, adapters merged into the base.
    Hf { max_shard: u64 },
}

/// Restores a checkpoint's model and writes it out. Export only moves weights: the CPU
/// backend serves whatever backend the run trained on.
struct ExportJob<'a> {
    recipe: &'a Recipe,
    checkpoint: Checkpoint,
    out: &'a Path,
    format: Format<'a>,
}

impl Job for ExportJob<'_> {
    type Output = Vec<PathBuf>;

    fn run<B: KilnAutodiffBackend>(self, device: B::Device) -> Result<Vec<PathBuf>> {
        let model = Model::<B::InnerBackend>::restore(self.recipe, self.checkpoint.model, &device)?;
        Ok(match self.format {
            Format::Peft { adapter, base } => model.export_peft(self.out, adapter, base)?,
            Format::Hf { max_shard } => model.merged(&device).export_hf(self.out, max_shard)?,
        })
    }
}

/// Copies a run's Hugging Face tokenizer (`tokenizer.json`, and `tokenizer_config.json` and
/// `chat_template.jinja` where they stand beside it) into `out`, so the exported model
/// ships with it; returns the files written.
fn copy_tokenizer(recipe: &Recipe, out: &Path) -> Result<Vec<PathBuf>> {
    let (kiln_recipe::TokenizerKind::Hf, Some(path)) =
        (recipe.tokenizer.kind, &recipe.tokenizer.path)
    else {
        return Ok(Vec::new());
    };
    let path = Path::new(path);
    let dir = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(Path::new("."))
    };
    let json = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    let mut files = Vec::new();
    for (src, name) in [
        (json, "tokenizer.json"),
        (dir.join("tokenizer_config.json"), "tokenizer_config.json"),
        (dir.join("chat_template.jinja"), "chat_template.jinja"),
    ] {
        if src.is_file() {
            let dst = out.join(name);
            std::fs::copy(&src, &dst).with_context(|| format!("copying `{}`", src.display()))?;
            files.push(dst);
        }
    }
    Ok(files)
}

/// Prints the written files, one a line, to stdout.
fn print_files(files: &[PathBuf]) {
    for f in files {
        println!("{}", f.display());
    }
}

/// Parses `5GB`, `500MB`, `64KB` (powers of 1000, as `transformers`' max_shard_size) or a
/// number of bytes.
fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim().to_ascii_uppercase();
    let (number, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&t[..i], &t[i..]),
        None => (t.as_str(), "B"),
    };
    let scale = match unit {
        "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => bail!("`{text}`: unknown size unit (use B, KB, MB, GB, KiB, MiB or GiB)"),
    };
    let value: f64 = number
        .trim()
        .parse()
        .with_context(|| format!("`{text}` is not a size"))?;
    if !value.is_finite() || value <= 0.0 {
        bail!("`{text}`: size must be positive");
    }
    Ok((value * scale) as u64)
}
