//! The token cache: each source tokenized once, on all cores, into flat files that later
//! runs, epochs and resumes memory-map instead of reading and tokenizing again.
//!
//! ```text
//! <cache_dir>/<source>-<key>/
//!   tokens.bin    u32 token ids, little-endian, every document's ids back to back
//!   offsets.bin   u64 little-endian: documents + 1 token offsets (document i is
//!                 tokens[offsets[i]..offsets[i + 1]])
//!   trained.bin   u8 per token, 1 where the token is trained as a target (chat sources)
//!   meta.json     counts (rows, skipped, filtered, tokens), chunk origins, the key inputs
//! ```
//!
//! The key is a SHA-256 of the source's settings (everything but its name), each file's
//! path, size and modification time, and the tokenizer's identity: changing any of them
//! builds a new cache entry. An entry is written into a temporary directory and renamed
//! into place, so a crash mid-build leaves no half entry. Memory holds one chunk of rows
//! (a file, a row group) while building, and nothing of the corpus while training: the
//! windows are cut from the mapped files.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use kiln_recipe::Source;

use crate::source::{Document, ReadStats, read_source, source_files};
use crate::window::{Doc, Docs};
use crate::{DataError, Tokenizer, tokenize_document};

/// Version of the cache layout; part of the key.
const VERSION: u32 = 2;

/// What a cache entry holds, written as `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheMeta {
    /// Layout version.
    pub version: u32,
    /// The source's name when the entry was built.
    pub source: String,
    /// The cache key.
    pub key: String,
    /// Documents kept.
    pub documents: u64,
    /// Tokens of the kept documents (end-of-text included).
    pub tokens: u64,
    /// Tokens trained on as targets in a full pass.
    pub trained_tokens: u64,
    /// What reading met (rows, skipped rows, empty shards).
    pub read: ReadStats,
    /// Documents dropped by `min_tokens`.
    pub filtered_short: u64,
    /// Documents dropped by `max_tokens`.
    pub filtered_long: u64,
    /// Each chunk's first document and where it came from, for messages and samples.
    pub chunks: Vec<(u64, String)>,
    /// Seconds the build took.
    pub build_s: f64,
    /// SHA-256 of the documents' token ids and trained flags: what a resumed run checks to
    /// know it reads the same data (the key also changes when a file is only touched).
    pub content_sha256: String,
}

/// One source's tokenized documents, memory-mapped.
pub struct TokenCache {
    /// The entry's directory.
    pub dir: PathBuf,
    /// Its counts.
    pub meta: CacheMeta,
    tokens: Mapped,
    offsets: Mapped,
    trained: Option<Mapped>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("dir", &self.dir)
            .field("documents", &self.meta.documents)
            .field("tokens", &self.meta.tokens)
            .finish()
    }
}

/// A read-only mapped file (or nothing, for an empty one).
enum Mapped {
    Map(memmap2::Mmap),
    Empty,
}

impl Mapped {
    fn open(path: &Path) -> Result<Self, DataError> {
        let file = File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| DataError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if len == 0 {
            return Ok(Self::Empty);
        }
        // SAFETY: cache entries are written once into a temporary directory and renamed into
        // place, never modified afterwards; kiln only reads the mapping. A user truncating
        // the file while a run maps it is the one way to break this, as with any mmap.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::Map(map))
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Self::Map(m) => m,
            Self::Empty => &[],
        }
    }
}

impl TokenCache {
    /// Opens the source's cache entry under `root`, building it first if there is none.
    /// `log` hears about a build (what, and how long it took).
    pub fn open_or_build(
        source: &Source,
        index: usize,
        tokenizer: &dyn Tokenizer,
        root: &Path,
        log: &mut dyn FnMut(String),
    ) -> Result<Arc<Self>, DataError> {
        let key = cache_key(source, index, tokenizer)?;
        let dir = root.join(format!("{}-{}", sanitize(&source.name), &key[..16]));
        if !dir.join("meta.json").is_file() {
            build(source, index, tokenizer, root, &dir, &key, log)?;
        }
        Self::open(&dir).map(Arc::new)
    }

    /// Opens a built entry.
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let bad = |message: String| DataError::Cache {
            path: dir.to_path_buf(),
            message,
        };
        let text =
            std::fs::read_to_string(dir.join("meta.json")).map_err(|source| DataError::Io {
                path: dir.join("meta.json"),
                source,
            })?;
        let meta: CacheMeta = serde_json::from_str(&text).map_err(|e| {
            bad(format!(
                "meta.json: {e} (delete the directory to rebuild it)"
            ))
        })?;
        let tokens = Mapped::open(&dir.join("tokens.bin"))?;
        let offsets = Mapped::open(&dir.join("offsets.bin"))?;
        let trained_path = dir.join("trained.bin");
        let trained = if trained_path.is_file() {
            Some(Mapped::open(&trained_path)?)
        } else {
            None
        };
        let cache = Self {
            dir: dir.to_path_buf(),
            meta,
            tokens,
            offsets,
            trained,
        };
        let tokens_ok = cache.tokens.bytes().len() as u64 == 4 * cache.meta.tokens;
        let offsets_ok = cache.offsets.bytes().len() as u64 == 8 * (cache.meta.documents + 1);
        let trained_ok = cache
            .trained
            .as_ref()
            .is_none_or(|t| t.bytes().len() as u64 == cache.meta.tokens);
        if !(tokens_ok && offsets_ok && trained_ok) {
            return Err(bad(
                "file sizes do not match meta.json (delete the directory to rebuild it)"
                    .to_string(),
            ));
        }
        Ok(cache)
    }

    /// Number of documents.
    pub fn documents(&self) -> usize {
        self.meta.documents as usize
    }

    /// Token offset of document `i`'s start (`i` up to `documents()`).
    fn offset(&self, i: usize) -> usize {
        let b = &self.offsets.bytes()[8 * i..8 * i + 8];
        u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize
    }

    fn token(&self, t: usize) -> u32 {
        let b = &self.tokens.bytes()[4 * t..4 * t + 4];
        u32::from_le_bytes(b.try_into().expect("4 bytes"))
    }

    /// Where document `i` came from: its chunk (file, row group) and position in it.
    pub fn origin(&self, i: usize) -> String {
        let at = self
            .meta
            .chunks
            .partition_point(|(first, _)| *first as usize <= i);
        match at.checked_sub(1).map(|k| &self.meta.chunks[k]) {
            Some((first, origin)) if *first as usize == i => origin.clone(),
            Some((first, origin)) => {
                format!("{origin}, then {} documents on", i - *first as usize)
            }
            None => format!("document {i}"),
        }
    }

    /// A view of documents `range`.
    pub fn view(self: &Arc<Self>, range: std::ops::Range<usize>) -> DocView {
        DocView {
            cache: Arc::clone(self),
            start: range.start,
            end: range.end,
        }
    }
}

/// A contiguous range of a cache's documents.
#[derive(Debug, Clone)]
pub struct DocView {
    cache: Arc<TokenCache>,
    start: usize,
    end: usize,
}

impl DocView {
    /// Number of documents.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the view holds no documents.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Tokens in the view.
    pub fn tokens(&self) -> u64 {
        (self.cache.offset(self.end) - self.cache.offset(self.start)) as u64
    }

    /// Document `i` of the view, as ids and trained flags.
    pub fn doc(&self, i: usize) -> Doc {
        let len = self.doc_len(i);
        let mut ids = Vec::with_capacity(len);
        self.extend_ids(i, 0..len, &mut ids);
        let trained = self
            .cache
            .trained
            .as_ref()
            .map(|_| (0..len).map(|j| self.trained_at(i, j)).collect());
        Doc { ids, trained }
    }

    /// Where document `i` of the view came from.
    pub fn origin(&self, i: usize) -> String {
        self.cache.origin(self.start + i)
    }

    /// The cache the view reads.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }
}

impl Docs for DocView {
    fn count(&self) -> usize {
        self.len()
    }

    fn doc_len(&self, i: usize) -> usize {
        let d = self.start + i;
        self.cache.offset(d + 1) - self.cache.offset(d)
    }

    fn extend_ids(&self, i: usize, range: std::ops::Range<usize>, out: &mut Vec<u32>) {
        let base = self.cache.offset(self.start + i);
        out.extend((base + range.start..base + range.end).map(|t| self.cache.token(t)));
    }

    fn trained_at(&self, i: usize, j: usize) -> bool {
        match &self.cache.trained {
            None => true,
            Some(t) => t.bytes()[self.cache.offset(self.start + i) + j] != 0,
        }
    }
}

/// Keeps a name usable as a directory name.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// SHA-256 (hex) of what decides a source's tokens.
fn cache_key(
    source: &Source,
    index: usize,
    tokenizer: &dyn Tokenizer,
) -> Result<String, DataError> {
    let mut settings = source.clone();
    settings.name = String::new();
    let mut h = sha2::Sha256::new();
    h.update(format!("kiln-cache-{VERSION}\n").as_bytes());
    h.update(
        serde_json::to_string(&settings)
            .unwrap_or_default()
            .as_bytes(),
    );
    h.update(tokenizer.identity().as_bytes());
    for file in source_files(source, index)? {
        let meta = std::fs::metadata(&file).map_err(|source| DataError::Io {
            path: file.clone(),
            source,
        })?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        h.update(format!("\n{}\t{}\t{modified}", file.display(), meta.len()).as_bytes());
    }
    Ok(kiln_recipe::hex(&h.finalize()))
}

/// Tokenizes `docs` on every core, keeping their order.
fn tokenize_parallel(tokenizer: &dyn Tokenizer, docs: &[Document]) -> Vec<Doc> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads == 1 || docs.len() < 64 {
        return docs
            .iter()
            .map(|d| tokenize_document(tokenizer, d))
            .collect();
    }
    let per = docs.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = docs
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|d| tokenize_document(tokenizer, d))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("tokenizer thread panicked"))
            .collect()
    })
}

/// Builds the entry `dir` for a source.
fn build(
    source: &Source,
    index: usize,
    tokenizer: &dyn Tokenizer,
    root: &Path,
    dir: &Path,
    key: &str,
    log: &mut dyn FnMut(String),
) -> Result<(), DataError> {
    let started = std::time::Instant::now();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| DataError::Io { path, source }
    };
    std::fs::create_dir_all(root).map_err(io(root))?;
    let tmp = root.join(format!(
        ".tmp-{}-{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let create = |name: &str| -> Result<BufWriter<File>, DataError> {
        let p = tmp.join(name);
        Ok(BufWriter::with_capacity(
            1 << 20,
            File::create(&p).map_err(io(&p))?,
        ))
    };
    let chat = source.messages_field.is_some();
    let mut tokens_out = create("tokens.bin")?;
    let mut offsets_out = create("offsets.bin")?;
    let mut trained_out = if chat {
        Some(create("trained.bin")?)
    } else {
        None
    };
    let mut meta = CacheMeta {
        version: VERSION,
        source: source.name.clone(),
        key: key.to_string(),
        documents: 0,
        tokens: 0,
        trained_tokens: 0,
        read: ReadStats::default(),
        filtered_short: 0,
        filtered_long: 0,
        chunks: Vec::new(),
        build_s: 0.0,
        content_sha256: String::new(),
    };
    let mut content = sha2::Sha256::new();
    let write_err = |e: std::io::Error| DataError::Cache {
        path: tmp.clone(),
        message: e.to_string(),
    };
    offsets_out
        .write_all(&0u64.to_le_bytes())
        .map_err(write_err)?;
    let mut last_log = std::time::Instant::now();
    let read = read_source(source, index, &mut |chunk: Vec<Document>| {
        if let Some(first) = chunk.first() {
            meta.chunks.push((meta.documents, first.origin.clone()));
        }
        for doc in tokenize_parallel(tokenizer, &chunk) {
            if source.min_tokens.is_some_and(|m| doc.len() < m) {
                meta.filtered_short += 1;
                continue;
            }
            if source.max_tokens.is_some_and(|m| doc.len() > m) {
                meta.filtered_long += 1;
                continue;
            }
            let bytes: Vec<u8> = doc.ids.iter().flat_map(|id| id.to_le_bytes()).collect();
            tokens_out.write_all(&bytes).map_err(write_err)?;
            content.update(&bytes);
            content.update((doc.len() as u64).to_le_bytes());
            if let Some(out) = trained_out.as_mut() {
                let flags: Vec<u8> = (0..doc.len())
                    .map(|j| u8::from(doc.trained.as_ref().is_none_or(|t| t[j])))
                    .collect();
                out.write_all(&flags).map_err(write_err)?;
                content.update(&flags);
            }
            meta.trained_tokens += doc.trainable_targets();
            meta.tokens += doc.len() as u64;
            meta.documents += 1;
            offsets_out
                .write_all(&meta.tokens.to_le_bytes())
                .map_err(write_err)?;
        }
        if last_log.elapsed().as_secs() >= 10 {
            last_log = std::time::Instant::now();
            log(format!(
                "source `{}`: tokenized {} documents, {} tokens so far",
                source.name, meta.documents, meta.tokens
            ));
        }
        Ok(())
    })?;
    meta.read = read;
    if meta.documents == 0 {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(DataError::EmptySource {
            name: source.name.clone(),
            path: PathBuf::from(&source.path),
        });
    }
    for mut out in [Some(tokens_out), Some(offsets_out), trained_out]
        .into_iter()
        .flatten()
    {
        out.flush().map_err(write_err)?;
        out.get_ref().sync_all().map_err(write_err)?;
    }
    meta.build_s = started.elapsed().as_secs_f64();
    meta.content_sha256 = kiln_recipe::hex(&content.finalize());
    let meta_path = tmp.join("meta.json");
    std::fs::write(
        &meta_path,
        serde_json::to_string_pretty(&meta).unwrap_or_default(),
    )
    .map_err(io(&meta_path))?;
    if std::fs::rename(&tmp, dir).is_err() {
        // Another process built the same entry first: keep theirs.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    log(format!(
        "source `{}`: tokenized {} rows into {} documents, {} tokens in {:.1}s ({:.0} tokens/s){} -> {}",
        source.name,
        meta.read.rows,
        meta.documents,
        meta.tokens,
        meta.build_s,
        meta.tokens as f64 / meta.build_s.max(1e-9),
        skipped_note(&meta),
        dir.display()
    ));
    Ok(())
}

/// ", 3 rows skipped (first: ...)" when rows were skipped or filtered.
pub(crate) fn skipped_note(meta: &CacheMeta) -> String {
    let mut s = String::new();
    if meta.read.skipped > 0 {
        s.push_str(&format!(
            ", {} bad rows skipped (first: {})",
            meta.read.skipped,
            meta.read.first_skip.as_deref().unwrap_or("?")
        ));
    }
    if meta.read.empty_files > 0 {
        s.push_str(&format!(", {} empty shards skipped", meta.read.empty_files));
    }
    if meta.filtered_short + meta.filtered_long > 0 {
        s.push_str(&format!(
            ", {} documents under min_tokens and {} over max_tokens dropped",
            meta.filtered_short, meta.filtered_long
        ));
    }
    s
}
