//! The free ids of a frame table, as a bitmap.
//!
//! One bit per id of the table (a set bit: free), and one summary bit per word of
//! it (set while the word has a free id), so that the next free id is found by
//! looking at a word of the summary per 4,096 ids at most. An ordered set
//! took 16 bytes per free id: after half of a merged copy was written at random, a
//! tenth of the ids of a frame table were free, a third of a byte per tracked page.

#![forbid(unsafe_code)]

use super::FrameId;

#[derive(Clone, Debug, Default)]
pub struct FreeIds {
    words: Vec<u64>,
    summary: Vec<u64>,
}

/// The lowest set bit of `w` at or above bit `b` (`b` < 64).
fn first_at_or_above(w: u64, b: usize) -> Option<usize> {
    let m = w & (u64::MAX << b);
    (m != 0).then(|| m.trailing_zeros() as usize)
}

impl FreeIds {
    pub fn contains(&self, f: FrameId) -> bool {
        let i = f as usize;
        self.words
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Mark `f` free; false if it was.
    pub fn insert(&mut self, f: FrameId) -> bool {
        let i = f as usize;
        let w = i / 64;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
            self.summary.resize(self.words.len().div_ceil(64), 0);
        }
        let bit = 1 << (i % 64);
        if self.words[w] & bit != 0 {
            return false;
        }
        self.words[w] |= bit;
        self.summary[w / 64] |= 1 << (w % 64);
        true
    }

    /// Mark `f` in use; false if it was not free.
    pub fn remove(&mut self, f: FrameId) -> bool {
        if !self.contains(f) {
            return false;
        }
        let i = f as usize;
        let w = i / 64;
        self.words[w] &= !(1 << (i % 64));
        if self.words[w] == 0 {
            self.summary[w / 64] &= !(1 << (w % 64));
        }
        true
    }

    /// The lowest free id at or above `f`.
    pub fn next_from(&self, f: FrameId) -> Option<FrameId> {
        let i = f as usize;
        let w = i / 64;
        let word = *self.words.get(w)?;
        if let Some(b) = first_at_or_above(word, i % 64) {
            return FrameId::try_from(w * 64 + b).ok();
        }
        // The next word with a free id, from the summary.
        let start = w + 1;
        let mut s = start / 64;
        let mut from = start % 64;
        while s < self.summary.len() {
            if let Some(b) = first_at_or_above(self.summary[s], from) {
                let w = s * 64 + b;
                let b = self.words[w].trailing_zeros() as usize;
                return FrameId::try_from(w * 64 + b).ok();
            }
            s += 1;
            from = 0;
        }
        None
    }

    /// Free ids in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = FrameId> + '_ {
        let mut next = self.next_from(0);
        std::iter::from_fn(move || {
            let f = next?;
            next = f.checked_add(1).and_then(|g| self.next_from(g));
            Some(f)
        })
    }

    /// Forget the ids from `len` on (a table that shrank), and give back memory
    /// once a quarter of what is held is used.
    pub fn truncate(&mut self, len: usize) {
        let words = len.div_ceil(64).min(self.words.len());
        self.words.truncate(words);
        if words * 64 > len {
            self.words[words - 1] &= !(u64::MAX << (len % 64));
        }
        // The summary of what is left, from the words.
        self.summary = self
            .words
            .chunks(64)
            .map(|c| {
                c.iter()
                    .enumerate()
                    .fold(0u64, |s, (k, &w)| s | (u64::from(w != 0) << k))
            })
            .collect();
        if self.words.len() * 4 <= self.words.capacity() {
            self.words.shrink_to(self.words.len() * 2);
        }
    }

    /// Bytes held (by capacity).
    pub fn metadata_bytes(&self) -> usize {
        (self.words.capacity() + self.summary.capacity()) * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::xorshift as rng;
    use std::collections::BTreeSet;

    fn check(f: &FreeIds, model: &BTreeSet<FrameId>, span: FrameId) {
        assert!(f.iter().eq(model.iter().copied()));
        for x in (0..span + 70).step_by(7) {
            assert_eq!(f.contains(x), model.contains(&x), "{x}");
            assert_eq!(f.next_from(x), model.range(x..).next().copied(), "next {x}");
        }
    }

    #[test]
    fn free_ids_answer_as_an_ordered_set_would() {
        for (seed, span) in [(1, 100u32), (2, 5_000), (3, 300_000)] {
            let mut next = rng(seed);
            let (mut f, mut model) = (FreeIds::default(), BTreeSet::new());
            for step in 0..20_000 {
                // Clustered and scattered ids, inserts and removes, and now and then
                // a shrink of the table.
                let x = if step % 3 == 0 {
                    (next() % 200) as FrameId + span / 2
                } else {
                    (next() % u64::from(span)) as FrameId
                };
                if next() % 2 == 0 {
                    assert_eq!(f.insert(x), model.insert(x));
                } else {
                    assert_eq!(f.remove(x), model.remove(&x));
                }
                if step % 5_000 == 4_999 {
                    let len = (next() % u64::from(span)) as usize;
                    f.truncate(len);
                    model.retain(|&y| (y as usize) < len);
                }
                if step % 2_000 == 0 {
                    check(&f, &model, span);
                }
            }
            check(&f, &model, span);
        }
    }

    #[test]
    fn a_free_id_far_from_the_others_is_found() {
        let mut f = FreeIds::default();
        assert_eq!(f.next_from(0), None);
        f.insert(3);
        f.insert(1_000_000);
        assert_eq!(f.next_from(4), Some(1_000_000));
        assert_eq!(f.next_from(1_000_001), None);
        f.truncate(1_000_000);
        assert_eq!((f.iter().count(), f.next_from(4)), (1, None));
        assert_eq!(
            f.metadata_bytes(),
            f.words.capacity() * 8 + f.summary.capacity() * 8
        );
    }

    #[test]
    fn a_shrink_inside_the_last_word_forgets_the_ids_past_it() {
        let mut f = FreeIds::default();
        for x in [10, 70, 100] {
            f.insert(x);
        }
        f.truncate(80);
        assert_eq!(
            (f.iter().count(), f.contains(100), f.next_from(71)),
            (2, false, None)
        );
    }
}
