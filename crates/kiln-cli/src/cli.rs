//! The `kiln` command line: every command, argument and help text (clap derive), and the
//! shell completions and man page generated from them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

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
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum RecipeCommand {
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
pub enum TokenizerCommand {
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
pub enum DataCommand {
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

/// Backends `kiln doctor` checks.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DoctorBackend {
    /// burn-flex, checked against burn-ndarray.
    Flex,
    /// burn-ndarray.
    Ndarray,
    /// burn-cuda (a build with `--features cuda`).
    Cuda,
    /// burn-wgpu: Vulkan or Metal (a build with `--features wgpu`).
    Wgpu,
}

/// Export formats.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    /// Hugging Face `transformers`: config.json + (sharded) model.safetensors.
    Hf,
    /// PEFT LoRA adapter: adapter_config.json + adapter_model.safetensors (adapter runs).
    Peft,
}

#[derive(Subcommand)]
pub enum Command {
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
        /// Its device, as `run.device` names it: `cpu`; `cuda:N`; for wgpu `default`,
        /// `discrete:N`, `integrated:N`, `virtual:N` or `software`. Default: `cpu`, `cuda:0`
        /// or `default`.
        #[arg(long)]
        device: Option<String>,
        /// burn-fusion on the cuda and wgpu backends, as `run.fusion` sets it.
        #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
        fusion: bool,
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

/// The recipe's backend kind that a `kiln doctor --backend` value checks.
impl From<DoctorBackend> for kiln_recipe::BackendKind {
    fn from(backend: DoctorBackend) -> Self {
        match backend {
            DoctorBackend::Flex => Self::Flex,
            DoctorBackend::Ndarray => Self::Ndarray,
            DoctorBackend::Cuda => Self::Cuda,
            DoctorBackend::Wgpu => Self::Wgpu,
        }
    }
}

/// Parses `kiln generate --backend`.
fn parse_backend(text: &str) -> Result<kiln_recipe::BackendKind, String> {
    match text {
        "flex" => Ok(kiln_recipe::BackendKind::Flex),
        "ndarray" => Ok(kiln_recipe::BackendKind::Ndarray),
        "cuda" => Ok(kiln_recipe::BackendKind::Cuda),
        "wgpu" => Ok(kiln_recipe::BackendKind::Wgpu),
        other => Err(format!(
            "unknown backend `{other}` (flex, ndarray, cuda or wgpu)"
        )),
    }
}

/// `kiln completions SHELL`: the completion script for `shell`, on stdout.
pub fn completions(shell: clap_complete::Shell) -> Result<ExitCode> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "kiln", &mut script);
    print_bytes(&script)
}

/// `kiln man`: the man page (roff), on stdout.
pub fn man() -> Result<ExitCode> {
    let mut page = Vec::new();
    clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
        .render(&mut page)
        .context("rendering the man page")?;
    print_bytes(&page)
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
