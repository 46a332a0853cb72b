//! Attention of every query over its own list of keys, on the host, without materializing
//! the gathered keys and values (the chunk-token memory's inner loop, see
//! [`crate::KilnBackend::kiln_gather_attention`]).
//!
//! For row `r` (a batch-and-head pair) and query `i`: `s_j = scale * q_i . k[idx_ij] +
//! bias_ij`, `p = softmax(s)`, `out_i = sum_j p_j v[idx_ij]`. The backward pass recomputes
//! `p`: `dp_j = dO_i . v[idx_ij]`, `ds_j = p_j (dp_j - sum_l p_l dp_l)`,
//! `dq_i = scale * sum_j ds_j k[idx_ij]`, `dk[idx_ij] += scale * ds_j q_i`,
//! `dv[idx_ij] += p_j dO_i`. Work and memory are proportional to the number of indices, never
//! to `queries x keys`. Rows are independent and split across threads.

use crate::parallel::for_rows;

/// Sizes: `rows` batch-and-head pairs, `queries` and `keys` per row, `width` per head,
/// `reads` indices per query.
#[derive(Debug, Clone, Copy)]
pub struct GatherDims {
    /// Batch-and-head pairs.
    pub rows: usize,
    /// Queries per row.
    pub queries: usize,
    /// Keys per row.
    pub keys: usize,
    /// Head width.
    pub width: usize,
    /// Keys read per query.
    pub reads: usize,
}

/// The probabilities of query `i` of row `r` into `p` (length `reads`).
#[allow(clippy::too_many_arguments)]
fn probabilities(
    q: &[f32],
    k: &[f32],
    idx: &[i64],
    bias: &[f32],
    d: GatherDims,
    r: usize,
    i: usize,
    scale: f32,
    p: &mut [f32],
) {
    let e = d.width;
    let qi = &q[(r * d.queries + i) * e..][..e];
    let base = (r * d.queries + i) * d.reads;
    let mut max = f32::NEG_INFINITY;
    for j in 0..d.reads {
        let key = idx[base + j] as usize;
        let kj = &k[(r * d.keys + key) * e..][..e];
        let s = scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() + bias[base + j];
        p[j] = s;
        max = max.max(s);
    }
    let mut total = 0.0f32;
    for x in p.iter_mut() {
        *x = (*x - max).exp();
        total += *x;
    }
    for x in p.iter_mut() {
        *x /= total;
    }
}

/// The forward pass: `[rows, queries, width]`.
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    idx: &[i64],
    bias: &[f32],
    d: GatherDims,
    scale: f32,
) -> Vec<f32> {
    let e = d.width;
    let mut out = vec![0.0f32; d.rows * d.queries * e];
    for_rows(&mut out, d.queries * e, |r, out| {
        let mut p = vec![0.0f32; d.reads];
        for i in 0..d.queries {
            probabilities(q, k, idx, bias, d, r, i, scale, &mut p);
            let o = &mut out[i * e..][..e];
            let base = (r * d.queries + i) * d.reads;
            for (j, pj) in p.iter().enumerate() {
                let key = idx[base + j] as usize;
                let vj = &v[(r * d.keys + key) * e..][..e];
                for (x, y) in o.iter_mut().zip(vj) {
                    *x += pj * y;
                }
            }
        }
    });
    out
}

/// The backward pass: gradients of q, k and v (each the shape of its input).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    idx: &[i64],
    bias: &[f32],
    d_out: &[f32],
    d: GatherDims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let e = d.width;
    // One row's gradients side by side: dq [queries, e], dk [keys, e], dv [keys, e].
    let per_row = (d.queries + 2 * d.keys) * e;
    let mut grads = vec![0.0f32; d.rows * per_row];
    for_rows(&mut grads, per_row, |r, g| {
        let (dq, rest) = g.split_at_mut(d.queries * e);
        let (dk, dv) = rest.split_at_mut(d.keys * e);
        let mut p = vec![0.0f32; d.reads];
        let mut dp = vec![0.0f32; d.reads];
        for i in 0..d.queries {
            probabilities(q, k, idx, bias, d, r, i, scale, &mut p);
            let row = r * d.queries + i;
            let doi = &d_out[row * e..][..e];
            let qi = &q[row * e..][..e];
            let base = row * d.reads;
            let mut dot = 0.0f32;
            for j in 0..d.reads {
                let key = idx[base + j] as usize;
                let vj = &v[(r * d.keys + key) * e..][..e];
                dp[j] = doi.iter().zip(vj).map(|(a, b)| a * b).sum::<f32>();
                dot += p[j] * dp[j];
            }
            let dqi = &mut dq[i * e..][..e];
            for j in 0..d.reads {
                let key = idx[base + j] as usize;
                let ds = p[j] * (dp[j] - dot) * scale;
                let kj = &k[(r * d.keys + key) * e..][..e];
                for (x, y) in dqi.iter_mut().zip(kj) {
                    *x += ds * y;
                }
                for (x, y) in dk[key * e..][..e].iter_mut().zip(qi) {
                    *x += ds * y;
                }
                for (x, y) in dv[key * e..][..e].iter_mut().zip(doi) {
                    *x += p[j] * y;
                }
            }
        }
    });
    let (mut dq, mut dk, mut dv) = (
        Vec::with_capacity(d.rows * d.queries * e),
        Vec::with_capacity(d.rows * d.keys * e),
        Vec::with_capacity(d.rows * d.keys * e),
    );
    for g in grads.chunks(per_row) {
        dq.extend_from_slice(&g[..d.queries * e]);
        dk.extend_from_slice(&g[d.queries * e..(d.queries + d.keys) * e]);
        dv.extend_from_slice(&g[(d.queries + d.keys) * e..]);
    }
    (dq, dk, dv)
}
