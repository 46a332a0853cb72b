//! Chunk-memory attention on the host: every query attends over the key chunks it picked
//! and, causally, its own chunk (ConvGPT-v2's memory, see
//! [`crate::KilnBackend::kiln_chunk_attention`]).
//!
//! For batch `b`, head `h` and query `i`, the keys read are the chunks `picks[b, h, i, :]`
//! (chunk `c` holds positions `c * chunk .. (c + 1) * chunk`; a negative pick is none) and
//! then positions `chunk * (i / chunk) ..= i`. With `s_j = scale * q_i . k_j` and
//! `p = softmax(s)`, `out_i = sum_j p_j v_j`. The backward pass recomputes `p`:
//! `dp_j = dO_i . v_j`, `ds_j = p_j (dp_j - sum_l p_l dp_l)`, `dq_i = scale * sum_j ds_j k_j`,
//! `dk_j += scale * ds_j q_i`, `dv_j += p_j dO_i`.
//!
//! Work and memory are proportional to the keys read, never to `queries x keys`, and no
//! key index list is built: a query's keys are a few contiguous ranges. The keys (and, for
//! the backward, the values) of a batch-and-head pair are transposed once, so a query's
//! scores over a range are `width` vectorized multiply-adds of contiguous runs (one per
//! channel), and its weighted sums of value (and key) rows are one per key. q, k, v and the results are in the projections' `[batch, seq, heads, width]`
//! layout; pairs are spread over the cores.

use rayon::prelude::*;

use super::simd::{exp, multiversion};

/// Sizes of a chunk attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkDims {
    /// Batch rows.
    pub batch: usize,
    /// Positions (queries and keys).
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// Head width.
    pub width: usize,
    /// Chunks picked per query.
    pub picks: usize,
    /// Positions per chunk.
    pub chunk: usize,
}

/// The inputs: q, k, v `[batch, seq, heads, width]`, picks `[batch, heads, seq, picks]`.
#[derive(Debug, Clone, Copy)]
pub struct ChunkInputs<'a> {
    /// Queries.
    pub q: &'a [f32],
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// Picked chunk of every query (negative: none).
    pub picks: &'a [i64],
    /// Sizes.
    pub dims: ChunkDims,
    /// Score scale.
    pub scale: f32,
}

impl ChunkInputs<'_> {
    /// Checks the buffers against the sizes.
    fn check(&self) {
        let d = self.dims;
        let n = d.batch * d.seq * d.heads * d.width;
        assert!(
            self.q.len() == n && self.k.len() == n && self.v.len() == n,
            "chunk attention: q, k, v must hold {n} values ({d:?})"
        );
        assert_eq!(
            self.picks.len(),
            d.batch * d.heads * d.seq * d.picks,
            "chunk attention: picks ({d:?})"
        );
        assert!(d.chunk > 0, "chunk attention: chunk of 0 positions");
    }

    /// Row `i` of pair `(b, h)` of a `[batch, seq, heads, width]` buffer.
    #[inline(always)]
    fn row<'b>(&self, x: &'b [f32], (b, h): (usize, usize), i: usize) -> &'b [f32] {
        let d = self.dims;
        &x[((b * d.seq + i) * d.heads + h) * d.width..][..d.width]
    }

    /// Pair `(b, h)` of `x` transposed to `[width, seq]`.
    fn transposed(&self, x: &[f32], pair: (usize, usize)) -> Vec<f32> {
        let d = self.dims;
        let stride = d.seq;
        let mut out = vec![0.0f32; d.width * stride];
        for i in 0..d.seq {
            for (c, &value) in self.row(x, pair, i).iter().enumerate() {
                out[c * stride + i] = value;
            }
        }
        out
    }

    /// The key ranges `(start, len)` query `i` of pair `(b, h)` reads: its picked chunks in
    /// order, then its own chunk up to itself. Picks outside the sequence are skipped.
    fn ranges(&self, (b, h): (usize, usize), i: usize, out: &mut Vec<(usize, usize)>) {
        let d = self.dims;
        out.clear();
        let picks = &self.picks[((b * d.heads + h) * d.seq + i) * d.picks..][..d.picks];
        for &c in picks {
            let Ok(c) = usize::try_from(c) else { continue };
            let start = c * d.chunk;
            if start < d.seq {
                out.push((start, d.chunk.min(d.seq - start)));
            }
        }
        let own = i / d.chunk * d.chunk;
        out.push((own, i - own + 1));
    }
}

/// `s[j] = q . xt[.., start + j]` for `j < s.len()`, with `xt` a `[q.len(), stride]`
/// transposed buffer: one multiply-add of a contiguous run of `xt` per channel.
#[inline(always)]
fn scores(s: &mut [f32], q: &[f32], xt: &[f32], stride: usize, start: usize) {
    s.fill(0.0);
    let n = s.len();
    for (c, &a) in q.iter().enumerate() {
        let x = &xt[c * stride + start..][..n];
        for (s, &x) in s.iter_mut().zip(x) {
            *s += a * x;
        }
    }
}

/// `out += sum_j w[j] row(j)` over rows of `out.len()` values.
#[inline(always)]
fn weighted_rows<'x>(out: &mut [f32], w: &[f32], row: impl Fn(usize) -> &'x [f32]) {
    let n = out.len();
    for (j, &wj) in w.iter().enumerate() {
        let x = &row(j)[..n];
        for (o, &x) in out.iter_mut().zip(x) {
            *o += wj * x;
        }
    }
}

/// `softmax(scale * s)` in place (`scale > 0`, `s` not empty).
#[inline(always)]
fn softmax(s: &mut [f32], scale: f32) {
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) * scale;
    let mut total = 0.0f32;
    for x in s.iter_mut() {
        *x = exp(*x * scale - max);
        total += *x;
    }
    let inv = 1.0 / total;
    for x in s.iter_mut() {
        *x *= inv;
    }
}

/// Query `i`'s probabilities over its ranges into `p` (resized to the keys read).
#[inline(always)]
fn probabilities(
    a: &ChunkInputs<'_>,
    pair: (usize, usize),
    i: usize,
    kt: &[f32],
    ranges: &[(usize, usize)],
    p: &mut Vec<f32>,
) {
    let stride = a.dims.seq;
    p.resize(ranges.iter().map(|r| r.1).sum(), 0.0);
    let q = a.row(a.q, pair, i);
    let mut at = 0;
    for &(start, len) in ranges {
        scores(&mut p[at..at + len], q, kt, stride, start);
        at += len;
    }
    softmax(p, a.scale);
}

multiversion! {
    /// The output rows `[seq, width]` of pair `(b, h)`.
    fn forward_pair(a: &ChunkInputs<'_>, pair: (usize, usize)) -> Vec<f32> {
        let d = a.dims;
        let kt = a.transposed(a.k, pair);
        let mut out = vec![0.0f32; d.seq * d.width];
        let (mut ranges, mut p) = (Vec::new(), Vec::new());
        for i in 0..d.seq {
            a.ranges(pair, i, &mut ranges);
            probabilities(a, pair, i, &kt, &ranges, &mut p);
            let o = &mut out[i * d.width..][..d.width];
            let mut at = 0;
            for &(start, len) in &ranges {
                weighted_rows(o, &p[at..at + len], |j| a.row(a.v, pair, start + j));
                at += len;
            }
        }
        out
    }
}

multiversion! {
    /// The gradients `[seq, width]` of q, k and v of pair `(b, h)`.
    fn backward_pair(
        a: &ChunkInputs<'_>,
        d_out: &[f32],
        pair: (usize, usize),
    ) -> [Vec<f32>; 3] {
        let d = a.dims;
        let (e, stride) = (d.width, d.seq);
        let (kt, vt) = (a.transposed(a.k, pair), a.transposed(a.v, pair));
        let mut grads = [(); 3].map(|_| vec![0.0f32; d.seq * e]);
        let [dq, dk, dv] = &mut grads;
        let (mut ranges, mut p, mut ds) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..d.seq {
            a.ranges(pair, i, &mut ranges);
            probabilities(a, pair, i, &kt, &ranges, &mut p);
            let (qi, doi) = (a.row(a.q, pair, i), a.row(d_out, pair, i));
            // dp_j = dO_i . v_j, then ds_j = scale * p_j (dp_j - p . dp).
            ds.resize(p.len(), 0.0);
            let mut at = 0;
            for &(start, len) in &ranges {
                scores(&mut ds[at..at + len], doi, &vt, stride, start);
                at += len;
            }
            let dot: f32 = p.iter().zip(&ds).map(|(p, g)| p * g).sum();
            for (g, &pj) in ds.iter_mut().zip(&p) {
                *g = a.scale * pj * (*g - dot);
            }
            let dqi = &mut dq[i * e..][..e];
            let mut at = 0;
            for &(start, len) in &ranges {
                weighted_rows(dqi, &ds[at..at + len], |j| a.row(a.k, pair, start + j));
                for j in 0..len {
                    let key = (start + j) * e;
                    let (g, pj) = (ds[at + j], p[at + j]);
                    for (x, y) in dk[key..key + e].iter_mut().zip(qi) {
                        *x += g * y;
                    }
                    for (x, y) in dv[key..key + e].iter_mut().zip(doi) {
                        *x += pj * y;
                    }
                }
                at += len;
            }
        }
        grads
    }
}

/// Writes pair results `[seq, width]` (pairs in `(b, h)` order) into one
/// `[batch, seq, heads, width]` buffer.
fn interleave(d: ChunkDims, pairs: &[Vec<f32>]) -> Vec<f32> {
    let e = d.width;
    let mut out = vec![0.0f32; d.batch * d.seq * d.heads * e];
    for (pair, rows) in pairs.iter().enumerate() {
        let (b, h) = (pair / d.heads, pair % d.heads);
        for (i, row) in rows.chunks(e).enumerate() {
            out[((b * d.seq + i) * d.heads + h) * e..][..e].copy_from_slice(row);
        }
    }
    out
}

/// The attention output, `[batch, seq, heads, width]`.
pub fn forward(a: ChunkInputs<'_>) -> Vec<f32> {
    a.check();
    let d = a.dims;
    let pairs: Vec<Vec<f32>> = (0..d.batch * d.heads)
        .into_par_iter()
        .map(|p| forward_pair(&a, (p / d.heads, p % d.heads)))
        .collect();
    interleave(d, &pairs)
}

/// The gradients of q, k and v given the output's, each `[batch, seq, heads, width]`.
pub fn backward(a: ChunkInputs<'_>, d_out: &[f32]) -> [Vec<f32>; 3] {
    a.check();
    let d = a.dims;
    assert_eq!(d_out.len(), a.q.len(), "chunk attention: output gradient");
    let pairs: Vec<[Vec<f32>; 3]> = (0..d.batch * d.heads)
        .into_par_iter()
        .map(|p| backward_pair(&a, d_out, (p / d.heads, p % d.heads)))
        .collect();
    let mut parts: [Vec<Vec<f32>>; 3] = Default::default();
    for grads in pairs {
        for (part, g) in parts.iter_mut().zip(grads) {
            part.push(g);
        }
    }
    parts.map(|part| interleave(d, &part))
}
