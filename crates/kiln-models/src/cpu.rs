//! Host kernels behind kiln's operations on Burn's CPU backend (Flex).
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
//!
//! Vector code is compiled three times, for AVX-512, AVX2 with FMA and the baseline target,
//! and picked at run time ([`multiversion!`]), so one binary uses the widest unit the CPU
//! has.

use rayon::prelude::*;

/// Query rows per block of the attention kernels: the block's scores (`BLOCK x keys`
/// floats, 64 KiB at 256 keys) stay in the core's cache between the two matmuls.
const BLOCK: usize = 64;

/// Defines `fn $name` whose body is compiled for AVX-512, for AVX2 + FMA and for the
/// baseline target, and dispatches on what the CPU has. Helpers the body calls must be
/// `#[inline(always)]` to be compiled with the same features.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features the function is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use multiversion;

/// Lanes of the partial sums and maxima: wide enough for one AVX-512 register, and a
/// shape the compiler turns into vector code at any width.
const LANES: usize = 16;

/// `e^x` to within 2 ulp (Cephes' `expf` polynomial), written so that a loop over it
/// vectorizes; 0 below `-87.3`, where `e^x` leaves the normal floats.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.722_83;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let c = x.clamp(LO, HI);
    let n = (c * LOG2_E + ROUND) - ROUND;
    let r = c - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n + 127 is an integer in [0, 255]: added to 2^23 it lands in the low mantissa bits,
    // and shifting those into the exponent field makes 2^n.
    let scale = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    if x < LO { 0.0 } else { e * scale }
}

/// The largest value of `xs` (`-inf` when empty).
#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let m = tail.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    acc.iter().fold(m, |m, &x| m.max(x))
}

/// `sum(a ⊙ b)`.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

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

multiversion! {
    /// `log(sum(exp(row)))`, shifted by the row's maximum.
    fn logsumexp(row: &[f32]) -> f32 {
        let m = max(row);
        if m == f32::NEG_INFINITY {
            return m;
        }
        let mut acc = [0.0f32; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().map(|&x| exp(x - m)).sum();
        for c in chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += exp(x - m);
            }
        }
        m + (acc.iter().sum::<f32>() + tail).ln()
    }
}

multiversion! {
    /// `out = exp(row - lse) · d`: the softmax of a row whose log-sum-exp is `lse`, scaled.
    fn scaled_softmax(row: &[f32], lse: f32, d: f32, out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o = exp(x - lse) * d;
        }
    }
}

/// Checks a target id against the vocabulary, naming the row.
fn target_index(targets: &[i64], row: usize, vocab: usize) -> usize {
    let t = targets[row];
    usize::try_from(t)
        .ok()
        .filter(|&t| t < vocab)
        .unwrap_or_else(|| panic!("target {t} of row {row} is outside the vocabulary of {vocab}"))
}

/// Per-row cross-entropy `logsumexp(logits_r) - logits_r[target_r]` for row-major
/// `logits: [rows, vocab]`; rows are spread over the cores.
pub fn cross_entropy(logits: &[f32], targets: &[i64], vocab: usize) -> Vec<f32> {
    logits
        .par_chunks(vocab)
        .enumerate()
        .map(|(r, row)| logsumexp(row) - row[target_index(targets, r, vocab)])
        .collect()
}

/// The gradient of [`cross_entropy`] with respect to the logits, given the gradient
/// `d_loss` of each row's loss: `(softmax(logits_r) - onehot(target_r)) · d_loss_r`.
pub fn cross_entropy_backward(
    logits: &[f32],
    targets: &[i64],
    d_loss: &[f32],
    vocab: usize,
) -> Vec<f32> {
    let mut grad = vec![0.0f32; logits.len()];
    grad.par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .enumerate()
        .for_each(|(r, (g, row))| {
            let d = d_loss[r];
            scaled_softmax(row, logsumexp(row), d, g);
            g[target_index(targets, r, vocab)] -= d;
        });
    grad
}

/// Elements per task of the element-wise kernels: large enough that splitting costs
/// little, small enough to spread a layer's activations over the cores.
const CHUNK: usize = 1 << 15;

/// `1 / (1 + e^-x)`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

multiversion! {
    /// `out = silu(gate) ⊙ up`.
    fn swiglu_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    }
}

multiversion! {
    /// The gradients of [`swiglu_chunk`] given the output's gradient `d`, into `d_gate`
    /// and `d_up`.
    fn swiglu_backward_chunk(
        gate: &[f32],
        up: &[f32],
        d: &[f32],
        d_gate: &mut [f32],
        d_up: &mut [f32],
    ) {
        for ((((dg, du), &g), &u), &d) in d_gate.iter_mut().zip(d_up.iter_mut()).zip(gate).zip(up).zip(d) {
            let s = sigmoid(g);
            *du = d * g * s;
            *dg = d * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

/// SwiGLU's gate, `silu(gate) ⊙ up`, over equal-length slices.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; gate.len()];
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| swiglu_chunk(g, u, o));
    out
}

/// The gradients `(d_gate, d_up)` of [`swiglu`] given the output's gradient `d_out`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], d_out: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut d_gate = vec![0.0f32; gate.len()];
    let mut d_up = vec![0.0f32; gate.len()];
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .zip(d_out.par_chunks(CHUNK))
        .for_each(|(((dg, du), (g, u)), d)| swiglu_backward_chunk(g, u, d, dg, du));
    (d_gate, d_up)
}

/// A dropout mask of `n` values: `1 / keep` with probability `keep`, else 0. Value `i`
/// comes from a hash of `seed` and `i` (SplitMix64's output function of the counter), so
/// the mask depends on the seed alone, not on how the work is split over threads.
pub fn dropout_mask(n: usize, keep: f64, seed: u64) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    let scale = (1.0 / keep) as f32;
    // Keep a value when its 32-bit draw is below keep · 2³² (every value at keep = 1).
    let threshold = (keep * 4_294_967_296.0).min(4_294_967_296.0) as u64;
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let start = (c * CHUNK) as u64;
            for (pair, values) in chunk.chunks_mut(2).enumerate() {
                let h =
                    mix64(seed.wrapping_add((start / 2 + pair as u64 + 1).wrapping_mul(GOLDEN)));
                for (k, v) in values.iter_mut().enumerate() {
                    let draw = (h >> (32 * k)) & 0xffff_ffff;
                    *v = if draw < threshold { scale } else { 0.0 };
                }
            }
        });
    out
}

/// SplitMix64's increment (2⁶⁴ / φ).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `x ⊙ s` row by row: row `r` of `x` (`x.len() / s.len()` values) times `s[r]`.
pub fn scale_rows(x: &[f32], s: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    if x.is_empty() {
        return out;
    }
    let width = x.len() / s.len();
    let rows = (CHUNK / width).max(1);
    out.par_chunks_mut(rows * width)
        .zip(x.par_chunks(rows * width).zip(s.par_chunks(rows)))
        .for_each(|(o, (x, s))| scale_rows_chunk(x, s, width, o));
    out
}

/// The gradients `(dx, ds)` of [`scale_rows`] given the output's gradient `d`: `d ⊙ s`
/// and each row's `d · x`.
pub fn scale_rows_backward(x: &[f32], s: &[f32], d: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let dx = scale_rows(d, s);
    let mut ds = vec![0.0f32; s.len()];
    if !x.is_empty() {
        let width = x.len() / s.len();
        let rows = (CHUNK / width).max(1);
        ds.par_chunks_mut(rows)
            .zip(x.par_chunks(rows * width).zip(d.par_chunks(rows * width)))
            .for_each(|(ds, (x, d))| row_dots(x, d, width, ds));
    }
    (dx, ds)
}

multiversion! {
    /// `out` = each `width`-wide row of `x` times its entry of `s`.
    fn scale_rows_chunk(x: &[f32], s: &[f32], width: usize, out: &mut [f32]) {
        for ((o, x), &s) in out.chunks_mut(width).zip(x.chunks(width)).zip(s) {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = x * s;
            }
        }
    }
}

multiversion! {
    /// `out[r]` = row `r` of `a` · row `r` of `b`, rows `width` wide.
    fn row_dots(a: &[f32], b: &[f32], width: usize, out: &mut [f32]) {
        for ((o, a), b) in out.iter_mut().zip(a.chunks(width)).zip(b.chunks(width)) {
            *o = dot(a, b);
        }
    }
}

multiversion! {
    /// Rotary embedding of the heads of one position, `x: [heads, dim]`, with that
    /// position's `cos` and `sin` rows (`[dim]`): `x ⊙ cos + rotate_half(x) ⊙ sin`, where
    /// `rotate_half([x1, x2]) = [-x2, x1]`. With `inverse`, the transpose (the backward):
    /// `x ⊙ cos + rotate_halfᵀ(x ⊙ sin)`, `rotate_halfᵀ([y1, y2]) = [y2, -y1]`.
    fn rope_position(x: &[f32], cos: &[f32], sin: &[f32], inverse: bool, out: &mut [f32]) {
        let half = cos.len() / 2;
        let (c1, c2) = cos.split_at(half);
        let (s1, s2) = sin.split_at(half);
        for (x, o) in x.chunks_exact(cos.len()).zip(out.chunks_exact_mut(cos.len())) {
            let (x1, x2) = x.split_at(half);
            let (o1, o2) = o.split_at_mut(half);
            if inverse {
                for i in 0..half {
                    o1[i] = x1[i] * c1[i] + x2[i] * s2[i];
                    o2[i] = x2[i] * c2[i] - x1[i] * s1[i];
                }
            } else {
                for i in 0..half {
                    o1[i] = x1[i] * c1[i] - x2[i] * s1[i];
                    o2[i] = x2[i] * c2[i] + x1[i] * s2[i];
                }
            }
        }
    }
}

/// Rotary embedding of `x: [batch, seq, heads, dim]` with tables `cos, sin: [seq, dim]`
/// (see [`rope_position`]); `inverse` applies the transpose, which is the backward.
pub fn rope(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    [seq, heads, dim]: [usize; 3],
    inverse: bool,
) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let row = heads * dim;
    // Positions per task: a few thousand elements each.
    let per_task = (CHUNK / 8 / row.max(1)).max(1);
    out.par_chunks_mut(row * per_task)
        .zip(x.par_chunks(row * per_task))
        .enumerate()
        .for_each(|(task, (o, x))| {
            for (j, (o, x)) in o.chunks_exact_mut(row).zip(x.chunks_exact(row)).enumerate() {
                let t = (task * per_task + j) % seq;
                let (c, s) = (&cos[t * dim..][..dim], &sin[t * dim..][..dim]);
                rope_position(x, c, s, inverse, o);
            }
        });
    out
}

multiversion! {
    /// `acc += x ⊙ w` over equal-length slices.
    fn fma_into(acc: &mut [f32], x: &[f32], w: &[f32]) {
        for ((a, &x), &w) in acc.iter_mut().zip(x).zip(w) {
            *a += x * w;
        }
    }
}

/// Causal depthwise convolution of `x: [batch, seq, channels]` with `w: [channels,
/// kernel]` (tap `kernel - 1` on the current token): `out[b, t, c] = sum_j w[c, j] ·
/// x[b, t - kernel + 1 + j, c]`, zero before the start. Batch rows go to the cores.
pub fn causal_depthwise(x: &[f32], w: &[f32], [seq, channels, kernel]: [usize; 3]) -> Vec<f32> {
    let taps = transpose_taps(w, channels, kernel);
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(seq * channels)
        .zip(x.par_chunks(seq * channels))
        .for_each(|(o, x)| {
            for t in 0..seq {
                let row = &mut o[t * channels..][..channels];
                for (j, tap) in taps.chunks_exact(channels).enumerate() {
                    // Input position t - (kernel - 1) + j.
                    if let Some(src) = (t + j).checked_sub(kernel - 1) {
                        fma_into(row, &x[src * channels..][..channels], tap);
                    }
                }
            }
        });
    out
}

/// The gradients `(dx, dw)` of [`causal_depthwise`] given the output's gradient.
pub fn causal_depthwise_backward(
    x: &[f32],
    w: &[f32],
    d_out: &[f32],
    [seq, channels, kernel]: [usize; 3],
) -> (Vec<f32>, Vec<f32>) {
    let taps = transpose_taps(w, channels, kernel);
    let mut dx = vec![0.0f32; x.len()];
    // Each batch row's weight gradient `[kernel, channels]`, summed after.
    let dw_rows: Vec<Vec<f32>> = dx
        .par_chunks_mut(seq * channels)
        .zip(
            x.par_chunks(seq * channels)
                .zip(d_out.par_chunks(seq * channels)),
        )
        .map(|(dx, (x, d))| {
            let mut dw = vec![0.0f32; kernel * channels];
            for t in 0..seq {
                let d_row = &d[t * channels..][..channels];
                for (j, (tap, dw_tap)) in taps
                    .chunks_exact(channels)
                    .zip(dw.chunks_exact_mut(channels))
                    .enumerate()
                {
                    if let Some(src) = (t + j).checked_sub(kernel - 1) {
                        fma_into(&mut dx[src * channels..][..channels], d_row, tap);
                        fma_into(dw_tap, d_row, &x[src * channels..][..channels]);
                    }
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0.0f32; channels * kernel];
    for row in &dw_rows {
        for (j, tap) in row.chunks_exact(channels).enumerate() {
            for (c, &g) in tap.iter().enumerate() {
                dw[c * kernel + j] += g;
            }
        }
    }
    (dx, dw)
}

multiversion! {
    /// RMSNorm of each `w.len()`-wide row of `x` into `out`: `x · r ⊙ w` with
    /// `r = 1 / sqrt(mean(x²) + eps)`.
    fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let d = w.len();
        for (x, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let r = 1.0 / (dot(x, x) / d as f32 + eps).sqrt();
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                *o = x * r * w;
            }
        }
    }
}

multiversion! {
    /// The backward of [`rms_norm_rows`] for rows of `x` with output gradients `d`: with
    /// `g = d ⊙ w`, `dx = r g - x r³ (g · x) / width` into `dx`, and `d ⊙ x r` added to
    /// `dw`.
    fn rms_norm_backward_rows(x: &[f32], w: &[f32], d: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32]) {
        let width = w.len();
        let mut g = vec![0.0f32; width];
        for ((x, d), dx) in x.chunks_exact(width).zip(d.chunks_exact(width)).zip(dx.chunks_exact_mut(width)) {
            let r = 1.0 / (dot(x, x) / width as f32 + eps).sqrt();
            for ((g, &d), &w) in g.iter_mut().zip(d).zip(w) {
                *g = d * w;
            }
            let c = r * r * r * dot(&g, x) / width as f32;
            for ((dx, &g), &x) in dx.iter_mut().zip(&g).zip(x) {
                *dx = r * g - x * c;
            }
            for ((dw, &d), &x) in dw.iter_mut().zip(d).zip(x) {
                *dw += d * x * r;
            }
        }
    }
}

/// Rows per task of the RMSNorm kernels: about [`CHUNK`] values.
fn norm_rows(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1) * width.max(1)
}

/// RMSNorm `x / sqrt(mean(x²) + eps) ⊙ w` over the rows of `x: [rows, w.len()]`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let task = norm_rows(w.len());
    out.par_chunks_mut(task)
        .zip(x.par_chunks(task))
        .for_each(|(o, x)| rms_norm_rows(x, w, eps, o));
    out
}

/// The gradients `(dx, dw)` of [`rms_norm`] given the output's gradient `d_out`; the
/// scale `r` of each row is recomputed rather than kept.
pub fn rms_norm_backward(x: &[f32], w: &[f32], d_out: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut dx = vec![0.0f32; x.len()];
    let task = norm_rows(w.len());
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(task)
        .zip(x.par_chunks(task).zip(d_out.par_chunks(task)))
        .map(|(dx, (x, d))| {
            let mut dw = vec![0.0f32; w.len()];
            rms_norm_backward_rows(x, w, d, eps, dx, &mut dw);
            dw
        })
        .collect();
    let mut dw = vec![0.0f32; w.len()];
    for p in &partial {
        for (a, &b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    (dx, dw)
}

/// `w: [channels, kernel]` as `[kernel, channels]`, so each tap's weights are contiguous.
fn transpose_taps(w: &[f32], channels: usize, kernel: usize) -> Vec<f32> {
    (0..kernel)
        .flat_map(|j| (0..channels).map(move |c| w[c * kernel + j]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_standard_library() {
        let mut worst = 0.0f32;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01 + 0.003;
            let (ours, std) = (exp(x), x.exp());
            worst = worst.max(((ours - std) / std).abs());
        }
        assert!(worst < 3e-7, "largest relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

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

    #[test]
    fn dropout_masks_keep_their_rate_and_depend_on_the_seed_alone() {
        // Crosses several parallel chunks, with an odd length (a lone last value).
        let n = 3 * CHUNK + 7;
        let mask = dropout_mask(n, 0.8, 42);
        assert!(
            mask.iter().all(|&v| v == 0.0 || v == 1.25),
            "values 0 or 1 / keep"
        );
        let kept = mask.iter().filter(|&&v| v > 0.0).count() as f64 / n as f64;
        assert!((kept - 0.8).abs() < 0.005, "kept {kept}");
        assert_eq!(mask, dropout_mask(n, 0.8, 42));
        let other = dropout_mask(n, 0.8, 43);
        let same = mask.iter().zip(&other).filter(|(a, b)| a == b).count() as f64 / n as f64;
        // Independent masks agree where both keep or both drop: 0.8² + 0.2² = 0.68.
        assert!((same - 0.68).abs() < 0.01, "agreement {same}");
        // Neighbouring values are not correlated (both halves of one hash are used).
        let both = mask.windows(2).filter(|w| w[0] > 0.0 && w[1] > 0.0).count() as f64;
        assert!((both / (n - 1) as f64 - 0.64).abs() < 0.01);
        assert!(dropout_mask(100, 1.0, 7).iter().all(|&v| v == 1.0));
        // A prefix is the mask of the shorter length: values do not depend on the length.
        assert_eq!(&mask[..CHUNK + 3], &dropout_mask(CHUNK + 3, 0.8, 42)[..]);
    }
}
