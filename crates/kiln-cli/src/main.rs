//! `kiln`: train language models from declarative TOML recipes.

mod backend;
mod bench;
mod data;
mod doctor;
mod generate;
mod inspect;
mod plot;
mod progress;
mod recipe_cmd;
mod runs;
mod tooleval;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use kiln_models::KilnAutodiffBackend;

use kiln_recipe::{Recipe, diff_keys};
use kiln_train::checkpoint::{find_checkpoint, newest_valid_checkpoint, remove_stale_temporaries};
use kiln_train::{Checkpoint, Control, Outcome, RunDir};

use backend::{Job, dispatch};
use progress::Progress;

/// Large tensors are recycled instead of being mapped fresh (and page-faulted) every step.
#[global_allocator]
static ALLOC: kiln_models::alloc::RecyclingAlloc = kiln_models::alloc::RecyclingAlloc::new();

/// Exit status when a run stopped on a signal (after writing a checkpoint).
const EXIT_INTERRUPTED: u8 = 130;
/// Exit status when a run stopped at `run.max_wall_time` or `--stop-after` (after writing a
/// checkpoint).
const EXIT_PAUSED: u8 = 75;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Train language models from declarative TOML recipes",
    long_about = "Train language models from declarative TOML recipes.\n\n\
        A recipe names a model family, its data, its curriculum phases and its backend. \
        `kiln train` runs it into a run directory (<run.out_dir>/<run.name>/) holding the \
        resolved recipe, metrics.jsonl and checkpoints; `kiln resume` continues it exactly.",
    after_help = "Exit status: 0 done, 1 error, 2 usage error, 75 stopped at run.max_wall_time \
        or --stop-after (resumable), 130 interrupted by a signal (resumable).\n\
        Environment: NO_COLOR disables colors; KILN_LOG sets the log filter (e.g. `debug`)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum RecipeCommand {
    /// Print (or write) the JSON Schema of recipe files, for editors: a TOML language server
    /// (taplo, Even Better TOML) reads the `#:schema PATH` line at the top of a recipe and
    /// completes and checks its keys. kiln's copy is schemas/recipe.schema.json.
    Schema {
        /// Write it to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Write a commented starter recipe that validates and trains on the data shipped with
    /// kiln: `qwen2` (pretraining), `qlora` (chat fine-tune with tool calls), `moa`
    /// (DiscoverLM's mixture of attentions) or `convgpt` (ConvGPT-v2).
    New {
        /// The model family and method.
        #[arg(long, value_parser = ["qwen2", "qlora", "moa", "convgpt"])]
        family: String,
        /// The recipe file to write; its name becomes `run.name`.
        #[arg(long, value_name = "FILE.toml", default_value = "recipe.toml")]
        out: PathBuf,
        /// Replace the file if it exists.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a Qwen2-style byte-level BPE tokenizer (ChatML special tokens) on a recipe's
    /// sources and write its tokenizer.json.
    Train {
        /// The recipe whose `[[data.sources]]` to read.
        recipe: PathBuf,
        /// Override a recipe key, as for `train`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Vocabulary size, special tokens included.
        #[arg(long, value_name = "N")]
        vocab_size: usize,
        /// Where to write tokenizer.json.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Per source: rows, documents, tokens, skipped and filtered rows, a length histogram,
    /// what each phase's windowing keeps and drops, and rendered samples with the loss mask
    /// shown (trained text between `⟦` and `⟧` for chat sources). Builds the token cache.
    Inspect {
        /// The recipe file (TOML).
        recipe: PathBuf,
        /// Override a recipe key, as for `train`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Samples to render per source.
        #[arg(long, value_name = "N", default_value_t = 2)]
        samples: usize,
    },
}

/// Writes generated text to stdout; a reader that stops early (`kiln man | head`) is not
/// an error.
fn print_bytes(bytes: &[u8]) -> Result<ExitCode> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Backends `kiln doctor` checks.
#[derive(Clone, Copy, clap::ValueEnum)]
enum DoctorBackend {
    /// burn-flex, checked against burn-ndarray.
    Flex,
    /// burn-ndarray.
    Ndarray,
    /// burn-cuda (a build with `--features cuda`).
    Cuda,
}

/// Export formats.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    /// Hugging Face `transformers`: config.json + (sharded) model.safetensors.
    Hf,
    /// PEFT LoRA adapter: adapter_config.json + adapter_model.safetensors (adapter runs).
    Peft,
}

#[derive(Subcommand)]
enum Command {
    /// Train a recipe from scratch into a new run directory.
    Train {
        /// The recipe file (TOML).
        recipe: PathBuf,
        /// Override a recipe key before validation, e.g. `--set phases[0].window=256` or
        /// `--set optim.lr=3e-4`; repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Directory to create the run directory in (overrides `run.out_dir`).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Delete an existing run of the same name instead of refusing to start.
        #[arg(long)]
        overwrite: bool,
        /// Stop after N optimizer steps (checkpoint, exit status 75), e.g. to fit a job slot.
        #[arg(long, value_name = "N")]
        stop_after: Option<u64>,
    },
    /// Continue a run from its newest complete checkpoint.
    Resume {
        /// The run directory (`<run.out_dir>/<run.name>`).
        run_dir: PathBuf,
        /// Override a key of the run's recipe (refused unless --allow-recipe-change).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Accept a recipe that differs from the one the checkpoint was written with.
        #[arg(long)]
        allow_recipe_change: bool,
        /// Stop after N more optimizer steps (checkpoint, exit status 75).
        #[arg(long, value_name = "N")]
        stop_after: Option<u64>,
    },
    /// Run the global orchestrator of data-parallel runs (`[distributed]`): the processes
    /// of a run meet through it. Start it before them, and afresh for every run (it keeps
    /// a crashed run's registrations); it serves until interrupted.
    Orchestrator {
        /// Port to listen on (all interfaces); the recipes' `distributed.orchestrator` is
        /// `this-host:PORT`.
        #[arg(long, default_value_t = 7300)]
        port: u16,
    },
    /// Check that a backend computes kiln's operations and their gradients as the CPU
    /// does: matmuls, the NF4 weight and linear layer, a QLoRA projection, attention,
    /// cross-entropy and the fused ops, at the QLoRA smoke recipe's sizes, each against
    /// the same computation on the CPU (Flex; NdArray when Flex is checked). Run it on a
    /// new machine or GPU before training there. Exit status 1 when an output differs.
    Doctor {
        /// The backend to check.
        #[arg(long, value_enum, default_value_t = DoctorBackend::Flex)]
        backend: DoctorBackend,
        /// Its device: `cpu`, or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Runs of each check, to tell results that vary from run to run from results that
        /// are wrong every time.
        #[arg(long, value_name = "N", default_value_t = 2)]
        repeat: usize,
        /// Largest accepted relative error, `max |a - b| / max |reference|` of an output
        /// (GPU matmuls may round f32 inputs to TF32, about 1e-3).
        #[arg(long, value_name = "E", default_value_t = 1e-2)]
        tolerance: f64,
        /// Also write the results to this JSON file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Evaluate a checkpoint on the recipe's held-out data (JSON on stdout), or with
    /// --tool-calls by what it generates for a chat test set.
    Eval {
        /// The run directory.
        run_dir: PathBuf,
        /// Which checkpoint: `step-N`, `N` or `latest`.
        #[arg(long, default_value = "latest", value_name = "step-N")]
        checkpoint: String,
        /// Instead of the held-out loss: generate (greedy) a reply to each row of this chat
        /// JSONL file, whose last message is the expected assistant turn, and score tool
        /// calls (format, tool name, arguments) and text answers (exact, normalized). Prints
        /// a table; writes every reply and score as JSON.
        #[arg(long, value_name = "FILE.jsonl")]
        tool_calls: Option<PathBuf>,
        /// With --tool-calls: the most new tokens per reply.
        #[arg(long, value_name = "N", default_value_t = 96, requires = "tool_calls")]
        max_new_tokens: usize,
        /// With --tool-calls: where to write the JSON result (default:
        /// RUN_DIR/eval/tool-calls-step-N.json).
        #[arg(long, value_name = "FILE", requires = "tool_calls")]
        json: Option<PathBuf>,
    },
    /// Write a checkpoint as a Hugging Face model directory that `transformers` loads.
    Export {
        /// The run directory.
        run_dir: PathBuf,
        /// Output format (`hf`: config.json + safetensors).
        #[arg(long, value_enum, default_value = "hf")]
        format: ExportFormat,
        /// Directory to write (created if needed).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Which checkpoint: `step-N`, `N` or `latest`.
        #[arg(long, default_value = "latest", value_name = "step-N")]
        checkpoint: String,
        /// Split the weights into shards no larger than this (e.g. `5GB`, `500MB`).
        #[arg(long, default_value = "5GB", value_name = "SIZE")]
        max_shard_size: String,
        /// For an adapter run with `--format hf`: merge the adapters into the base (an NF4
        /// base is dequantized first, so its rounding is baked into the merged weights).
        #[arg(long)]
        merged: bool,
    },
    /// Generate text from a run's checkpoint or a Hugging Face model directory (KV cache;
    /// greedy by default, sampled with --temperature).
    Generate {
        /// A run directory or a Hugging Face model directory (config.json + safetensors).
        target: PathBuf,
        /// The prompt (with --chat: the user message).
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt in the Qwen2.5 chat template and stop at <|im_end|>.
        #[arg(long)]
        chat: bool,
        /// System message for --chat.
        #[arg(long)]
        system: Option<String>,
        /// JSON file with an array of tool definitions (implies --chat); prints the reply
        /// and its parsed tool calls as JSON.
        #[arg(long, value_name = "FILE")]
        tools: Option<PathBuf>,
        /// Most new tokens.
        #[arg(long, default_value_t = 128, value_name = "N")]
        max_new_tokens: usize,
        /// Sampling temperature (0: greedy).
        #[arg(long, default_value_t = 0.0, value_name = "T")]
        temperature: f64,
        /// Nucleus sampling threshold in (0, 1].
        #[arg(long, default_value_t = 1.0, value_name = "P")]
        top_p: f64,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 0, value_name = "S")]
        seed: u64,
        /// For a run directory: which checkpoint (`step-N`, `N` or `latest`).
        #[arg(long, default_value = "latest", value_name = "step-N")]
        checkpoint: String,
        /// A tokenizer.json to use instead of the target's (a model directory without one
        /// uses the byte tokenizer).
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<PathBuf>,
        /// Backend (default: the run's, or flex for a model directory).
        #[arg(long, value_parser = parse_backend)]
        backend: Option<kiln_recipe::BackendKind>,
    },
    /// Recipe tools: the JSON Schema for editors, and starter recipes.
    Recipe {
        #[command(subcommand)]
        action: RecipeCommand,
    },
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        action: TokenizerCommand,
    },
    /// Look at a recipe's data: what it reads, how it tokenizes and what training will see.
    Data {
        #[command(subcommand)]
        action: DataCommand,
    },
    /// Time real optimizer steps of a recipe's model: tokens/s, step time, FLOPs per token,
    /// GFLOP/s, MFU against the machine's peak and peak memory. Prints a summary to stderr
    /// and a JSON result to stdout (`scripts/bench_torch.py --like FILE` runs the same
    /// configuration in PyTorch; `just bench-compare RECIPE` runs both).
    Bench {
        /// The recipe file (TOML).
        recipe: PathBuf,
        /// Override a recipe key, as for `train`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Timed optimizer steps.
        #[arg(long, value_name = "N", default_value_t = 10)]
        steps: u64,
        /// Untimed steps first (allocation, caches).
        #[arg(long, value_name = "N", default_value_t = 2)]
        warmup: u64,
        /// The phase whose batch and window are measured.
        #[arg(long, value_name = "I", default_value_t = 0)]
        phase: usize,
        /// The machine's peak GFLOP/s for MFU (default: from /proc/cpuinfo).
        #[arg(long, value_name = "GFLOPS")]
        peak_gflops: Option<f64>,
        /// Also write the JSON result to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Plot runs against the step: loss (smoothed train, eval), learning rate, tokens/s,
    /// router path usage and dream multipliers where present, phase boundaries marked;
    /// several runs overlaid with a legend. Writes SVG.
    Plot {
        /// Run directories.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// The SVG file to write (default: RUN_DIR/plot.svg for one run, kiln-plot.svg for
        /// several).
        #[arg(long, value_name = "FILE.svg")]
        out: Option<PathBuf>,
    },
    /// List the runs under a directory: name, family, backend, status (running, finished,
    /// interrupted, failed, crashed), steps, last loss, best eval loss, tokens, wall time
    /// and newest checkpoint.
    Runs {
        /// Where the runs are (a run directory, an `out_dir`, or a folder of them).
        #[arg(default_value = "runs")]
        dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script: `kiln completions bash > ~/.local/share/bash-completion/completions/kiln`,
    /// `kiln completions zsh > "${fpath[1]}/_kiln"`, `kiln completions fish > ~/.config/fish/completions/kiln.fish`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print kiln's man page (roff): `kiln man | man -l -`.
    Man,
    /// Show the resolved recipe, parameter count, tokens per step, data and memory estimate.
    Inspect {
        /// The recipe file (TOML).
        recipe: PathBuf,
        /// Override a recipe key, as for `train`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Skip reading the data sources.
        #[arg(long)]
        no_data: bool,
    },
}

fn main() -> ExitCode {
    quiet_broken_pipe();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::env::var_os("NO_COLOR").is_none())
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", render_error(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, like `{:#}`, but a cause whose text the line
/// already holds (library errors that name their source in their own message) is not
/// repeated.
fn render_error(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Train {
            recipe,
            set,
            out,
            overwrite,
            stop_after,
        } => {
            let mut set = set;
            if let Some(out) = out {
                set.push(format!("run.out_dir={}", toml_string(&out)));
            }
            let mut loaded = kiln_recipe::load(&recipe, &set)?;
            print_warnings(&loaded);
            resolve_epochs(&mut loaded)?;
            let run = match peer_rank(&loaded.recipe)? {
                // A data-parallel process other than the leader logs into a directory of
                // its own beside the run's, which the leader alone creates and writes.
                Some(rank) if rank > 0 => {
                    let shared =
                        Path::new(&loaded.recipe.run.out_dir).join(&loaded.recipe.run.name);
                    RunDir::create_at(&peer_dir(&shared, rank), &loaded.recipe, overwrite)?
                }
                _ => RunDir::create(&loaded.recipe, overwrite)?,
            };
            eprintln!(
                "training `{}` ({} on {}) into {}",
                recipe.display(),
                loaded.recipe.model.family.as_str(),
                loaded.recipe.run.backend.as_str(),
                run.path().display()
            );
            train(loaded.recipe, run, None, stop_after)
        }
        Command::Resume {
            run_dir,
            set,
            allow_recipe_change,
            stop_after,
        } => {
            let shared = RunDir::open(&run_dir)?;
            let loaded = shared.load_recipe(&set)?;
            print_warnings(&loaded);
            let rank = peer_rank(&loaded.recipe)?.unwrap_or(0);
            let run = if rank > 0 {
                RunDir::open_or_create(&peer_dir(&run_dir, rank), &loaded.recipe)?
            } else {
                shared
            };
            // Only the leader tidies the shared directory.
            let stale = if rank == 0 {
                remove_stale_temporaries(&run_dir)
            } else {
                Vec::new()
            };
            for removed in stale {
                eprintln!(
                    "removed an unfinished checkpoint write: {}",
                    removed.display()
                );
            }
            let (checkpoint, warnings) = newest_valid_checkpoint(&run_dir);
            for w in warnings {
                eprintln!("warning: {w}");
            }
            if let Some(ckpt) = &checkpoint {
                let saved =
                    kiln_recipe::from_str(&ckpt.recipe_toml, &ckpt.dir.join("recipe.toml"), &[])
                        .context("reading the checkpoint's recipe")?;
                // The keys each process of a data-parallel run sets for itself are no change.
                let changes: Vec<String> = diff_keys(&saved.recipe, &loaded.recipe)
                    .into_iter()
                    .filter(|k| {
                        ![
                            "distributed.rank",
                            "distributed.host",
                            "distributed.data_port",
                            "distributed.orchestrator",
                        ]
                        .iter()
                        .any(|p| k.starts_with(p))
                    })
                    .collect();
                if !changes.is_empty() {
                    if !allow_recipe_change {
                        bail!(
                            "the recipe differs from the one checkpoint `{}` was written with:\n  {}\n\
                             resume with the original recipe, or pass --allow-recipe-change to continue with the new one",
                            ckpt.dir.display(),
                            changes.join("\n  ")
                        );
                    }
                    eprintln!(
                        "warning: continuing with a changed recipe:\n  {}",
                        changes.join("\n  ")
                    );
                }
            } else {
                eprintln!(
                    "no complete checkpoint in {}: starting the run from step 0",
                    run_dir.display()
                );
            }
            run.write_recipe(&loaded.recipe)?;
            train(loaded.recipe, run, checkpoint, stop_after)
        }
        Command::Doctor {
            backend,
            device,
            repeat,
            tolerance,
            json,
        } => {
            let backend = match backend {
                DoctorBackend::Flex => kiln_recipe::BackendKind::Flex,
                DoctorBackend::Ndarray => kiln_recipe::BackendKind::Ndarray,
                DoctorBackend::Cuda => kiln_recipe::BackendKind::Cuda,
            };
            doctor::doctor(&doctor::DoctorOptions {
                backend,
                device,
                repeat,
                tolerance,
                json,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Orchestrator { port } => {
            eprintln!(
                "orchestrator listening on 0.0.0.0:{port}; start the processes with distributed.orchestrator = \"<this host>:{port}\" (Ctrl-C stops it)"
            );
            kiln_train::distributed::run_orchestrator(port)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval {
            run_dir,
            checkpoint,
            tool_calls: Some(file),
            max_new_tokens,
            json,
        } => {
            tooleval::run(tooleval::ToolEvalRequest {
                run_dir,
                checkpoint,
                file,
                max_new_tokens,
                json,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval {
            run_dir,
            checkpoint,
            tool_calls: None,
            ..
        } => {
            let run = RunDir::open(&run_dir)?;
            let recipe = run.load_recipe(&[])?.recipe;
            let ckpt = find_checkpoint(&run_dir, &checkpoint)?;
            let metrics = dispatch(
                &recipe,
                EvalJob {
                    recipe: &recipe,
                    checkpoint: ckpt,
                },
            )?;
            eprintln!(
                "step {} | eval_loss {:.4} | perplexity {:.2} | bits/byte {:.4} | {} tokens",
                metrics.step,
                metrics.eval_loss,
                metrics.perplexity,
                metrics.bits_per_byte,
                metrics.eval_tokens
            );
            println!("{}", serde_json::to_string_pretty(&metrics)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            run_dir,
            format: ExportFormat::Peft,
            out,
            checkpoint,
            ..
        } => {
            let run = RunDir::open(&run_dir)?;
            let recipe = run.load_recipe(&[])?.recipe;
            let Some(adapter) = &recipe.adapter else {
                bail!(
                    "`{}` has no [adapter]: use `--format hf` to export the full model",
                    run_dir.display()
                );
            };
            let ckpt = find_checkpoint(&run_dir, &checkpoint)?;
            let step = ckpt.state.step;
            let device = burn::backend::flex::FlexDevice;
            let model =
                kiln_models::Model::<burn::backend::Flex>::restore(&recipe, ckpt.model, &device)?;
            let base = recipe
                .model
                .qwen2
                .as_ref()
                .and_then(|q| q.hf_dir.clone())
                .unwrap_or_else(|| format!("random base (run.seed {})", recipe.run.seed));
            let files = model.export_peft(&out, adapter, &base)?;
            eprintln!(
                "exported the adapters of step {step} of {} to {}:",
                run_dir.display(),
                out.display()
            );
            for f in files {
                println!("{}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            run_dir,
            format: ExportFormat::Hf,
            out,
            checkpoint,
            max_shard_size,
            merged,
        } => {
            let run = RunDir::open(&run_dir)?;
            let recipe = run.load_recipe(&[])?.recipe;
            if recipe.adapter.is_some() && !merged {
                bail!(
                    "`{}` is an adapter run: export its adapters with `--format peft`, or the merged model with `--format hf --merged`",
                    run_dir.display()
                );
            }
            let ckpt = find_checkpoint(&run_dir, &checkpoint)?;
            let max_shard = parse_size(&max_shard_size)?;
            let step = ckpt.state.step;
            // Export only moves weights: the CPU backend serves whatever the run used.
            let device = burn::backend::flex::FlexDevice;
            let model =
                kiln_models::Model::<burn::backend::Flex>::restore(&recipe, ckpt.model, &device)?
                    .merged(&device);
            let mut files = model.export_hf(&out, max_shard)?;
            // A run with a Hugging Face tokenizer ships it beside the weights.
            if let (kiln_recipe::TokenizerKind::Hf, Some(path)) =
                (recipe.tokenizer.kind, &recipe.tokenizer.path)
            {
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
                for (src, name) in [
                    (json, "tokenizer.json"),
                    (dir.join("tokenizer_config.json"), "tokenizer_config.json"),
                    (dir.join("chat_template.jinja"), "chat_template.jinja"),
                ] {
                    if src.is_file() {
                        let dst = out.join(name);
                        std::fs::copy(&src, &dst)
                            .with_context(|| format!("copying `{}`", src.display()))?;
                        files.push(dst);
                    }
                }
            }
            eprintln!(
                "exported step {step} of {} to {}:",
                run_dir.display(),
                out.display()
            );
            for f in files {
                println!("{}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            target,
            prompt,
            chat,
            system,
            tools,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            checkpoint,
            tokenizer,
            backend,
        } => {
            generate::run(generate::Request {
                target,
                checkpoint,
                prompt,
                chat,
                system,
                tools,
                tokenizer,
                backend,
                options: kiln_models::generate::GenerateOptions {
                    max_new_tokens,
                    temperature,
                    top_p,
                    seed,
                    stop_ids: Vec::new(),
                },
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Tokenizer {
            action:
                TokenizerCommand::Train {
                    recipe,
                    set,
                    vocab_size,
                    out,
                },
        } => {
            let loaded = kiln_recipe::load(&recipe, &set)?;
            // The sources stream through the trainer: no corpus is held in memory.
            let (texts, reader) = kiln_data::stream_texts(loaded.recipe.data.sources.clone());
            let trained = kiln_data::bpe::train_bpe(texts, vocab_size, &out);
            let counts = reader
                .join()
                .map_err(|_| anyhow::anyhow!("the source reader thread panicked"))?;
            let counts = match counts {
                Ok(c) => c,
                Err(e) => {
                    // Trained on part of the data: do not leave that tokenizer behind.
                    let _ = std::fs::remove_file(&out);
                    return Err(e.into());
                }
            };
            let tok = trained?;
            for (name, n) in &counts {
                eprintln!("source `{name}`: {n} documents");
            }
            eprintln!(
                "trained a byte-level BPE tokenizer of {} ids on {} documents",
                tok.get_vocab_size(true),
                counts.iter().map(|(_, n)| n).sum::<u64>()
            );
            println!("{}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Data {
            action:
                DataCommand::Inspect {
                    recipe,
                    set,
                    samples,
                },
        } => {
            let loaded = kiln_recipe::load(&recipe, &set)?;
            data::inspect(&loaded.recipe, samples)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Recipe {
            action: RecipeCommand::Schema { out },
        } => {
            recipe_cmd::schema(out.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Recipe {
            action: RecipeCommand::New { family, out, force },
        } => {
            recipe_cmd::new(&family, &out, force)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot { runs, out } => {
            let out = out.unwrap_or_else(|| match runs.as_slice() {
                [one] => one.join("plot.svg"),
                _ => PathBuf::from("kiln-plot.svg"),
            });
            plot::plot(&runs, &out)?;
            eprintln!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs { dir, json } => {
            runs::runs(&dir, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "kiln", &mut script);
            print_bytes(&script)
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut page)
                .context("rendering the man page")?;
            print_bytes(&page)
        }
        Command::Bench {
            recipe,
            set,
            steps,
            warmup,
            phase,
            peak_gflops,
            json,
        } => {
            let mut loaded = kiln_recipe::load(&recipe, &set)?;
            print_warnings(&loaded);
            resolve_epochs(&mut loaded)?;
            bench::bench(
                &loaded,
                &bench::BenchOptions {
                    steps,
                    warmup,
                    phase,
                    peak_gflops,
                    json,
                },
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            recipe,
            set,
            no_data,
        } => {
            let mut loaded = kiln_recipe::load(&recipe, &set)?;
            print_warnings(&loaded);
            if !no_data {
                resolve_epochs(&mut loaded)?;
            }
            inspect::inspect(&loaded, !no_data)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Turns phase lengths given in `epochs` into steps (reading the data), says so, and checks
/// the recipe again now that its step count is known.
fn resolve_epochs(loaded: &mut kiln_recipe::LoadedRecipe) -> Result<()> {
    let vocab = kiln_models::ModelSpec::from_recipe(&loaded.recipe)?.vocab_size();
    let epochs: Vec<Option<f64>> = loaded.recipe.phases.iter().map(|p| p.epochs).collect();
    for (i, windows, steps) in kiln_data::DataPipeline::resolve_epochs(&mut loaded.recipe, vocab)? {
        eprintln!(
            "phases[{i}]: {} epochs = {windows} windows = {steps} steps",
            epochs[i].unwrap_or_default()
        );
    }
    loaded
        .recipe
        .validate(&loaded.path)
        .map_err(kiln_recipe::RecipeError::Invalid)?;
    Ok(())
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

fn parse_backend(text: &str) -> Result<kiln_recipe::BackendKind, String> {
    match text {
        "flex" => Ok(kiln_recipe::BackendKind::Flex),
        "ndarray" => Ok(kiln_recipe::BackendKind::Ndarray),
        "cuda" => Ok(kiln_recipe::BackendKind::Cuda),
        other => Err(format!("unknown backend `{other}` (flex, ndarray or cuda)")),
    }
}

/// A path as a TOML string literal (for `--out`).
fn toml_string(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

struct TrainJob<'a> {
    recipe: &'a Recipe,
    run: &'a RunDir,
    start: Option<Checkpoint>,
    stop: Arc<AtomicBool>,
    stop_after: Option<u64>,
}

impl Job for TrainJob<'_> {
    type Output = Outcome;

    fn run<B: KilnAutodiffBackend>(self, device: B::Device) -> Result<Outcome> {
        let mut progress = Progress::new();
        let control = Control {
            stop: &self.stop,
            stop_after_steps: self.stop_after,
        };
        let result = kiln_train::train::<B>(
            &device,
            self.recipe,
            self.run,
            self.start,
            &mut progress,
            &control,
        );
        progress.finish();
        Ok(result?)
    }
}

struct EvalJob<'a> {
    recipe: &'a Recipe,
    checkpoint: Checkpoint,
}

impl Job for EvalJob<'_> {
    type Output = kiln_train::EvalMetrics;

    fn run<B: KilnAutodiffBackend>(self, device: B::Device) -> Result<Self::Output> {
        Ok(kiln_train::evaluate_checkpoint::<B::InnerBackend>(
            &device,
            self.recipe,
            self.checkpoint,
        )?)
    }
}

/// This process's rank when the recipe trains data-parallel.
fn peer_rank(recipe: &Recipe) -> Result<Option<u32>> {
    Ok(kiln_train::distributed::Topology::of(recipe)?.map(|t| t.rank))
}

/// The directory a data-parallel process of rank `rank > 0` logs into, beside the run's.
fn peer_dir(run: &Path, rank: u32) -> PathBuf {
    let name = run
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    run.with_file_name(format!("{name}.rank-{rank}"))
}

fn train(
    recipe: Recipe,
    run: RunDir,
    start: Option<Checkpoint>,
    stop_after: Option<u64>,
) -> Result<ExitCode> {
    backend::check_training(&recipe)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while the first is being handled exits at once.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))
            .context("installing the signal handler")?;
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the signal handler")?;
    }
    // Data parallel on CUDA, each process of a machine takes its own device (unless the
    // recipe names one).
    let device = match &recipe.distributed {
        Some(d) if recipe.run.device == "cuda" => format!(
            "cuda:{}",
            peer_rank(&recipe)?.unwrap_or(0) % d.devices_per_node.max(1)
        ),
        _ => recipe.run.device.clone(),
    };
    let outcome = backend::dispatch_on(
        recipe.run.backend,
        &device,
        TrainJob {
            recipe: &recipe,
            run: &run,
            start,
            stop,
            stop_after,
        },
    )
    .with_context(|| format!("run {}", run.path().display()))?;
    let dir = run.path().display();
    match outcome {
        Outcome::Finished => {
            eprintln!("done: {dir}");
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Converged => {
            eprintln!("done (converged, see status.json): {dir}");
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Interrupted => {
            eprintln!("interrupted: checkpoint written; continue with `kiln resume {dir}`");
            Ok(ExitCode::from(EXIT_INTERRUPTED))
        }
        Outcome::Paused => {
            eprintln!(
                "stopped at the time or step limit: checkpoint written; continue with `kiln resume {dir}`"
            );
            Ok(ExitCode::from(EXIT_PAUSED))
        }
    }
}

/// Prints what validation questioned without refusing, to stderr.
fn print_warnings(loaded: &kiln_recipe::LoadedRecipe) {
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
}

/// A reader that stops early (`kiln inspect RECIPE | head`) closes stdout under us, and
/// Rust's `println!` panics on the broken pipe. That is not an error of kiln's: exit quietly
/// instead, as other command-line tools do.
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}
