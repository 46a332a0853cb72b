//! Cutting a source's token stream into training windows: `belt`, `pack` and `truncate`.
//!
//! A window of length `W` holds `W + 1` tokens: the model reads the first `W` and predicts
//! the last `W`. Every document ends with the end-of-text id. Short windows are padded on
//! the right; padded targets carry a zero loss mask, and with a causal model right padding
//! never changes the real positions' outputs.

use serde::{Deserialize, Serialize};

use kiln_recipe::Windowing;

/// Where a source stands: which pass over it, which document, which token of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCursor {
    /// Completed passes over the source.
    pub epoch: u64,
    /// Index of the current document among the source's training documents.
    pub document: usize,
    /// Token offset of the next window inside that document.
    pub offset: usize,
}

/// Running token counts of one source, kept in the cursor so resumed runs report the same.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCounts {
    /// Windows drawn.
    pub windows: u64,
    /// Target tokens trained on (loss mask 1).
    pub trained: u64,
    /// Tokens of documents that windowing dropped (`truncate` only).
    pub dropped: u64,
    /// Padding positions added to short windows.
    pub padded: u64,
    /// Overlap positions seen again as context but not trained twice (`belt` only).
    pub overlap: u64,
    /// Trained spans (assistant turns of chat documents; a whole plain document counts as
    /// one) that lost target tokens to windowing (`truncate` only).
    #[serde(default)]
    pub turns_cut: u64,
}

/// A tokenized document: ids (ending with end-of-text) and, for chat documents, which
/// tokens are trained on as targets (`None`: all of them).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Doc {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Per token: trained when it is a target.
    pub trained: Option<Vec<bool>>,
}

impl Doc {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the document has no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn trained_at(&self, i: usize) -> bool {
        self.trained.as_ref().is_none_or(|t| t[i])
    }

    /// Target tokens trained on in a full pass (every token but the first).
    pub fn trainable_targets(&self) -> u64 {
        (1..self.len()).filter(|&i| self.trained_at(i)).count() as u64
    }
}

/// Tokenized documents addressed by index: in memory (`[Doc]`) or in the on-disk cache.
pub trait Docs {
    /// Number of documents.
    fn count(&self) -> usize;
    /// Tokens of document `i`.
    fn doc_len(&self, i: usize) -> usize;
    /// Appends the ids of tokens `range` of document `i` to `out`.
    fn extend_ids(&self, i: usize, range: std::ops::Range<usize>, out: &mut Vec<u32>);
    /// Whether token `j` of document `i` is trained on as a target.
    fn trained_at(&self, i: usize, j: usize) -> bool;

    /// Trained spans (maximal runs of trained tokens) of document `i` with at least one
    /// token at or after `from`.
    fn spans_reaching(&self, i: usize, from: usize) -> u64 {
        let len = self.doc_len(i);
        let mut n = 0;
        let mut inside = false;
        let mut j = 0;
        while j < len {
            let t = self.trained_at(i, j);
            if t && !inside {
                // One past the span's last token.
                let end = (j..len).find(|&k| !self.trained_at(i, k)).unwrap_or(len);
                if end > from {
                    n += 1;
                }
            }
            inside = t;
            j += 1;
        }
        n
    }
}

impl Docs for Vec<Doc> {
    fn count(&self) -> usize {
        self.as_slice().count()
    }

    fn doc_len(&self, i: usize) -> usize {
        self.as_slice().doc_len(i)
    }

    fn extend_ids(&self, i: usize, range: std::ops::Range<usize>, out: &mut Vec<u32>) {
        self.as_slice().extend_ids(i, range, out);
    }

    fn trained_at(&self, i: usize, j: usize) -> bool {
        self.as_slice().trained_at(i, j)
    }
}

impl Docs for [Doc] {
    fn count(&self) -> usize {
        self.len()
    }

    fn doc_len(&self, i: usize) -> usize {
        self[i].len()
    }

    fn extend_ids(&self, i: usize, range: std::ops::Range<usize>, out: &mut Vec<u32>) {
        out.extend_from_slice(&self[i].ids[range]);
    }

    fn trained_at(&self, i: usize, j: usize) -> bool {
        self[i].trained_at(j)
    }
}

impl From<Vec<u32>> for Doc {
    fn from(ids: Vec<u32>) -> Self {
        Self { ids, trained: None }
    }
}

/// One window: `tokens.len() == window + 1`, `mask.len() == window`.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Input ids followed by the last target id; padded with the pad id.
    pub tokens: Vec<u32>,
    /// 1.0 where the target at that position is trained on.
    pub mask: Vec<f32>,
}

/// Settings for cutting windows.
#[derive(Debug, Clone, Copy)]
pub struct WindowSpec {
    /// Window length `W`.
    pub window: usize,
    /// The windowing mode.
    pub mode: Windowing,
    /// Belt overlap.
    pub overlap: usize,
    /// Pad id.
    pub pad: u32,
}

/// Cuts the next window from `docs` at `cursor`, advancing the cursor and the counts.
///
/// `docs` must be non-empty and every document must hold at least two tokens (text plus
/// end-of-text), which the pipeline guarantees.
pub fn next_window<D: Docs + ?Sized>(
    docs: &D,
    cursor: &mut SourceCursor,
    counts: &mut SourceCounts,
    spec: WindowSpec,
) -> Window {
    let w = spec.window;
    let mut tokens = Vec::with_capacity(w + 1);
    // Whether each token is trainable as a target (chat documents train assistant turns only).
    let mut trainable: Vec<bool> = Vec::with_capacity(w + 1);
    let mut mask = vec![0.0f32; w];
    match spec.mode {
        Windowing::Belt => {
            let d = cursor.document;
            let len = docs.doc_len(d);
            let start = cursor.offset;
            let end = (start + w + 1).min(len);
            docs.extend_ids(d, start..end, &mut tokens);
            trainable.extend((start..end).map(|i| docs.trained_at(d, i)));
            let targets = end - start - 1;
            // Positions below `skip` predict tokens the previous window already trained.
            let skip = if start > 0 {
                spec.overlap.min(targets)
            } else {
                0
            };
            for m in &mut mask[skip..targets] {
                *m = 1.0;
            }
            counts.overlap += skip as u64;
            if end >= len {
                advance_document(docs, cursor);
            } else {
                cursor.offset = start + w - spec.overlap;
            }
        }
        Windowing::Pack => {
            // Consecutive windows share one boundary token, so every token of the stream is
            // a target exactly once.
            while tokens.len() < w + 1 {
                let d = cursor.document;
                let len = docs.doc_len(d);
                let take = (w + 1 - tokens.len()).min(len - cursor.offset);
                let range = cursor.offset..cursor.offset + take;
                docs.extend_ids(d, range.clone(), &mut tokens);
                trainable.extend(range.map(|i| docs.trained_at(d, i)));
                cursor.offset += take;
                if cursor.offset >= len {
                    advance_document(docs, cursor);
                }
            }
            // Step back one token: the last target is the next window's first input.
            if cursor.offset > 0 {
                cursor.offset -= 1;
            } else {
                retreat_to_last_token(docs, cursor);
            }
            mask.fill(1.0);
        }
        Windowing::Truncate => {
            let d = cursor.document;
            let len = docs.doc_len(d);
            let end = (w + 1).min(len);
            docs.extend_ids(d, 0..end, &mut tokens);
            trainable.extend((0..end).map(|i| docs.trained_at(d, i)));
            for m in &mut mask[..end - 1] {
                *m = 1.0;
            }
            counts.dropped += (len - end) as u64;
            if end < len {
                counts.turns_cut += docs.spans_reaching(d, end);
            }
            advance_document(docs, cursor);
        }
    }
    // Chat documents: only targets inside trained spans count.
    for (m, t) in mask.iter_mut().zip(&trainable[1..]) {
        if !t {
            *m = 0.0;
        }
    }
    let real = tokens.len();
    counts.padded += (w + 1 - real) as u64;
    tokens.resize(w + 1, spec.pad);
    counts.windows += 1;
    counts.trained += mask.iter().filter(|m| **m > 0.0).count() as u64;
    Window { tokens, mask }
}

fn advance_document<D: Docs + ?Sized>(docs: &D, cursor: &mut SourceCursor) {
    cursor.offset = 0;
    cursor.document += 1;
    if cursor.document >= docs.count() {
        cursor.document = 0;
        cursor.epoch += 1;
    }
}

/// Moves a cursor that sits at the start of a document back onto the previous document's
/// last token (crossing an epoch boundary backwards if needed).
fn retreat_to_last_token<D: Docs + ?Sized>(docs: &D, cursor: &mut SourceCursor) {
    if cursor.document == 0 {
        cursor.document = docs.count() - 1;
        cursor.epoch -= 1;
    } else {
        cursor.document -= 1;
    }
    cursor.offset = docs.doc_len(cursor.document) - 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(window: usize, mode: Windowing, overlap: usize) -> WindowSpec {
        WindowSpec {
            window,
            mode,
            overlap,
            pad: 99,
        }
    }

    #[test]
    fn belt_trains_every_token_once_in_order() {
        let docs: Vec<Doc> = vec![
            (0..10).collect::<Vec<u32>>().into(),
            vec![20, 21, 22].into(),
        ];
        let mut c = SourceCursor::default();
        let mut n = SourceCounts::default();
        let w1 = next_window(&docs, &mut c, &mut n, spec(4, Windowing::Belt, 0));
        assert_eq!(w1.tokens, vec![0, 1, 2, 3, 4]);
        assert_eq!(w1.mask, vec![1.0; 4]);
        let w2 = next_window(&docs, &mut c, &mut n, spec(4, Windowing::Belt, 0));
        assert_eq!(w2.tokens, vec![4, 5, 6, 7, 8]);
        let w3 = next_window(&docs, &mut c, &mut n, spec(4, Windowing::Belt, 0));
        assert_eq!(w3.tokens, vec![8, 9, 99, 99, 99]);
        assert_eq!(w3.mask, vec![1.0, 0.0, 0.0, 0.0]);
        let w4 = next_window(&docs, &mut c, &mut n, spec(4, Windowing::Belt, 0));
        assert_eq!(w4.tokens, vec![20, 21, 22, 99, 99]);
        assert_eq!(
            c,
            SourceCursor {
                epoch: 1,
                document: 0,
                offset: 0
            }
        );
        // 9 targets in the first document, 2 in the second: all trained, none dropped.
        assert_eq!(n.trained, 11);
        assert_eq!(n.dropped, 0);
    }

    #[test]
    fn belt_overlap_is_context_not_trained_twice() {
        let docs: Vec<Doc> = vec![(0..10).collect::<Vec<u32>>().into()];
        let mut c = SourceCursor::default();
        let mut n = SourceCounts::default();
        let s = spec(4, Windowing::Belt, 2);
        let w1 = next_window(&docs, &mut c, &mut n, s);
        assert_eq!(w1.tokens, vec![0, 1, 2, 3, 4]);
        let w2 = next_window(&docs, &mut c, &mut n, s);
        assert_eq!(w2.tokens, vec![2, 3, 4, 5, 6]);
        assert_eq!(w2.mask, vec![0.0, 0.0, 1.0, 1.0]);
        let _ = next_window(&docs, &mut c, &mut n, s);
        let _ = next_window(&docs, &mut c, &mut n, s);
        assert_eq!(n.trained, 9, "each of the 9 targets trained exactly once");
        assert_eq!(c.epoch, 1);
    }

    #[test]
    fn pack_streams_across_documents() {
        let docs: Vec<Doc> = vec![
            vec![1, 2, 3].into(),
            vec![4, 5].into(),
            vec![6, 7, 8, 9].into(),
        ];
        let mut c = SourceCursor::default();
        let mut n = SourceCounts::default();
        let s = spec(3, Windowing::Pack, 0);
        assert_eq!(
            next_window(&docs, &mut c, &mut n, s).tokens,
            vec![1, 2, 3, 4]
        );
        assert_eq!(
            next_window(&docs, &mut c, &mut n, s).tokens,
            vec![4, 5, 6, 7]
        );
        assert_eq!(
            next_window(&docs, &mut c, &mut n, s).tokens,
            vec![7, 8, 9, 1]
        );
        assert_eq!(c.epoch, 1);
        assert_eq!(n.padded, 0);
    }

    #[test]
    fn only_trained_tokens_of_chat_documents_are_targets() {
        let doc = Doc {
            ids: vec![1, 2, 3, 4, 5],
            trained: Some(vec![false, false, true, true, false]),
        };
        let mut c = SourceCursor::default();
        let mut n = SourceCounts::default();
        let w = next_window(&[doc][..], &mut c, &mut n, spec(4, Windowing::Belt, 0));
        // Targets are tokens 2..=5: trained flags true, true, false of tokens 3, 4, 5.
        assert_eq!(w.mask, vec![0.0, 1.0, 1.0, 0.0]);
        assert_eq!(n.trained, 2);
    }

    #[test]
    fn truncate_drops_the_rest() {
        let docs: Vec<Doc> = vec![(0..10).collect::<Vec<u32>>().into(), vec![1, 2].into()];
        let mut c = SourceCursor::default();
        let mut n = SourceCounts::default();
        let s = spec(4, Windowing::Truncate, 0);
        assert_eq!(
            next_window(&docs, &mut c, &mut n, s).tokens,
            vec![0, 1, 2, 3, 4]
        );
        assert_eq!(n.dropped, 5);
        assert_eq!(n.turns_cut, 1, "a plain document is one trained span");
        let w = next_window(&docs, &mut c, &mut n, s);
        assert_eq!(w.tokens, vec![1, 2, 99, 99, 99]);
        assert_eq!(w.mask, vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn truncate_reports_the_assistant_turns_it_cuts() {
        // Two assistant turns: tokens 2..4 and 6..9; a window of 4 keeps tokens 0..=4.
        let trained = [
            false, false, true, true, false, false, true, true, true, false,
        ];
        let doc = Doc {
            ids: (0..10).collect(),
            trained: Some(trained.to_vec()),
        };
        let (mut c, mut n) = (SourceCursor::default(), SourceCounts::default());
        next_window(
            std::slice::from_ref(&doc),
            &mut c,
            &mut n,
            spec(4, Windowing::Truncate, 0),
        );
        assert_eq!((n.dropped, n.turns_cut), (5, 1));
        // A window of 3 keeps tokens 0..=3: the first turn survives whole, the second is cut.
        let (mut c, mut n) = (SourceCursor::default(), SourceCounts::default());
        next_window(
            std::slice::from_ref(&doc),
            &mut c,
            &mut n,
            spec(3, Windowing::Truncate, 0),
        );
        assert_eq!(n.turns_cut, 1);
        // A window of 2 keeps tokens 0..=2: the first turn loses token 3, the second is gone.
        let (mut c, mut n) = (SourceCursor::default(), SourceCounts::default());
        next_window(&[doc][..], &mut c, &mut n, spec(2, Windowing::Truncate, 0));
        assert_eq!(n.turns_cut, 2);
    }
}
