//! `kiln generate`: decode from a run's checkpoint or a Hugging Face model directory.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use kiln_models::KilnAutodiffBackend;
use serde_json::json;

use kiln_data::chat::{Message, parse_tool_calls, render};
use kiln_data::{ByteTokenizer, HfTokenizer, Tokenizer, tokenizer_for};
use kiln_models::Model;
use kiln_models::generate::{GenerateOptions, generate};
use kiln_recipe::{BackendKind, Recipe};
use kiln_train::RunDir;
use kiln_train::checkpoint::find_checkpoint;

use crate::backend::{Job, dispatch_on};

/// What `kiln generate` was asked to do.
pub struct Request {
    /// A run directory or a Hugging Face model directory.
    pub target: PathBuf,
    /// For a run directory: which checkpoint.
    pub checkpoint: String,
    /// The prompt text (or the user message with `chat`).
    pub prompt: String,
    /// Render the prompt as a user turn with the chat template.
    pub chat: bool,
    /// System message for `chat`.
    pub system: Option<String>,
    /// JSON file with an array of tool definitions (implies `chat`).
    pub tools: Option<PathBuf>,
    /// A tokenizer.json to use instead of the target's.
    pub tokenizer: Option<PathBuf>,
    /// Backend override.
    pub backend: Option<BackendKind>,
    /// Decoding settings.
    pub options: GenerateOptions,
}

enum Source {
    Run { recipe: Box<Recipe>, dir: PathBuf },
    Hf(PathBuf),
}

fn load_tokenizer(req: &Request, source: &Source) -> Result<Box<dyn Tokenizer>> {
    if let Some(path) = &req.tokenizer {
        return Ok(Box::new(HfTokenizer::from_path(path, None, None)?));
    }
    match source {
        Source::Run { recipe, .. } => Ok(tokenizer_for(recipe)?),
        Source::Hf(dir) if dir.join("tokenizer.json").is_file() => {
            Ok(Box::new(HfTokenizer::from_path(dir, None, None)?))
        }
        Source::Hf(_) => Ok(Box::new(ByteTokenizer)),
    }
}

/// The tokens that end a reply: ChatML's end of turn, end of text, and the tokenizer's EOS.
pub fn stop_ids(tokenizer: &dyn Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = ["<|im_end|>", "<|endoftext|>"]
        .iter()
        .filter_map(|t| tokenizer.token_id(t))
        .chain([tokenizer.eos_id()])
        .collect();
    ids.dedup();
    ids
}

/// Runs `kiln generate`: prints the continuation (or, with tools, a JSON object with the
/// parsed tool calls) on stdout and timings on stderr.
pub fn run(req: Request) -> Result<()> {
    let source = if req.target.join(kiln_train::run::RESOLVED_RECIPE).is_file() {
        let run = RunDir::open(&req.target)?;
        Source::Run {
            recipe: Box::new(run.load_recipe(&[])?.recipe),
            dir: req.target.clone(),
        }
    } else if req.target.join("config.json").is_file() {
        Source::Hf(req.target.clone())
    } else {
        bail!(
            "`{}` is neither a run directory (recipe.resolved.toml) nor a Hugging Face model directory (config.json)",
            req.target.display()
        );
    };
    let tokenizer = load_tokenizer(&req, &source)?;
    let chat = req.chat || req.tools.is_some();
    let tools: Vec<serde_json::Value> = match &req.tools {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading `{}`", path.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("`{}` is not valid JSON", path.display()))?;
            match value {
                serde_json::Value::Array(items) => items,
                _ => bail!(
                    "`{}`: expected a JSON array of tool definitions",
                    path.display()
                ),
            }
        }
        None => Vec::new(),
    };
    let text = if chat {
        let mut messages = Vec::new();
        if let Some(system) = &req.system {
            messages.push(Message {
                role: "system".to_string(),
                content: Some(system.clone()),
                tool_calls: None,
            });
        }
        messages.push(Message {
            role: "user".to_string(),
            content: Some(req.prompt.clone()),
            tool_calls: None,
        });
        render(&messages, &tools, true)?.text
    } else {
        req.prompt.clone()
    };
    let prompt = tokenizer.encode(&text);
    let mut options = req.options.clone();
    options.stop_ids = stop_ids(tokenizer.as_ref());

    let (backend, device, fusion) = match &source {
        // The run's own placement, unless `--backend` names another backend.
        Source::Run { recipe, .. } if req.backend.is_none_or(|b| b == recipe.run.backend) => (
            recipe.run.backend,
            recipe.run.device.clone(),
            recipe.run.fusion,
        ),
        _ => {
            let backend = req.backend.unwrap_or(BackendKind::Flex);
            (backend, backend.default_device().to_string(), true)
        }
    };
    let generation = dispatch_on(
        backend,
        &device,
        fusion,
        GenerateJob {
            source: &source,
            checkpoint: &req.checkpoint,
            prompt: &prompt,
            options: &options,
        },
    )?;
    let mut new = generation.tokens.clone();
    if generation.stopped_on.is_some() {
        new.pop();
    }
    let reply = tokenizer.decode(&new);
    eprintln!(
        "{} prompt tokens at {:.0} tokens/s; {} new tokens at {:.1} tokens/s{}",
        prompt.len(),
        generation.prompt_tokens_per_s(),
        generation.tokens.len(),
        generation.decode_tokens_per_s(),
        match generation.stopped_on {
            Some(id) => format!(" (stopped at `{}`)", tokenizer.decode(&[id])),
            None => " (length limit)".to_string(),
        }
    );
    if req.tools.is_some() {
        let mut calls = Vec::new();
        let mut errors = Vec::new();
        for parsed in parse_tool_calls(&reply) {
            match parsed {
                Ok(c) => calls.push(json!({ "name": c.name, "arguments": c.arguments })),
                Err(e) => {
                    eprintln!("warning: {e}");
                    errors.push(serde_json::Value::String(e));
                }
            }
        }
        let out = json!({ "reply": reply, "tool_calls": calls, "tool_call_errors": errors });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{reply}");
    }
    Ok(())
}

struct GenerateJob<'a> {
    source: &'a Source,
    checkpoint: &'a str,
    prompt: &'a [u32],
    options: &'a GenerateOptions,
}

impl Job for GenerateJob<'_> {
    type Output = kiln_models::generate::Generation;

    fn run<B: KilnAutodiffBackend>(self, device: B::Device) -> Result<Self::Output> {
        // Decoding needs no gradients: build the model on the inner backend.
        let model: Model<B::InnerBackend> = match self.source {
            Source::Run { recipe, dir } => {
                let ckpt = find_checkpoint(dir, self.checkpoint)?;
                Model::restore(recipe, ckpt.model, &device)?
            }
            Source::Hf(dir) => Model::from_hf_dir(dir, &device)?,
        };
        Ok(generate(&model, self.prompt, self.options)?)
    }
}
