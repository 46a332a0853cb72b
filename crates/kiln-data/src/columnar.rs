//! Parquet and Arrow IPC sources, read one row group (Parquet) or record batch (Arrow) at a
//! time, so memory holds one chunk of rows, never the file.
//!
//! A row becomes a document from one string column (`text_field`), from several joined by a
//! `template`, or, for chat, from a column of JSON messages (`messages_field`, with an
//! optional JSON `tools_field` column). String columns may be `Utf8`, `LargeUtf8` or
//! `Utf8View`. A missing column, a column of another type, a corrupt file and an empty
//! shard are errors naming the file (and the columns it has); a null or unreadable value
//! names the file, row group (or batch), row and column, or with `on_bad_row = "skip"` drops
//! the row and is counted.

use std::fs::File;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Schema};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};

use kiln_recipe::{BadRow, Source};

use crate::DataError;
use crate::source::{Document, ReadStats};

/// Rows per record batch read from a row group.
const BATCH_ROWS: usize = 8192;

/// How a row is turned into a document: which columns, and how they are joined.
struct RowShape {
    /// The template, or `{<text_field>}`.
    template: Option<String>,
    /// Columns the document is built from, by name, with their index in the schema.
    columns: Vec<(String, usize)>,
    /// Chat rows: the messages column and the optional tools column.
    chat: Option<(usize, Option<usize>)>,
}

impl RowShape {
    fn new(source: &Source, schema: &Schema, file: &Path) -> Result<Self, DataError> {
        let find = |name: &str| -> Result<usize, DataError> {
            let i = schema.index_of(name).map_err(|_| DataError::Format {
                path: file.to_path_buf(),
                message: format!(
                    "no column `{name}` (columns: {})",
                    schema
                        .fields()
                        .iter()
                        .map(|f| format!("`{}`", f.name()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
            match schema.field(i).data_type() {
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(i),
                other => Err(DataError::Format {
                    path: file.to_path_buf(),
                    message: format!("column `{name}` is {other}, expected a string column"),
                }),
            }
        };
        if let Some(messages) = &source.messages_field {
            let tools = schema
                .index_of(&source.tools_field)
                .ok()
                .map(|_| find(&source.tools_field))
                .transpose()?;
            return Ok(Self {
                template: None,
                columns: Vec::new(),
                chat: Some((find(messages)?, tools)),
            });
        }
        let names = match &source.template {
            Some(t) => kiln_recipe::template_fields(t).map_err(|message| DataError::Format {
                path: file.to_path_buf(),
                message: format!("template: {message}"),
            })?,
            None => vec![source.text_field.clone()],
        };
        let columns = names
            .into_iter()
            .map(|n| find(&n).map(|i| (n, i)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            template: source.template.clone(),
            columns,
            chat: None,
        })
    }

    /// The documents of a record batch; `location` names the chunk (`row group 3`) and
    /// `first_row` is the batch's first row within it.
    fn documents(
        &self,
        batch: &RecordBatch,
        file: &Path,
        location: &str,
        first_row: usize,
        policy: BadRow,
        stats: &mut ReadStats,
    ) -> Result<Vec<Document>, DataError> {
        let mut docs = Vec::with_capacity(batch.num_rows());
        for row in 0..batch.num_rows() {
            stats.rows += 1;
            let origin = format!("{}: {location}, row {}", file.display(), first_row + row);
            match self.document(batch, row, &origin) {
                Ok(Some(doc)) => docs.push(doc),
                Ok(None) => {}
                Err(e) if policy == BadRow::Skip => {
                    stats.skipped += 1;
                    if stats.first_skip.is_none() {
                        stats.first_skip = Some(e.to_string());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(docs)
    }

    /// One row's document (`None` for an empty text).
    fn document(
        &self,
        batch: &RecordBatch,
        row: usize,
        origin: &str,
    ) -> Result<Option<Document>, DataError> {
        let bad = |column: &str, message: &str| DataError::Row {
            origin: origin.to_string(),
            message: format!("column `{column}`: {message}"),
        };
        let schema = batch.schema();
        let value = |i: usize| -> Result<&str, DataError> {
            str_at(batch.column(i), row).ok_or_else(|| bad(schema.field(i).name(), "null"))
        };
        if let Some((messages, tools)) = self.chat {
            let name = schema.field(messages).name().clone();
            let messages: Vec<crate::chat::Message> = serde_json::from_str(value(messages)?)
                .map_err(|e| bad(&name, &format!("not a JSON list of messages: {e}")))?;
            let tools: Vec<serde_json::Value> = match tools {
                Some(i) => match str_at(batch.column(i), row) {
                    None => Vec::new(),
                    Some(t) => serde_json::from_str(t).map_err(|e| {
                        bad(
                            schema.field(i).name(),
                            &format!("not a JSON list of tools: {e}"),
                        )
                    })?,
                },
                None => Vec::new(),
            };
            let rendered = crate::chat::render(&messages, &tools, false)
                .map_err(|e| bad(&name, &e.to_string()))?;
            return Ok(Some(Document {
                text: rendered.text,
                origin: origin.to_string(),
                trained: Some(rendered.trained),
            }));
        }
        let text = match &self.template {
            None => value(self.columns[0].1)?.to_string(),
            Some(t) => {
                let mut values = Vec::with_capacity(self.columns.len());
                for (name, i) in &self.columns {
                    values.push((name.as_str(), value(*i)?));
                }
                kiln_recipe::render_template(t, &values)
            }
        };
        Ok((!text.trim().is_empty()).then(|| Document {
            text,
            origin: origin.to_string(),
            trained: None,
        }))
    }
}

/// The string at `row` of a string column, `None` when null.
fn str_at(column: &ArrayRef, row: usize) -> Option<&str> {
    if column.is_null(row) {
        return None;
    }
    Some(match column.data_type() {
        DataType::Utf8 => column.as_string::<i32>().value(row),
        DataType::LargeUtf8 => column.as_string::<i64>().value(row),
        DataType::Utf8View => column.as_string_view().value(row),
        _ => return None,
    })
}

fn open(file: &Path) -> Result<File, DataError> {
    File::open(file).map_err(|source| DataError::Io {
        path: file.to_path_buf(),
        source,
    })
}

fn empty_shard(file: &Path, policy: BadRow, stats: &mut ReadStats) -> Result<(), DataError> {
    if policy == BadRow::Skip {
        stats.empty_files += 1;
        return Ok(());
    }
    Err(DataError::Format {
        path: file.to_path_buf(),
        message: "holds no rows (remove the shard, or set `on_bad_row = \"skip\"` to pass over empty shards)".to_string(),
    })
}

/// Reads a Parquet file one row group at a time, handing each group's documents to `sink`.
pub(crate) fn read_parquet(
    file: &Path,
    source: &Source,
    stats: &mut ReadStats,
    sink: &mut dyn FnMut(Vec<Document>) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let corrupt = |e: parquet::errors::ParquetError| DataError::Format {
        path: file.to_path_buf(),
        message: format!("not a readable Parquet file: {e}"),
    };
    let meta = ArrowReaderMetadata::load(&open(file)?, Default::default()).map_err(corrupt)?;
    let shape = RowShape::new(source, meta.schema(), file)?;
    let groups = meta.metadata().num_row_groups();
    if meta.metadata().file_metadata().num_rows() == 0 {
        return empty_shard(file, source.on_bad_row, stats);
    }
    for group in 0..groups {
        let location = format!("row group {group}");
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(open(file)?, meta.clone())
            .with_row_groups(vec![group])
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(corrupt)?;
        let mut first_row = 0;
        for batch in reader {
            let batch = batch.map_err(|e| DataError::Format {
                path: file.to_path_buf(),
                message: format!("{location}: cannot decode: {e}"),
            })?;
            let docs =
                shape.documents(&batch, file, &location, first_row, source.on_bad_row, stats)?;
            first_row += batch.num_rows();
            sink(docs)?;
        }
    }
    Ok(())
}

/// Reads an Arrow IPC file (file or stream format) one record batch at a time.
pub(crate) fn read_arrow(
    file: &Path,
    source: &Source,
    stats: &mut ReadStats,
    sink: &mut dyn FnMut(Vec<Document>) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let corrupt = |e: arrow_schema::ArrowError| DataError::Format {
        path: file.to_path_buf(),
        message: format!("not a readable Arrow IPC file: {e}"),
    };
    let mut magic = [0u8; 6];
    let is_file_format = {
        use std::io::Read;
        open(file)?.read_exact(&mut magic).is_ok() && &magic == b"ARROW1"
    };
    let reader: Box<dyn Iterator<Item = Result<RecordBatch, arrow_schema::ArrowError>>> =
        if is_file_format {
            Box::new(arrow_ipc::reader::FileReader::try_new(open(file)?, None).map_err(corrupt)?)
        } else {
            Box::new(
                arrow_ipc::reader::StreamReader::try_new(
                    std::io::BufReader::new(open(file)?),
                    None,
                )
                .map_err(corrupt)?,
            )
        };
    let mut shape: Option<RowShape> = None;
    let mut rows = 0;
    for (i, batch) in reader.enumerate() {
        let batch = batch.map_err(corrupt)?;
        if shape.is_none() {
            shape = Some(RowShape::new(source, &batch.schema(), file)?);
        }
        let shape = shape.as_ref().expect("set above");
        rows += batch.num_rows();
        let docs = shape.documents(
            &batch,
            file,
            &format!("batch {i}"),
            0,
            source.on_bad_row,
            stats,
        )?;
        sink(docs)?;
    }
    if rows == 0 {
        return empty_shard(file, source.on_bad_row, stats);
    }
    Ok(())
}
