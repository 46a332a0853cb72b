//! Training a Qwen2-style byte-level BPE tokenizer (`kiln tokenizer train`).
//!
//! The tokenizer splits text with Qwen2's pre-tokenizer pattern (contractions, letters,
//! single digits, punctuation runs, newlines, spaces), maps bytes to GPT-2's byte-level
//! alphabet, and learns merges with the `tokenizers` crate's BPE trainer. Its special
//! tokens are the ChatML ones, so chat data tokenizes as Qwen's does.

use std::path::Path;

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior};

use crate::DataError;

/// Qwen2's pre-tokenizer split pattern (from its `tokenizer.json`).
pub const QWEN2_SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special tokens of trained tokenizers, in id order from 0.
pub const CHATML_SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Trains a byte-level BPE tokenizer of `vocab_size` ids on `texts` and writes it to `out`.
pub fn train_bpe<I, S>(
    texts: I,
    vocab_size: usize,
    out: &Path,
) -> Result<tokenizers::Tokenizer, DataError>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let err = |message: String| DataError::Tokenizer {
        path: out.to_path_buf(),
        message,
    };
    let alphabet_size = ByteLevel::alphabet().len() + CHATML_SPECIAL_TOKENS.len();
    if vocab_size <= alphabet_size {
        return Err(err(format!(
            "--vocab-size {vocab_size} leaves no room for merges: the byte alphabet and special tokens take {alphabet_size}"
        )));
    }
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT_PATTERN.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| err(format!("pre-tokenizer: {e}")))?;
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ]);
    let mut tokenizer = tokenizers::Tokenizer::new(ModelWrapper::BPE(BPE::default()));
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre)));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    ))));
    let specials: Vec<AddedToken> = CHATML_SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| err(format!("training failed: {e}")))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
    }
    tokenizer
        .save(out, true)
        .map_err(|e| err(format!("cannot write: {e}")))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HfTokenizer, Tokenizer};

    #[test]
    fn trained_tokenizer_round_trips_and_keeps_chatml_tokens_whole() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tokenizer.json");
        let texts = [
            "the kiln fires the clay",
            "the clay cools in the kiln",
            "fire, clay and glaze",
        ];
        train_bpe(texts.iter().cycle().take(60), 300, &out).unwrap();
        let tok = HfTokenizer::from_path(&out, None, None).unwrap();
        // A corpus this small runs out of merges before 300 ids.
        assert!(
            tok.vocab_size() > 259 && tok.vocab_size() <= 300,
            "{}",
            tok.vocab_size()
        );
        let text = "<|im_start|>user\nthe kiln glows, naïvely<|im_end|>";
        let ids = tok.encode(text);
        assert_eq!(tok.decode(&ids), text);
        assert_eq!(ids[0], tok.token_id("<|im_start|>").unwrap());
        assert!(ids.len() < text.len(), "merges shorten the sequence");
        assert_eq!(tok.eos_id(), 0);
        assert_eq!(tok.token_bytes(tok.eos_id()), 0);
        let err = train_bpe(texts.iter(), 100, &out).unwrap_err().to_string();
        assert!(err.contains("leaves no room for merges"), "{err}");
    }
}
