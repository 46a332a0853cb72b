//! Splitting host work over the machine's cores.

use std::ops::Range;

/// Runs `f` over consecutive ranges covering `0..len`, each a multiple of `align` long
/// except the last, one per core; returns the results in order.
pub fn in_parallel<T: Send>(
    len: usize,
    align: usize,
    f: impl Fn(Range<usize>) -> T + Sync,
) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Below a million items a thread costs more than it saves.
    if threads == 1 || len < 1 << 20 {
        return vec![f(0..len)];
    }
    let per = len.div_ceil(threads).div_ceil(align) * align;
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = (0..len)
            .step_by(per)
            .map(|start| scope.spawn(move || f(start..(start + per).min(len))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// [`in_parallel`] for pieces of one vector: their concatenation.
pub fn concat_parallel<T: Send + Clone>(
    len: usize,
    align: usize,
    f: impl Fn(Range<usize>) -> Vec<T> + Sync,
) -> Vec<T> {
    let mut pieces = in_parallel(len, align, f);
    if pieces.len() == 1 {
        return pieces.pop().unwrap_or_default();
    }
    pieces.concat()
}

/// Runs `f(row, out_slice_of_that_row)` for every row, split across the available cores.
pub fn for_rows<F>(out: &mut [f32], per_row: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rows = out.len() / per_row.max(1);
    let per_thread = rows.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (chunk_i, chunk) in out.chunks_mut(per_thread * per_row).enumerate() {
            let f = &f;
            scope.spawn(move || {
                for (j, row) in chunk.chunks_mut(per_row).enumerate() {
                    f(chunk_i * per_thread + j, row);
                }
            });
        }
    });
}
