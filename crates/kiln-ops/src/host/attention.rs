//! Attention on the host: `softmax(q kᵀ · scale + bias) v` and its recomputing backward
//! ([`crate::ops::attention`]).
//!
//! Written as tensor ops, attention on Flex spends most of its time outside its matmuls:
//! adding a `[1, 1, t, s]` mask to `[b, h, t, s]` scores walks them element by element
//! (Flex vectorizes only a broadcast of the last axis), its exponential is scalar, and each
//! step writes the whole `[t, s]` score matrix to memory and reads it back. The kernels here
//! work one block of query rows at a time in a cache-sized scratch: the two matmuls of the
//! block go to `gemm` (the matmul crate Flex itself uses), and the scale, mask, softmax and
//! its backward run in one vectorized pass over the block's rows. Batch and head pairs (and
//! blocks, in the forward) are spread over the cores with rayon. The heads are read in
//! place from the projections' `[b, t, heads, d]` layout and the results written back in
//! it, grouped-query heads share their key/value head without a copy, and a causal block
//! computes only the keys its last row sees.

use rayon::prelude::*;

use super::simd::{LANES, dot, exp, max, multiversion};

/// Query rows per block of the attention kernels: the block's scores (`BLOCK x keys`
/// floats, 64 KiB at 256 keys) stay in the core's cache between the two matmuls.
const BLOCK: usize = 64;

multiversion! {
    /// Turns each row of `scores` (`row_len` wide) into `softmax(row · scale + bias_row)`
    /// over its first `visible[r]` entries, in place, and zeroes the rest of the row. Row
    /// `r`'s bias is `bias[r * bias_stride..][..row_len]` (a stride of 0 shares one row),
    /// or none. A row whose every visible entry is `-inf` becomes all zeros.
    fn softmax_rows(
        scores: &mut [f32],
        row_len: usize,
        visible: &[usize],
        scale: f32,
        bias: Option<&[f32]>,
        bias_stride: usize,
    ) {
        for ((r, row), &vis) in scores.chunks_exact_mut(row_len).enumerate().zip(visible) {
            let (row, hidden) = row.split_at_mut(vis.min(row_len));
            hidden.fill(0.0);
            match bias {
                Some(b) => {
                    let b = &b[r * bias_stride..][..row.len()];
                    for (s, &b) in row.iter_mut().zip(b) {
                        *s = *s * scale + b;
                    }
                }
                None => row.iter_mut().for_each(|s| *s *= scale),
            }
            let m = max(row);
            if m == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let mut acc = [0.0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for (a, s) in acc.iter_mut().zip(c.iter_mut()) {
                    *s = exp(*s - m);
                    *a += *s;
                }
            }
            let mut sum: f32 = acc.iter().sum();
            for s in chunks.into_remainder() {
                *s = exp(*s - m);
                sum += *s;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|s| *s *= inv);
        }
    }
}

multiversion! {
    /// The softmax backward, scaled, in place: each row of `dp` becomes
    /// `scale · p ⊙ (dp − sum(dp ⊙ p))`.
    fn softmax_backward_rows(dp: &mut [f32], p: &[f32], row_len: usize, scale: f32) {
        for (d, p) in dp.chunks_exact_mut(row_len).zip(p.chunks_exact(row_len)) {
            let row = dot(d, p);
            for (d, &p) in d.iter_mut().zip(p) {
                *d = scale * p * (*d - row);
            }
        }
    }
}

/// A 4-axis f32 operand read in place, in whatever layout it has: element `[i, j, r, c]`
/// is `data[offset + i·s0 + j·s1 + r·s2 + c·s3]`. Attention takes its heads as views
/// (`[b, t, h, d]` projections seen as `[b, h, t, d]`), so nothing is copied into a
/// head-major layout first.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a> {
    data: &'a [f32],
    offset: usize,
    strides: [usize; 4],
}

impl<'a> Strided<'a> {
    /// The operand of `shape` at `offset` with `strides` in `data`; `None` when a stride is
    /// negative, an axis is empty, or an index of `shape` would fall outside `data`.
    pub fn new(
        data: &'a [f32],
        offset: usize,
        shape: [usize; 4],
        strides: [isize; 4],
    ) -> Option<Self> {
        let mut last = offset;
        let mut st = [0usize; 4];
        for i in 0..4 {
            st[i] = usize::try_from(strides[i]).ok()?;
            last = last.checked_add(shape[i].checked_sub(1)?.checked_mul(st[i])?)?;
        }
        (last < data.len()).then_some(Self {
            data,
            offset,
            strides: st,
        })
    }

    /// A row-major operand of `shape` filling `data`.
    pub fn contiguous(data: &'a [f32], shape: [usize; 4]) -> Self {
        assert_eq!(
            data.len(),
            shape.iter().product::<usize>(),
            "shape {shape:?}"
        );
        let [_, a, b, c] = shape;
        Self {
            data,
            offset: 0,
            strides: [a * b * c, b * c, c, 1],
        }
    }

    /// Pointer to element `[i, j, r, 0]`, with the row and column strides of the matrix
    /// `[r.., ..]` there.
    fn matrix(&self, i: usize, j: usize, r: usize) -> (*const f32, usize, usize) {
        let [s0, s1, s2, s3] = self.strides;
        let at = self.offset + i * s0 + j * s1 + r * s2;
        (self.data[at..].as_ptr(), s2, s3)
    }

    /// The same matrix transposed: rows become columns.
    fn matrix_t(&self, i: usize, j: usize, r: usize) -> (*const f32, usize, usize) {
        let (ptr, rs, cs) = self.matrix(i, j, r);
        (ptr, cs, rs)
    }
}

/// Shapes of an attention call: `q: [batch, heads, queries, dk]`, `k: [batch, kv_heads,
/// keys, dk]`, `v: [batch, kv_heads, keys, dv]`, query head `i` reading key/value head
/// `i / (heads / kv_heads)`, and a bias of `[bias_batch, bias_heads, bias_queries, keys]`
/// broadcast over the axes where it has 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    /// Batch size.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Query positions.
    pub queries: usize,
    /// Key positions.
    pub keys: usize,
    /// Width of a query and key head.
    pub dk: usize,
    /// Width of a value head.
    pub dv: usize,
    /// Batch rows of the bias (1 or `batch`).
    pub bias_batch: usize,
    /// Head rows of the bias (1 or `heads`).
    pub bias_heads: usize,
    /// Query rows of the bias (1 or `queries`).
    pub bias_queries: usize,
    /// Query `r` sees keys `0..=r + keys - queries` only (the queries are the last
    /// `queries` positions of the `keys`); the rest is neither computed nor read.
    pub causal: bool,
}

impl AttentionDims {
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// How many keys query `r` sees.
    fn visible(&self, r: usize) -> usize {
        if self.causal {
            (r + 1 + self.keys)
                .saturating_sub(self.queries)
                .min(self.keys)
        } else {
            self.keys
        }
    }

    /// The bias rows that batch `b`, head `h` and queries `rows` read, and their stride.
    fn bias_rows<'a>(
        &self,
        bias: Option<&'a [f32]>,
        (b, h): (usize, usize),
        rows: &std::ops::Range<usize>,
    ) -> (Option<&'a [f32]>, usize) {
        let (bb, hb) = (b % self.bias_batch, h % self.bias_heads);
        let first = if self.bias_queries == 1 {
            0
        } else {
            rows.start
        };
        let stride = if self.bias_queries == 1 { 0 } else { self.keys };
        let plane = (bb * self.bias_heads + hb) * self.bias_queries;
        (
            bias.map(|bias| &bias[(plane + first) * self.keys..]),
            stride,
        )
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]`, each operand given by its pointer and its row
/// and column strides (in elements); single-threaded (the callers split the work).
///
/// # Safety
/// Every element the strides reach must lie inside the operand's allocation, and `dst`
/// must not overlap the inputs or be written by another thread meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: guaranteed by the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The operands of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionInputs<'a> {
    /// `[batch, heads, queries, dk]`.
    pub q: Strided<'a>,
    /// `[batch, kv_heads, keys, dk]`.
    pub k: Strided<'a>,
    /// `[batch, kv_heads, keys, dv]`.
    pub v: Strided<'a>,
    /// Contiguous `[bias_batch, bias_heads, bias_queries, keys]`, added to the scores.
    pub bias: Option<&'a [f32]>,
    /// The shapes.
    pub dims: AttentionDims,
    /// Multiplies `q kᵀ` before the bias is added.
    pub scale: f32,
}

impl AttentionInputs<'_> {
    /// The probabilities of query head `h`'s rows `rows` in batch `b` over the keys the
    /// block's last row sees, into `p` (`rows.len() x` that many, row-major); returns how
    /// many keys that is.
    fn block_probabilities(
        &self,
        (b, h): (usize, usize),
        rows: std::ops::Range<usize>,
        p: &mut [f32],
    ) -> usize {
        let d = &self.dims;
        let n = rows.len();
        let kl = d.visible(rows.end - 1);
        let kv = h / d.group();
        // SAFETY: `Strided::new` checked that every index of q and k is inside their
        // data; p holds `n x kl` floats.
        unsafe {
            matmul(
                (n, kl, d.dk),
                p.as_mut_ptr(),
                kl,
                false,
                self.q.matrix(b, h, rows.start),
                self.k.matrix_t(b, kv, 0),
            );
        }
        let mut visible = [0usize; BLOCK];
        for (i, v) in visible[..n].iter_mut().enumerate() {
            *v = d.visible(rows.start + i);
        }
        let (bias, stride) = d.bias_rows(self.bias, (b, h), &rows);
        softmax_rows(
            &mut p[..n * kl],
            kl,
            &visible[..n],
            self.scale,
            bias,
            stride,
        );
        kl
    }
}

/// A pointer that tasks on other threads write through, each to rows no other task writes.
#[derive(Clone, Copy)]
struct SharedRows(*mut f32);

// SAFETY: the callers give each rayon task rows of the buffer no other task touches, and
// the buffer outlives the parallel loop.
unsafe impl Send for SharedRows {}
// SAFETY: as above.
unsafe impl Sync for SharedRows {}

impl SharedRows {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `softmax(q kᵀ · scale + bias) v` with the causal limit of `dims`, as a row-major
/// `[batch, queries, heads, dv]` buffer (the layout the output projection reads).
pub fn attention(a: AttentionInputs<'_>) -> Vec<f32> {
    let d = a.dims;
    let (t, s, h, dv) = (d.queries, d.keys, d.heads, d.dv);
    let mut out = vec![0.0f32; d.batch * t * h * dv];
    out.par_chunks_mut(t * h * dv)
        .enumerate()
        .flat_map(|(b, o)| {
            o.par_chunks_mut(BLOCK * h * dv)
                .enumerate()
                .map(move |(i, o)| (b, i, o))
        })
        .for_each_init(
            || vec![0.0f32; BLOCK * s],
            |p, (b, i, o)| {
                let rows = i * BLOCK..((i + 1) * BLOCK).min(t);
                let n = rows.len();
                for head in 0..h {
                    let kl = a.block_probabilities((b, head), rows.clone(), p);
                    // SAFETY: p is `n x kl`; v's rows are checked by `Strided::new`; `o`
                    // holds the block's `n` rows of `h x dv`, so head `head`'s `n x dv`
                    // values at row stride `h · dv` lie inside it.
                    unsafe {
                        matmul(
                            (n, dv, kl),
                            o[head * dv..].as_mut_ptr(),
                            h * dv,
                            false,
                            (p.as_ptr(), kl, 1),
                            a.v.matrix(b, head / d.group(), 0),
                        );
                    }
                }
            },
        );
    out
}

/// The gradients `(dq, dk, dv)` of [`attention`] given the output's gradient `d_out`
/// (`[batch, heads, queries, dv]`, any layout), recomputing each block's probabilities.
/// They come as row-major `[batch, queries, heads, dk]`, `[batch, keys, kv_heads, dk]`
/// and `[batch, keys, kv_heads, dv]` buffers: the layouts of the projections they flow
/// back into.
pub fn attention_backward(
    a: AttentionInputs<'_>,
    d_out: Strided<'_>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = a.dims;
    let (t, s, h, kvh, dk, dv) = (d.queries, d.keys, d.heads, d.kv_heads, d.dk, d.dv);
    let mut dq = vec![0.0f32; d.batch * t * h * dk];
    let mut dkey = vec![0.0f32; d.batch * s * kvh * dk];
    let mut dval = vec![0.0f32; d.batch * s * kvh * dv];
    let (dq_rows, dk_rows, dv_rows) = (
        SharedRows(dq.as_mut_ptr()),
        SharedRows(dkey.as_mut_ptr()),
        SharedRows(dval.as_mut_ptr()),
    );
    (0..d.batch * kvh).into_par_iter().for_each_init(
        || (vec![0.0f32; BLOCK * s], vec![0.0f32; BLOCK * s]),
        |(p, dp), task| {
            let (b, kv) = (task / kvh, task % kvh);
            // This task alone writes key/value head `kv` of batch `b` in dk and dv, and
            // the query heads of its group in dq.
            let dk_head = dk_rows.at((b * s * kvh + kv) * dk);
            let dv_head = dv_rows.at((b * s * kvh + kv) * dv);
            for head in kv * d.group()..(kv + 1) * d.group() {
                for r0 in (0..t).step_by(BLOCK) {
                    let rows = r0..(r0 + BLOCK).min(t);
                    let n = rows.len();
                    let kl = a.block_probabilities((b, head), rows, p);
                    if kl == 0 {
                        continue;
                    }
                    let dob = d_out.matrix(b, head, r0);
                    // SAFETY: p and dp hold `n x kl`; q, k, v and d_out are checked by
                    // `Strided::new`; dk_head and dv_head address `kl <= s` rows at stride
                    // `kvh · d` inside this task's head, dq's block `n` rows at stride
                    // `h · dk` of this task's query head, inside the buffers.
                    unsafe {
                        // dV += Pᵀ dO
                        matmul(
                            (kl, dv, n),
                            dv_head,
                            kvh * dv,
                            true,
                            (p.as_ptr(), 1, kl),
                            dob,
                        );
                        // dP = dO Vᵀ
                        matmul(
                            (n, kl, dv),
                            dp.as_mut_ptr(),
                            kl,
                            false,
                            dob,
                            a.v.matrix_t(b, kv, 0),
                        );
                    }
                    softmax_backward_rows(&mut dp[..n * kl], &p[..n * kl], kl, a.scale);
                    // SAFETY: as above; dp now holds dS · scale.
                    unsafe {
                        // dQ = dS K
                        matmul(
                            (n, dk, kl),
                            dq_rows.at(((b * t + r0) * h + head) * dk),
                            h * dk,
                            false,
                            (dp.as_ptr(), kl, 1),
                            a.k.matrix(b, kv, 0),
                        );
                        // dK += dSᵀ Q
                        matmul(
                            (kl, dk, n),
                            dk_head,
                            kvh * dk,
                            true,
                            (dp.as_ptr(), 1, kl),
                            a.q.matrix(b, head, r0),
                        );
                    }
                }
            }
        },
    );
    (dq, dkey, dval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_rows_match_a_scalar_softmax() {
        let row_len = 37; // not a multiple of the lane count
        let scores: Vec<f32> = (0..3 * row_len)
            .map(|i| ((i * 7) % 11) as f32 - 5.0)
            .collect();
        let mut bias: Vec<f32> = (0..3 * row_len).map(|i| (i % 3) as f32 * 0.5).collect();
        bias[row_len..2 * row_len].fill(f32::NEG_INFINITY);
        bias[row_len + 4] = 0.0;
        let mut ours = scores.clone();
        softmax_rows(&mut ours, row_len, &[row_len; 3], 0.3, Some(&bias), row_len);
        for r in 0..3 {
            let row: Vec<f64> = (0..row_len)
                .map(|j| f64::from(scores[r * row_len + j] * 0.3 + bias[r * row_len + j]))
                .collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row.iter().map(|x| (x - m).exp()).sum();
            for j in 0..row_len {
                let want = (row[j] - m).exp() / sum;
                let got = f64::from(ours[r * row_len + j]);
                assert!(
                    (got - want).abs() < 1e-6,
                    "row {r} col {j}: {got} vs {want}"
                );
            }
        }
        let mut masked = vec![1.0f32; row_len];
        softmax_rows(
            &mut masked,
            row_len,
            &[row_len],
            1.0,
            Some(&vec![f32::NEG_INFINITY; row_len]),
            0,
        );
        assert!(masked.iter().all(|&p| p == 0.0));
        // Entries past a row's visible count are zero, and the rest a softmax of their own.
        let mut causal = vec![1.0f32; 2 * row_len];
        softmax_rows(&mut causal, row_len, &[1, 5], 1.0, None, 0);
        assert_eq!(causal[0], 1.0);
        assert!(causal[1..row_len].iter().all(|&p| p == 0.0));
        assert!(
            causal[row_len..row_len + 5]
                .iter()
                .all(|&p| (p - 0.2).abs() < 1e-7)
        );
        assert!(causal[row_len + 5..].iter().all(|&p| p == 0.0));
    }
}
