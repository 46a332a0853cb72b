//! Tokenizers: the byte tokenizer (no file needed) and Hugging Face `tokenizer.json` files
//! through the `tokenizers` crate.

use std::path::{Path, PathBuf};

use crate::DataError;

/// What the data pipeline needs from a tokenizer.
pub trait Tokenizer: Send + Sync {
    /// Ids of a text and the byte range of `text` each id covers. Special tokens written in
    /// the text (`<|im_start|>`) become their ids, as Hugging Face tokenizers do.
    fn encode_with_offsets(&self, text: &str) -> (Vec<u32>, Vec<(usize, usize)>);
    /// Ids of a text.
    fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_with_offsets(text).0
    }
    /// Text of ids; special tokens render as their names.
    fn decode(&self, ids: &[u32]) -> String;
    /// Number of ids the model must be able to embed.
    fn vocab_size(&self) -> usize;
    /// The end-of-text id appended to every document.
    fn eos_id(&self) -> u32;
    /// The id used to pad short windows (never trained on).
    fn pad_id(&self) -> u32;
    /// The id of a token given by its text, if it is one token.
    fn token_id(&self, token: &str) -> Option<u32>;
    /// How many bytes of text an id stands for (0 for special tokens); used for bits/byte.
    fn token_bytes(&self, id: u32) -> usize;
    /// A string that changes whenever the ids of some text would: keys the token cache.
    fn identity(&self) -> String;
}

/// Byte-level tokenizer: 256 byte ids plus special tokens.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

/// The special tokens of [`ByteTokenizer`], in id order from 256.
pub const BYTE_SPECIAL_TOKENS: [&str; 4] =
    ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"];

impl ByteTokenizer {
    /// Vocabulary size: 256 bytes plus the special tokens.
    pub const VOCAB_SIZE: usize = 256 + BYTE_SPECIAL_TOKENS.len();
}

impl Tokenizer for ByteTokenizer {
    fn encode_with_offsets(&self, text: &str) -> (Vec<u32>, Vec<(usize, usize)>) {
        let bytes = text.as_bytes();
        let mut ids = Vec::with_capacity(bytes.len());
        let mut offsets = Vec::with_capacity(bytes.len());
        let mut i = 0;
        'outer: while i < bytes.len() {
            if bytes[i] == b'<' {
                for (k, special) in BYTE_SPECIAL_TOKENS.iter().enumerate() {
                    if bytes[i..].starts_with(special.as_bytes()) {
                        ids.push(256 + k as u32);
                        offsets.push((i, i + special.len()));
                        i += special.len();
                        continue 'outer;
                    }
                }
            }
            ids.push(u32::from(bytes[i]));
            offsets.push((i, i + 1));
            i += 1;
        }
        (ids, offsets)
    }

    fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut bytes = Vec::new();
        for &id in ids {
            if id < 256 {
                bytes.push(id as u8);
                continue;
            }
            out.push_str(&String::from_utf8_lossy(&bytes));
            bytes.clear();
            match BYTE_SPECIAL_TOKENS.get(id as usize - 256) {
                Some(name) => out.push_str(name),
                None => out.push('\u{fffd}'),
            }
        }
        out.push_str(&String::from_utf8_lossy(&bytes));
        out
    }

    fn vocab_size(&self) -> usize {
        Self::VOCAB_SIZE
    }

    fn eos_id(&self) -> u32 {
        256
    }

    fn pad_id(&self) -> u32 {
        257
    }

    fn token_id(&self, token: &str) -> Option<u32> {
        if let Some(k) = BYTE_SPECIAL_TOKENS.iter().position(|s| *s == token) {
            return Some(256 + k as u32);
        }
        match token.as_bytes() {
            [b] => Some(u32::from(*b)),
            _ => None,
        }
    }

    fn token_bytes(&self, id: u32) -> usize {
        usize::from(id < 256)
    }

    fn identity(&self) -> String {
        "bytes-1".to_string()
    }
}

/// A Hugging Face tokenizer (`tokenizer.json`).
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    eos: u32,
    pad: u32,
    bytes: Vec<usize>,
    /// SHA-256 of the `tokenizer.json` bytes.
    sha256: String,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab", &self.bytes.len())
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

/// Whether `c` is one of the 256 characters GPT-2's byte-level alphabet maps bytes to.
fn is_byte_level_char(c: char) -> bool {
    let u = c as u32;
    (33..=126).contains(&u)
        || (161..=172).contains(&u)
        || (174..=255).contains(&u)
        || (256..256 + 68).contains(&u)
}

impl HfTokenizer {
    /// Loads `tokenizer.json` (or `<dir>/tokenizer.json`).
    pub fn from_path(path: &Path, eos: Option<&str>, pad: Option<&str>) -> Result<Self, DataError> {
        let file: PathBuf = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        if !file.is_file() {
            return Err(DataError::Tokenizer {
                path: file,
                message: "not found".to_string(),
            });
        }
        let raw = std::fs::read(&file).map_err(|source| DataError::Io {
            path: file.clone(),
            source,
        })?;
        let sha256 = {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(&raw);
            kiln_recipe::hex(&digest)
        };
        let inner = tokenizers::Tokenizer::from_bytes(&raw).map_err(|e| DataError::Tokenizer {
            path: file.clone(),
            message: format!("cannot load: {e}"),
        })?;
        let id = |t: &str| inner.token_to_id(t);
        let eos = match eos {
            Some(t) => id(t).ok_or_else(|| DataError::Tokenizer {
                path: file.clone(),
                message: format!("tokenizer.eos: `{t}` is not a token of this tokenizer"),
            })?,
            None => ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
                .iter()
                .find_map(|t| id(t))
                .ok_or_else(|| DataError::Tokenizer {
                    path: file.clone(),
                    message: "no end-of-text token found (<|endoftext|>, </s>, <eos>, <|end_of_text|>): set tokenizer.eos".to_string(),
                })?,
        };
        let pad = match pad {
            Some(t) => id(t).ok_or_else(|| DataError::Tokenizer {
                path: file.clone(),
                message: format!("tokenizer.pad: `{t}` is not a token of this tokenizer"),
            })?,
            None => id("<|pad|>").unwrap_or(eos),
        };
        let vocab = inner.get_vocab_size(true);
        let specials: std::collections::HashSet<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        let bytes = (0..vocab as u32)
            .map(|i| {
                if specials.contains(&i) {
                    return 0;
                }
                match inner.id_to_token(i) {
                    Some(t) if t.chars().all(is_byte_level_char) => t.chars().count(),
                    Some(t) => t.replace('\u{2581}', " ").len(),
                    None => 0,
                }
            })
            .collect();
        Ok(Self {
            inner,
            eos,
            pad,
            bytes,
            sha256,
        })
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl Tokenizer for HfTokenizer {
    fn encode_with_offsets(&self, text: &str) -> (Vec<u32>, Vec<(usize, usize)>) {
        match self.inner.encode(text, false) {
            Ok(enc) => (enc.get_ids().to_vec(), enc.get_offsets().to_vec()),
            // `tokenizers` fails only on internal errors for plain text input.
            Err(_) => (Vec::new(), Vec::new()),
        }
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    fn eos_id(&self) -> u32 {
        self.eos
    }

    fn pad_id(&self) -> u32 {
        self.pad
    }

    fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn token_bytes(&self, id: u32) -> usize {
        self.bytes.get(id as usize).copied().unwrap_or(0)
    }

    fn identity(&self) -> String {
        format!("hf-{}-eos{}-pad{}", self.sha256, self.eos, self.pad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_with_specials() {
        let t = ByteTokenizer;
        let mut ids = t.encode("héllo");
        assert_eq!(ids.len(), 6, "é is two UTF-8 bytes");
        ids.push(t.eos_id());
        assert_eq!(t.decode(&ids), "héllo<|endoftext|>");
        assert_eq!(t.token_bytes(t.eos_id()), 0);
        assert_eq!(t.token_bytes(104), 1);
    }

    #[test]
    fn byte_tokenizer_recognizes_special_tokens_in_text() {
        let t = ByteTokenizer;
        let (ids, offsets) = t.encode_with_offsets("<|im_start|>a<|im_end|><b");
        assert_eq!(ids, vec![258, 97, 259, 60, 98]);
        assert_eq!(
            offsets,
            vec![(0, 12), (12, 13), (13, 23), (23, 24), (24, 25)]
        );
    }
}
