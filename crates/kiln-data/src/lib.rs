//! kiln-data: from recipe sources to batches of token ids, with a data cursor that records
//! exactly where every source stands so a resumed run sees the same windows.
//!
//! ```text
//! sources --read--> documents --tokenize (+ end-of-text)--> ids
//!         --window (belt | pack | truncate)--> windows --mix (seeded)--> batches
//! ```
//!
//! This crate does not depend on Burn: batches are plain vectors.

pub mod bpe;
mod cache;
pub mod chat;
mod columnar;
mod source;
mod tokenizer;
mod window;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use kiln_recipe::{Recipe, Windowing};

pub use cache::{CacheMeta, DocView, TokenCache};
pub use kiln_recipe::rng::SplitMix64;
pub use source::{
    Document, ReadStats, SourceReader, read_documents, read_source, source_files, stream_texts,
};
pub use tokenizer::{BYTE_SPECIAL_TOKENS, ByteTokenizer, HfTokenizer, Tokenizer};
pub use window::{Doc, Docs, SourceCounts, SourceCursor, Window, WindowSpec, next_window};

/// Errors from reading and preparing data; each names the file, line or recipe key.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A source path in the recipe does not exist or cannot be read.
    #[error("{key}: `{path}`: {message}")]
    SourcePath {
        /// Dotted recipe key of the path.
        key: String,
        /// The path as given.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Reading a file failed.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is not valid UTF-8.
    #[error("{path}:{line}: not valid UTF-8")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// First line holding invalid bytes.
        line: usize,
    },
    /// A JSONL line is malformed.
    #[error("{path}:{line}: malformed JSON: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// A JSONL line lacks the text field.
    #[error("{path}:{line}: missing field `{field}`")]
    MissingField {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// The field the recipe asked for.
        field: String,
    },
    /// A source produced no documents.
    #[error("source `{name}` (`{path}`) holds no documents")]
    EmptySource {
        /// The source name.
        name: String,
        /// Its path.
        path: PathBuf,
    },
    /// The tokenizer's vocabulary does not fit the model.
    #[error("{key}: {model} is smaller than the tokenizer's {tokenizer} ids")]
    Vocab {
        /// Where the vocabulary size is set.
        key: String,
        /// The model's vocabulary size.
        model: usize,
        /// The tokenizer's vocabulary size.
        tokenizer: usize,
    },
    /// A Parquet or Arrow file is unreadable or lacks what the recipe asks for.
    #[error("`{path}`: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A row cannot be read (`on_bad_row = "error"`).
    #[error("{origin}: {message} (set `on_bad_row = \"skip\"` on the source to drop such rows)")]
    Row {
        /// File, row group or batch, and row.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// The token cache cannot be written or read.
    #[error("token cache `{path}`: {message}")]
    Cache {
        /// The cache directory or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A source's data differs from what the checkpoint's run read.
    #[error(
        "source `{name}`: its documents changed since the checkpoint was written (content {was}… is now {now}…), so a resumed run would not see the windows the original run would have; restore the data, or start a new run"
    )]
    DataChanged {
        /// The source.
        name: String,
        /// Content hash prefix recorded in the checkpoint.
        was: String,
        /// Content hash prefix now.
        now: String,
    },
    /// A data cursor does not match the recipe's sources.
    #[error("data cursor names source `{0}`, which the recipe does not have")]
    CursorMismatch(String),
    /// A tokenizer file is missing or unusable.
    #[error("`{path}`: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A chat row cannot be rendered.
    #[error("{path}:{line}: {message}")]
    Chat {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// A tokenized source (in the token cache), split into training and held-out documents.
#[derive(Debug, Clone)]
pub struct PreparedSource {
    /// Source name.
    pub name: String,
    /// Training documents (ids, each ending with end-of-text).
    pub train: DocView,
    /// Held-out documents for evaluation (the source's last ones).
    pub heldout: DocView,
}

impl PreparedSource {
    /// Total tokens in the training documents.
    pub fn train_tokens(&self) -> u64 {
        self.train.tokens()
    }

    /// The cache entry the source reads.
    pub fn cache(&self) -> &TokenCache {
        self.train.cache()
    }
}

/// The exact position of the data stream, saved in every checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataCursor {
    /// State of the mixing random generator.
    pub rng: u64,
    /// Per-source position (sources keep their position across phases).
    pub sources: BTreeMap<String, SourceCursor>,
    /// Per-source running counts.
    pub counts: BTreeMap<String, SourceCounts>,
    /// Per source, the SHA-256 of its tokenized documents, so a resume can tell that its
    /// data is still what the run read.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub content: BTreeMap<String, String>,
}

/// One micro-batch: `batch_size` windows of `window` positions, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Sequences in the batch.
    pub batch_size: usize,
    /// Positions per sequence.
    pub window: usize,
    /// Input ids, `[batch_size * window]`.
    pub inputs: Vec<u32>,
    /// Target ids, `[batch_size * window]`.
    pub targets: Vec<u32>,
    /// Loss mask, `[batch_size * window]`, 1.0 where the target is trained.
    pub mask: Vec<f32>,
}

impl Batch {
    /// The sequences `range` of the batch (clamped to it), as a batch of their own.
    pub fn rows(&self, range: std::ops::Range<usize>) -> Batch {
        let end = range.end.min(self.batch_size);
        let start = range.start.min(end);
        let span = start * self.window..end * self.window;
        Batch {
            batch_size: end - start,
            window: self.window,
            inputs: self.inputs[span.clone()].to_vec(),
            targets: self.targets[span.clone()].to_vec(),
            mask: self.mask[span].to_vec(),
        }
    }

    /// Positions that count in the loss.
    pub fn trained_tokens(&self) -> usize {
        self.mask.iter().filter(|m| **m > 0.0).count()
    }

    fn from_windows(windows: &[Window], window: usize) -> Self {
        let mut inputs = Vec::with_capacity(windows.len() * window);
        let mut targets = Vec::with_capacity(windows.len() * window);
        let mut mask = Vec::with_capacity(windows.len() * window);
        for w in windows {
            inputs.extend_from_slice(&w.tokens[..window]);
            targets.extend_from_slice(&w.tokens[1..]);
            mask.extend_from_slice(&w.mask);
        }
        Self {
            batch_size: windows.len(),
            window,
            inputs,
            targets,
            mask,
        }
    }
}

/// All sources of a recipe, tokenized, with the fixed evaluation batches.
pub struct DataPipeline {
    sources: Vec<PreparedSource>,
    tokenizer: Box<dyn Tokenizer>,
    recipe: Recipe,
}

impl std::fmt::Debug for DataPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPipeline")
            .field("sources", &self.sources.len())
            .finish_non_exhaustive()
    }
}

/// Where a recipe's token cache lives: `data.cache_dir`, or `<run.out_dir>/.cache`.
pub fn cache_root(recipe: &Recipe) -> PathBuf {
    match &recipe.data.cache_dir {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(&recipe.run.out_dir).join(".cache"),
    }
}

/// The tokenizer a recipe asks for.
pub fn tokenizer_for(recipe: &Recipe) -> Result<Box<dyn Tokenizer>, DataError> {
    let t = &recipe.tokenizer;
    Ok(match t.kind {
        kiln_recipe::TokenizerKind::Bytes => Box::new(ByteTokenizer),
        kiln_recipe::TokenizerKind::Hf => {
            let path = t.path.as_deref().unwrap_or("tokenizer.json");
            Box::new(HfTokenizer::from_path(
                std::path::Path::new(path),
                t.eos.as_deref(),
                t.pad.as_deref(),
            )?)
        }
    })
}

/// Tokenizes a document: ids plus end-of-text, and for chat documents which tokens are
/// trained on (a token is trained when it starts inside a trained span; the end-of-text
/// of a chat document is not).
pub fn tokenize_document(tokenizer: &dyn Tokenizer, doc: &Document) -> Doc {
    let (mut ids, offsets) = tokenizer.encode_with_offsets(&doc.text);
    ids.push(tokenizer.eos_id());
    let trained = doc.trained.as_ref().map(|spans| {
        let mut flags: Vec<bool> = offsets
            .iter()
            .map(|(start, _)| spans.iter().any(|r| r.contains(start)))
            .collect();
        flags.push(false);
        flags
    });
    Doc { ids, trained }
}

impl DataPipeline {
    /// Opens (building where needed) every source's token cache and splits off held-out
    /// documents.
    pub fn new(recipe: &Recipe, model_vocab: usize) -> Result<Self, DataError> {
        Self::with_log(recipe, model_vocab, &mut |_| {})
    }

    /// [`DataPipeline::new`], telling `log` about cache builds.
    pub fn with_log(
        recipe: &Recipe,
        model_vocab: usize,
        log: &mut dyn FnMut(String),
    ) -> Result<Self, DataError> {
        let tokenizer = tokenizer_for(recipe)?;
        if model_vocab < tokenizer.vocab_size() {
            return Err(DataError::Vocab {
                key: recipe.model_vocab_key(),
                model: model_vocab,
                tokenizer: tokenizer.vocab_size(),
            });
        }
        let root = cache_root(recipe);
        let mut sources = Vec::new();
        for (i, src) in recipe.data.sources.iter().enumerate() {
            let cache = TokenCache::open_or_build(src, i, tokenizer.as_ref(), &root, log)?;
            let n = cache.documents();
            // Hold out the last documents, but always leave one to train on.
            let held = if n < 2 || recipe.data.eval_holdout == 0.0 {
                0
            } else {
                ((n as f64 * recipe.data.eval_holdout).ceil() as usize).clamp(1, n - 1)
            };
            sources.push(PreparedSource {
                name: src.name.clone(),
                train: cache.view(0..n - held),
                heldout: cache.view(n - held..n),
            });
        }
        Ok(Self {
            sources,
            tokenizer,
            recipe: recipe.clone(),
        })
    }

    /// The tokenizer in use.
    pub fn tokenizer(&self) -> &dyn Tokenizer {
        self.tokenizer.as_ref()
    }

    /// The prepared sources, in recipe order.
    pub fn sources(&self) -> &[PreparedSource] {
        &self.sources
    }

    /// The cursor of a run that has not drawn any data yet.
    pub fn initial_cursor(&self, seed: u64) -> DataCursor {
        DataCursor {
            // Derive the mixing stream from the run seed, apart from model initialization.
            rng: SplitMix64::new(seed ^ 0x6b69_6c6e_6461_7461).state(),
            sources: self
                .sources
                .iter()
                .map(|s| (s.name.clone(), SourceCursor::default()))
                .collect(),
            counts: self
                .sources
                .iter()
                .map(|s| (s.name.clone(), SourceCounts::default()))
                .collect(),
            content: self
                .sources
                .iter()
                .map(|s| (s.name.clone(), s.cache().meta.content_sha256.clone()))
                .collect(),
        }
    }

    /// Checks that a cursor (e.g. from a checkpoint) fits this pipeline's sources.
    pub fn check_cursor(&self, cursor: &DataCursor) -> Result<(), DataError> {
        for name in cursor.sources.keys() {
            if !self.sources.iter().any(|s| &s.name == name) {
                return Err(DataError::CursorMismatch(name.clone()));
            }
        }
        for (name, was) in &cursor.content {
            if let Some(s) = self.sources.iter().find(|s| &s.name == name) {
                let now = &s.cache().meta.content_sha256;
                if now != was {
                    return Err(DataError::DataChanged {
                        name: name.clone(),
                        was: was[..16.min(was.len())].to_string(),
                        now: now[..16.min(now.len())].to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether source `i` has left its mixtures (`on_exhausted = "stop"` and its epochs
    /// are done).
    fn exhausted(&self, i: usize, cursor: &DataCursor) -> bool {
        let spec = &self.recipe.data.sources[i];
        spec.on_exhausted == kiln_recipe::Exhausted::Stop
            && cursor
                .sources
                .get(&self.sources[i].name)
                .is_some_and(|c| c.epoch >= spec.epochs.unwrap_or(1))
    }

    /// Draws the next micro-batch of a phase, advancing the cursor; `None` once every
    /// source of the phase has stopped (`on_exhausted = "stop"`). A batch drawn as the last
    /// source stops may be short.
    pub fn next_batch(&self, phase_index: usize, cursor: &mut DataCursor) -> Option<Batch> {
        let rows = self.recipe.phases[phase_index].batch_size;
        self.next_batch_of(phase_index, cursor, rows)
    }

    /// [`Self::next_batch`] with `rows` windows instead of the phase's `batch_size`: the
    /// global batch of a data-parallel step, which every process draws whole (so the
    /// cursor stays the same on all of them) and then slices with [`Batch::rows`].
    pub fn next_batch_of(
        &self,
        phase_index: usize,
        cursor: &mut DataCursor,
        rows: usize,
    ) -> Option<Batch> {
        let phase = &self.recipe.phases[phase_index];
        let spec = WindowSpec {
            window: phase.window,
            mode: phase.windowing,
            overlap: phase.overlap,
            pad: self.tokenizer.pad_id(),
        };
        let mut rng = SplitMix64::from_state(cursor.rng);
        let mut windows = Vec::with_capacity(rows);
        for _ in 0..rows {
            let mixture: Vec<(usize, f64)> = phase
                .sources
                .iter()
                .filter_map(|(name, w)| {
                    self.sources
                        .iter()
                        .position(|s| &s.name == name)
                        .map(|i| (i, *w))
                })
                .filter(|(i, _)| !self.exhausted(*i, cursor))
                .collect();
            let Some(&(last, _)) = mixture.last() else {
                break;
            };
            let total: f64 = mixture.iter().map(|(_, w)| w).sum();
            let source = if mixture.len() == 1 {
                last
            } else {
                let mut x = rng.next_f64() * total;
                let mut pick = last;
                for (i, w) in &mixture {
                    if x < *w {
                        pick = *i;
                        break;
                    }
                    x -= w;
                }
                pick
            };
            let src = &self.sources[source];
            let c = cursor.sources.entry(src.name.clone()).or_default();
            let n = cursor.counts.entry(src.name.clone()).or_default();
            windows.push(next_window(&src.train, c, n, spec));
        }
        cursor.rng = rng.state();
        (!windows.is_empty()).then(|| Batch::from_windows(&windows, phase.window))
    }

    /// The fixed evaluation batches: belt windows over held-out documents of every source,
    /// in order, until `train.eval_tokens` targets are covered.
    pub fn eval_batches(&self, batch_size: usize) -> Vec<Batch> {
        let window = self.recipe.eval_window();
        let budget = self.recipe.train.eval_tokens;
        let spec = WindowSpec {
            window,
            mode: Windowing::Belt,
            overlap: 0,
            pad: self.tokenizer.pad_id(),
        };
        let mut windows = Vec::new();
        let mut covered = 0u64;
        'outer: for src in &self.sources {
            if src.heldout.is_empty() {
                continue;
            }
            let mut c = SourceCursor::default();
            let mut n = SourceCounts::default();
            while c.epoch == 0 {
                let w = next_window(&src.heldout, &mut c, &mut n, spec);
                covered += w.mask.iter().filter(|m| **m > 0.0).count() as u64;
                windows.push(w);
                if covered >= budget {
                    break 'outer;
                }
            }
        }
        windows
            .chunks(batch_size.max(1))
            .map(|chunk| Batch::from_windows(chunk, window))
            .collect()
    }

    /// Resolves the recipe's phases given in `epochs` into `steps` (see
    /// [`Recipe::resolve_epochs`]) from one pass over each phase's sources; returns, per
    /// resolved phase, its index, windows and steps. Reads the data only when a phase needs it.
    pub fn resolve_epochs(
        recipe: &mut Recipe,
        model_vocab: usize,
    ) -> Result<Vec<(usize, u64, u64)>, DataError> {
        if recipe.phases.iter().all(|p| p.epochs.is_none()) {
            return Ok(Vec::new());
        }
        let data = Self::new(recipe, model_vocab)?;
        Ok(recipe.resolve_epochs(|i| {
            data.windowing_report(i)
                .iter()
                .map(|(_, c)| c.windows)
                .sum()
        }))
    }

    /// What one pass over each source yields under a phase's windowing: windows, trained,
    /// dropped and padded tokens.
    pub fn windowing_report(&self, phase_index: usize) -> Vec<(String, SourceCounts)> {
        let phase = &self.recipe.phases[phase_index];
        let spec = WindowSpec {
            window: phase.window,
            mode: phase.windowing,
            overlap: phase.overlap,
            pad: self.tokenizer.pad_id(),
        };
        self.sources
            .iter()
            .filter(|s| phase.sources.contains_key(&s.name))
            .map(|s| {
                let mut c = SourceCursor::default();
                let mut n = SourceCounts::default();
                while c.epoch == 0 {
                    next_window(&s.train, &mut c, &mut n, spec);
                }
                (s.name.clone(), n)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn recipe(dir: &Path) -> Recipe {
        std::fs::write(
            dir.join("a.txt"),
            "alpha beta gamma delta epsilon zeta eta theta",
        )
        .unwrap();
        std::fs::write(
            dir.join("b.jsonl"),
            "{\"text\": \"one two three four five\"}\n{\"text\": \"six seven\"}\n",
        )
        .unwrap();
        let text = format!(
            r#"
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
[data]
eval_holdout = 0.0
cache_dir = "{cache}"
[[data.sources]]
name = "a"
format = "text"
path = "{a}"
[[data.sources]]
name = "b"
format = "jsonl"
path = "{b}"
[[phases]]
sources = {{ a = 1.0, b = 2.0 }}
batch_size = 3
window = 8
windowing = "pack"
steps = 10
"#,
            cache = dir.join("cache").display(),
            a = dir.join("a.txt").display(),
            b = dir.join("b.jsonl").display()
        );
        kiln_recipe::from_str(&text, Path::new("t.toml"), &[])
            .unwrap()
            .recipe
    }

    #[test]
    fn a_saved_cursor_replays_the_same_batches() {
        let dir = tempfile::tempdir().unwrap();
        let r = recipe(dir.path());
        let data = DataPipeline::new(&r, 260).unwrap();
        let mut cursor = data.initial_cursor(7);
        for _ in 0..3 {
            data.next_batch(0, &mut cursor).unwrap();
        }
        let saved: DataCursor =
            serde_json::from_str(&serde_json::to_string(&cursor).unwrap()).unwrap();
        let straight: Vec<Batch> = (0..5)
            .map(|_| data.next_batch(0, &mut cursor).unwrap())
            .collect();
        let mut resumed_cursor = saved;
        let resumed: Vec<Batch> = (0..5)
            .map(|_| data.next_batch(0, &mut resumed_cursor).unwrap())
            .collect();
        assert_eq!(straight, resumed);
        assert_eq!(cursor, resumed_cursor);
        // Both sources were drawn from, about in proportion to their weights.
        let a = cursor.counts["a"].windows;
        let b = cursor.counts["b"].windows;
        assert_eq!(a + b, 24);
        assert!(b > a, "b has twice a's weight: a {a}, b {b}");
    }

    #[test]
    fn a_stopping_source_leaves_the_mixture_after_its_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let r = recipe(dir.path());
        let sets: Vec<String> = [
            "data.sources[0].on_exhausted=\"stop\"",
            "data.sources[1].on_exhausted=\"stop\"",
            "data.sources[1].epochs=2",
        ]
        .map(String::from)
        .to_vec();
        let r = kiln_recipe::from_str(&r.to_toml(), Path::new("t.toml"), &sets)
            .unwrap()
            .recipe;
        let data = DataPipeline::new(&r, 260).unwrap();
        let mut cursor = data.initial_cursor(3);
        let mut drawn = 0;
        while let Some(batch) = data.next_batch(0, &mut cursor) {
            drawn += batch.batch_size;
            assert!(drawn < 1000, "stopping sources never stop");
        }
        assert_eq!(cursor.sources["a"].epoch, 1);
        assert_eq!(cursor.sources["b"].epoch, 2);
        // Every window of those passes was drawn, none more.
        assert_eq!(
            drawn as u64,
            cursor.counts["a"].windows + cursor.counts["b"].windows
        );
        assert!(data.next_batch(0, &mut cursor).is_none());
    }

    #[test]
    fn different_seeds_mix_differently() {
        let dir = tempfile::tempdir().unwrap();
        let r = recipe(dir.path());
        let data = DataPipeline::new(&r, 260).unwrap();
        let mut c1 = data.initial_cursor(1);
        let mut c2 = data.initial_cursor(2);
        let b1: Vec<Batch> = (0..4)
            .map(|_| data.next_batch(0, &mut c1).unwrap())
            .collect();
        let b2: Vec<Batch> = (0..4)
            .map(|_| data.next_batch(0, &mut c2).unwrap())
            .collect();
        assert_ne!(b1, b2);
    }

    #[test]
    fn model_vocab_must_cover_the_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let r = recipe(dir.path());
        let err = DataPipeline::new(&r, 100).unwrap_err().to_string();
        assert_eq!(
            err,
            "model.qwen2.vocab_size: 100 is smaller than the tokenizer's 260 ids"
        );
    }
}
