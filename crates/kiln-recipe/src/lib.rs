//! kiln-recipe: the TOML recipe schema, with parsing, `--set` overrides, validation,
//! the phase plan and the recipe hash.
//!
//! A recipe goes through three stages (torchtune's parse, validate, resolve):
//! 1. [`load`] reads the file into a TOML table and applies `--set key=value` overrides to
//!    that table, so overridden values get exactly the same checks as written ones;
//! 2. typed parsing into [`Recipe`] rejects unknown keys and wrong types, naming the file and
//!    the dotted key;
//! 3. [`Recipe::validate`] collects *all* cross-field errors at once.
//!
//! This crate never depends on Burn.

mod overrides;
pub mod rng;
mod schema;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use overrides::{apply_override, diff_keys, resume_changes};
pub use schema::*;

/// The JSON Schema (draft 7, which TOML language servers such as taplo read) of a recipe
/// file, derived from the serde structs: keys, types, defaults, allowed values and, from
/// the doc comments, descriptions. `schemas/recipe.schema.json` is this text; a test fails
/// when the two differ.
pub fn json_schema() -> String {
    let generator = schemars::generate::SchemaSettings::draft07().into_generator();
    let mut schema = generator.into_root_schema_for::<Recipe>();
    schema.insert(
        "title".to_string(),
        serde_json::Value::String("kiln recipe".to_string()),
    );
    let mut text = serde_json::to_string_pretty(&schema).expect("the schema serializes");
    text.push('\n');
    text
}

/// Errors from reading, parsing or validating a recipe.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The file could not be read.
    #[error("cannot read recipe `{path}`: {source}")]
    Io {
        /// The recipe file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path}: invalid TOML: {message}")]
    Syntax {
        /// The recipe file.
        path: PathBuf,
        /// What the TOML parser said, with line and column.
        message: String,
    },
    /// A `--set` override could not be applied.
    #[error("--set `{spec}`: {message}")]
    Override {
        /// The override as given.
        spec: String,
        /// Why it failed.
        message: String,
    },
    /// The TOML does not match the schema (unknown key, wrong type, missing key).
    #[error("{path}: {key}: {message}")]
    Schema {
        /// The recipe file.
        path: PathBuf,
        /// Dotted key, e.g. `phases[1].window`.
        key: String,
        /// What was wrong and what was expected.
        message: String,
    },
    /// Cross-field validation failed; every problem is listed.
    #[error("{}", ValidationList(.0))]
    Invalid(Vec<ValidationError>),
}

/// One validation problem, tied to a file and a dotted key.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationError {
    /// The recipe file.
    pub path: PathBuf,
    /// Dotted key, e.g. `phases[1].window`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.path.display(), self.key, self.message)
    }
}

struct ValidationList<'a>(&'a [ValidationError]);

impl fmt::Display for ValidationList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "recipe has {n} error{}:", if n == 1 { "" } else { "s" })?;
        for e in self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// A recipe read from a file, with the TOML table it came from.
#[derive(Debug, Clone)]
pub struct LoadedRecipe {
    /// Where it was read from (used in every error message).
    pub path: PathBuf,
    /// The typed recipe.
    pub recipe: Recipe,
    /// The TOML table after overrides, before typed parsing.
    pub table: toml::Table,
    /// What validation questions without refusing (e.g. tokens per step that change
    /// between phases); the CLI prints them.
    pub warnings: Vec<ValidationError>,
}

/// Reads a recipe file, applies `key=value` overrides, parses and validates it.
pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedRecipe, RecipeError> {
    let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    from_str(&text, path, overrides)
}

/// Parses recipe text (as if read from `path`), applies overrides and validates.
pub fn from_str(
    text: &str,
    path: &Path,
    overrides: &[String],
) -> Result<LoadedRecipe, RecipeError> {
    let mut table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| RecipeError::Syntax {
                path: path.to_path_buf(),
                message: e.to_string().trim().to_string(),
            })?;
    for spec in overrides {
        apply_override(&mut table, spec)?;
    }
    let recipe = from_table(&table, path)?;
    recipe.validate(path).map_err(RecipeError::Invalid)?;
    let warnings = recipe.warnings(path);
    Ok(LoadedRecipe {
        path: path.to_path_buf(),
        recipe,
        table,
        warnings,
    })
}

/// Typed parsing of a TOML table, with the failing key's dotted path in the error.
pub fn from_table(table: &toml::Table, path: &Path) -> Result<Recipe, RecipeError> {
    let value = toml::Value::Table(table.clone());
    serde_path_to_error::deserialize::<_, Recipe>(value).map_err(|err| {
        let key = err.path().to_string();
        let key = if key == "." {
            "(top level)".to_string()
        } else {
            key
        };
        // The TOML deserializer appends "in `table`"; the dotted key already says where.
        let message = err.inner().to_string();
        let message = message
            .lines()
            .filter(|l| !l.trim_start().starts_with("in `"))
            .collect::<Vec<_>>()
            .join(" ");
        RecipeError::Schema {
            path: path.to_path_buf(),
            key,
            message: message.trim().to_string(),
        }
    })
}

impl Recipe {
    /// The recipe as canonical TOML (every default written out).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a recipe always serializes to TOML")
    }

    /// Processes that train together (`[distributed]`'s `nodes x devices_per_node`; 1
    /// without it): each step draws `world x batch_size` rows per micro-batch.
    pub fn world(&self) -> u32 {
        self.distributed
            .as_ref()
            .map_or(1, |d| d.nodes.max(1) * d.devices_per_node.max(1))
    }

    /// SHA-256 of the canonical TOML, hex-encoded: identifies the recipe in checkpoints.
    pub fn hash(&self) -> String {
        hex(&Sha256::digest(self.to_toml().as_bytes()))
    }

    /// Resolves phases given in `epochs` into `steps`, given the windows one pass over each
    /// phase's sources yields (`windows_per_pass(phase_index)`); returns, per resolved
    /// phase, its index, the windows and the steps.
    pub fn resolve_epochs(
        &mut self,
        mut windows_per_pass: impl FnMut(usize) -> u64,
    ) -> Vec<(usize, u64, u64)> {
        let accum = self.train.grad_accum.max(1) as u64 * u64::from(self.world());
        let mut resolved = Vec::new();
        for (i, p) in self.phases.iter_mut().enumerate() {
            let Some(epochs) = p.epochs.take() else {
                continue;
            };
            let windows = (epochs * windows_per_pass(i) as f64).ceil() as u64;
            let steps = windows.div_ceil(p.batch_size.max(1) as u64 * accum).max(1);
            p.steps = Some(steps);
            resolved.push((i, windows, steps));
        }
        resolved
    }

    /// Optimizer steps of each phase, resolving `tokens` lengths into whole steps (a phase
    /// still given in `epochs` counts 0 until [`Recipe::resolve_epochs`]).
    pub fn phase_steps(&self) -> Vec<u64> {
        self.phases
            .iter()
            .map(|p| match (p.steps, p.tokens) {
                (Some(s), _) => s,
                (None, Some(t)) => t.div_ceil(self.tokens_per_step(p).max(1)),
                (None, None) => 0,
            })
            .collect()
    }

    /// Token positions (inputs) per optimizer step in a phase.
    pub fn tokens_per_step(&self, phase: &Phase) -> u64 {
        (phase.batch_size * phase.window * self.train.grad_accum) as u64
    }

    /// Total optimizer steps over all phases.
    pub fn total_steps(&self) -> u64 {
        self.phase_steps().iter().sum()
    }

    /// The wall-time budget, if any.
    pub fn max_wall_time(&self) -> Option<Duration> {
        match self.run.max_wall_time.as_str() {
            "none" => None,
            s => parse_duration(s).ok(),
        }
    }

    /// The evaluation window length.
    pub fn eval_window(&self) -> usize {
        self.train
            .eval_window
            .or_else(|| self.phases.first().map(|p| p.window))
            .unwrap_or(1)
    }

    /// Where the model's vocabulary size is set, for error messages.
    pub fn model_vocab_key(&self) -> String {
        match self.model.family {
            ModelFamily::Qwen2 => match self.model.qwen2.as_ref().and_then(|q| q.hf_dir.as_deref())
            {
                Some(dir) => format!("model.qwen2.hf_dir: `{dir}/config.json` vocab_size"),
                None => "model.qwen2.vocab_size".to_string(),
            },
            ModelFamily::Moa => "model.moa.vocab_size".to_string(),
            ModelFamily::Convgpt => "model.convgpt.vocab_size".to_string(),
        }
    }

    /// The longest sequence the configured model accepts, when the recipe itself says
    /// (a model read from `hf_dir` is checked when it is loaded).
    pub fn model_max_position(&self) -> Option<usize> {
        match self.model.family {
            ModelFamily::Qwen2 => self.model.qwen2.as_ref().and_then(|q| {
                q.hf_dir
                    .is_none()
                    .then(|| q.max_position_embeddings.unwrap_or(2048))
            }),
            ModelFamily::Moa => self.model.moa.as_ref().map(|m| m.max_position_embeddings),
            ModelFamily::Convgpt => self
                .model
                .convgpt
                .as_ref()
                .map(|c| 4usize.saturating_pow(c.grid_order)),
        }
    }
}

/// Lower-case hex of bytes (digests in checkpoints, cache keys and tokenizer identities).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The column names a source `template` refers to, in order of first use; `{{` and `}}`
/// are literal braces.
pub fn template_fields(template: &str) -> Result<Vec<String>, String> {
    let mut fields: Vec<String> = Vec::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
            }
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    name.push(c);
                }
                if !closed || name.is_empty() || name.contains('{') {
                    return Err(format!("`{{{name}` is not a column placeholder `{{name}}`"));
                }
                if !fields.contains(&name) {
                    fields.push(name);
                }
            }
            '}' => return Err("unmatched `}` (write `}}` for a literal brace)".to_string()),
            _ => {}
        }
    }
    if fields.is_empty() {
        return Err("names no column: write columns as `{name}`".to_string());
    }
    Ok(fields)
}

/// Renders a template (checked by [`template_fields`]) with the `(column, value)` pairs;
/// a column missing from them renders empty.
pub fn render_template(template: &str, values: &[(&str, &str)]) -> String {
    let value = |name: &str| {
        values
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, v)| *v)
    };
    let mut out = String::with_capacity(template.len() * 4);
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                out.push_str(value(&name));
            }
            c => out.push(c),
        }
    }
    out
}

/// Parses `"90s"`, `"45m"`, `"2h"`, `"1h30m"` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".to_string());
    }
    if let Ok(secs) = text.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("`{text}` is not a non-negative duration"));
    }
    let mut total = 0.0f64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1.0,
            'm' => 60.0,
            'h' => 3600.0,
            'd' => 86400.0,
            _ => return Err(format!("`{text}`: unknown unit `{c}` (use s, m, h or d)")),
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{text}`: expected a number before `{c}`"))?;
        total += value * unit;
        number.clear();
    }
    if !number.is_empty() {
        return Err(format!(
            "`{text}`: number `{number}` has no unit (use s, m, h or d)"
        ));
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[run]
name = "t"
[model]
family = "qwen2"
[model.qwen2]
vocab_size = 260
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 1
max_position_embeddings = 64
[data]
[[data.sources]]
name = "a"
format = "text"
path = "x"
[[phases]]
sources = { a = 1.0 }
batch_size = 2
window = 16
tokens = 100
"#;

    fn parse(overrides: &[&str]) -> Result<LoadedRecipe, RecipeError> {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        from_str(MINIMAL, Path::new("r.toml"), &o)
    }

    #[test]
    fn defaults_fill_and_tokens_round_up_to_steps() {
        let r = parse(&[]).unwrap().recipe;
        assert_eq!(r.run.backend, BackendKind::Flex);
        assert_eq!(r.optim.betas, [0.9, 0.999]);
        // 100 tokens at 2 x 16 per step: 4 steps.
        assert_eq!(r.phase_steps(), vec![4]);
        assert_eq!(r.eval_window(), 16);
    }

    #[test]
    fn wgpu_devices_are_named_and_fusion_is_a_gpu_switch() {
        use WgpuDeviceSpec as D;
        for (text, spec) in [
            ("default", D::Default),
            ("discrete:0", D::Discrete(0)),
            ("integrated:2", D::Integrated(2)),
            ("virtual:1", D::Virtual(1)),
            ("software", D::Software),
        ] {
            assert_eq!(D::parse(text), Some(spec), "{text}");
        }
        for text in [
            "cpu",
            "cuda:0",
            "discrete",
            "discrete:",
            "discrete:x",
            "integrated:-1",
        ] {
            assert_eq!(D::parse(text), None, "{text}");
        }
        let loaded = parse(&[
            "run.backend=wgpu",
            "run.device=discrete:1",
            "run.fusion=false",
        ])
        .expect("a wgpu recipe");
        assert!(!loaded.recipe.run.fusion);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        // The CPU's device is not a wgpu device: the error names the key and the choices.
        let err = parse(&["run.backend=wgpu"]).unwrap_err().to_string();
        assert!(
            err.contains("run.device") && err.contains("`cpu` is not a wgpu device (use `default`"),
            "{err}"
        );
        // Fusion on by default; turning it off on a CPU backend is allowed but warned.
        assert!(parse(&[]).unwrap().recipe.run.fusion);
        let loaded = parse(&["run.fusion=false"]).unwrap();
        assert!(
            loaded
                .warnings
                .iter()
                .any(|w| w.key == "run.fusion" && w.message.contains("only `cuda` and `wgpu`")),
            "{:?}",
            loaded.warnings
        );
    }

    #[test]
    fn overrides_reach_nested_keys_and_array_entries() {
        let r = parse(&[
            "phases[0].window=32",
            "optim.betas=[0.8, 0.9]",
            "run.backend=ndarray",
            "phases.0.batch_size=4",
        ])
        .unwrap()
        .recipe;
        assert_eq!(r.phases[0].window, 32);
        assert_eq!(r.phases[0].batch_size, 4);
        assert_eq!(r.optim.betas, [0.8, 0.9]);
        assert_eq!(r.run.backend, BackendKind::Ndarray);
        let err = parse(&["optim.lrr=1"]).unwrap_err().to_string();
        assert!(
            err.starts_with("r.toml: optim.lrr: unknown field `lrr`, expected one of `kind`, `lr`"),
            "{err}"
        );
    }

    #[test]
    fn a_phase_has_one_length_and_epochs_resolve_from_windows() {
        // Setting one length replaces the recipe's.
        let r = parse(&["phases[0].steps=7"]).unwrap().recipe;
        assert_eq!((r.phases[0].steps, r.phases[0].tokens), (Some(7), None));
        let mut r = parse(&["phases[0].epochs=2.5"]).unwrap().recipe;
        assert_eq!(
            r.phase_steps(),
            vec![0],
            "unresolved until the data is read"
        );
        // 2.5 passes of 9 windows = 23 windows (rounded up) = 12 steps of 2.
        assert_eq!(r.resolve_epochs(|_| 9), vec![(0, 23, 12)]);
        assert_eq!((r.phases[0].steps, r.phases[0].epochs), (Some(12), None));
        let err = parse(&["phases[0].epochs=-1"]).unwrap_err().to_string();
        assert!(
            err.contains("phases[0].epochs: -1 must be a positive"),
            "{err}"
        );
        let two = MINIMAL.replace("tokens = 100", "tokens = 100\nepochs = 1");
        let err = from_str(&two, Path::new("r.toml"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("give one of `steps`, `tokens` and `epochs`"),
            "{err}"
        );
    }

    #[test]
    fn diff_lists_changed_keys() {
        let a = parse(&[]).unwrap().recipe;
        let b = parse(&["optim.lr=0.5", "phases[0].window=8"])
            .unwrap()
            .recipe;
        let d = diff_keys(&a, &b);
        assert_eq!(
            d,
            vec!["optim.lr: 0.001 -> 0.5", "phases[0].window: 16 -> 8"]
        );
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash(), parse(&[]).unwrap().recipe.hash());
    }

    #[test]
    fn resume_changes_leave_out_per_process_keys() {
        // Another rank, host and ports make the same run; another learning rate does not.
        let leader = ["distributed.nodes=2", "distributed.rank=0"];
        let saved = parse(&leader).unwrap().recipe;
        let peer = parse(&[
            "distributed.nodes=2",
            "distributed.rank=1",
            "distributed.host=\"10.0.0.2\"",
            "distributed.data_port=7400",
            "distributed.orchestrator=\"10.0.0.1:7300\"",
        ])
        .unwrap()
        .recipe;
        assert_eq!(diff_keys(&saved, &peer).len(), 4);
        assert!(resume_changes(&saved, &peer).is_empty());
        let changed = parse(&["distributed.nodes=2", "distributed.rank=1", "optim.lr=0.5"])
            .unwrap()
            .recipe;
        assert_eq!(
            resume_changes(&saved, &changed),
            vec!["optim.lr: 0.001 -> 0.5"]
        );
    }

    #[test]
    fn canonical_toml_round_trips() {
        let r = parse(&[]).unwrap().recipe;
        let again = from_str(&r.to_toml(), Path::new("again.toml"), &[])
            .unwrap()
            .recipe;
        assert_eq!(r, again);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("2.5m").unwrap().as_secs(), 150);
        assert!(parse_duration("10 minutes").is_err());
        assert!(parse_duration("5").is_ok());
        assert!(parse_duration("5x").is_err());
    }
}
