//! Reading documents from sources: plain text and JSONL here, Parquet and Arrow in
//! `columnar`. Sources are read in chunks (a file, a row group, a record batch) handed to a
//! sink, so a source is never held whole in memory.

use std::path::{Path, PathBuf};

use kiln_recipe::{BadRow, Source, SourceFormat, TextSplit};

use crate::DataError;

/// One document and where it came from (for error messages and samples).
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The document text.
    pub text: String,
    /// `file` or `file:line` of the document's start.
    pub origin: String,
    /// Byte ranges of `text` trained on (chat documents: the assistant turns); `None`
    /// trains on everything.
    pub trained: Option<Vec<std::ops::Range<usize>>>,
}

/// What reading a source met.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReadStats {
    /// Files read.
    pub files: u64,
    /// Rows (JSONL lines, Parquet/Arrow rows) read, skipped ones included.
    pub rows: u64,
    /// Rows dropped by `on_bad_row = "skip"`.
    pub skipped: u64,
    /// Empty shards passed over by `on_bad_row = "skip"`.
    pub empty_files: u64,
    /// Why the first skipped row was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_skip: Option<String>,
}

/// Whether a path holds glob characters.
fn is_glob(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

/// The files of a source: the path itself, the sorted regular files of a directory, or
/// the sorted matches of a glob.
pub fn source_files(source: &Source, index: usize) -> Result<Vec<PathBuf>, DataError> {
    if is_glob(&source.path) {
        let bad = |message: String| DataError::SourcePath {
            key: format!("data.sources[{index}].path"),
            path: PathBuf::from(&source.path),
            message,
        };
        let mut files: Vec<PathBuf> = glob::glob(&source.path)
            .map_err(|e| bad(format!("not a valid glob: {e}")))?
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(bad("the glob matches no files".to_string()));
        }
        return Ok(files);
    }
    let path = Path::new(&source.path);
    let meta = std::fs::metadata(path).map_err(|e| DataError::SourcePath {
        key: format!("data.sources[{index}].path"),
        path: path.to_path_buf(),
        message: if e.kind() == std::io::ErrorKind::NotFound {
            match std::env::current_dir() {
                Ok(cwd) => format!(
                    "not found (relative paths are read from `{}`)",
                    cwd.display()
                ),
                Err(_) => "not found".to_string(),
            }
        } else {
            e.to_string()
        },
    })?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let p = entry.path();
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if p.is_file() && !hidden {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(DataError::EmptySource {
            name: source.name.clone(),
            path: path.to_path_buf(),
        });
    }
    Ok(files)
}

/// Reads every document of a source, in order, into memory (for small sources and
/// tokenizer training; the pipeline streams through [`read_source`]).
pub fn read_documents(source: &Source, index: usize) -> Result<Vec<Document>, DataError> {
    let mut docs = Vec::new();
    read_source(source, index, &mut |chunk| {
        docs.extend(chunk);
        Ok(())
    })?;
    Ok(docs)
}

/// The reader thread of [`stream_texts`]: per-source document counts, or the read error.
pub type SourceReader = std::thread::JoinHandle<Result<Vec<(String, u64)>, DataError>>;

/// The texts of `sources`' documents as a stream: a reader thread reads them chunk by
/// chunk (never a whole source at once) and hands them over a bounded channel. Join the
/// returned handle after consuming the stream for read errors and per-source document
/// counts (a read error ends the stream early).
pub fn stream_texts(sources: Vec<Source>) -> (impl Iterator<Item = String> + Send, SourceReader) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<String>>(4);
    let reader = std::thread::spawn(move || {
        let mut counts = Vec::new();
        for (i, src) in sources.iter().enumerate() {
            let mut n = 0u64;
            read_source(src, i, &mut |chunk| {
                n += chunk.len() as u64;
                // A closed channel means the consumer stopped early: nothing left to do.
                let _ = tx.send(chunk.into_iter().map(|d| d.text).collect());
                Ok(())
            })?;
            counts.push((src.name.clone(), n));
        }
        Ok(counts)
    });
    (rx.into_iter().flatten(), reader)
}

/// Reads a source's documents in order, one chunk (a text or JSONL file, a Parquet row
/// group, an Arrow record batch) at a time, handing each to `sink`.
pub fn read_source(
    source: &Source,
    index: usize,
    sink: &mut dyn FnMut(Vec<Document>) -> Result<(), DataError>,
) -> Result<ReadStats, DataError> {
    let mut stats = ReadStats::default();
    let mut any = false;
    let mut counting = |chunk: Vec<Document>| {
        any |= !chunk.is_empty();
        sink(chunk)
    };
    for file in source_files(source, index)? {
        stats.files += 1;
        match source.format {
            SourceFormat::Parquet => {
                crate::columnar::read_parquet(&file, source, &mut stats, &mut counting)?
            }
            SourceFormat::Arrow => {
                crate::columnar::read_arrow(&file, source, &mut stats, &mut counting)?
            }
            SourceFormat::Text | SourceFormat::Jsonl => {
                let text = read_utf8(&file)?;
                let mut docs = Vec::new();
                match (source.format, &source.messages_field) {
                    (SourceFormat::Text, _) => read_text(&text, &file, source.split, &mut docs),
                    (_, Some(field)) => read_chat_jsonl(
                        &text,
                        &file,
                        field,
                        &source.tools_field,
                        source.on_bad_row,
                        &mut stats,
                        &mut docs,
                    )?,
                    (_, None) => read_jsonl(&text, &file, source, &mut stats, &mut docs)?,
                }
                counting(docs)?;
            }
        }
    }
    if !any {
        return Err(DataError::EmptySource {
            name: source.name.clone(),
            path: PathBuf::from(&source.path),
        });
    }
    Ok(stats)
}

fn read_utf8(file: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(file).map_err(|source| DataError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..valid]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1;
        DataError::NotUtf8 {
            path: file.to_path_buf(),
            line,
        }
    })
}

/// Applies the skip policy to a row's error.
fn skip_or(policy: BadRow, stats: &mut ReadStats, err: DataError) -> Result<(), DataError> {
    if policy == BadRow::Skip {
        stats.skipped += 1;
        if stats.first_skip.is_none() {
            stats.first_skip = Some(err.to_string());
        }
        Ok(())
    } else {
        Err(err)
    }
}

fn read_text(text: &str, file: &Path, split: TextSplit, docs: &mut Vec<Document>) {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    match split {
        TextSplit::File => {
            let t = text.trim();
            if !t.is_empty() {
                docs.push(Document {
                    text: t.to_string(),
                    origin: file.display().to_string(),
                    trained: None,
                });
            }
        }
        TextSplit::BlankLine => {
            let mut block = String::new();
            let mut start = 0;
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    flush_block(&mut block, file, start, docs);
                } else {
                    if block.is_empty() {
                        start = i + 1;
                    } else {
                        block.push('\n');
                    }
                    block.push_str(line);
                }
            }
            flush_block(&mut block, file, start, docs);
        }
    }
}

fn flush_block(block: &mut String, file: &Path, line: usize, docs: &mut Vec<Document>) {
    if !block.trim().is_empty() {
        docs.push(Document {
            text: std::mem::take(block),
            origin: format!("{}:{line}", file.display()),
            trained: None,
        });
    }
    block.clear();
}

/// Parses one JSONL line as an object (`None` for a blank line), errors naming file:line.
fn parse_row(
    line: &str,
    file: &Path,
    line_no: usize,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, DataError> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let err = |message: String| DataError::Json {
        path: file.to_path_buf(),
        line: line_no,
        message,
    };
    match serde_json::from_str::<serde_json::Value>(line).map_err(|e| err(e.to_string()))? {
        serde_json::Value::Object(map) => Ok(Some(map)),
        _ => Err(err("expected a JSON object".to_string())),
    }
}

fn read_jsonl(
    text: &str,
    file: &Path,
    source: &Source,
    stats: &mut ReadStats,
    docs: &mut Vec<Document>,
) -> Result<(), DataError> {
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        stats.rows += 1;
        match jsonl_text(line, file, line_no, source) {
            Ok(text) if !text.trim().is_empty() => docs.push(Document {
                text,
                origin: format!("{}:{line_no}", file.display()),
                trained: None,
            }),
            Ok(_) => {}
            Err(e) => skip_or(source.on_bad_row, stats, e)?,
        }
    }
    Ok(())
}

/// The document text of one JSONL row: its `text_field`, or its `template` rendered.
fn jsonl_text(
    line: &str,
    file: &Path,
    line_no: usize,
    source: &Source,
) -> Result<String, DataError> {
    let obj = parse_row(line, file, line_no)?.unwrap_or_default();
    let field_str = |field: &str| -> Result<&str, DataError> {
        match obj.get(field) {
            None => Err(DataError::MissingField {
                path: file.to_path_buf(),
                line: line_no,
                field: field.to_string(),
            }),
            Some(serde_json::Value::String(s)) => Ok(s),
            Some(other) => Err(DataError::Json {
                path: file.to_path_buf(),
                line: line_no,
                message: format!("field `{field}` is {}, expected a string", json_kind(other)),
            }),
        }
    };
    match &source.template {
        None => field_str(&source.text_field).map(str::to_string),
        Some(t) => {
            let fields = kiln_recipe::template_fields(t).unwrap_or_default();
            let mut values = Vec::with_capacity(fields.len());
            for f in &fields {
                values.push((f.as_str(), field_str(f)?));
            }
            Ok(kiln_recipe::render_template(t, &values))
        }
    }
}

/// Reads chat rows (`{"messages": [...], "tools": [...]}`) and renders each with the
/// Qwen2.5 template, keeping the assistant spans as the trained ranges.
fn read_chat_jsonl(
    text: &str,
    file: &Path,
    messages_field: &str,
    tools_field: &str,
    policy: BadRow,
    stats: &mut ReadStats,
    docs: &mut Vec<Document>,
) -> Result<(), DataError> {
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        stats.rows += 1;
        match chat_row(line, file, line_no, messages_field, tools_field) {
            Ok(doc) => docs.push(doc),
            Err(e) => skip_or(policy, stats, e)?,
        }
    }
    Ok(())
}

/// One chat row rendered with the Qwen2.5 template, assistant spans trained.
fn chat_row(
    line: &str,
    file: &Path,
    line_no: usize,
    messages_field: &str,
    tools_field: &str,
) -> Result<Document, DataError> {
    {
        let mut obj = parse_row(line, file, line_no)?.unwrap_or_default();
        let json_err = |message: String| DataError::Json {
            path: file.to_path_buf(),
            line: line_no,
            message,
        };
        let messages = obj
            .remove(messages_field)
            .ok_or_else(|| DataError::MissingField {
                path: file.to_path_buf(),
                line: line_no,
                field: messages_field.to_string(),
            })?;
        let messages: Vec<crate::chat::Message> = serde_json::from_value(messages)
            .map_err(|e| json_err(format!("field `{messages_field}`: {e}")))?;
        let tools = match obj.remove(tools_field) {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Array(t)) => t,
            Some(_) => return Err(json_err(format!("field `{tools_field}` must be an array"))),
        };
        let rendered =
            crate::chat::render(&messages, &tools, false).map_err(|e| DataError::Chat {
                path: file.to_path_buf(),
                line: line_no,
                message: e.to_string(),
            })?;
        Ok(Document {
            text: rendered.text,
            origin: format!("{}:{line_no}", file.display()),
            trained: Some(rendered.trained),
        })
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
