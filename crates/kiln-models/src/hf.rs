//! Hugging Face checkpoint files: safetensors (single or sharded) in, safetensors out.
//!
//! Reading parses the safetensors header itself and then reads each tensor's bytes with
//! `seek` + `read_exact`, one tensor at a time: a multi-gigabyte shard is never held in
//! memory whole, and every offset is checked against the file length before it is used
//! (a truncated or malformed file is an error naming the file and tensor, never an
//! out-of-bounds read). `F32`, `F16` and `BF16` tensors are converted to `f32`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{ModelError, NamedTensor};

/// Largest header kiln accepts (the safetensors format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

#[derive(Debug, Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// A safetensors file and the tensors its header lists.
pub type CheckpointFile = (PathBuf, BTreeMap<String, TensorInfo>);

/// One tensor's place in a safetensors file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Element type as written in the header (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Byte length of the data.
    pub len: u64,
}

fn bad(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Safetensors {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn dtype_size(dtype: &str) -> Option<u64> {
    match dtype {
        "F32" | "I32" | "U32" => Some(4),
        "F16" | "BF16" | "I16" | "U16" => Some(2),
        "F64" | "I64" | "U64" => Some(8),
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => Some(1),
        _ => None,
    }
}

/// Reads and checks the header of a safetensors file.
pub fn read_header(path: &Path) -> Result<BTreeMap<String, TensorInfo>, ModelError> {
    let mut file = File::open(path).map_err(io(path))?;
    let file_len = file.metadata().map_err(io(path))?.len();
    if file_len < 8 {
        return Err(bad(
            path,
            format!("file is {file_len} bytes, too short for a safetensors header"),
        ));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(io(path))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER || header_len > file_len - 8 {
        return Err(bad(
            path,
            format!(
                "header length {header_len} does not fit in the {file_len}-byte file (truncated or not safetensors)"
            ),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io(path))?;
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(path, format!("malformed header: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut out = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let entry: HeaderEntry = serde_json::from_value(value).map_err(|e| {
            bad(
                path,
                format!("tensor `{name}`: malformed header entry: {e}"),
            )
        })?;
        let size = dtype_size(&entry.dtype).ok_or_else(|| {
            bad(
                path,
                format!("tensor `{name}`: unknown dtype `{}`", entry.dtype),
            )
        })?;
        let [start, end] = entry.data_offsets;
        let elements = entry
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| {
                bad(
                    path,
                    format!("tensor `{name}`: shape {:?} overflows", entry.shape),
                )
            })?;
        if end < start || end > data_len {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}`: data offsets [{start}, {end}] lie outside the {data_len} data bytes (truncated file?)"
                ),
            ));
        }
        if end - start != elements * size {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}`: {} bytes of data for shape {:?} of {}",
                    end - start,
                    entry.shape,
                    entry.dtype
                ),
            ));
        }
        out.insert(
            name,
            TensorInfo {
                dtype: entry.dtype,
                shape: entry.shape,
                offset: data_start + start,
                len: end - start,
            },
        );
    }
    Ok(out)
}

/// Reads one tensor as `f32`.
pub fn read_tensor(path: &Path, name: &str, info: &TensorInfo) -> Result<NamedTensor, ModelError> {
    let mut file = File::open(path).map_err(io(path))?;
    file.seek(SeekFrom::Start(info.offset)).map_err(io(path))?;
    let mut bytes = vec![0u8; info.len as usize];
    file.read_exact(&mut bytes).map_err(io(path))?;
    let values: Vec<f32> = match info.dtype.as_str() {
        "F32" => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        "BF16" => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        "F16" => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(bad(
                path,
                format!("tensor `{name}` is {other}; model weights must be F32, F16 or BF16"),
            ));
        }
    };
    Ok(NamedTensor {
        shape: info.shape.clone(),
        values,
    })
}

/// The safetensors files of a Hugging Face model directory: `model.safetensors`, or the
/// shards listed by `model.safetensors.index.json`, with the tensors each one holds.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<CheckpointFile>, ModelError> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(&index).map_err(io(&index))?;
        let idx: Index = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: index.clone(),
            message: format!("malformed index: {e}"),
        })?;
        let mut shards: Vec<String> = idx.weight_map.values().cloned().collect();
        shards.sort();
        shards.dedup();
        let mut out = Vec::new();
        for shard in shards {
            let path = dir.join(&shard);
            if !path.is_file() {
                return Err(ModelError::MissingFile {
                    path,
                    hint: format!("listed in `{}`", index.display()),
                });
            }
            let header = read_header(&path)?;
            for (name, file) in &idx.weight_map {
                if *file == shard && !header.contains_key(name) {
                    return Err(bad(
                        &path,
                        format!("tensor `{name}` is listed in the index but not in this shard"),
                    ));
                }
            }
            out.push((path, header));
        }
        return Ok(out);
    }
    if single.is_file() {
        let header = read_header(&single)?;
        return Ok(vec![(single, header)]);
    }
    Err(ModelError::MissingFile {
        path: single,
        hint:
            "expected `model.safetensors` or `model.safetensors.index.json` in the model directory"
                .to_string(),
    })
}

/// Reads every tensor of a Hugging Face model directory as `f32`, applying `map` to each
/// (name, tensor) as it is read; `map` returns `None` to drop a tensor.
pub fn read_checkpoint(
    dir: &Path,
    mut map: impl FnMut(String, NamedTensor) -> Option<(String, NamedTensor)>,
) -> Result<BTreeMap<String, NamedTensor>, ModelError> {
    let mut out = BTreeMap::new();
    for (path, header) in checkpoint_files(dir)? {
        for (name, info) in &header {
            let tensor = read_tensor(&path, name, info)?;
            if let Some((k, v)) = map(name.clone(), tensor) {
                out.insert(k, v);
            }
        }
    }
    Ok(out)
}

/// Reads every tensor of one safetensors file as `f32`, mapped by `map` as in
/// [`read_checkpoint`].
pub fn read_checkpoint_file(
    path: &Path,
    mut map: impl FnMut(String, NamedTensor) -> Option<(String, NamedTensor)>,
) -> Result<BTreeMap<String, NamedTensor>, ModelError> {
    if !path.is_file() {
        return Err(ModelError::MissingFile {
            path: path.to_path_buf(),
            hint: "expected a safetensors file".to_string(),
        });
    }
    let mut out = BTreeMap::new();
    for (name, info) in &read_header(path)? {
        if let Some((k, v)) = map(name.clone(), read_tensor(path, name, info)?) {
            out.insert(k, v);
        }
    }
    Ok(out)
}

fn encode(tensors: &[(&String, &NamedTensor)], path: &Path) -> Result<Vec<u8>, ModelError> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".to_string(),
        serde_json::json!({ "format": "pt" }),
    );
    let mut offset = 0u64;
    for (name, t) in tensors {
        let len = t.values.len() as u64 * 4;
        header.insert(
            (*name).clone(),
            serde_json::json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + len] }),
        );
        offset += len;
    }
    let mut header_bytes = serde_json::to_vec(&header).map_err(|e| bad(path, e.to_string()))?;
    // Pad the header with spaces so the data starts 8-byte aligned, as the format advises.
    while (8 + header_bytes.len()) % 8 != 0 {
        header_bytes.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + header_bytes.len() + offset as usize);
    out.extend_from_slice(&(header_bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(&header_bytes);
    for (_, t) in tensors {
        for v in &t.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(out)
}

/// Writes tensors (already under Hugging Face names and layouts) as `model.safetensors`,
/// or as `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`
/// when they exceed `max_shard_bytes`. Returns the files written.
pub fn write_checkpoint(
    dir: &Path,
    tensors: &BTreeMap<String, NamedTensor>,
    max_shard_bytes: u64,
) -> Result<Vec<PathBuf>, ModelError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut shards: Vec<Vec<(&String, &NamedTensor)>> = vec![Vec::new()];
    let mut current = 0u64;
    for (name, t) in tensors {
        let size = t.values.len() as u64 * 4;
        if current > 0 && current + size > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        shards
            .last_mut()
            .expect("at least one shard")
            .push((name, t));
        current += size;
    }
    let mut written = Vec::new();
    if shards.len() == 1 {
        let path = dir.join("model.safetensors");
        let bytes = encode(&shards[0], &path)?;
        write_file(&path, &bytes)?;
        written.push(path);
        return Ok(written);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        let path = dir.join(&file);
        let bytes = encode(shard, &path)?;
        write_file(&path, &bytes)?;
        for (name, t) in shard {
            weight_map.insert((*name).clone(), serde_json::Value::String(file.clone()));
            total += t.values.len() as u64 * 4;
        }
        written.push(path);
    }
    let index =
        serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let path = dir.join("model.safetensors.index.json");
    write_file(
        &path,
        serde_json::to_string_pretty(&index)
            .expect("index serializes")
            .as_bytes(),
    )?;
    written.push(path);
    Ok(written)
}

/// Writes tensors (already under their file names and layouts) as one safetensors file.
pub fn write_tensors(
    path: &Path,
    tensors: &BTreeMap<String, NamedTensor>,
) -> Result<(), ModelError> {
    let list: Vec<(&String, &NamedTensor)> = tensors.iter().collect();
    let bytes = encode(&list, path)?;
    write_file(path, &bytes)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}
