//! One page's visit (`cmp_and_merge_page`): what its presence says of its record
//! (a merged page copied by a write, a page gone), smart scan's skipping, the
//! volatility check, then the zero page, the stable index and the unstable index
//! (`visit_content`), and the searches of both indexes.
//!
//! Invariants: a page's bytes are read only when some index holds a candidate
//! (or a checksum must be taken); a page is merged only through `merge`, which
//! compares under write-protection; a record leaves the unstable index (and
//! `pages_unshared`) whenever its visit starts, and enters it again only when
//! nothing merged it.

#![forbid(unsafe_code)]

use super::{checksum_of, key_of, Core, Mem, Presence, Target};
use crate::pool::{self, FrameId};
use crate::region::{PageRec, State, SUM_TRACKED};

/// Result of looking a content up in the stable index.
enum StableHit {
    Room(FrameId),
    Full,
    Miss,
}

/// What the batch's probe said of one page.
#[derive(Clone, Copy)]
pub(super) struct Seen {
    pub(super) pres: Presence,
    /// Its writes are tracked (see `Mem::probe_tracked`).
    pub(super) tracked: bool,
    /// Tracked, and not written since the previous probe.
    pub(super) unchanged: bool,
    /// The batch was probed with write tracking (see `Core::tracked_probe`): a
    /// covered page that held still is worth tracking (see `Mem::track_covered`).
    pub(super) tracking: bool,
}

/// The kernel's `skip_age`: how many visits a page that failed to merge `age`
/// times may be skipped.
pub(super) fn skip_age(age: u8) -> u8 {
    match age {
        0..=3 => 1,
        4..=5 => 2,
        6..=8 => 4,
        _ => 8,
    }
}

impl<M: Mem> Core<M> {
    /// `cmp_and_merge_page`: returns whether the page counted as scanned.
    pub(super) fn visit(&mut self, addr: usize, seen: Seen) -> bool {
        let rec = self.rec(addr).expect("tracked");
        // Its recorded checksum still holds: taken while its writes were tracked, and
        // none since (an unmerged page only: any other state is looked at afresh).
        let trusted = seen.unchanged
            && rec.sum_tracked()
            && matches!(rec.state(), State::Volatile | State::Unstable);
        let pres = seen.pres;
        let t = self.target_at(addr).expect("tracked");
        // The batch probed presence ahead of the cursor; a run merged since then made
        // later pages merged ones: look again before taking one for a written copy.
        let mut pres = pres;
        if rec.state() == State::Stable && pres == Presence::Anon {
            let mut p = [Presence::Anon];
            if self.mem.probe(addr, &mut p).is_ok() {
                pres = p[0];
            }
        }
        match pres {
            // Still maps its frame (PTE present and file-backed, or not faulted in yet):
            // already a KSM page hung on its node, nothing to do.
            Presence::Absent | Presence::File if rec.state() == State::Stable => {
                self.counters.pages_scanned += 1;
                if self.domain.is_some() && self.moves_off(rec.frame()) {
                    self.move_off(t, rec.frame());
                }
                return true;
            }
            // Still maps the parent's frame, or still the zero page: the kernel's page
            // walk passes over both (no normal page of this process there).
            Presence::Absent | Presence::File
                if matches!(rec.state(), State::Inherited | State::Zero) =>
            {
                return false
            }
            // Not present: the kernel frees rmap_items of pages it passes over.
            Presence::Absent | Presence::File => {
                if rec.state() != State::Untracked {
                    self.forget(addr);
                }
                return false;
            }
            Presence::Anon => {}
        }
        match rec.state() {
            State::Stable => {
                // Copied away by a write: leave the stable tree, the checksum starts over.
                // The private copy stays where the write put it, inside the mapping of
                // the frame's offset: a covered page (`IN_POOL`), as one a run covers,
                // so that a write changes no mapping and adds no VMA (giving each
                // written page an anonymous mapping of its own took two VMAs per page,
                // up to the application's `vm.max_map_count`). The frame may be freed
                // and its offset reused: a discard of the page reads zeros through the
                // fault thread, never the offset's new bytes (docs/design.md, "Extent
                // merging").
                self.counters.cows += 1;
                self.changes += 1;
                *self.rec_mut(addr) = PageRec::fresh(State::Volatile, rec.flags());
                self.cover(addr, rec.frame());
                self.drop_frame_ref(rec.frame());
            }
            State::Inherited => {
                // A forked child's copy of a merged page, written: it sits in a VMA mapping
                // the parent's pool, so it gets an anonymous mapping first (as above).
                if self
                    .mem
                    .unmerge_run(addr, self.page, t.prot, t.owned)
                    .is_err()
                {
                    return false;
                }
                self.counters.rmap_items += 1;
                self.rec_mut(addr).set_state(State::Volatile);
            }
            State::Zero => {
                // Written since it became the zero page: an ordinary page again.
                self.counters.ksm_zero_pages -= 1;
                self.counters.rmap_items += 1;
                *self.rec_mut(addr) = PageRec::fresh(State::Volatile, rec.flags());
            }
            State::Untracked => {
                self.counters.rmap_items += 1;
                self.rec_mut(addr).set_state(State::Volatile);
            }
            State::Unstable | State::Volatile => {}
        }
        if self.should_skip(addr) {
            return false;
        }
        self.counters.pages_scanned += 1;
        if self.rec(addr).expect("tracked").state() == State::Unstable {
            // Out of the unstable index until this visit puts it back.
            self.counters.pages_unshared -= 1;
            self.rec_mut(addr).set_state(State::Volatile);
        }
        let ahead = self.sums_ahead.take(addr, self.page);
        let mut buf = std::mem::take(&mut self.buf);
        self.visit_content(t, &mut buf, (trusted, ahead), seen);
        self.buf = buf;
        true
    }

    /// The kernel's `should_skip_rmap_item` (smart scan, docs/kernel-contract.md,
    /// “Smart scan”) for a page in no index or the unstable one: it ages at every
    /// visit; from its fourth visit on, a page that never merged is skipped for
    /// `skip_age(age)` visits between looks.
    /// A skipped page leaves the unstable index and is not counted as scanned.
    pub(super) fn should_skip(&mut self, addr: usize) -> bool {
        if !self.smart_scan {
            return false;
        }
        // In a domain, frames arrive from other members at any scan: a page that one
        // of the index may take, or that the domain has not heard of or asks for, is
        // looked at (the kernel's stable tree only grows
        // from pages it visits, so it has no such case).
        if let Some(d) = &self.domain {
            let c = self.rec(addr).map_or(0, |r| r.checksum());
            if d.needs_visit(c, self.vma_room_known())
                || self.stable.contains(key_of(c), |f| self.frames.hash(f))
            {
                return false;
            }
        }
        let r = self.rec_mut(addr);
        let age = r.age();
        r.set_age(age.saturating_add(1));
        if age < 3 {
            return false;
        }
        if r.skips() == 0 {
            r.set_skips(skip_age(age));
            return false;
        }
        r.set_skips(r.skips() - 1);
        let was_unstable = r.state() == State::Unstable;
        r.set_state(State::Volatile);
        self.counters.pages_skipped += 1;
        if was_unstable {
            self.counters.pages_unshared -= 1;
        }
        true
    }

    /// The page's content step: volatility check, then the zero page, the stable
    /// index, the unstable index. With `trusted` (see `visit`), the checksum is not
    /// taken again, with `ahead` it was taken ahead of the visit in this batch (see
    /// `sum_ahead`); either way the bytes are read only if some index holds a
    /// candidate. `seen.tracked` says whether a checksum taken now stays trustworthy.
    pub(super) fn visit_content(
        &mut self,
        t: Target,
        buf: &mut [u8],
        (trusted, ahead): (bool, Option<u32>),
        seen: Seen,
    ) -> bool {
        let (hash, checksum) = if trusted {
            let c = self.rec(t.addr).expect("tracked").checksum();
            (key_of(c), c)
        } else {
            let (hash, checksum) = match ahead {
                Some(c) => (key_of(c), c),
                None => {
                    if self.mem.read(t.addr, t.owned, buf).is_err() {
                        self.forget(t.addr);
                        return false;
                    }
                    checksum_of(buf)
                }
            };
            self.counters.pages_hashed += 1;
            let rec = self.rec_mut(t.addr);
            if seen.tracked {
                rec.set(SUM_TRACKED);
            } else {
                rec.clear(SUM_TRACKED);
            }
            if rec.checksum() != checksum {
                rec.set_checksum(checksum);
                self.changes += 1;
                return false;
            }
            // Unchanged since the previous visit, and a private copy in a pool mapping,
            // which the tracker cannot take: its writes are tracked from now on
            // through write-protection (`Mem::track_covered`). Its checksum is trusted
            // only once taken again under that protection, at its next visit.
            if seen.tracking && !seen.tracked && rec.covered() && self.mem.write_tracking() {
                let _ = self.mem.track_covered(t.addr, self.page);
            }
            (hash, checksum)
        };
        // The bytes, read the first time they are needed (a failed read forgets the
        // page). A checksum taken ahead is older than a read at the visit would be: the
        // bytes read must still have it, else the page changed since, as the volatility
        // check would have seen.
        let verify = ahead.is_some();
        let mut loaded = !trusted && !verify;
        let mut load = |core: &mut Self, buf: &mut [u8]| {
            if loaded {
                return true;
            }
            if core.mem.read(t.addr, t.owned, buf).is_err() {
                core.forget(t.addr);
                return false;
            }
            if verify {
                let now = checksum_of(buf).1;
                if now != checksum {
                    core.rec_mut(t.addr).set_checksum(now);
                    core.changes += 1;
                    return false;
                }
            }
            loaded = true;
            true
        };
        if self.use_zero_pages && checksum == self.zero_checksum {
            if !load(self, buf) {
                return false;
            }
            if buf.iter().all(|&b| b == 0) && self.merge_zero(t) {
                return true;
            }
        }
        if let Some(g) = self.continuing_frame(t, hash) {
            if !load(self, buf) {
                return false;
            }
            if self.mem.frame(g) == buf && self.merge_with_frame(t, g, hash) {
                return true;
            }
        }
        if self.stable.contains(hash, |f| self.frames.hash(f)) {
            if !load(self, buf) {
                return false;
            }
            match self.stable_search(hash, buf) {
                // A failed merge (content changed under protection, or the VMA budget)
                // falls through to the unstable index, as the kernel's does.
                StableHit::Room(f) if self.merge_with_frame(t, f, hash) => return true,
                StableHit::Room(_) | StableHit::Full | StableHit::Miss => {}
            }
        }
        let candidate = self.unstable_candidate(hash, Some(t.addr));
        if candidate.is_some() && !self.vma_room(2) {
            // A pair merge needs VMAs the budget no longer has: it is put off before any
            // byte is read or compared (a process at its budget would otherwise read and
            // compare every such pair at every full scan, only to refuse the merge).
            // Counted on the checksum match, as `charge_vmas` counts a refused merge (a
            // checksum taken ahead is checked first, as where the bytes are needed).
            if verify && !load(self, buf) {
                return false;
            }
            self.put_off(t.addr);
            if let Some(c) = candidate {
                self.keep_visiting(c);
            }
        } else if self.unstable.may_contain(&hash) {
            if !load(self, buf) {
                return false;
            }
            if let Some(other) = self.unstable_search(hash, t.addr, buf) {
                if self.domain.is_some() {
                    // In a domain every new frame is one the other members can map: the
                    // page goes into a segment (built at the end of this batch), and
                    // both pages merge onto it at their next visit.
                    self.domain_publish(t, checksum);
                } else if self.merge_pair(t, other, hash) {
                    return true;
                }
            }
        }
        let r = self.rec_mut(t.addr);
        if r.state() == State::Volatile {
            r.set_state(State::Unstable);
            self.counters.pages_unshared += 1;
            // A candidate the domain has not heard of goes in whatever the scan's
            // filter says: the broker may ask for it by checksum (see
            // `begin_unstable_index`).
            let unheard = self
                .domain
                .as_ref()
                .is_some_and(|d| d.needs_visit(checksum, true));
            let (regions, page) = (&self.regions, self.page);
            let key_of = |a| super::unstable_key(regions, page, a);
            if unheard {
                self.unstable.push_unfiltered(hash, t.addr, key_of);
            } else {
                self.unstable.push(hash, t.addr, key_of);
            }
        }
        self.domain_candidate(t, checksum, false);
        false
    }

    /// A page of ours on a frame `f` of a retired segment, or of our own pool while in
    /// a domain (see `moves_off`), not written since: onto a frame with the same bytes
    /// in the index (a segment published since; for a page on our own pool, a domain
    /// frame, within the VMA budget), with the pages after it that are to move too,
    /// mapping for mapping (see `merge_with_frame_from`); else its content is told to
    /// the domain as a candidate's is (or queued, if asked for), so that a member
    /// publishes it in a new segment. This is how a domain compacts where no VMA is
    /// left to give the pages private copies first, and how pages merged before
    /// joining come to be shared with the other members.
    fn move_off(&mut self, t: Target, f: FrameId) {
        let retired = self.frames.on_retired(f);
        let hash = self.frames.hash(f);
        // A page of our own pool can only move onto a domain frame: with none of its
        // key in the index, no byte is compared (its own frame is there). A retired
        // frame is out of the index: `stable_search` finds what there is.
        let key_of = |g| self.frames.hash(g);
        if retired || self.stable.get(hash, &key_of).any(pool::is_domain) {
            // (The frame's bytes are the page's: it maps them, unwritten.)
            if let StableHit::Room(g) = self.stable_search(hash, self.mem.frame(f)) {
                // Domain frames are found first: a private one means none has room.
                let onto = retired || (pool::is_domain(g) && self.vma_room(1));
                if onto && self.merge_with_frame_from(t, g, hash, Some(f)) {
                    return;
                }
            }
        }
        let said = self.domain_candidate(t, hash as u32, retired);
        if !retired && !said && self.vma_room_known() {
            self.private_again();
        }
    }

    /// Frames holding exactly `buf`: one with room (the fullest), or whether all are full.
    ///
    /// Only frames with room are compared, fullest first, and the first equal one
    /// wins: a content with many users has many full frames (one per
    /// `max_page_sharing` users), which must not cost a comparison each per page.
    fn stable_search(&self, hash: u64, buf: &[u8]) -> StableHit {
        let max = self.max_page_sharing;
        let key_of = |f| self.frames.hash(f);
        let mut room: Vec<FrameId> = self
            .stable
            .get(hash, &key_of)
            .filter(|&f| self.frames.refs(f) < max)
            .collect();
        // Domain frames first, the oldest segment's (lowest identity) first: every
        // member picks the same frame of a content published twice (two members at
        // once, or again after a broker restarted), so that their pages share it.
        // Then the fullest, as the kernel's chains do.
        room.sort_unstable_by_key(|&f| {
            (
                self.frames.segment_of(f).unwrap_or(u64::MAX),
                std::cmp::Reverse(self.frames.refs(f)),
            )
        });
        if let Some(f) = room.into_iter().find(|&f| self.mem.frame(f) == buf) {
            return StableHit::Room(f);
        }
        let full = self
            .stable
            .get(hash, &key_of)
            .any(|f| self.frames.refs(f) >= max && self.mem.frame(f) == buf);
        if full {
            StableHit::Full
        } else {
            StableHit::Miss
        }
    }

    /// A page of this full scan's unstable index with the same bytes as `buf`.
    ///
    /// Entries that left the index (merged, revisited, forgotten) are dropped as they
    /// are met, so that a content many pages share costs one comparison per page,
    /// not one per page already seen.
    fn unstable_search(&mut self, hash: u64, addr: usize, buf: &[u8]) -> Option<usize> {
        let candidates: Vec<usize> = self.unstable.candidates(&hash).collect();
        let mut other = std::mem::take(&mut self.buf2);
        let mut found = None;
        for c in candidates {
            if c == addr {
                continue;
            }
            match self.unstable_key_of(c) {
                // Left the index (merged, revisited, forgotten): dropped.
                None => self.unstable.remove(&hash, c),
                // Another key with the same tag.
                Some(k) if key_of(k) != hash => {}
                Some(_) => {
                    if self.same_bytes(c, buf, &mut other) {
                        found = Some(c);
                        break;
                    }
                }
            }
        }
        self.buf2 = other;
        found
    }

    /// The key page `c` is under in this scan's unstable index, if it is in it.
    fn unstable_key_of(&self, c: usize) -> Option<u32> {
        super::unstable_key(&self.regions, self.page, c)
    }

    /// A page of this scan's unstable index with checksum key `hash` (not `not`, the
    /// page looking, if any).
    pub(super) fn unstable_candidate(&self, hash: u64, not: Option<usize>) -> Option<usize> {
        self.unstable
            .candidates(&hash)
            .find(|&c| Some(c) != not && self.unstable_key_of(c).map(key_of) == Some(hash))
    }

    /// Whether page `c` holds `buf` (read into `scratch`).
    fn same_bytes(&mut self, c: usize, buf: &[u8], scratch: &mut [u8]) -> bool {
        let owned = self.region_at(c).is_some_and(|r| r.owned);
        self.mem.read(c, owned, scratch).is_ok() && scratch == buf
    }
}
