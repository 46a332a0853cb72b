//! `kiln`: train language models from declarative TOML recipes.
//!
//! This file parses the command line (`cli.rs` defines it) and hands each command to its
//! module; the commands' work, messages and exit statuses live there.

mod backend;
mod bench;
mod cli;
mod data_cmd;
mod doctor;
mod eval;
mod export;
mod generate;
mod inspect;
mod load;
mod orchestrator;
mod plot;
mod progress;
mod recipe_cmd;
mod resume;
mod runs;
mod tokenizer_cmd;
mod tooleval;
mod train;
#[cfg(feature = "wgpu")]
mod wgpu_adapter;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use cli::{Cli, Command, DataCommand, ExportFormat, RecipeCommand, TokenizerCommand};

/// Large tensors are recycled instead of being mapped fresh (and page-faulted) every step.
#[global_allocator]
static ALLOC: kiln_models::alloc::RecyclingAlloc = kiln_models::alloc::RecyclingAlloc::new();

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

/// Runs the command: the ones that train return their own exit status, the others succeed
/// or fail.
fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Train {
            recipe,
            set,
            out,
            overwrite,
            stop_after,
        } => return train::train(&recipe, &set, out.as_deref(), overwrite, stop_after),
        Command::Resume {
            run_dir,
            set,
            allow_recipe_change,
            stop_after,
        } => return resume::resume(&run_dir, &set, allow_recipe_change, stop_after),
        Command::Completions { shell } => return cli::completions(shell),
        Command::Man => return cli::man(),
        Command::Doctor {
            backend,
            device,
            fusion,
            repeat,
            tolerance,
            json,
        } => doctor::doctor(&doctor::DoctorOptions {
            backend: backend.into(),
            device: device.unwrap_or_else(|| {
                kiln_recipe::BackendKind::from(backend)
                    .default_device()
                    .to_string()
            }),
            fusion,
            repeat,
            tolerance,
            json,
        })?,
        Command::Orchestrator { port } => orchestrator::orchestrator(port)?,
        Command::Eval {
            run_dir,
            checkpoint,
            tool_calls: Some(file),
            max_new_tokens,
            json,
        } => tooleval::run(tooleval::ToolEvalRequest {
            run_dir,
            checkpoint,
            file,
            max_new_tokens,
            json,
        })?,
        Command::Eval {
            run_dir,
            checkpoint,
            tool_calls: None,
            ..
        } => eval::eval(&run_dir, &checkpoint)?,
        Command::Export {
            run_dir,
            format: ExportFormat::Peft,
            out,
            checkpoint,
            ..
        } => export::peft(&run_dir, &out, &checkpoint)?,
        Command::Export {
            run_dir,
            format: ExportFormat::Hf,
            out,
            checkpoint,
            max_shard_size,
            merged,
        } => export::hf(&run_dir, &out, &checkpoint, &max_shard_size, merged)?,
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
        } => generate::run(generate::Request {
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
        })?,
        Command::Tokenizer {
            action:
                TokenizerCommand::Train {
                    recipe,
                    set,
                    vocab_size,
                    out,
                },
        } => tokenizer_cmd::train(&recipe, &set, vocab_size, &out)?,
        Command::Data {
            action:
                DataCommand::Inspect {
                    recipe,
                    set,
                    samples,
                },
        } => data_cmd::inspect(&kiln_recipe::load(&recipe, &set)?.recipe, samples)?,
        Command::Recipe {
            action: RecipeCommand::Schema { out },
        } => recipe_cmd::schema(out.as_deref())?,
        Command::Recipe {
            action: RecipeCommand::New { family, out, force },
        } => recipe_cmd::new(&family, &out, force)?,
        Command::Plot { runs, out } => plot::run(&runs, out)?,
        Command::Runs { dir, json } => runs::runs(&dir, json)?,
        Command::Bench {
            recipe,
            set,
            steps,
            warmup,
            phase,
            peak_gflops,
            json,
        } => bench::bench(
            &load::load(&recipe, &set, true)?,
            &bench::BenchOptions {
                steps,
                warmup,
                phase,
                peak_gflops,
                json,
            },
        )?,
        Command::Inspect {
            recipe,
            set,
            no_data,
        } => inspect::inspect(&load::load(&recipe, &set, !no_data)?, !no_data)?,
    }
    Ok(ExitCode::SUCCESS)
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
