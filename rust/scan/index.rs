//! A content-hash index that costs one entry per hash in the common case.

use std::collections::{hash_map::Entry, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// Maps keyed by a content checksum (32 bits of xxh3, already uniform): spread over
/// 64 bits by one multiplication (the table takes its control bits from the top).
pub type ByHash<V> = HashMap<u64, V, BuildHasherDefault<KeyIsHash>>;

#[derive(Default)]
pub struct KeyIsHash(u64);

impl Hasher for KeyIsHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; anything else still spreads.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
}

/// Maps keyed by the checksum itself (32 bits: half the slot of a `u64` key).
type ByKey<V> = HashMap<u32, V, BuildHasherDefault<KeyIsHash>>;

/// An index key as stored (keys are 32-bit checksums, widened at the interface).
fn key(h: u64) -> u32 {
    u32::try_from(h).expect("index keys are 32-bit checksums")
}

/// Give back most of a table's memory once it holds a quarter of what it could (so
/// that an index that emptied costs nothing; halving again before the next shrink
/// keeps the cost amortized).
fn shrink_if_sparse<V>(m: &mut ByKey<V>) {
    if m.len() * 4 < m.capacity() {
        m.shrink_to(m.len() * 2);
    }
}

/// Values per hash: the first in `one` (no allocation), the others, rare, in `more`.
#[derive(Debug)]
pub struct MultiIndex<T> {
    one: ByKey<T>,
    more: ByKey<Vec<T>>,
}

impl<T> Default for MultiIndex<T> {
    fn default() -> Self {
        MultiIndex {
            one: ByKey::default(),
            more: ByKey::default(),
        }
    }
}

impl<T: Copy + PartialEq> MultiIndex<T> {
    pub fn push(&mut self, h: u64, v: T) {
        let h = key(h);
        match self.one.entry(h) {
            Entry::Vacant(e) => {
                e.insert(v);
            }
            Entry::Occupied(_) => self.more.entry(h).or_default().push(v),
        }
    }

    /// The values under `h`, the first pushed first.
    pub fn get(&self, h: u64) -> impl Iterator<Item = T> + '_ {
        let h = key(h);
        let more = self.more.get(&h).map_or(&[][..], |v| &v[..]);
        self.one
            .get(&h)
            .copied()
            .into_iter()
            .chain(more.iter().copied())
    }

    /// Remove one occurrence of `v` under `h`.
    pub fn remove(&mut self, h: u64, v: T) {
        let h = key(h);
        if self.one.get(&h) == Some(&v) {
            match self.more.get_mut(&h).and_then(|m| m.pop()) {
                Some(next) => {
                    self.one.insert(h, next);
                }
                None => {
                    self.one.remove(&h);
                    shrink_if_sparse(&mut self.one);
                }
            }
        } else if let Some(m) = self.more.get_mut(&h) {
            if let Some(i) = m.iter().position(|&x| x == v) {
                m.swap_remove(i);
            }
        } else {
            return;
        }
        if self.more.get(&h).is_some_and(|m| m.is_empty()) {
            self.more.remove(&h);
            shrink_if_sparse(&mut self.more);
        }
    }

    /// Every hash with more than one value, with its values.
    pub fn groups(&self) -> impl Iterator<Item = Vec<T>> + '_ {
        self.more.keys().map(|&h| self.get(u64::from(h)).collect())
    }

    /// Bytes this index holds (table slots and the vectors of `more`).
    pub fn metadata_bytes(&self) -> usize {
        // A slot holds the pair, plus one control byte.
        self.one.capacity() * (std::mem::size_of::<(u32, T)>() + 1)
            + self.more.capacity() * (std::mem::size_of::<(u32, Vec<T>)>() + 1)
            + self
                .more
                .values()
                .map(|v| v.capacity() * std::mem::size_of::<T>())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_kept_and_removed_per_hash() {
        let mut ix: MultiIndex<u32> = MultiIndex::default();
        ix.push(7, 1);
        ix.push(7, 2);
        ix.push(7, 3);
        ix.push(9, 4);
        assert_eq!(ix.get(7).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(ix.groups().count(), 1);
        ix.remove(7, 1);
        let mut v: Vec<_> = ix.get(7).collect();
        v.sort_unstable();
        assert_eq!(v, vec![2, 3]);
        ix.remove(7, 3);
        ix.remove(7, 2);
        assert_eq!(ix.get(7).count(), 0);
        assert_eq!(ix.groups().count(), 0);
        ix.remove(9, 5); // absent: nothing happens
        assert_eq!(ix.get(9).collect::<Vec<_>>(), vec![4]);
    }

    #[test]
    fn an_index_that_empties_gives_its_memory_back() {
        let mut ix: MultiIndex<u32> = MultiIndex::default();
        for h in 0..100_000u32 {
            ix.push(u64::from(h % 50_000), h);
        }
        let full = ix.metadata_bytes();
        assert!(full >= 50_000 * 9, "{full}");
        for h in 0..100_000u32 {
            ix.remove(u64::from(h % 50_000), h);
        }
        assert_eq!(ix.get(7).count(), 0);
        assert!(
            ix.metadata_bytes() < 1024,
            "{} bytes kept",
            ix.metadata_bytes()
        );
    }
}
