//! A set of content checksums kept as one sorted vector: what a merge domain's
//! member remembers of the contents it announced, and the stable index's keys with
//! more than one frame.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::hash::BuildHasherDefault;

use super::index::KeyIsHash;
use crate::stats::hash_table_bytes;

/// A hash set of this process's own content checksums (32 bits of xxh3, already
/// uniform: hashed by one multiplication, as the indexes' keys are, where the default
/// hasher's SipHash took a measurable share of a member's scan, which asks for every
/// unmerged page whether it was announced).
pub type Sums = HashSet<u32, BuildHasherDefault<KeyIsHash>>;

/// Changes kept beside the sorted vector before they are folded into it: at least
/// this many, else an eighth of its length (so that a fold, which moves the whole
/// vector, comes once per that many changes).
const FOLD_MIN: usize = 1024;

/// A set of checksums as one sorted vector (4 bytes each) and the changes made since
/// it was last rebuilt, in two small hash sets (at most an eighth of its length, or
/// [`FOLD_MIN`]). A hash set of every checksum took 5 bytes a slot with its empty
/// slots, and kept its largest size: a member of a domain of 4 × 64 MiB whose pages
/// were half written held 28,473 slots (8.7 bytes per tracked page) for the 8,357
/// contents it had announced and nobody else holds (2 bytes a page in the vector).
/// Checksums are uniform, so a lookup starts where the checksum's value puts it in
/// the vector and gallops from there: a few probes, most in one cache line.
#[derive(Debug, Default)]
pub struct SumSet {
    sorted: Vec<u32>,
    /// In the set, not in `sorted`.
    added: Sums,
    /// In `sorted`, not in the set.
    removed: Sums,
}

impl SumSet {
    pub fn contains(&self, c: u32) -> bool {
        self.added.contains(&c) || (self.in_sorted(c) && !self.removed.contains(&c))
    }

    /// Add `c`; whether it was not there.
    pub fn insert(&mut self, c: u32) -> bool {
        let new = if self.in_sorted(c) {
            self.removed.remove(&c)
        } else {
            self.added.insert(c)
        };
        self.fold_if_due();
        new
    }

    /// Take `c` out; whether it was there. A set emptied holds no memory.
    pub fn remove(&mut self, c: u32) -> bool {
        let was = self.added.remove(&c) || (self.in_sorted(c) && self.removed.insert(c));
        if self.added.is_empty() && self.removed.len() == self.sorted.len() {
            self.clear();
        } else {
            self.fold_if_due();
        }
        was
    }

    /// The checksums, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.sorted
            .iter()
            .copied()
            .filter(|c| !self.removed.contains(c))
            .chain(self.added.iter().copied())
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sorted.len() + self.added.len() - self.removed.len()
    }

    /// Bytes held: the vector and the two sets as allocated.
    pub fn metadata_bytes(&self) -> usize {
        self.sorted.capacity() * 4
            + hash_table_bytes(self.added.capacity(), 4)
            + hash_table_bytes(self.removed.capacity(), 4)
    }

    fn fold_if_due(&mut self) {
        if self.added.len() + self.removed.len() > FOLD_MIN.max(self.sorted.len() / 8) {
            self.fold();
        }
    }

    /// Rebuild the vector with the changes made since, and give back what the sets
    /// and the vector hold beyond that.
    pub fn fold(&mut self) {
        if self.added.is_empty() && self.removed.is_empty() {
            if self.sorted.capacity() > self.sorted.len() + self.sorted.len() / 8 {
                self.sorted.shrink_to_fit();
            }
            return;
        }
        let mut added: Vec<u32> = std::mem::take(&mut self.added).into_iter().collect();
        added.sort_unstable();
        let removed = std::mem::take(&mut self.removed);
        let old = std::mem::take(&mut self.sorted);
        let mut out = Vec::with_capacity(old.len() + added.len() - removed.len());
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < added.len() {
            let take_old = j == added.len() || (i < old.len() && old[i] < added[j]);
            let c = if take_old {
                i += 1;
                old[i - 1]
            } else {
                j += 1;
                added[j - 1]
            };
            if !removed.contains(&c) {
                out.push(c);
            }
        }
        self.sorted = out;
    }

    /// Whether `c` is in the sorted vector.
    fn in_sorted(&self, c: u32) -> bool {
        let v = &self.sorted;
        let n = v.len();
        if n == 0 {
            return false;
        }
        // Where a uniform checksum falls, then out from there by doubling steps until
        // `c` is bracketed, then a binary search of the bracket.
        let guess = ((u64::from(c) * n as u64) >> 32) as usize;
        let (lo, hi) = match v[guess].cmp(&c) {
            std::cmp::Ordering::Equal => return true,
            std::cmp::Ordering::Less => {
                let (mut lo, mut step) = (guess + 1, 1);
                loop {
                    let probe = guess + step;
                    if probe >= n {
                        break (lo, n);
                    }
                    if v[probe] >= c {
                        break (lo, probe + 1);
                    }
                    lo = probe + 1;
                    step *= 2;
                }
            }
            std::cmp::Ordering::Greater => {
                let (mut hi, mut step) = (guess, 1);
                loop {
                    if step > guess {
                        break (0, hi);
                    }
                    let probe = guess - step;
                    if v[probe] <= c {
                        break (probe, hi);
                    }
                    hi = probe;
                    step *= 2;
                }
            }
        };
        v[lo..hi].binary_search(&c).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Sums spread like checksums (xorshift), and some crowded at the ends of the
    /// range and repeated.
    fn sums(n: usize, seed: u64) -> Vec<u32> {
        let mut next = crate::testing::xorshift(seed);
        (0..n)
            .map(|i| {
                let x = next();
                match i % 16 {
                    0 => (x % 8) as u32,
                    1 => u32::MAX - (x % 8) as u32,
                    2 => (x % 64) as u32 * 7,
                    _ => x as u32,
                }
            })
            .collect()
    }

    #[test]
    fn the_set_answers_as_a_btreeset_through_inserts_removals_and_folds() {
        let mut s = SumSet::default();
        let mut model = BTreeSet::new();
        let ins = sums(20_000, 0x9E37_79B9_7F4A_7C15);
        let del = sums(20_000, 0x2545_F491_4F6C_DD1D);
        for (k, (&a, &b)) in ins.iter().zip(&del).enumerate() {
            assert_eq!(s.insert(a), model.insert(a), "insert {a}");
            // Removals of what is there (an earlier insert) and of what is not.
            let r = if k % 3 == 0 { ins[k / 2] } else { b };
            assert_eq!(s.remove(r), model.remove(&r), "remove {r}");
            if k % 997 == 0 {
                s.fold();
            }
            assert_eq!(s.len(), model.len());
        }
        for &c in ins.iter().chain(&del) {
            assert_eq!(s.contains(c), model.contains(&c), "{c}");
        }
        s.fold();
        assert!(s.added.is_empty() && s.removed.is_empty());
        assert_eq!(s.sorted, model.iter().copied().collect::<Vec<_>>());
        for c in [0, 1, 7, u32::MAX, u32::MAX - 1] {
            assert_eq!(s.contains(c), model.contains(&c), "{c}");
        }
        // Every value around each member, found or not as the model says.
        for &c in model.iter().step_by(7) {
            for d in [c.wrapping_sub(1), c, c.wrapping_add(1)] {
                assert_eq!(s.contains(d), model.contains(&d), "{d}");
            }
        }
    }

    #[test]
    fn a_set_that_shrank_gives_its_memory_back_at_the_next_fold() {
        let mut s = SumSet::default();
        let mut seen = BTreeSet::new();
        let all: Vec<u32> = sums(70_000, 77)
            .into_iter()
            .filter(|&c| seen.insert(c))
            .collect();
        assert!(all.len() > 50_000);
        for &c in &all {
            s.insert(c);
        }
        s.fold();
        let full = s.metadata_bytes();
        assert!(full <= s.len() * 4 + s.len() / 2, "{full} for {}", s.len());
        for &c in &all[..40_000] {
            s.remove(c);
        }
        s.fold();
        assert!(
            s.metadata_bytes() * 3 < full,
            "{} of {full}",
            s.metadata_bytes()
        );
        assert!(all[40_000..].iter().all(|&c| s.contains(c)));
        s.clear();
        assert_eq!((s.len(), s.metadata_bytes()), (0, 0));
        assert!(!s.contains(all[45_000]));
    }
}
