//! Frames: the shared copies of merged pages.
//!
//! [`FrameTable`] is the pure bookkeeping (allocation, reference counts, the
//! fork rule); [`Pool`] is the memfd that holds the bytes, read through a
//! `MAP_SHARED` view and written with `pwrite`.
//!
//! The fork rule (docs/design.md, "Fork rule"): after `fork()` a child may map a
//! frame with no PTE present, and would read zeros if the parent punched it. So a frame
//! born before the latest fork is not punched when its last mapper in this
//! process lets go; it waits in `deferred` until no other process maps the
//! pool (checked from /proc/*/maps by the engine), and only then is freed.
//!
//! Frames of a merge domain's sealed segments get ids from [`DOMAIN_BASE`] on,
//! a block of [`BLOCK_FRAMES`] ids per segment (so a run of consecutive ids
//! never crosses from one segment into another, and page records keep their
//! 32-bit frame id). They are counted like the pool's, but never freed or
//! punched by this process: a segment is immutable and the kernel frees it when
//! its last mapping and descriptor are gone. A domain frame stays in the index
//! with no reference (it is *offered*: other members made it) until its segment
//! is retired; a retired segment's block goes once no page of ours maps it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CStr;
use std::io;

mod free;
use free::FreeIds;

use crate::sys::memfd::Memfd;
use crate::sys::mman::Mapping;

pub type FrameId = u32;

/// Name of the pool memfd; merged pages show as `/memfd:ksm-frames (deleted)` in maps.
pub const POOL_NAME: &CStr = c"ksm-frames";
pub const POOL_PATH_PREFIX: &str = "/memfd:ksm-frames";

/// The first frame id of domain segments (ids below are the pool's).
pub const DOMAIN_BASE: FrameId = 1 << 31;
/// Ids given to each domain segment (its frames at most).
pub const BLOCK_FRAMES: u32 = crate::domain::proto::SEGMENT_FRAMES;
/// Blocks of domain ids there are.
const BLOCKS: u32 = (u32::MAX - DOMAIN_BASE) / BLOCK_FRAMES;

/// Whether `f` names a frame of a domain segment.
pub fn is_domain(f: FrameId) -> bool {
    f >= DOMAIN_BASE
}

/// Whether domain frames `a` and `b` are of the same segment.
pub fn same_block(a: FrameId, b: FrameId) -> bool {
    is_domain(a) && is_domain(b) && split_domain(a).0 == split_domain(b).0
}

/// The frames of one domain segment, as this process uses them.
#[derive(Debug, Clone)]
struct Block {
    /// The segment's identity.
    id: u64,
    /// Pages of ours mapping each frame (`MANY`: see `FrameTable::many`).
    refs: Vec<u8>,
    hash: Vec<u32>,
    /// Pages of ours mapping its frames (Σ refs).
    pages: u64,
    /// Retired (or the domain was left): no longer in the index, kept while mapped.
    retired: bool,
    /// Full scans completed since it entered the index.
    age: u32,
}

/// The blocks held, by block number: a vector, since block numbers are handed out
/// from 0 up and reused, so that a domain frame's block is one index away (its key,
/// references and room are looked up many times a scan; an ordered map's search
/// was measurable).
#[derive(Debug, Default, Clone)]
struct Blocks(Vec<Option<Block>>);

impl Blocks {
    fn get(&self, b: u32) -> Option<&Block> {
        self.0.get(b as usize)?.as_ref()
    }

    fn get_mut(&mut self, b: u32) -> Option<&mut Block> {
        self.0.get_mut(b as usize)?.as_mut()
    }

    fn insert(&mut self, b: u32, blk: Block) {
        let i = b as usize;
        if self.0.len() <= i {
            self.0.resize_with(i + 1, || None);
        }
        self.0[i] = Some(blk);
    }

    fn remove(&mut self, b: u32) {
        if let Some(slot) = self.0.get_mut(b as usize) {
            *slot = None;
        }
        while matches!(self.0.last(), Some(None)) {
            self.0.pop();
        }
    }

    /// (block number, block), by block number.
    fn iter(&self) -> impl Iterator<Item = (u32, &Block)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(b, blk)| Some((b as u32, blk.as_ref()?)))
    }

    fn values(&self) -> impl Iterator<Item = &Block> {
        self.0.iter().flatten()
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Block> {
        self.0.iter_mut().flatten()
    }

    fn len(&self) -> usize {
        self.values().count()
    }
}

/// Frame bookkeeping, no syscalls (fuzzed and unit-tested).
#[derive(Debug, Default, Clone)]
pub struct FrameTable {
    /// Each frame's reference count, `MANY` for counts of `MANY` and more (in `many`).
    refs: Vec<u8>,
    /// Reference counts of `MANY` and more (a content `max_page_sharing` lets many
    /// pages share, often 256 a frame): 1 byte per frame instead of 4 for every other.
    many: HashMap<FrameId, u32>,
    /// Each frame's index key: a 32-bit checksum (the scanner's `key_of`), widened
    /// to `u64` at the interface.
    hash: Vec<u32>,
    /// One bit per id of the table: handed out before the latest fork (a child may
    /// map it while the pool is not quiet). Always as long as the table, so that a
    /// fork changes no figure of the parent's.
    exposed: Vec<u64>,
    /// Free ids below the end of the table (the free ids at its end are dropped, the
    /// table shrinks instead).
    free: FreeIds,
    /// The frame handed out last (allocation continues after it).
    last: Option<FrameId>,
    deferred: Vec<FrameId>,
    /// Unreferenced frames that a vanished mapping may still map (see `decref_suspect`).
    suspects: Vec<FrameId>,
    /// Referenced frames that a vanished mapping may map as well (see `decref_suspect`):
    /// whichever reference goes last, they become suspects, never free at once.
    mapped_elsewhere: BTreeSet<FrameId>,
    capacity: u32,
    /// Incremented in the parent at every fork.
    fork_epoch: u32,
    /// The fork epoch at which we last saw no other process mapping the pool.
    quiet_epoch: u32,
    live: u32,
    /// Domain segments by block number, and block numbers by segment identity.
    blocks: Blocks,
    block_of: HashMap<u64, u32>,
    next_block: u32,
    free_blocks: Vec<u32>,
    /// Blocks marked retired (so that the scan asks in O(1) whether any is).
    retired_blocks: u32,
    /// Changes to which domain frames our pages map, or how many (for usage reports).
    domain_changes: u64,
}

/// A reference count kept in `FrameTable::many`.
const MANY: u8 = u8::MAX;

/// What to do with a frame whose last reference went away.
#[derive(Debug, PartialEq, Eq)]
pub enum Release {
    /// Still referenced.
    Kept,
    /// Punch it now.
    Free(FrameId),
    /// A child may map it: keep its bytes until the pool is quiet.
    Deferred,
    /// A vanished mapping may still map it: keep its bytes until
    /// [`FrameTable::clear_suspects`] finds no mapping of it.
    Suspect,
}

impl FrameTable {
    pub fn new(capacity: u32) -> Self {
        FrameTable {
            capacity,
            ..Default::default()
        }
    }

    /// A fresh frame with no reference yet (the caller adds them).
    ///
    /// Frames are handed out in ascending order from the last one: pages merged one
    /// after another then map consecutive file offsets, and the kernel coalesces
    /// their VMAs (one VMA for a copied run instead of one per page).
    pub fn alloc(&mut self, hash: u64) -> Option<FrameId> {
        let want = self.last.map_or(0, |l| l.wrapping_add(1));
        // The next free frame after the last one, else the lowest free one (free frames
        // tend to form runs, so allocation stays consecutive), else a new one at the end.
        let reuse = self.free.next_from(want).or_else(|| self.free.next_from(0));
        let f = match reuse {
            Some(f) => f,
            None => u32::try_from(self.refs.len())
                .ok()
                .filter(|&f| f < self.capacity)?,
        };
        self.hand_out(f, hash);
        self.last = Some(f);
        Some(f)
    }

    /// Hand out frame `f`: a free one, or the one just past the end of the table.
    fn hand_out(&mut self, f: FrameId, hash: u64) {
        let i = f as usize;
        if i == self.refs.len() {
            self.push_id();
        } else {
            let was_free = self.free.remove(f);
            debug_assert!(was_free, "frame {f} handed out twice");
        }
        self.refs[i] = 0;
        self.hash[i] = key32(hash);
        // Born after the latest fork: no child maps it.
        if let Some(w) = self.exposed.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
        self.live += 1;
    }

    /// Whether a forked child may still map frame `f` (handed out before the latest
    /// fork, and no quiet pool seen since).
    fn child_may_map(&self, f: FrameId) -> bool {
        let i = f as usize;
        self.quiet_epoch < self.fork_epoch
            && self
                .exposed
                .get(i / 64)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Make the table reach id `f` (the ids added are free), so that a frame offset
    /// past its end can be handed out or reserved.
    fn grow_to(&mut self, f: FrameId) {
        while self.refs.len() <= f as usize {
            let g = self.refs.len() as FrameId;
            self.push_id();
            self.free.insert(g);
        }
    }

    /// One more id at the end of the table. The table grows by an eighth at a time
    /// rather than doubling (it is one of the larger pieces of metadata; its vectors
    /// are small next to the frames they describe, so copying them is cheap).
    fn push_id(&mut self) {
        if self.refs.len() == self.refs.capacity() {
            let more = (self.refs.len() / 8).max(64);
            self.refs.reserve_exact(more);
            self.hash.reserve_exact(more);
            self.exposed.reserve_exact(
                (self.refs.capacity().div_ceil(64)).saturating_sub(self.exposed.len()),
            );
        }
        if self.refs.len() % 64 == 0 {
            self.exposed.push(0);
        }
        self.refs.push(0);
        self.hash.push(0);
    }

    /// `hashes.len()` fresh frames with consecutive ids (so that one mapping of the
    /// pool covers a run of merged pages): right after the last frame handed out if
    /// those are free (runs merged one after another stay one mapping), else the
    /// first free stretch long enough, else at the end of the table. Freed ids are
    /// reused before the table grows, so it does not grow with every run ever merged. None if the
    /// capacity does not allow it (the caller merges page by page then).
    pub fn alloc_run(&mut self, hashes: &[u64]) -> Option<FrameId> {
        let n = u32::try_from(hashes.len()).ok()?;
        let len = u32::try_from(self.refs.len()).ok()?;
        let fits_capacity = |f0: u32| f0.checked_add(n).is_some_and(|e| e <= self.capacity);
        if n == 0 {
            return None;
        }
        let usable = |t: &Self, f0: u32| {
            fits_capacity(f0) && (f0..f0 + n).all(|f| f >= len || t.free.contains(f))
        };
        let after = self
            .last
            .map(|l| l + 1)
            .filter(|&f0| f0 <= len && usable(self, f0));
        // Continuing the last run inside the table, else a free stretch, and only
        // then growing the table (continuing the last run if it ended the table).
        let first = after
            .filter(|&f0| f0 + n <= len)
            .or_else(|| self.free_stretch(n))
            .or(after)
            .or_else(|| Some(len).filter(|&f0| fits_capacity(f0)))?;
        for (i, &h) in hashes.iter().enumerate() {
            self.hand_out(first + i as u32, h);
        }
        self.last = Some(first + n - 1);
        Some(first)
    }

    /// The first run of `n` consecutive free ids (looking at the first few thousand
    /// free ids only, so that a fragmented table costs little to search), else the
    /// free ids that end the table, which a run may go on from past its end.
    fn free_stretch(&self, n: u32) -> Option<FrameId> {
        let len = u32::try_from(self.refs.len()).ok()?;
        let (mut start, mut count, mut prev) = (0, 0, None::<u32>);
        for f in self.free.iter().take(4096) {
            if prev.is_some_and(|p| p + 1 == f) {
                count += 1;
            } else {
                (start, count) = (f, 1);
            }
            prev = Some(f);
            if count == n {
                return Some(start);
            }
        }
        // The free ids at the end of the table, looked at from the back (at most n).
        let mut tail = len;
        while tail > 0 && len - tail < n && self.free.contains(tail - 1) {
            tail -= 1;
        }
        (tail < len && tail.checked_add(n)? <= self.capacity).then_some(tail)
    }

    /// Frame `f` itself, if it is free (merging pages in place where their mapping
    /// already covers that offset keeps the mapping whole).
    pub fn alloc_at(&mut self, f: FrameId, hash: u64) -> Option<FrameId> {
        if !self.is_free(f) {
            return None;
        }
        self.grow_to(f);
        self.hand_out(f, hash);
        Some(f)
    }

    /// Whether [`FrameTable::alloc_at`] can hand out `f`: free, or past the end of the
    /// table (within capacity).
    pub fn is_free(&self, f: FrameId) -> bool {
        f < self.capacity && (!self.exists(f) || self.free.contains(f))
    }

    /// Whether `f` is handed out now (referenced, being merged, deferred or suspect).
    pub fn is_live(&self, f: FrameId) -> bool {
        if is_domain(f) {
            return self.exists(f);
        }
        self.exists(f) && !self.free.contains(f)
    }

    /// Whether `f` was ever handed out (its counts can be asked for); a domain frame:
    /// whether its segment's block is here.
    pub fn exists(&self, f: FrameId) -> bool {
        if is_domain(f) {
            return self.domain(f).is_some();
        }
        (f as usize) < self.refs.len()
    }

    /// The block of domain frame `f` and its index there.
    fn domain(&self, f: FrameId) -> Option<(&Block, usize)> {
        let (b, i) = split_domain(f);
        let blk = self.blocks.get(b)?;
        (i < blk.refs.len()).then_some((blk, i))
    }

    fn domain_mut(&mut self, f: FrameId) -> (&mut Block, usize) {
        let (b, i) = split_domain(f);
        let blk = self
            .blocks
            .get_mut(b)
            .expect("a domain frame of a block we hold");
        (blk, i)
    }

    pub fn refs(&self, f: FrameId) -> u32 {
        let slot = if is_domain(f) {
            self.domain(f).map(|(b, i)| b.refs[i])
        } else {
            self.refs.get(f as usize).copied()
        };
        match slot {
            None => 0,
            Some(MANY) => self.many[&f],
            Some(r) => u32::from(r),
        }
    }

    /// Take one of frame `f`'s references away; the count it had.
    fn take_ref(&mut self, f: FrameId) -> u32 {
        let n = self.refs(f);
        assert!(n > 0, "frame {f} released more often than referenced");
        self.set_refs(f, n - 1);
        n
    }

    /// Set frame `f`'s reference count (of the pool or a segment we hold).
    fn set_refs(&mut self, f: FrameId, n: u32) {
        let small = u8::try_from(n).ok().filter(|&r| r < MANY);
        let slot = if is_domain(f) {
            let (b, i) = self.domain_mut(f);
            &mut b.refs[i]
        } else {
            &mut self.refs[f as usize]
        };
        let was_many = *slot == MANY;
        *slot = small.unwrap_or(MANY);
        if small.is_none() {
            self.many.insert(f, n);
        } else if was_many {
            self.many.remove(&f);
            crate::stats::shrink_if_sparse(&mut self.many);
        }
    }

    pub fn hash(&self, f: FrameId) -> u64 {
        if is_domain(f) {
            return self.domain(f).map_or(0, |(b, i)| u64::from(b.hash[i]));
        }
        u64::from(self.hash[f as usize])
    }

    pub fn incref(&mut self, f: FrameId) -> u32 {
        if is_domain(f) {
            self.domain_changes += 1;
            self.domain_mut(f).0.pages += 1;
        }
        let n = self.refs(f) + 1;
        self.set_refs(f, n);
        n
    }

    /// Drop one reference; on the last one, say whether the frame can be punched.
    /// A domain frame is never punched (`Kept`): its segment is immutable and goes
    /// with its last mapping.
    pub fn decref(&mut self, f: FrameId) -> Release {
        let n = self.take_ref(f);
        if is_domain(f) {
            self.domain_changes += 1;
            self.domain_mut(f).0.pages -= 1;
            return Release::Kept;
        }
        if n > 1 {
            return Release::Kept;
        }
        if self.mapped_elsewhere.remove(&f) {
            self.suspects.push(f);
            Release::Suspect
        } else if self.child_may_map(f) {
            self.deferred.push(f);
            Release::Deferred
        } else {
            self.recycle(f);
            Release::Free(f)
        }
    }

    /// Drop one reference held by a page whose memory vanished behind our back (the
    /// application unmapped or moved it): the mapping may live on elsewhere (`mremap`),
    /// so on the last reference the frame becomes a suspect, kept with its bytes until
    /// [`FrameTable::clear_suspects`] finds no mapping of it. Returns whether it did.
    ///
    /// While other pages still reference the frame, it is marked: the moved mapping
    /// may outlive them all, so whichever reference goes last (through `decref` as
    /// well), the frame becomes a suspect then.
    pub fn decref_suspect(&mut self, f: FrameId) -> bool {
        if is_domain(f) {
            // Never punched: nothing to suspect.
            self.decref(f);
            return false;
        }
        let n = self.take_ref(f);
        if n == 1 {
            self.mapped_elsewhere.remove(&f);
            self.suspects.push(f);
            true
        } else {
            self.mapped_elsewhere.insert(f);
            false
        }
    }

    /// Hand back the suspects that `mapped` says nothing maps, to punch.
    pub fn clear_suspects(&mut self, mapped: impl Fn(FrameId) -> bool) -> Vec<FrameId> {
        let (keep, unmapped): (Vec<_>, Vec<_>) = std::mem::take(&mut self.suspects)
            .into_iter()
            .partition(|&f| mapped(f));
        self.suspects = keep;
        let mut free = Vec::new();
        for f in unmapped {
            // The fork rule still holds: a child may map it.
            if self.child_may_map(f) {
                self.deferred.push(f);
            } else {
                self.recycle(f);
                free.push(f);
            }
        }
        free
    }

    pub fn suspects(&self) -> usize {
        self.suspects.len()
    }

    /// Abandon a frame allocated by `alloc` that never got a reference.
    pub fn discard(&mut self, f: FrameId) {
        assert_eq!(self.refs[f as usize], 0);
        self.recycle(f);
    }

    fn recycle(&mut self, f: FrameId) {
        self.live -= 1;
        self.free.insert(f);
    }

    /// Drop the free ids that end the table, and give back the memory of a table that
    /// shrank a lot (so that memory no longer merged costs nothing). Not done as frames
    /// are freed: the caller may still ask a freed frame's key (to drop it from its
    /// index); it calls this once it is done. Ids past the end count as free.
    pub fn trim(&mut self) {
        let mut len = self.refs.len();
        while len > 0 && self.free.contains(len as FrameId - 1) {
            len -= 1;
        }
        if len == self.refs.len() {
            return;
        }
        self.free.truncate(len);
        self.refs.truncate(len);
        self.hash.truncate(len);
        self.exposed.truncate(len.div_ceil(64));
        if len * 4 <= self.refs.capacity() {
            self.refs.shrink_to(len * 2);
            self.hash.shrink_to(len * 2);
            self.exposed.shrink_to(len.div_ceil(64) * 2);
        }
    }

    /// Record a fork (parent side): every live frame may now be mapped by a child.
    pub fn on_fork(&mut self) {
        self.fork_epoch += 1;
        // Every id of the table: the free ones get their bit cleared when handed out.
        self.exposed.fill(u64::MAX);
    }

    /// Whether a fork happened that we have not yet seen the end of.
    pub fn needs_quiet_check(&self) -> bool {
        self.quiet_epoch < self.fork_epoch
    }

    /// A forked child may read frame `f` (a page it inherited sits over it): if `f` is
    /// free, keep it out of use, as deferred frames are, until the pool is quiet.
    pub fn reserve_until_quiet(&mut self, f: FrameId) {
        if f >= self.capacity {
            return;
        }
        // Past the end of the table (it shrank): the id is free all the same.
        self.grow_to(f);
        if self.free.remove(f) {
            self.live += 1;
            self.deferred.push(f);
        }
    }

    /// No other process maps the pool any more: hand back the deferred frames to punch.
    pub fn quiet(&mut self) -> Vec<FrameId> {
        self.quiet_epoch = self.fork_epoch;
        self.exposed.fill(0);
        let d = std::mem::take(&mut self.deferred);
        for &f in &d {
            self.recycle(f);
        }
        d
    }

    /// Frames holding bytes (referenced or deferred).
    pub fn live(&self) -> u32 {
        self.live
    }

    /// Frames with at least one reference (the pool's, then the domain's).
    pub fn referenced(&self) -> impl Iterator<Item = FrameId> + '_ {
        let pool = (0..self.refs.len() as u32).filter(|&f| self.refs[f as usize] > 0);
        let domain = self.blocks.iter().flat_map(|(b, blk)| {
            (0..blk.refs.len())
                .filter(|&i| blk.refs[i] > 0)
                .map(move |i| join_domain(b, i))
        });
        pool.chain(domain)
    }

    /// Take in a domain segment `id` with frames of keys `hashes`: its first frame id,
    /// or None if it is here already or no block is left.
    pub fn add_segment(&mut self, id: u64, hashes: &[u64]) -> Option<FrameId> {
        if self.block_of.contains_key(&id)
            || hashes.is_empty()
            || hashes.len() > BLOCK_FRAMES as usize
        {
            return None;
        }
        let b = match self.free_blocks.pop() {
            Some(b) => b,
            None if self.next_block < BLOCKS => {
                self.next_block += 1;
                self.next_block - 1
            }
            None => return None,
        };
        self.blocks.insert(
            b,
            Block {
                id,
                refs: vec![0; hashes.len()],
                hash: hashes.iter().map(|&h| key32(h)).collect(),
                pages: 0,
                retired: false,
                age: 0,
            },
        );
        self.block_of.insert(id, b);
        Some(join_domain(b, 0))
    }

    /// The first frame id and frame count of segment `id`, if here.
    pub fn segment(&self, id: u64) -> Option<(FrameId, u32)> {
        let &b = self.block_of.get(&id)?;
        let blk = self.blocks.get(b).expect("indexed");
        Some((join_domain(b, 0), blk.refs.len() as u32))
    }

    /// Mark segment `id` retired (out of the index: the caller removes its frames
    /// from it). Returns its first frame id and frame count.
    pub fn retire_segment(&mut self, id: u64) -> Option<(FrameId, u32)> {
        let &b = self.block_of.get(&id)?;
        let blk = self.blocks.get_mut(b).expect("indexed");
        if blk.retired {
            return None;
        }
        blk.retired = true;
        self.retired_blocks += 1;
        Some((join_domain(b, 0), blk.refs.len() as u32))
    }

    /// Segment `id`, held retired, is live in the domain after all (offered again by
    /// the broker after we left the domain and joined it again): back in use. Returns
    /// its first frame id and frame count, for the caller to index its frames again.
    pub fn unretire_segment(&mut self, id: u64) -> Option<(FrameId, u32)> {
        let &b = self.block_of.get(&id)?;
        let blk = self.blocks.get_mut(b).expect("indexed");
        if !blk.retired {
            return None;
        }
        blk.retired = false;
        self.retired_blocks -= 1;
        Some((join_domain(b, 0), blk.refs.len() as u32))
    }

    /// The identity of the segment of domain frame `f` (None for the pool's frames).
    pub fn segment_of(&self, f: FrameId) -> Option<u64> {
        if !is_domain(f) {
            return None;
        }
        self.domain(f).map(|(b, _)| b.id)
    }

    /// Whether domain frame `f`'s segment is retired (no new page may map it).
    pub fn retired(&self, f: FrameId) -> bool {
        self.domain(f).is_none_or(|(b, _)| b.retired)
    }

    /// Whether `f` is a frame of a retired segment (pages on it move off); false for
    /// the pool's frames.
    pub fn on_retired(&self, f: FrameId) -> bool {
        is_domain(f) && self.retired(f)
    }

    /// Whether some segment held is retired (pages of ours may still be on it).
    pub fn any_retired(&self) -> bool {
        self.retired_blocks > 0
    }

    /// The retired segments no page maps any more: (id, first frame id, frames).
    pub fn unmapped_segments(&self) -> Vec<(u64, FrameId, u32)> {
        self.blocks
            .iter()
            .filter(|(_, blk)| blk.retired && blk.pages == 0)
            .map(|(b, blk)| (blk.id, join_domain(b, 0), blk.refs.len() as u32))
            .collect()
    }

    /// Forget retired segment `id` if no page maps it (its block is free for another):
    /// whether it was, for the caller to unmap and close it.
    pub fn drop_segment(&mut self, id: u64) -> bool {
        let Some(&b) = self.block_of.get(&id) else {
            return false;
        };
        let blk = self.blocks.get(b).expect("indexed");
        if !blk.retired || blk.pages > 0 {
            return false;
        }
        self.blocks.remove(b);
        self.block_of.remove(&id);
        self.free_blocks.push(b);
        self.retired_blocks -= 1;
        true
    }

    /// Per segment: its identity, pages of ours mapping it, full scans since it came,
    /// and which frames they map.
    pub fn segment_usage(&self) -> Vec<(u64, u64, u32, Vec<bool>)> {
        self.blocks
            .values()
            .map(|blk| {
                let mapped = blk.refs.iter().map(|&r| r > 0).collect();
                (blk.id, blk.pages, blk.age, mapped)
            })
            .collect()
    }

    /// A full scan ended: every segment is one scan older.
    pub fn age_segments(&mut self) {
        for b in self.blocks.values_mut() {
            b.age = b.age.saturating_add(1);
        }
    }

    /// A count that changes whenever a page of ours starts or stops mapping a domain
    /// frame (so whenever `segment_usage` may say something new, segments aside).
    pub fn domain_changes(&self) -> u64 {
        self.domain_changes
    }

    /// Segments held, and the pages of ours mapping their frames.
    pub fn domain_totals(&self) -> (usize, u64) {
        (
            self.blocks.len(),
            self.blocks.values().map(|b| b.pages).sum(),
        )
    }

    /// The segment ids held (retired or not).
    pub fn segment_ids(&self) -> Vec<u64> {
        self.blocks.values().map(|b| b.id).collect()
    }

    pub fn deferred(&self) -> usize {
        self.deferred.len()
    }

    /// Bytes of bookkeeping.
    pub fn metadata_bytes(&self) -> usize {
        self.refs.capacity()
            + crate::stats::hash_table_bytes(self.many.capacity(), 8)
            + self.hash.capacity() * 4
            + self.exposed.capacity() * 8
            + self.free.metadata_bytes()
            + self.deferred.capacity() * 4
            + self.suspects.capacity() * 4
            + self.mapped_elsewhere.len() * 16
            + self
                .blocks
                .values()
                .map(|b| 64 + b.refs.capacity() + b.hash.capacity() * 4)
                .sum::<usize>()
            + self.block_of.len() * 24
    }

    /// Ids the table spans (free ones included).
    pub fn len(&self) -> usize {
        self.refs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }
}

/// Block and index of domain frame `f`.
fn split_domain(f: FrameId) -> (u32, usize) {
    let d = f - DOMAIN_BASE;
    (d / BLOCK_FRAMES, (d % BLOCK_FRAMES) as usize)
}

/// Domain frame `i` of block `b`.
fn join_domain(b: u32, i: usize) -> FrameId {
    DOMAIN_BASE + b * BLOCK_FRAMES + i as u32
}

/// A frame's index key as stored: index keys are 32-bit checksums.
fn key32(hash: u64) -> u32 {
    u32::try_from(hash).expect("frame keys are 32-bit checksums")
}

/// The domain segments this process maps, by their first frame id: their sealed
/// memfds and read-only views, through which their frames are compared and mapped.
#[derive(Debug, Default)]
pub struct Segments {
    by_start: BTreeMap<FrameId, crate::domain::client::SegmentView>,
}

impl Segments {
    /// Serve the frames from `f0` (a block start) from `seg`.
    pub fn add(&mut self, f0: FrameId, seg: crate::domain::client::SegmentView) {
        debug_assert!(is_domain(f0) && split_domain(f0).1 == 0);
        self.by_start.insert(f0, seg);
    }

    /// Unmap the segment at `f0` and close its descriptor (pages mapping its frames
    /// keep them: the kernel frees the segment with its last mapping).
    pub fn remove(&mut self, f0: FrameId) {
        self.by_start.remove(&f0);
    }

    fn at(&self, f: FrameId) -> Option<(&crate::domain::client::SegmentView, u32)> {
        let (b, i) = split_domain(f);
        let seg = self.by_start.get(&join_domain(b, 0))?;
        (i < seg.frames as usize).then_some((seg, i as u32))
    }

    /// The bytes of domain frame `f`.
    pub fn frame(&self, f: FrameId, page: usize) -> &[u8] {
        let (seg, i) = self.at(f).expect("a domain frame of a segment we map");
        seg.frame(i, page)
    }

    /// The descriptor and offset to map `n` frames from domain frame `f0` (all in one
    /// segment), if they are.
    pub fn backing(&self, f0: FrameId, n: usize, page: usize) -> Option<(i32, u64)> {
        let (seg, i) = self.at(f0)?;
        (i as usize + n <= seg.frames as usize)
            .then(|| (seg.memfd.raw(), u64::from(i) * page as u64))
    }

    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }
}

/// The memfd holding frame bytes, and a shared view to read them.
#[derive(Debug)]
pub struct Pool {
    memfd: Memfd,
    view: Mapping,
    page: usize,
}

impl Pool {
    /// A sparse pool of `capacity` frames (virtual only until frames are written).
    pub fn new(capacity: u32, page: usize) -> io::Result<Self> {
        let bytes = capacity as usize * page;
        let memfd = Memfd::create(POOL_NAME, bytes as u64)?;
        let view = Mapping::shared_view(memfd.raw(), bytes)?;
        Ok(Pool { memfd, view, page })
    }

    pub fn frame(&self, f: FrameId) -> &[u8] {
        self.view.bytes(f as usize * self.page, self.page)
    }

    pub fn write(&self, f: FrameId, data: &[u8]) -> io::Result<()> {
        self.memfd.write_at(f as u64 * self.page as u64, data)
    }

    /// Write frames `f0, f0+1, …` from `len` bytes (whole pages) of mapping `src` at
    /// `offset` with one `pwrite` straight from it (see `Memfd::write_from`).
    pub fn write_from(
        &self,
        f0: FrameId,
        src: &Mapping,
        offset: usize,
        len: usize,
    ) -> io::Result<()> {
        self.memfd
            .write_from(f0 as u64 * self.page as u64, src, offset, len)
    }

    pub fn punch(&self, f: FrameId) -> io::Result<()> {
        self.memfd
            .punch_hole(f as u64 * self.page as u64, self.page as u64)
    }

    /// Punch the `n` consecutive frames from `f0` with one call.
    pub fn punch_run(&self, f0: FrameId, n: u32) -> io::Result<()> {
        self.memfd.punch_hole(
            f0 as u64 * self.page as u64,
            u64::from(n) * self.page as u64,
        )
    }

    pub fn fd(&self) -> i32 {
        self.memfd.raw()
    }

    pub fn offset(&self, f: FrameId) -> u64 {
        f as u64 * self.page as u64
    }

    pub fn allocated_bytes(&self) -> u64 {
        self.memfd.allocated_bytes().unwrap_or(0)
    }

    pub fn inode(&self) -> u64 {
        self.memfd.inode().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_count_past_8_bits_is_kept_whole() {
        let mut t = FrameTable::new(1 << 20);
        let (f, g) = (t.alloc(7).unwrap(), t.alloc(8).unwrap());
        t.incref(g);
        let n = 70_000;
        for k in 1..=n {
            assert_eq!(t.incref(f), k);
            if (254..=256).contains(&k) {
                // Counts of 255 and more are kept beside the table, whole.
                assert_eq!(t.many.contains_key(&f), k >= 255, "count {k}");
                assert_eq!(t.refs(f), k);
            }
        }
        assert_eq!((t.refs(f), t.refs(g)), (n, 1));
        let with_many = t.metadata_bytes();
        for k in (1..n).rev() {
            assert_eq!(t.decref(f), Release::Kept);
            assert_eq!(t.refs(f), k);
        }
        assert!(t.many.is_empty() && t.metadata_bytes() < with_many);
        assert_eq!(t.many.capacity(), 0, "the map's memory given back");
        assert_eq!(t.decref(f), Release::Free(f));
        assert_eq!(t.refs.iter().filter(|&&r| r == MANY).count(), 0);
        // A domain segment's frame, the same.
        let d = t.add_segment(77, &[1, 2]).unwrap() + 1;
        for k in 1..=n {
            assert_eq!(t.incref(d), k);
        }
        assert_eq!((t.refs(d), t.refs(d - 1)), (n, 0));
        for k in (0..n).rev() {
            assert_eq!(t.decref(d), Release::Kept);
            assert_eq!(t.refs(d), k);
        }
        assert!(t.many.is_empty());
    }

    #[test]
    fn runs_reuse_the_free_end_of_a_fragmented_table() {
        // Review finding: with more than 4096 single free ids below it, a run freed at
        // the end of the table was not found again, and the table grew with every run.
        let mut t = FrameTable::new(1 << 20);
        for _ in 0..5000 {
            let a = t.alloc_run(&[1; 3]).unwrap();
            t.incref(a);
            t.incref(a + 2);
            t.discard(a + 1); // a hole between two live frames
        }
        let len = t.refs.len();
        for _ in 0..1000 {
            let a = t.alloc_run(&[2; 8]).unwrap();
            for f in a..a + 8 {
                t.discard(f);
            }
        }
        assert!(
            t.refs.len() <= len + 8,
            "table grew from {len} to {}",
            t.refs.len()
        );
    }

    #[test]
    fn runs_reuse_freed_ids_before_the_table_grows() {
        // The soak's finding: runs merged and freed again and again must not grow
        // the table.
        let mut t = FrameTable::new(1 << 20);
        for _ in 0..100 {
            let a = t.alloc_run(&[1; 8]).unwrap();
            let b = t.alloc_run(&[2; 5]).unwrap();
            for f in (a..a + 8).chain(b..b + 5) {
                t.incref(f);
                assert_eq!(t.decref(f), Release::Free(f));
            }
        }
        assert!(t.refs.len() <= 13, "table grew to {}", t.refs.len());
        assert_eq!(t.live(), 0);
        // A run goes on right after the last one while those ids are free.
        let a = t.alloc_run(&[3; 4]).unwrap();
        let b = t.alloc_run(&[4; 4]).unwrap();
        assert_eq!(b, a + 4);
    }

    #[test]
    fn alloc_ref_release_recycles() {
        let mut t = FrameTable::new(2);
        let a = t.alloc(7).unwrap();
        let b = t.alloc(8).unwrap();
        assert!(t.alloc(9).is_none(), "capacity respected");
        t.incref(a);
        t.incref(a);
        assert_eq!(t.decref(a), Release::Kept);
        assert_eq!(t.decref(a), Release::Free(a));
        assert_eq!(t.alloc(1), Some(a));
        t.discard(b);
        assert_eq!(t.live(), 1);
    }

    #[test]
    fn allocation_continues_in_ascending_order() {
        let mut t = FrameTable::new(16);
        let fs: Vec<_> = (0..6).map(|i| t.alloc(i).unwrap()).collect();
        for &f in &fs {
            t.incref(f);
        }
        for &f in &fs[1..5] {
            assert_eq!(t.decref(f), Release::Free(f));
        }
        // Free: 1..=4; last handed out: 5. Nothing free after 5: wrap to 1, go on in
        // order, and extend at the end only when nothing is free.
        let next: Vec<_> = (0..5).map(|i| t.alloc(i).unwrap()).collect();
        assert_eq!(next, vec![1, 2, 3, 4, 6]);
    }

    #[test]
    fn frames_born_before_fork_wait_for_quiet() {
        let mut t = FrameTable::new(8);
        let old = t.alloc(1).unwrap();
        t.incref(old);
        t.on_fork();
        let new = t.alloc(2).unwrap();
        t.incref(new);
        assert_eq!(t.decref(old), Release::Deferred, "a child may still map it");
        assert_eq!(
            t.decref(new),
            Release::Free(new),
            "born after the fork: no child maps it"
        );
        assert_eq!(t.quiet(), vec![old]);
        let again = t.alloc(3).unwrap();
        t.incref(again);
        assert_eq!(t.decref(again), Release::Free(again));
    }

    #[test]
    fn a_frame_a_vanished_mapping_shared_waits_as_a_suspect_whoever_lets_go_last() {
        // Review finding: only the vanished page's own reference made a suspect, so a
        // frame still referenced by another page was punched when that page let go,
        // while the moved mapping still mapped it.
        let mut t = FrameTable::new(8);
        let f = t.alloc(1).unwrap();
        t.incref(f);
        t.incref(f);
        assert!(!t.decref_suspect(f), "another page still references it");
        assert_eq!(
            t.decref(f),
            Release::Suspect,
            "the moved mapping may map it"
        );
        assert!(t.is_live(f) && t.suspects() == 1);
        assert_eq!(t.clear_suspects(|_| true), Vec::<FrameId>::new());
        assert_eq!(t.clear_suspects(|_| false), vec![f]);
        assert!(!t.is_live(f) && t.live() == 0);
        // Reused, it is an ordinary frame again.
        assert_eq!(t.alloc(2), Some(f));
        t.incref(f);
        assert_eq!(t.decref(f), Release::Free(f));
    }

    #[test]
    fn domain_frames_are_counted_never_freed_and_go_with_their_retired_segment() {
        let mut t = FrameTable::new(8);
        let f0 = t.add_segment(77, &[1, 2, 3]).unwrap();
        assert!(is_domain(f0) && t.exists(f0 + 2) && !t.exists(f0 + 3));
        assert!(t.add_segment(77, &[1]).is_none(), "one block per segment");
        assert!(!t.is_free(f0), "never handed out as a pool frame");
        assert_eq!((t.refs(f0 + 1), t.hash(f0 + 1)), (0, 2));
        assert_eq!(t.incref(f0 + 1), 1);
        assert_eq!(t.incref(f0 + 1), 2);
        assert_eq!(t.referenced().collect::<Vec<_>>(), vec![f0 + 1]);
        assert_eq!(t.decref(f0 + 1), Release::Kept);
        assert_eq!(
            t.segment_usage(),
            vec![(77, 1, 0, vec![false, true, false])]
        );
        assert_eq!(t.retire_segment(77), Some((f0, 3)));
        assert!(t.any_retired());
        assert!(
            t.retired(f0) && t.unmapped_segments().is_empty() && !t.drop_segment(77),
            "still mapped"
        );
        // Offered again (we left the domain and joined it again): back in use.
        assert_eq!(t.unretire_segment(77), Some((f0, 3)));
        assert!(!t.retired(f0) && !t.any_retired());
        assert_eq!(t.unretire_segment(77), None, "not retired");
        assert_eq!(t.retire_segment(77), Some((f0, 3)));
        assert!(!t.decref_suspect(f0 + 1));
        assert_eq!(t.unmapped_segments(), vec![(77, f0, 3)]);
        assert!(t.drop_segment(77));
        assert!(!t.drop_segment(77), "gone");
        assert!(!t.exists(f0) && !t.any_retired());
        assert_eq!(t.live(), 0, "pool frames untouched");
        // The block is used again for the next segment.
        assert_eq!(t.add_segment(78, &[5]), Some(f0));
    }

    #[test]
    fn pool_writes_reads_and_punches() {
        let p = Pool::new(16, crate::sys::page_size()).unwrap();
        let page = vec![0xAB; crate::sys::page_size()];
        p.write(3, &page).unwrap();
        assert_eq!(p.frame(3), &page[..]);
        assert!(p.allocated_bytes() >= page.len() as u64);
        p.punch(3).unwrap();
        assert_eq!(p.allocated_bytes(), 0);
    }

    #[test]
    fn frames_are_filled_and_compared_in_place() {
        let ps = crate::sys::page_size();
        let p = Pool::new(16, ps).unwrap();
        let m = Mapping::anonymous(3 * ps).unwrap();
        for i in 0..3 {
            m.copy_in(i * ps, &vec![i as u8 + 1; ps]);
        }
        // Two pages from the second on, straight from the mapping, with one call.
        p.write_from(5, &m, ps, 2 * ps).unwrap();
        assert_eq!(p.frame(5), &vec![2; ps][..]);
        assert_eq!(p.frame(6), &vec![3; ps][..]);
        assert!(m.equals(ps, p.frame(5)) && m.equals(2 * ps, p.frame(6)));
        assert!(!m.equals(0, p.frame(5)));
        let other = Mapping::anonymous(ps).unwrap();
        other.copy_in(0, &vec![3; ps]);
        assert!(m.equals_at(2 * ps, &other, 0, ps));
        assert!(!m.equals_at(ps, &other, 0, ps));
        // A range past the mapping's end is refused before any syscall.
        let r = std::panic::catch_unwind(|| p.write_from(7, &m, 2 * ps, 2 * ps));
        assert!(r.is_err());
    }
}
