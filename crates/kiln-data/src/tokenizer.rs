//! Tokenizers. The byte tokenizer needs no file: ids 0..=255 are the UTF-8 bytes, and a
//! few special tokens follow.

/// What the data pipeline needs from a tokenizer.
pub trait Tokenizer: Send + Sync {
    /// Ids of a text (no special tokens added).
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Text of ids; special tokens render as their names, invalid UTF-8 as U+FFFD.
    fn decode(&self, ids: &[u32]) -> String;
    /// Number of ids the model must be able to embed.
    fn vocab_size(&self) -> usize;
    /// The end-of-text id appended to every document.
    fn eos_id(&self) -> u32;
    /// The id used to pad short windows (never trained on).
    fn pad_id(&self) -> u32;
    /// How many bytes of text an id stands for (0 for special tokens); used for bits/byte.
    fn token_bytes(&self, id: u32) -> usize;
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
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
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

    fn token_bytes(&self, id: u32) -> usize {
        usize::from(id < 256)
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
}
