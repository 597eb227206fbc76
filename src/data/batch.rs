//! Packed token batches: the ids of several rows concatenated, with their boundaries.
//!
//! Rows are grouped longest first under a token budget, so every batch holds rows of similar
//! length and no padding is computed.

use crate::ops::SeqLayout;

/// A packed batch ready for a model's forward pass.
#[derive(Clone, Debug)]
pub struct TokenBatch {
    pub ids: Vec<u32>,
    pub layout: SeqLayout,
}

impl TokenBatch {
    pub fn from_rows(rows: &[&[u32]]) -> Self {
        let lens: Vec<usize> = rows.iter().map(|r| r.len()).collect();
        let ids = rows.iter().flat_map(|r| r.iter().copied()).collect();
        TokenBatch {
            ids,
            layout: SeqLayout::from_lens(&lens),
        }
    }

    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// The token each row's classifier reads, as transformers' `*ForSequenceClassification`
    /// picks it: the last position whose id is not `pad_token_id` (the first position if every
    /// id is the pad id), or simply the last position when the model has no pad id.
    pub fn pooled_tokens(&self, pad: Option<u32>) -> Vec<usize> {
        (0..self.layout.rows())
            .map(|r| {
                let range = self.layout.range(r);
                match pad {
                    None => range.end - 1,
                    Some(p) => range
                        .clone()
                        .rev()
                        .find(|&i| self.ids[i] != p)
                        .unwrap_or(range.start),
                }
            })
            .collect()
    }
}

/// Group row indices into batches: rows sorted by length (longest first), a batch closing when
/// adding a row would exceed `max_tokens` tokens or `max_rows` rows. A row longer than the
/// budget gets a batch of its own. Ties keep input order, so the grouping is deterministic.
pub fn plan_batches(lens: &[usize], max_tokens: usize, max_rows: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by(|&a, &b| lens[b].cmp(&lens[a]).then(a.cmp(&b)));
    pack_in_order(&order, lens, max_tokens, max_rows)
}

/// Group rows in file order under the same limits (no sorting): what a pipeline without length
/// sorting computes, kept to measure what sorting is worth (`engine infer --no-sort`).
pub fn plan_batches_unsorted(
    lens: &[usize],
    max_tokens: usize,
    max_rows: usize,
) -> Vec<Vec<usize>> {
    let order: Vec<usize> = (0..lens.len()).collect();
    pack_in_order(&order, lens, max_tokens, max_rows)
}

fn pack_in_order(
    order: &[usize],
    lens: &[usize],
    max_tokens: usize,
    max_rows: usize,
) -> Vec<Vec<usize>> {
    let mut batches = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_tokens = 0;
    for &i in order {
        if !cur.is_empty() && (cur_tokens + lens[i] > max_tokens || cur.len() >= max_rows) {
            batches.push(std::mem::take(&mut cur));
            cur_tokens = 0;
        }
        cur_tokens += lens[i];
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_skips_trailing_pad_ids_like_transformers() {
        let b = TokenBatch::from_rows(&[&[2, 5, 6, 1], &[2, 7, 1, 1], &[1, 1]]);
        assert_eq!(b.pooled_tokens(None), vec![3, 7, 9]);
        assert_eq!(b.pooled_tokens(Some(0)), vec![3, 7, 9]);
        // pad == EOS (id 1): the token before the trailing EOS run; an all-pad row reads its first.
        assert_eq!(b.pooled_tokens(Some(1)), vec![2, 5, 8]);
    }

    #[test]
    fn batches_respect_the_budget_and_cover_every_row_once() {
        let lens = [5, 40, 3, 40, 12, 100, 7, 7];
        let b = plan_batches(&lens, 50, 3);
        let mut seen: Vec<usize> = b.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        assert_eq!(b[0], vec![5]); // over budget alone
        for batch in &b[1..] {
            assert!(batch.iter().map(|&i| lens[i]).sum::<usize>() <= 50);
            assert!(batch.len() <= 3);
        }
        assert_eq!(b[1], vec![1]);
        assert_eq!(b[2], vec![3]);
        // Longest first: batch maxima never increase.
        let max: Vec<usize> = b
            .iter()
            .map(|x| x.iter().map(|&i| lens[i]).max().unwrap())
            .collect();
        assert!(max.windows(2).all(|w| w[0] >= w[1]), "{max:?}");
    }

    #[test]
    fn unsorted_batches_keep_file_order_under_the_same_limits() {
        let lens = [5, 40, 3, 40, 12, 100, 7, 7];
        let b = plan_batches_unsorted(&lens, 50, 3);
        assert_eq!(
            b,
            vec![vec![0, 1, 2], vec![3], vec![4], vec![5], vec![6, 7]]
        );
    }
}
