//! Content-hash indexes that cost one entry per hash in the common case, in slots
//! packed tight (they hold an entry per merged frame or unmerged page).

use std::collections::{hash_map::Entry, HashMap};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::mem::size_of;

use crate::stats::hash_table_bytes;

/// The hasher of maps keyed by a content checksum (32 bits of xxh3, already
/// uniform) or a page number: spread over 64 bits by one multiplication (the table
/// takes its control bits from the top).
#[derive(Default)]
pub struct KeyIsHash(u64);

impl Hasher for KeyIsHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only integer keys are hashed here; anything else still spreads.
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

/// A 32-bit index key stored with alignment 1 (see [`AddrIndex`]).
#[derive(Clone, Copy, PartialEq, Eq)]
struct PackedKey([u8; 4]);

impl Hash for PackedKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u32(u32::from_le_bytes(self.0));
    }
}

/// A page address stored as its page number in 48 bits, alignment 1 (see [`AddrIndex`]).
#[derive(Clone, Copy, PartialEq, Eq)]
struct PackedPage([u8; 6]);

impl PackedPage {
    fn number(self) -> u64 {
        let mut b = [0; 8];
        b[..6].copy_from_slice(&self.0);
        u64::from_le_bytes(b)
    }
}

impl Hash for PackedPage {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.number());
    }
}

/// Page addresses to and from [`PackedPage`].
#[derive(Clone, Copy, Debug)]
struct PageCodec {
    /// log2 of the page size.
    shift: u32,
}

impl PageCodec {
    fn new(page: usize) -> Self {
        assert!(page.is_power_of_two());
        PageCodec {
            shift: page.trailing_zeros(),
        }
    }

    fn pack(self, addr: usize) -> PackedPage {
        let n = (addr >> self.shift) as u64;
        assert!(
            n << self.shift == addr as u64 && n >> 48 == 0,
            "address {addr:#x}"
        );
        let b = n.to_le_bytes();
        PackedPage([b[0], b[1], b[2], b[3], b[4], b[5]])
    }

    fn unpack(self, p: PackedPage) -> usize {
        (p.number() as usize) << self.shift
    }
}

fn packed_key(h: u64) -> PackedKey {
    PackedKey(key(h).to_le_bytes())
}

/// Per index key, one page address: the heads of the unstable index. A slot is a
/// 4-byte key and a 6-byte page number with no padding (11 bytes with its control
/// byte, where a `u64 → usize` map takes 17), as this index holds every unmerged page
/// at the end of a full scan.
#[derive(Debug)]
pub struct AddrIndex {
    map: HashMap<PackedKey, PackedPage, BuildHasherDefault<KeyIsHash>>,
    codec: PageCodec,
}

impl std::fmt::Debug for PackedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        u32::from_le_bytes(self.0).fmt(f)
    }
}

impl std::fmt::Debug for PackedPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.number().fmt(f)
    }
}

impl AddrIndex {
    /// An empty index of addresses of pages of `page` bytes (a power of two).
    pub fn new(page: usize) -> Self {
        AddrIndex {
            map: HashMap::default(),
            codec: PageCodec::new(page),
        }
    }

    pub fn contains_key(&self, h: &u64) -> bool {
        self.map.contains_key(&packed_key(*h))
    }

    /// The address under `h`.
    pub fn get(&self, h: &u64) -> Option<usize> {
        self.map.get(&packed_key(*h)).map(|&p| self.codec.unpack(p))
    }

    /// Set the address under `h`; the one it replaces.
    pub fn insert(&mut self, h: u64, addr: usize) -> Option<usize> {
        let v = self.codec.pack(addr);
        let old = self.map.insert(packed_key(h), v);
        old.map(|p| self.codec.unpack(p))
    }

    /// Set the address under `h` if there is none; whether it did.
    pub fn insert_first(&mut self, h: u64, addr: usize) -> bool {
        let v = self.codec.pack(addr);
        match self.map.entry(packed_key(h)) {
            Entry::Vacant(e) => {
                e.insert(v);
                true
            }
            Entry::Occupied(_) => false,
        }
    }

    pub fn remove(&mut self, h: &u64) -> Option<usize> {
        let p = self.map.remove(&packed_key(*h))?;
        Some(self.codec.unpack(p))
    }

    /// Empty it, memory included.
    pub fn clear(&mut self) {
        self.map = HashMap::default();
    }

    /// Bytes this index holds (its table as allocated).
    pub fn metadata_bytes(&self) -> usize {
        hash_table_bytes(self.map.capacity(), size_of::<(PackedKey, PackedPage)>())
    }
}

/// Per index key, any number of page addresses (the unstable index's other pages of
/// a key: contents seen again that could not merge, checksums shared by other
/// bytes), as chains: the newest address of each key in `heads`, and for each
/// address the one pushed before it under the same key in `next`. A key with one
/// address costs one 11-byte slot and each further address one 13-byte slot, where
/// a vector per key cost a 33-byte slot and a 32-byte allocation.
///
/// An address is expected under one key at most (a page enters the unstable index
/// once per full scan). Were it pushed twice, chains could lose or borrow entries
/// (callers check every address they get), never loop: walking one consumes it.
#[derive(Debug)]
pub struct AddrChains {
    heads: HashMap<PackedKey, PackedPage, BuildHasherDefault<KeyIsHash>>,
    next: HashMap<PackedPage, PackedPage, BuildHasherDefault<KeyIsHash>>,
    codec: PageCodec,
}

impl AddrChains {
    /// No chains, for pages of `page` bytes (a power of two).
    pub fn new(page: usize) -> Self {
        AddrChains {
            heads: HashMap::default(),
            next: HashMap::default(),
            codec: PageCodec::new(page),
        }
    }

    /// Add `addr` under `h` (after those already there).
    pub fn push(&mut self, h: u64, addr: usize) {
        let a = self.codec.pack(addr);
        debug_assert!(!self.next.contains_key(&a), "{addr:#x} pushed twice");
        if let Some(older) = self.heads.insert(packed_key(h), a) {
            self.next.insert(a, older);
        }
    }

    /// The addresses under `h`, the newest first (nothing taken).
    pub fn iter(&self, h: &u64) -> impl Iterator<Item = usize> + '_ {
        let head = self.heads.get(&packed_key(*h)).copied();
        // Bounded: an address pushed twice could make a cycle (see above).
        std::iter::successors(head, |a| self.next.get(a).copied())
            .take(self.next.len() + 1)
            .map(|a| self.codec.unpack(a))
    }

    /// Take every address under `h`, the first pushed first.
    pub fn remove(&mut self, h: &u64) -> Option<Vec<usize>> {
        let mut a = self.heads.remove(&packed_key(*h))?;
        let mut out = vec![self.codec.unpack(a)];
        while let Some(older) = self.next.remove(&a) {
            out.push(self.codec.unpack(older));
            a = older;
        }
        out.reverse();
        Some(out)
    }

    /// Put `addrs` under `h` (in this order), after those already there.
    pub fn insert(&mut self, h: u64, addrs: Vec<usize>) {
        for a in addrs {
            self.push(h, a);
        }
    }

    /// Empty it, memory included.
    pub fn clear(&mut self) {
        self.heads = HashMap::default();
        self.next = HashMap::default();
    }

    /// Bytes this index holds (its table as allocated).
    pub fn metadata_bytes(&self) -> usize {
        hash_table_bytes(self.heads.capacity(), size_of::<(PackedKey, PackedPage)>())
            + hash_table_bytes(self.next.capacity(), size_of::<(PackedPage, PackedPage)>())
    }
}

/// Values per hash: the first in `one` (no allocation), the others, rare, in `more`
/// (in boxed slices of their exact length: a smaller slot than a vector's, and no
/// spare room).
#[derive(Debug)]
pub struct MultiIndex<T> {
    one: ByKey<T>,
    more: ByKey<Box<[T]>>,
}

/// `f` applied to the values of a boxed slice (reallocated to its new exact length).
fn edit<T, R>(b: &mut Box<[T]>, f: impl FnOnce(&mut Vec<T>) -> R) -> R {
    let mut v = std::mem::take(b).into_vec();
    let r = f(&mut v);
    *b = v.into_boxed_slice();
    r
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
            Entry::Occupied(_) => edit(self.more.entry(h).or_default(), |m| m.push(v)),
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
            match self.more.get_mut(&h).and_then(|m| edit(m, Vec::pop)) {
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
                edit(m, |m| m.swap_remove(i));
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

    /// Bytes this index holds (table slots and the slices of `more`).
    pub fn metadata_bytes(&self) -> usize {
        hash_table_bytes(self.one.capacity(), size_of::<(u32, T)>())
            + hash_table_bytes(self.more.capacity(), size_of::<(u32, Box<[T]>)>())
            + self
                .more
                .values()
                .map(|v| std::mem::size_of_val::<[T]>(v))
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
    fn addresses_round_trip_in_six_bytes() {
        assert_eq!(std::mem::size_of::<(PackedKey, PackedPage)>(), 10);
        for page in [64usize, 4096, 65536] {
            let mut ix = AddrIndex::new(page);
            let addrs = [0, page, 0x7fff_ffff_f000 / page * page, (1 << 47) - page];
            for (i, &a) in addrs.iter().enumerate() {
                assert!(ix.insert_first(i as u64 * 3 + u64::from(u32::MAX - 20), a));
                assert!(!ix.insert_first(i as u64 * 3 + u64::from(u32::MAX - 20), a + page));
            }
            for (i, &a) in addrs.iter().enumerate() {
                let h = i as u64 * 3 + u64::from(u32::MAX - 20);
                assert!(ix.contains_key(&h));
                assert_eq!(ix.remove(&h), Some(a));
                assert!(!ix.contains_key(&h));
            }
            assert_eq!(ix.insert(5, page * 9), None);
            assert_eq!(ix.insert(5, page * 2), Some(page * 9));
            assert_eq!(ix.remove(&5), Some(page * 2));
            assert_eq!(ix.remove(&5), None);
        }
    }

    #[test]
    fn chains_keep_addresses_per_key_in_order() {
        let page = 4096;
        let mut c = AddrChains::new(page);
        assert_eq!(std::mem::size_of::<(PackedPage, PackedPage)>(), 12);
        for i in 0..5 {
            c.push(7, (10 + i) * page);
            c.push(9, (100 + i) * page);
        }
        c.push(8, page);
        assert_eq!(
            c.remove(&7),
            Some((10..15).map(|i| i * page).collect::<Vec<_>>())
        );
        assert_eq!(c.remove(&7), None);
        c.insert(7, vec![3 * page, 4 * page]);
        c.push(7, 5 * page);
        assert_eq!(c.remove(&7), Some(vec![3 * page, 4 * page, 5 * page]));
        assert_eq!(c.remove(&8), Some(vec![page]));
        assert_eq!(
            c.remove(&9),
            Some((100..105).map(|i| i * page).collect::<Vec<_>>())
        );
        assert!(c.heads.is_empty() && c.next.is_empty());
        // The same address twice under one key: no loop (a debug build refuses it).
        if !cfg!(debug_assertions) {
            c.push(1, page);
            c.push(1, 2 * page);
            c.push(1, page);
            assert!(c.remove(&1).is_some_and(|v| v.len() <= 3));
        }
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
