//! Content-hash indexes that cost one entry per hash in the common case, in slots
//! packed tight (they hold an entry per merged frame or unmerged page).

#![forbid(unsafe_code)]

use std::hash::Hasher;
use std::mem::size_of;

use super::sums::SumSet;
use crate::pool::FrameId;

/// The slots of an open-addressed table of `n` slots in linear-probing order from
/// `start`, wrapping around once.
fn probe_order(start: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| {
        if start + k >= n {
            start + k - n
        } else {
            start + k
        }
    })
}

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

/// An index key as stored (keys are 32-bit checksums, widened at the interface).
fn key(h: u64) -> u32 {
    u32::try_from(h).expect("index keys are 32-bit checksums")
}

/// Bits of a page number in an [`UnstableIndex`] slot: every page below 2^47 with
/// 4 KiB pages (the whole user address space with 4-level page tables). Pages above
/// go to a small side table.
const SLOT_PAGE_BITS: u32 = 35;
/// Bits of the key kept in a slot (a tag: the rest is checked on the page's record).
const SLOT_TAG_BITS: u32 = 48 - SLOT_PAGE_BITS;
const SLOT_PAGE_MASK: u64 = (1 << SLOT_PAGE_BITS) - 1;
const SLOT_EMPTY: u64 = 0;
/// A removed entry: lookups go past it, rebuilding drops it.
const SLOT_GONE: u64 = (1 << 48) - 1;
/// Slots per entry at most, as a fraction: 4 entries per 5 slots.
const LOAD_NUM: usize = 4;
const LOAD_DEN: usize = 5;

/// The unstable index of one full scan: per key, the pages entered under it, as
/// 6-byte slots of one open-addressed table (linear probing). A slot holds the
/// page number (35 bits, plus one so that zero is empty) and 13 bits of the key;
/// the page's record holds the whole key (an unstable page's checksum), so a slot
/// needs no more, and every address it gives is a candidate to be checked by its
/// record (callers do, as they always did: entries may be stale). The table is
/// sized when a scan begins for the pages that may enter it, at most 4 entries per
/// 5 slots: 7.5 bytes per entry, where a hash table of key and address grows by
/// doubling (11 to 26 bytes per entry) and a second key needs a chain (13 more).
///
/// Growing it needs each entry's key: `key_of` reads it from the page's record
/// (and drops the entries whose page left the index).
#[derive(Debug)]
pub struct UnstableIndex {
    slots: Vec<[u8; 6]>,
    /// Entries (not removed), and removed slots not yet reclaimed.
    len: usize,
    gone: usize,
    shift: u32,
    /// Entries whose page number needs more than `SLOT_PAGE_BITS` bits.
    far: Vec<(u32, usize)>,
    /// Entries the table is first allocated for (set when a scan begins).
    expect: usize,
    /// The keys that may pair in this scan (every key when off).
    pairs: PairFilter,
    /// Some entry went in whatever `pairs` said (see [`Self::push_unfiltered`]):
    /// look-ups look under every key.
    bypassed: bool,
}

/// The checksum keys that more than one page not merged held when a full scan
/// began, as one bit per cell of a table of `2^bits` cells (a key's cell: its high
/// bits), set where two or more of those keys fell.
///
/// A page enters the unstable index only at a visit that finds its checksum the
/// same as at its previous visit, so two pages that pair in a full scan both held
/// their checksum when it began: a page whose key had no other is left out of the
/// index (it stays `Unstable`, as the kernel's unstable tree would hold it, and
/// counts in `pages_unshared` the same). Its slot cost 7.5 bytes; the table costs
/// 4 to 8 one-bit cells per key, 0.5 to 1 byte per page the scan visits not merged
/// (as much again while it is built), and lets through the keys whose cell another
/// key shares (an eighth to a quarter of unique keys). Pages that smart scan skips
/// in this scan are left out of it (they do not enter the index either). A page
/// whose checksum came by another way during the scan (a merged page written and
/// found unmerged) misses at most that scan's pairing: its next scan's table has
/// its key.
#[derive(Debug)]
pub struct PairFilter {
    twice: Vec<u64>,
    bits: u32,
    /// Off: every key goes through.
    off: bool,
}

impl Default for PairFilter {
    /// Off.
    fn default() -> Self {
        PairFilter {
            twice: Vec::new(),
            bits: 0,
            off: true,
        }
    }
}

impl PairFilter {
    /// The cell of `key` in a table of `2^bits` cells.
    fn cell(key: u32, bits: u32) -> usize {
        if bits == 0 {
            0
        } else {
            (key >> (32 - bits)) as usize
        }
    }

    /// The filter of `keys`; with how many of them it lets through and the bytes of
    /// the second table it used while being built (of the keys met once, freed
    /// before it returns). No key: no table, and nothing goes through.
    pub fn build(keys: impl Iterator<Item = u32> + Clone) -> (Self, usize, usize) {
        let n = keys.clone().count();
        if n == 0 {
            let none = PairFilter {
                off: false,
                ..PairFilter::default()
            };
            return (none, 0, 0);
        }
        // 4 to 8 cells per key, at least 64, at most 2^32.
        let bits = (n.max(16) * 4).next_power_of_two().trailing_zeros().min(32);
        let words = (1usize << bits).div_ceil(64);
        let mut once = vec![0u64; words];
        let mut twice = vec![0u64; words];
        let mut through = 0;
        for k in keys {
            let c = Self::cell(k, bits);
            let (w, b) = (c / 64, 1u64 << (c % 64));
            if twice[w] & b != 0 {
                through += 1;
            } else if once[w] & b != 0 {
                twice[w] |= b;
                through += 2;
            } else {
                once[w] |= b;
            }
        }
        let transient = once.capacity() * 8;
        let f = PairFilter {
            twice,
            bits,
            off: false,
        };
        (f, through, transient)
    }

    fn admits_key(&self, key: u32) -> bool {
        if self.off {
            return true;
        }
        if self.twice.is_empty() {
            return false;
        }
        let c = Self::cell(key, self.bits);
        self.twice[c / 64] & (1 << (c % 64)) != 0
    }

    pub fn metadata_bytes(&self) -> usize {
        self.twice.capacity() * 8
    }
}

impl UnstableIndex {
    /// An empty index of pages of `page` bytes (a power of two).
    pub fn new(page: usize) -> Self {
        assert!(page.is_power_of_two());
        UnstableIndex {
            slots: Vec::new(),
            len: 0,
            gone: 0,
            shift: page.trailing_zeros(),
            far: Vec::new(),
            expect: 0,
            pairs: PairFilter::default(),
            bypassed: false,
        }
    }

    /// Empty it, memory included; the next table is allocated for `expect` entries.
    /// Every key may enter it.
    pub fn reset(&mut self, expect: usize) {
        self.reset_filtered(expect, PairFilter::default());
    }

    /// Empty it, memory included; the next table is allocated for `expect` entries,
    /// and only keys that `pairs` lets through may enter it (see [`Self::admits`]).
    pub fn reset_filtered(&mut self, expect: usize, pairs: PairFilter) {
        *self = UnstableIndex {
            expect,
            pairs,
            ..UnstableIndex::new(1 << self.shift)
        };
    }

    /// Whether a page under `h` goes into the index: false only for a key that no
    /// other page held when the scan began (see [`PairFilter`]), which no page can
    /// pair with in this scan.
    pub fn admits(&self, h: &u64) -> bool {
        self.pairs.admits_key(key(*h))
    }

    fn tag(key: u32) -> u64 {
        u64::from(key) & ((1 << SLOT_TAG_BITS) - 1)
    }

    fn home(&self, key: u32) -> usize {
        // Multiply-shift onto any table size: the key's high bits pick the slot, its
        // low bits are the tag.
        ((u64::from(key) * self.slots.len() as u64) >> 32) as usize
    }

    fn get(&self, i: usize) -> u64 {
        let mut b = [0; 8];
        b[..6].copy_from_slice(&self.slots[i]);
        u64::from_le_bytes(b)
    }

    fn set(&mut self, i: usize, v: u64) {
        self.slots[i].copy_from_slice(&v.to_le_bytes()[..6]);
    }

    /// The slot value of `addr` under `key`, or None if its page number is too large.
    fn encode(&self, key: u32, addr: usize) -> Option<u64> {
        let n = (addr >> self.shift) as u64 + 1;
        (n < SLOT_PAGE_MASK).then_some(n | Self::tag(key) << SLOT_PAGE_BITS)
    }

    fn addr(&self, v: u64) -> usize {
        (((v & SLOT_PAGE_MASK) - 1) as usize) << self.shift
    }

    /// Slots of a table for `entries` entries.
    fn slots_for(entries: usize) -> usize {
        entries * LOAD_DEN / LOAD_NUM + 1
    }

    /// Whether `more` entries fit without growing.
    pub fn has_room(&self, more: usize) -> bool {
        more == 0 || (self.len + self.gone + more) * LOAD_DEN <= self.slots.len() * LOAD_NUM
    }

    /// Room for `more` entries without growing (growing reads keys with `key_of`).
    pub fn reserve(&mut self, more: usize, key_of: impl Fn(usize) -> Option<u32>) {
        if self.has_room(more) {
            return;
        }
        let need = self.len + self.gone + more;
        // The size a scan begins with: its expected entries, and a 32nd more for the
        // entries removed meanwhile (pages met in it after they left), which hold
        // their slots until a rebuild.
        let sized = self.expect + self.expect / 32;
        let entries = if self.slots.is_empty() {
            need.max(sized)
        } else if self.len + more <= self.expect {
            // Full of removed entries: rebuilt without them at that size, not grown.
            // (Grown, a table that had reached its expected entries with a few dozen
            // removed ones went from 7.5 to 11.3 bytes per entry: pairs kept apart by
            // the VMA budget, 256 MiB, 17.1 bytes per tracked page.)
            sized
        } else {
            // Grown by half of what it holds at least, so that growing stays rare.
            (self.len + more).max(self.len + self.len / 2)
        };
        let old = std::mem::take(&mut self.slots);
        self.slots = vec![[0; 6]; Self::slots_for(entries)];
        self.len = 0;
        self.gone = 0;
        // From the start of a run of full slots, so that each key's pages keep their
        // order (a run may wrap around the end).
        let first = old.iter().position(|s| *s == [0; 6]).unwrap_or(0);
        for k in 0..old.len() {
            let s = old[(first + k) % old.len()];
            let mut b = [0; 8];
            b[..6].copy_from_slice(&s);
            let v = u64::from_le_bytes(b);
            if v == SLOT_EMPTY || v == SLOT_GONE {
                continue;
            }
            let a = self.addr(v);
            if let Some(key) = key_of(a) {
                if Self::tag(key) == v >> SLOT_PAGE_BITS {
                    self.place(key, v);
                }
            }
        }
    }

    fn place(&mut self, key: u32, v: u64) {
        let n = self.slots.len();
        let mut i = self.home(key);
        while self.get(i) != SLOT_EMPTY {
            i = if i + 1 == n { 0 } else { i + 1 };
        }
        self.set(i, v);
        self.len += 1;
    }

    /// Add `addr` under `key` (after those already there), if the index admits the
    /// key; room must have been reserved (see [`Self::reserve`]).
    pub fn push_reserved(&mut self, h: u64, addr: usize) {
        let key = key(h);
        if self.pairs.admits_key(key) {
            self.enter(key, addr);
        }
    }

    /// Add `addr` under `key` whatever the filter says: a merge domain's candidate
    /// that the domain has not heard of yet, which the broker may ask for by its
    /// checksum (found here) once another member announces it too.
    pub fn push_unfiltered(&mut self, h: u64, addr: usize, key_of: impl Fn(usize) -> Option<u32>) {
        self.reserve(1, key_of);
        self.bypassed = true;
        self.enter(key(h), addr);
    }

    fn enter(&mut self, key: u32, addr: usize) {
        match self.encode(key, addr) {
            Some(v) => {
                assert!(
                    (self.len + self.gone + 1) * LOAD_DEN <= self.slots.len() * LOAD_NUM,
                    "no room reserved"
                );
                self.place(key, v);
            }
            None => self.far.push((key, addr)),
        }
    }

    /// Add `addr` under `key` (after those already there), if the index admits the key.
    pub fn push(&mut self, h: u64, addr: usize, key_of: impl Fn(usize) -> Option<u32>) {
        if !self.admits(&h) {
            return;
        }
        self.reserve(1, key_of);
        self.push_reserved(h, addr);
    }

    /// The slots under `key`'s tag, in order (those of other keys with the same tag
    /// included: the caller checks each page's record).
    fn slots_of(&self, key: u32) -> impl Iterator<Item = (usize, u64)> + '_ {
        let n = self.slots.len();
        let tag = Self::tag(key);
        let start = if n == 0 { 0 } else { self.home(key) };
        probe_order(start, n)
            .map(|i| (i, self.get(i)))
            .take_while(|&(_, v)| v != SLOT_EMPTY)
            .filter(move |&(_, v)| v != SLOT_GONE && v >> SLOT_PAGE_BITS == tag)
    }

    /// Whether some page may be under `key` (a hint: a page under another key with
    /// the same 13-bit tag answers too).
    pub fn may_contain(&self, h: &u64) -> bool {
        let key = key(*h);
        if !self.bypassed && !self.pairs.admits_key(key) {
            return false;
        }
        self.slots_of(key).next().is_some() || self.far.iter().any(|&(k, _)| k == key)
    }

    /// The pages under `key` (and some under keys with the same tag), first entered
    /// first (those of the side table after the others).
    pub fn candidates(&self, h: &u64) -> impl Iterator<Item = usize> + '_ {
        let key = key(*h);
        // No page under a key the index does not admit is in it (unless let in).
        let admitted = self.bypassed || self.pairs.admits_key(key);
        self.slots_of(key)
            .take_while(move |_| admitted)
            .map(|(_, v)| self.addr(v))
            .chain(
                self.far
                    .iter()
                    .filter(move |&&(k, _)| k == key)
                    .map(|&(_, a)| a),
            )
    }

    /// Remove `addr` from under `key`, if it is there.
    pub fn remove(&mut self, h: &u64, addr: usize) {
        let key = key(*h);
        if let Some(v) = self.encode(key, addr) {
            let at = self.slots_of(key).find(|&(_, s)| s == v).map(|(i, _)| i);
            if let Some(i) = at {
                self.set(i, SLOT_GONE);
                self.len -= 1;
                self.gone += 1;
            }
        } else if let Some(i) = self.far.iter().position(|&e| e == (key, addr)) {
            self.far.swap_remove(i);
        }
    }

    /// Entries (tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len + self.far.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes this index holds (its table as allocated).
    pub fn metadata_bytes(&self) -> usize {
        self.slots.capacity() * 6
            + self.far.capacity() * size_of::<(u32, usize)>()
            + self.pairs.metadata_bytes()
    }
}

/// A frame id that is no frame: an empty slot of a [`FrameIndex`].
const FRAME_EMPTY: u32 = u32::MAX;
/// A removed entry of a [`FrameIndex`]: lookups go past it, rebuilding drops it.
const FRAME_GONE: u32 = u32::MAX - 1;
/// Frames per slot of a [`FrameIndex`] at most, as a fraction: 6 per 7 slots (fuller
/// than the unstable index: it lives as long as the frames, and grows in small steps).
const FRAME_LOAD_NUM: usize = 6;
const FRAME_LOAD_DEN: usize = 7;

/// The stable index: per key, the frames holding a content with that checksum, as
/// 5-byte slots of one open-addressed table (linear probing). A slot holds the
/// frame id and 8 bits of the key; the frame table holds each frame's whole key
/// (`key_of`), so a slot needs no more, and lookups check it. At most 6 entries
/// per 7 slots, grown by an eighth (as the frame table): 5.8 to 6.6 bytes per frame,
/// where a hash table of key and frame id grows by doubling (10.3 to 20.6). Keys with
/// more than one frame (`max_page_sharing` reached, or a checksum shared by other
/// bytes) are counted in a small map, for [`FrameIndex::groups`].
#[derive(Debug, Default)]
pub struct FrameIndex {
    slots: Vec<[u8; 5]>,
    len: usize,
    gone: usize,
    /// The keys with more than one frame (their frames are counted when asked).
    multi: SumSet,
}

impl FrameIndex {
    fn tag(key: u32) -> u8 {
        key as u8
    }

    fn home(&self, key: u32) -> usize {
        ((u64::from(key) * self.slots.len() as u64) >> 32) as usize
    }

    fn frame_at(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.slots[i][..4].try_into().expect("4 bytes"))
    }

    fn set(&mut self, i: usize, f: u32, tag: u8) {
        let b = f.to_le_bytes();
        self.slots[i] = [b[0], b[1], b[2], b[3], tag];
    }

    /// Slots under `key`'s tag from its home (frames of other keys with the same tag
    /// included), as (slot, frame).
    fn slots_of(&self, key: u32) -> impl Iterator<Item = (usize, u32)> + '_ {
        let n = self.slots.len();
        let tag = Self::tag(key);
        let start = if n == 0 { 0 } else { self.home(key) };
        probe_order(start, n)
            .map(|i| (i, self.frame_at(i), self.slots[i][4]))
            .take_while(|&(_, f, _)| f != FRAME_EMPTY)
            .filter(move |&(_, f, t)| f != FRAME_GONE && t == tag)
            .map(|(i, f, _)| (i, f))
    }

    /// Slots of a table for `entries` entries.
    fn slots_for(entries: usize) -> usize {
        entries * FRAME_LOAD_DEN / FRAME_LOAD_NUM + 1
    }

    /// Rebuild for `entries` entries, each frame's key read with `key_of`.
    fn rebuild(&mut self, entries: usize, key_of: &impl Fn(FrameId) -> u64) {
        let old = std::mem::take(&mut self.slots);
        self.len = 0;
        self.gone = 0;
        if entries == 0 {
            return;
        }
        self.slots = vec![[0xFF; 5]; Self::slots_for(entries)];
        // From the start of a run of full slots: each key's frames keep their order.
        let first = (0..old.len())
            .find(|&i| old[i][..4] == [0xFF; 4])
            .unwrap_or(0);
        for k in 0..old.len() {
            let s = old[(first + k) % old.len()];
            let f = u32::from_le_bytes(s[..4].try_into().expect("4 bytes"));
            if f != FRAME_EMPTY && f != FRAME_GONE {
                self.place(key(key_of(f)), f);
            }
        }
    }

    fn place(&mut self, key: u32, f: FrameId) {
        let n = self.slots.len();
        let mut i = self.home(key);
        while self.frame_at(i) != FRAME_EMPTY {
            i = if i + 1 == n { 0 } else { i + 1 };
        }
        self.set(i, f, Self::tag(key));
        self.len += 1;
    }

    /// Room for `n` more frames at once: one rebuild, where pushing them one by one
    /// grows the table by an eighth as often as it fills (a segment's 4,096 frames
    /// into an index of 20,000: three rebuilds of the whole index).
    pub fn reserve(&mut self, n: usize, key_of: impl Fn(FrameId) -> u64) {
        if (self.len + self.gone + n) * FRAME_LOAD_DEN > self.slots.len() * FRAME_LOAD_NUM {
            let entries = (self.len + n).max(self.len + self.len / 8).max(8);
            self.rebuild(entries, &key_of);
        }
    }

    /// Give back what frames removed left behind: a table more than an eighth larger
    /// than one rebuilt for its frames would be (rebuilt at growth, with an eighth of
    /// room) is rebuilt at that size. Removals (a retired segment's frames, pages of
    /// the own pool moved onto a domain's) otherwise kept the table at its largest
    /// until it was nearly empty: once a merge domain of 4 × 64 MiB had compacted
    /// after half of the pages were written, a member's index held 16,211 slots for
    /// 7,540 frames (10.8 bytes a frame) where a rebuild takes 8,797 (5.8). Called at
    /// the end of a full scan, when frames have stopped coming and going.
    pub fn trim(&mut self, key_of: impl Fn(FrameId) -> u64) {
        let entries = self.len + self.len / 8;
        let fresh = Self::slots_for(entries);
        if self.slots.len() > fresh + fresh / 8 {
            self.rebuild(entries, &key_of);
        }
        self.multi.fold();
    }

    /// Add frame `f` under `h` (after those already there); `key_of` gives each
    /// frame's key (the frame table's).
    pub fn push(&mut self, h: u64, f: FrameId, key_of: impl Fn(FrameId) -> u64) {
        assert!(f < FRAME_GONE, "frame id {f}");
        debug_assert_eq!(key_of(f), h, "frame {f} is under its own key");
        if (self.len + self.gone + 1) * FRAME_LOAD_DEN > self.slots.len() * FRAME_LOAD_NUM {
            let entries = (self.len + 1).max(self.len + self.len / 8).max(8);
            self.rebuild(entries, &key_of);
        }
        let k = key(h);
        if self.get(h, &key_of).next().is_some() {
            self.multi.insert(k);
        }
        self.place(k, f);
    }

    /// The frames under `h`, the first pushed first.
    pub fn get<'a>(
        &'a self,
        h: u64,
        key_of: &'a impl Fn(FrameId) -> u64,
    ) -> impl Iterator<Item = FrameId> + 'a {
        self.slots_of(key(h))
            .map(|(_, f)| f)
            .filter(move |&f| key_of(f) == h)
    }

    /// Whether some frame is under `h`.
    pub fn contains(&self, h: u64, key_of: impl Fn(FrameId) -> u64) -> bool {
        self.get(h, &key_of).next().is_some()
    }

    /// Remove frame `f` from under `h`.
    pub fn remove(&mut self, h: u64, f: FrameId, key_of: impl Fn(FrameId) -> u64) {
        let k = key(h);
        let Some(i) = self.slots_of(k).find(|&(_, g)| g == f).map(|(i, _)| i) else {
            return;
        };
        self.set(i, FRAME_GONE, 0);
        self.len -= 1;
        self.gone += 1;
        if self.multi.contains(k) && self.get(h, &key_of).nth(1).is_none() {
            self.multi.remove(k);
        }
        // Memory back once it holds an eighth of what it could (at once when empty).
        if self.len * 8 < self.slots.len() * FRAME_LOAD_NUM / FRAME_LOAD_DEN || self.len == 0 {
            self.rebuild(self.len + self.len / 8, &key_of);
        }
    }

    /// Every key with more than one frame, with its frames.
    pub fn groups<'a>(
        &'a self,
        key_of: &'a impl Fn(FrameId) -> u64,
    ) -> impl Iterator<Item = Vec<FrameId>> + 'a {
        self.multi
            .iter()
            .map(move |k| self.get(u64::from(k), key_of).collect())
    }

    /// Bytes this index holds (its table as allocated, and the map of keys with more
    /// than one frame).
    pub fn metadata_bytes(&self) -> usize {
        self.slots.capacity() * 5 + self.multi.metadata_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_pair_filter_lets_through_keys_held_twice_and_the_index_takes_no_other() {
        // 4 keys: cells of 6 bits (64 cells), the keys' top 6 bits 4, 8, 8, 12.
        let keys = [0x1000_0000u32, 0x2000_0000, 0x2000_0001, 0x3000_0000];
        let (f, through, transient) = PairFilter::build(keys.iter().copied());
        assert_eq!(through, 2);
        assert_eq!(transient, 8);
        assert!(f.admits_key(0x2000_0000) && f.admits_key(0x2000_0001));
        assert!(!f.admits_key(0x1000_0000) && !f.admits_key(0x3000_0000));
        let mut ix = UnstableIndex::new(4096);
        ix.reset_filtered(through, f);
        let none = |_: usize| None;
        ix.push(0x1000_0000, 0x1000, none);
        ix.push(0x2000_0000, 0x2000, none);
        assert!(!ix.may_contain(&0x1000_0000));
        assert_eq!(ix.candidates(&0x1000_0000).count(), 0);
        assert_eq!(ix.candidates(&0x2000_0000).collect::<Vec<_>>(), [0x2000]);
        // Unfiltered, every key goes in.
        ix.reset(4);
        ix.push(0x1000_0000, 0x1000, none);
        assert_eq!(ix.candidates(&0x1000_0000).collect::<Vec<_>>(), [0x1000]);
    }

    #[test]
    fn frames_are_kept_and_removed_per_key() {
        // Keys 7 and 7 + 256 share a tag; the frame table says which is whose.
        let keys: HashMap<FrameId, u64> = [(1, 7), (2, 7), (3, 7), (4, 9), (5, 7 + 256)].into();
        let key_of = |f: FrameId| keys[&f];
        let mut ix = FrameIndex::default();
        for f in 1..=5 {
            ix.push(keys[&f], f, key_of);
        }
        assert_eq!(ix.get(7, &key_of).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(ix.get(7 + 256, &key_of).collect::<Vec<_>>(), vec![5]);
        assert_eq!(ix.groups(&key_of).collect::<Vec<_>>(), vec![vec![1, 2, 3]]);
        ix.remove(7, 1, key_of);
        assert_eq!(ix.get(7, &key_of).collect::<Vec<_>>(), vec![2, 3]);
        ix.remove(7, 3, key_of);
        assert_eq!(ix.groups(&key_of).count(), 0);
        ix.remove(7, 2, key_of);
        assert!(!ix.contains(7, key_of));
        ix.remove(9, 5, key_of); // not under 9: nothing happens
        assert_eq!(ix.get(9, &key_of).collect::<Vec<_>>(), vec![4]);
        assert!(ix.contains(7 + 256, key_of));
    }

    /// A key per frame, spread as checksums are.
    fn spread_key(f: FrameId) -> u64 {
        u64::from(f).wrapping_mul(2_654_435_761) & 0xFFFF_FFFF
    }

    /// An index of frames `0..n`, each under its `spread_key`.
    fn index_of(n: u32) -> FrameIndex {
        let mut ix = FrameIndex::default();
        for f in 0..n {
            ix.push(spread_key(f), f, spread_key);
        }
        ix
    }

    #[test]
    fn room_reserved_for_a_segment_takes_its_frames_without_growing_again() {
        let key_of = spread_key;
        let mut ix = index_of(20_000);
        ix.reserve(4096, key_of);
        let slots = ix.slots.len();
        assert!(
            slots * FRAME_LOAD_NUM >= (20_000 + 4096) * FRAME_LOAD_DEN,
            "{slots}"
        );
        for f in 20_000..24_096u32 {
            ix.push(key_of(f), f, key_of);
        }
        assert_eq!(ix.slots.len(), slots, "grown again");
        assert_eq!(ix.len, 24_096);
        assert!((0..24_096u32).all(|f| ix.get(key_of(f), &key_of).any(|g| g == f)));
    }

    #[test]
    fn a_frame_index_trimmed_after_removals_keeps_its_frames_in_less_memory() {
        let key_of = spread_key;
        let mut ix = index_of(40_000);
        // Nothing removed: trimming changes nothing.
        let full = ix.slots.len();
        ix.trim(key_of);
        assert_eq!(ix.slots.len(), full);
        // A third removed (a segment retired): the table keeps its size until trimmed.
        for f in (0..40_000u32).filter(|f| f % 3 == 0) {
            ix.remove(key_of(f), f, key_of);
        }
        assert_eq!(ix.slots.len(), full);
        ix.trim(key_of);
        let left = 40_000 - 13_334;
        assert_eq!(ix.len, left);
        assert_eq!(ix.gone, 0);
        // Sized as a rebuild at growth: an eighth of room, at most 6 per 7 slots.
        assert_eq!(
            ix.slots.len(),
            (left + left / 8) * FRAME_LOAD_DEN / FRAME_LOAD_NUM + 1
        );
        assert!(
            ix.slots.len() * 4 < full * 3,
            "{} of {full}",
            ix.slots.len()
        );
        for f in 0..40_000u32 {
            assert_eq!(ix.contains(key_of(f), key_of), f % 3 != 0, "frame {f}");
        }
        // Trimmed once, the table stays as it is.
        let trimmed = ix.slots.len();
        ix.trim(key_of);
        assert_eq!(ix.slots.len(), trimmed);
    }

    #[test]
    fn a_frame_index_that_empties_gives_its_memory_back() {
        let key_of = |f: FrameId| u64::from(f % 50_000).wrapping_mul(2_654_435_761) & 0xFFFF_FFFF;
        let mut ix = FrameIndex::default();
        for f in 0..100_000u32 {
            ix.push(key_of(f), f, key_of);
        }
        let full = ix.metadata_bytes();
        // 5-byte slots at most 6 entries per 7 slots, grown by an eighth: under 6.7
        // bytes a frame (and the map of keys with two frames each: 50,000 here).
        let slots = full - ix.multi.metadata_bytes();
        assert!(slots <= 100_000 * 67 / 10, "{slots}");
        assert_eq!(ix.groups(&key_of).count(), 50_000);
        // The keys with two frames, once folded at a full scan's end: 4 bytes each
        // (a hash map of key and count took 9 to 18).
        ix.trim(key_of);
        let multi = ix.multi.metadata_bytes();
        assert!(multi <= 50_000 * 4 + 50_000 / 2, "{multi}");
        assert_eq!(ix.groups(&key_of).count(), 50_000);
        assert!(ix.groups(&key_of).all(|g| g.len() == 2));
        for f in 0..100_000u32 {
            assert!(ix.get(key_of(f), &key_of).any(|g| g == f));
            ix.remove(key_of(f), f, key_of);
        }
        assert_eq!(ix.get(7, &key_of).count(), 0);
        assert_eq!(ix.metadata_bytes(), 0, "bytes kept");
    }

    /// The key of each address pushed, as the page records would say (a page left
    /// the index once it is missing).
    fn keys(m: &HashMap<usize, u64>) -> impl Fn(usize) -> Option<u32> + '_ {
        |a| m.get(&a).map(|&h| key(h))
    }

    #[test]
    fn unstable_pages_are_kept_per_key_in_order_in_six_byte_slots() {
        for page in [64usize, 4096, 65536] {
            let mut ix = UnstableIndex::new(page);
            let mut recs = HashMap::new();
            // Keys sharing a tag (same low 13 bits) and a slot, keys far apart; an
            // address too high for a slot (with small pages) goes to the side table.
            let high = (1usize << 47) - 2 * page;
            let entries: Vec<(u64, usize)> = (0..200usize)
                .map(|i| {
                    let h = match i % 4 {
                        0 => 7,
                        1 => 7 + (1 << 13),
                        2 => u64::from(u32::MAX) - (i as u64 % 3),
                        _ => (i as u64) << 20,
                    };
                    (h, if i == 13 { high } else { (i + 1) * page })
                })
                .collect();
            for &(h, a) in &entries {
                recs.insert(a, h);
                ix.push(h, a, keys(&recs));
            }
            assert_eq!(ix.len(), entries.len());
            for h in [7, 7 + (1 << 13), u64::from(u32::MAX)] {
                assert!(ix.may_contain(&h));
                // In the order pushed, those of the side table last.
                let mut want: Vec<usize> =
                    entries.iter().filter(|e| e.0 == h).map(|e| e.1).collect();
                let far = ix.encode(key(h), high).is_none();
                if let Some(i) = want.iter().position(|&a| a == high && far) {
                    let a = want.remove(i);
                    want.push(a);
                }
                // Candidates may include another key's pages with the same tag (the
                // caller checks records); in order, and none of this key missing.
                let got: Vec<usize> = ix.candidates(&h).filter(|a| recs[a] == h).collect();
                assert_eq!(got, want, "page {page}, key {h}");
            }
            assert!(ix.candidates(&5).all(|a| recs[&a] != 5));
            // Removal, then growth that drops pages whose record left the index.
            let (h0, a0) = entries[0];
            ix.remove(&h0, a0);
            assert!(!ix.candidates(&h0).any(|a| a == a0));
            ix.remove(&entries[13].0, high);
            assert!(!ix.candidates(&entries[13].0).any(|a| a == high));
            recs.remove(&a0);
            recs.remove(&entries[1].1);
            for i in 0..1000usize {
                let a = (1000 + i) * page;
                recs.insert(a, 99);
                ix.push(99, a, keys(&recs));
            }
            assert_eq!(ix.candidates(&99).count(), 1000);
            assert!(!ix.candidates(&entries[1].0).any(|a| a == entries[1].1));
            assert_eq!(ix.len(), entries.len() - 3 + 1000);
            let bytes = ix.metadata_bytes();
            assert!(bytes <= ix.len() * 6 * 2, "{bytes} bytes for {}", ix.len());
            ix.reset(0);
            assert!(ix.is_empty() && ix.metadata_bytes() == 0);
        }
    }

    #[test]
    fn an_unstable_index_sized_for_its_scan_costs_under_8_bytes_an_entry() {
        let page = 4096;
        let n = 100_000;
        let mut ix = UnstableIndex::new(page);
        ix.reset(n);
        let mut recs = HashMap::new();
        let mut h = 1u64;
        for i in 0..n {
            h = h
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = h >> 32;
            recs.insert((i + 1) * page, k);
            ix.push(k, (i + 1) * page, keys(&recs));
        }
        for (&a, &k) in &recs {
            assert!(ix.candidates(&k).any(|c| c == a));
        }
        // 6-byte slots, 4 entries per 5, and a 32nd more entries for removed ones.
        let per = ix.metadata_bytes() as f64 / n as f64;
        assert!(per <= 7.5 * 33.0 / 32.0 + 0.01, "{per} bytes per entry");
    }

    #[test]
    fn removed_entries_do_not_grow_an_index_past_its_scan_s_size() {
        // Filled to the entries it was sized for, with removals on the way (pages met
        // in it after they left): rebuilt without them, never grown by half.
        let page = 4096;
        let n = 10_000;
        let mut ix = UnstableIndex::new(page);
        ix.reset(n);
        let mut recs = HashMap::new();
        let mut sized = None;
        for i in 0..n + 2_000 {
            let (a, k) = (
                (i + 1) * page,
                (i as u64).wrapping_mul(0x9E37_79B9) & 0xFFFF_FFFF,
            );
            recs.insert(a, k);
            ix.push(k, a, keys(&recs));
            sized.get_or_insert(ix.metadata_bytes());
            if i % 5 == 0 {
                // Left the index: met again, it is removed.
                recs.remove(&a);
                ix.remove(&k, a);
            }
        }
        assert_eq!(ix.metadata_bytes(), sized.unwrap(), "grown");
        for (&a, &k) in &recs {
            assert!(ix.candidates(&k).any(|c| c == a));
        }
    }
}
