//! Reading documents from sources: plain text and JSONL.

use std::path::{Path, PathBuf};

use kiln_recipe::{Source, SourceFormat, TextSplit};

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

/// The files of a source: the path itself, or the sorted regular files of a directory.
pub fn source_files(source: &Source, index: usize) -> Result<Vec<PathBuf>, DataError> {
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

/// Reads every document of a source, in order.
pub fn read_documents(source: &Source, index: usize) -> Result<Vec<Document>, DataError> {
    let mut docs = Vec::new();
    for file in source_files(source, index)? {
        let bytes = std::fs::read(&file).map_err(|source| DataError::Io {
            path: file.clone(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let valid = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..valid]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1;
            DataError::NotUtf8 {
                path: file.clone(),
                line,
            }
        })?;
        match source.format {
            SourceFormat::Text => read_text(&text, &file, source.split, &mut docs),
            SourceFormat::Jsonl => match &source.messages_field {
                Some(field) => {
                    read_chat_jsonl(&text, &file, field, &source.tools_field, &mut docs)?
                }
                None => read_jsonl(&text, &file, &source.text_field, &mut docs)?,
            },
        }
    }
    if docs.is_empty() {
        return Err(DataError::EmptySource {
            name: source.name.clone(),
            path: PathBuf::from(&source.path),
        });
    }
    Ok(docs)
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
    field: &str,
    docs: &mut Vec<Document>,
) -> Result<(), DataError> {
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let Some(obj) = parse_row(line, file, line_no)? else {
            continue;
        };
        let text = match obj.get(field) {
            None => {
                return Err(DataError::MissingField {
                    path: file.to_path_buf(),
                    line: line_no,
                    field: field.to_string(),
                });
            }
            Some(serde_json::Value::String(s)) => s,
            Some(other) => {
                return Err(DataError::Json {
                    path: file.to_path_buf(),
                    line: line_no,
                    message: format!("field `{field}` is {}, expected a string", json_kind(other)),
                });
            }
        };
        if !text.trim().is_empty() {
            docs.push(Document {
                text: text.clone(),
                origin: format!("{}:{line_no}", file.display()),
                trained: None,
            });
        }
    }
    Ok(())
}

/// Reads chat rows (`{"messages": [...], "tools": [...]}`) and renders each with the
/// Qwen2.5 template, keeping the assistant spans as the trained ranges.
fn read_chat_jsonl(
    text: &str,
    file: &Path,
    messages_field: &str,
    tools_field: &str,
    docs: &mut Vec<Document>,
) -> Result<(), DataError> {
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let Some(mut obj) = parse_row(line, file, line_no)? else {
            continue;
        };
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
        docs.push(Document {
            text: rendered.text,
            origin: format!("{}:{line_no}", file.display()),
            trained: Some(rendered.trained),
        });
    }
    Ok(())
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
