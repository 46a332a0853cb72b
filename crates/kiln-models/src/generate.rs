//! Text generation from a [`Model`]: greedy decoding, or temperature and nucleus (top-p)
//! sampling, with each family's decoding step ([`crate::Family::decoder`]).
//!
//! With Qwen2's explicit KV cache the prompt runs in one forward call that fills the cache
//! and yields the first new token; every further token costs one call over that token alone
//! ([`Qwen2ForCausalLM::forward_cached`](crate::Qwen2ForCausalLM::forward_cached)). Families
//! without a cache (MoA, ConvGPT) run the whole sequence again at every step. Tokens
//! are chosen on the host, in f64, from the last position's logits, and the only source of
//! randomness is [`SplitMix64`] seeded from [`GenerateOptions::seed`]: a seed draws the same
//! random numbers on every backend, so samples differ between backends only where their
//! logits differ by float rounding.
//!
//! Greedy decoding picks the largest logit, ties going to the lowest id as `torch.argmax`
//! does, so it reproduces `transformers`' `generate(do_sample=False)` token for token (see
//! `tests/generate_parity.rs`). Sampling follows `transformers`' order: divide the logits by
//! the temperature, keep the smallest set of most likely tokens whose probability reaches
//! `top_p`, renormalize, draw.

use std::time::Instant;

use burn::prelude::*;

use kiln_recipe::rng::SplitMix64;

use crate::{KilnBackend, Model};

/// How to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// The most new tokens to produce.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token (greedy) and ignores `top_p` and
    /// `seed`.
    pub temperature: f64,
    /// Nucleus sampling: draw among the most likely tokens whose probabilities sum to at
    /// least `top_p`, in `(0, 1]`; 1 keeps every token.
    pub top_p: f64,
    /// Seed of the sampling generator.
    pub seed: u64,
    /// Tokens that end generation; the stop token is kept in the output.
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_ids: Vec::new(),
        }
    }
}

/// What [`generate`] produced, with its timings.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The new tokens only, the stop token included if one was hit.
    pub tokens: Vec<u32>,
    /// The stop token that ended generation, if any.
    pub stopped_on: Option<u32>,
    /// Tokens in the prompt.
    pub prompt_len: usize,
    /// Seconds of the prompt call, up to and including the choice of the first new token.
    pub prompt_time_s: f64,
    /// Seconds of the single-token calls that produced the other `tokens.len() - 1` tokens.
    pub decode_time_s: f64,
}

impl Generation {
    /// Prompt tokens processed per second.
    pub fn prompt_tokens_per_s(&self) -> f64 {
        self.prompt_len as f64 / self.prompt_time_s
    }

    /// New tokens per second after the first (which comes from the prompt call).
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_time_s
    }
}

/// Why [`generate`] refused to start.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// There is nothing to continue.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A prompt token is not in the model's vocabulary.
    #[error("prompt token `{id}` at position {pos} is outside the vocabulary of {vocab}")]
    TokenOutOfVocab {
        /// The token.
        id: u32,
        /// Its index in the prompt.
        pos: usize,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// The temperature is negative or not finite.
    #[error("temperature `{0}` must be finite and at least 0")]
    Temperature(f64),
    /// `top_p` is outside `(0, 1]`.
    #[error("top_p `{0}` must be in (0, 1]")]
    TopP(f64),
}

/// Continues `prompt` with up to `opts.max_new_tokens` tokens, stopping early after any of
/// `opts.stop_ids`.
///
/// Use a model on a backend without autodiff (`model.valid()`), or every step would be
/// recorded for a backward pass that never comes.
pub fn generate<B: KilnBackend>(
    model: &Model<B>,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let vocab = model.vocab_size();
    if let Some((pos, &id)) = prompt
        .iter()
        .enumerate()
        .find(|&(_, &id)| id as usize >= vocab)
    {
        return Err(GenerateError::TokenOutOfVocab { id, pos, vocab });
    }
    if !opts.temperature.is_finite() || opts.temperature < 0.0 {
        return Err(GenerateError::Temperature(opts.temperature));
    }
    if !(opts.top_p > 0.0 && opts.top_p <= 1.0) {
        return Err(GenerateError::TopP(opts.top_p));
    }
    let family = model.family();
    let device = family.embedding().weight.device();
    Ok(decode(prompt, opts, &device, family.decoder()))
}

/// A decoding step for a family without a cache: keeps every token seen and runs `forward`
/// over all of them, returning the new tokens' logits.
pub(crate) fn recompute<B: KilnBackend>(
    forward: impl Fn(Tensor<B, 2, Int>) -> Tensor<B, 3>,
) -> impl FnMut(Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let mut history: Vec<Tensor<B, 2, Int>> = Vec::new();
    move |ids| {
        let new = ids.dims()[1];
        history.push(ids);
        let all = Tensor::cat(history.clone(), 1);
        let t = all.dims()[1];
        forward(all).narrow(1, t - new, new)
    }
}

/// The decoding loop, whatever the family: `step` runs new tokens `[1, seq]` against the
/// family's cache and returns their logits `[1, seq, vocab]`.
fn decode<B: KilnBackend>(
    prompt: &[u32],
    opts: &GenerateOptions,
    device: &B::Device,
    mut step: impl FnMut(Tensor<B, 2, Int>) -> Tensor<B, 3>,
) -> Generation {
    let mut rng = SplitMix64::new(opts.seed);
    let mut out = Generation {
        tokens: Vec::with_capacity(opts.max_new_tokens),
        stopped_on: None,
        prompt_len: prompt.len(),
        prompt_time_s: 0.0,
        decode_time_s: 0.0,
    };
    let mut input = prompt.to_vec();
    let mut start = Instant::now();
    while out.tokens.len() < opts.max_new_tokens {
        let ids: Vec<i64> = input.iter().map(|&id| i64::from(id)).collect();
        let t = ids.len();
        let logits = step(Tensor::from_data(TensorData::new(ids, [1, t]), device)); // [1, t, vocab]
        let [_, _, v] = logits.dims();
        // Reading the values back also waits for the device, so the timings are honest.
        let last = logits
            .narrow(1, t - 1, 1)
            .reshape([v])
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("converted to f32");
        let next = if opts.temperature == 0.0 {
            argmax(&last)
        } else {
            let kept = nucleus(&last, opts.temperature, opts.top_p);
            draw(&kept, rng.next_f64())
        };
        if out.tokens.is_empty() {
            out.prompt_time_s = start.elapsed().as_secs_f64();
            start = Instant::now();
        }
        out.tokens.push(next);
        if opts.stop_ids.contains(&next) {
            out.stopped_on = Some(next);
            break;
        }
        input = vec![next];
    }
    if out.tokens.len() > 1 {
        out.decode_time_s = start.elapsed().as_secs_f64();
    }
    out
}

/// Index of the largest logit, ties going to the lowest index (as `torch.argmax`). NaN
/// never wins.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        // Strictly greater: an equal later logit does not replace an earlier one.
        if x > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// The sampling distribution: softmax of `logits / temperature`, cut to the most likely
/// tokens whose probability reaches `top_p`, renormalized.
///
/// Returns `(token, probability)`, most likely first (equal probabilities by increasing
/// id), probabilities summing to 1. A token is kept while the tokens ranked before it hold
/// less than `top_p` (`transformers`' `TopPLogitsWarper`), so the token that crosses
/// `top_p` is kept and the most likely one always is.
fn nucleus(logits: &[f32], temperature: f64, top_p: f64) -> Vec<(u32, f64)> {
    let max: f64 = logits
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
        .into();
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, ((f64::from(x) - max) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|(_, p)| p).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut before = 0.0;
    let mut kept = 0;
    for (_, p) in &probs {
        if kept > 0 && before >= top_p {
            break;
        }
        before += p / total;
        kept += 1;
    }
    probs.truncate(kept);
    // Tokens whose probability underflowed to 0 can never be drawn; dropping them also keeps
    // `draw`'s rounding fallback off them. The most likely token has weight exp(0) = 1.
    probs.retain(|&(_, p)| p > 0.0);
    let mass: f64 = probs.iter().map(|(_, p)| p).sum();
    for (_, p) in &mut probs {
        *p /= mass;
    }
    probs
}

/// The token whose cumulative probability interval holds `u`, for `u` uniform in `[0, 1)`.
fn draw(dist: &[(u32, f64)], u: f64) -> u32 {
    let mut cum = 0.0;
    for &(id, p) in dist {
        cum += p;
        if u < cum {
            return id;
        }
    }
    // Rounding can leave the sum a hair below 1.
    dist.last().expect("nucleus keeps at least one token").0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Init;
    use crate::qwen2::Qwen2Config;
    use burn::backend::NdArray;

    fn close(got: &[(u32, f64)], want: &[(u32, f64)]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                g.0 == w.0 && (g.1 - w.1).abs() < 1e-6,
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn argmax_breaks_ties_to_the_lowest_id() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[5.0, 5.0]), 0);
        assert_eq!(argmax(&[-2.0, -1.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.5]), 1);
    }

    #[test]
    fn top_p_keeps_the_tokens_that_reach_it() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 (logits are log-probabilities).
        let logits = [0.5f32, 0.125, 0.25, 0.125].map(f32::ln);
        // 0.4: the most likely token alone already reaches it.
        close(&nucleus(&logits, 1.0, 0.4), &[(0, 1.0)]);
        // 0.6: 0.5 falls short, 0.5 + 0.25 reaches it.
        close(
            &nucleus(&logits, 1.0, 0.6),
            &[(0, 2.0 / 3.0), (2, 1.0 / 3.0)],
        );
        // 0.8: 0.75 falls short; of the tied 0.125s the lower id comes first and reaches it.
        close(
            &nucleus(&logits, 1.0, 0.8),
            &[(0, 4.0 / 7.0), (2, 2.0 / 7.0), (1, 1.0 / 7.0)],
        );
        // 1: everything.
        close(
            &nucleus(&logits, 1.0, 1.0),
            &[(0, 0.5), (2, 0.25), (1, 0.125), (3, 0.125)],
        );
    }

    #[test]
    fn temperature_scales_logits_before_top_p() {
        // Logits 0 and ln 4: probabilities 1/5, 4/5 at temperature 1; 1/3, 2/3 at 2.
        let logits = [0.0f32, 4f32.ln()];
        close(&nucleus(&logits, 1.0, 1.0), &[(1, 0.8), (0, 0.2)]);
        close(
            &nucleus(&logits, 2.0, 1.0),
            &[(1, 2.0 / 3.0), (0, 1.0 / 3.0)],
        );
        close(&nucleus(&logits, 2.0, 0.6), &[(1, 1.0)]);
        // A token whose probability underflows to 0 is not kept, even with top_p 1.
        close(&nucleus(&[0.0, -1e4, 0.0], 1.0, 1.0), &[(0, 0.5), (2, 0.5)]);
    }

    #[test]
    fn draw_walks_the_cumulative_distribution() {
        let dist = [(7, 0.5), (2, 0.25), (9, 0.25)];
        assert_eq!(draw(&dist, 0.0), 7);
        assert_eq!(draw(&dist, 0.49), 7);
        assert_eq!(draw(&dist, 0.5), 2);
        assert_eq!(draw(&dist, 0.8), 9);
        assert_eq!(draw(&dist, 0.999_999), 9);
    }

    fn tiny() -> Model<NdArray> {
        let cfg = Qwen2Config {
            vocab_size: 29,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 1,
            max_position_embeddings: 64,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: true,
            initializer_range: 0.5,
        };
        Model::Qwen2(cfg.init(&Init::new(3), &Default::default()))
    }

    /// Greedy decoding with the cache picks what a full forward pass over the whole
    /// sequence so far picks, step after step.
    #[test]
    fn greedy_matches_recomputing_without_cache() {
        let model = tiny();
        let prompt = [4u32, 20, 7];
        let opts = GenerateOptions {
            max_new_tokens: 8,
            ..Default::default()
        };
        let got = generate(&model, &prompt, &opts).unwrap();
        assert_eq!(got.tokens.len(), 8);
        assert_eq!(got.stopped_on, None);
        let mut seq: Vec<u32> = prompt.to_vec();
        for _ in 0..8 {
            let ids: Vec<i64> = seq.iter().map(|&x| i64::from(x)).collect();
            let t = ids.len();
            let input = Tensor::from_data(TensorData::new(ids, [1, t]), &Default::default());
            let logits = model
                .forward(input)
                .logits
                .narrow(1, t - 1, 1)
                .reshape([29]);
            seq.push(argmax(&logits.into_data().into_vec::<f32>().unwrap()));
        }
        assert_eq!(got.tokens, seq[prompt.len()..]);
    }

    #[test]
    fn sampling_is_reproducible_and_stops() {
        let model = tiny();
        let opts = GenerateOptions {
            max_new_tokens: 12,
            temperature: 1.5,
            top_p: 0.9,
            seed: 42,
            stop_ids: Vec::new(),
        };
        let a = generate(&model, &[1, 2], &opts).unwrap();
        let b = generate(&model, &[1, 2], &opts).unwrap();
        assert_eq!(a.tokens, b.tokens);
        // Stopping on the third sampled token keeps it and nothing after.
        let stop = a.tokens[2];
        let first = a.tokens.iter().position(|&t| t == stop).unwrap();
        let stopped = generate(
            &model,
            &[1, 2],
            &GenerateOptions {
                stop_ids: vec![stop],
                ..opts.clone()
            },
        )
        .unwrap();
        assert_eq!(stopped.tokens, a.tokens[..=first]);
        assert_eq!(stopped.stopped_on, Some(stop));
        // A nucleus that keeps only the most likely token is greedy.
        let narrow = generate(
            &model,
            &[1, 2],
            &GenerateOptions {
                top_p: 1e-9,
                ..opts.clone()
            },
        )
        .unwrap();
        let greedy = generate(
            &model,
            &[1, 2],
            &GenerateOptions {
                temperature: 0.0,
                ..opts
            },
        )
        .unwrap();
        assert_eq!(narrow.tokens, greedy.tokens);
    }

    #[test]
    fn refuses_bad_inputs() {
        let model = tiny();
        let opts = GenerateOptions::default();
        let err = |prompt: &[u32], opts: &GenerateOptions| {
            generate(&model, prompt, opts).unwrap_err().to_string()
        };
        assert_eq!(err(&[], &opts), "the prompt is empty");
        assert_eq!(
            err(&[3, 29], &opts),
            "prompt token `29` at position 1 is outside the vocabulary of 29"
        );
        let hot = GenerateOptions {
            temperature: -1.0,
            ..opts.clone()
        };
        assert_eq!(
            err(&[3], &hot),
            "temperature `-1` must be finite and at least 0"
        );
        let wide = GenerateOptions { top_p: 0.0, ..opts };
        assert_eq!(err(&[3], &wide), "top_p `0` must be in (0, 1]");
    }
}
