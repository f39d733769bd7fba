//! Merging: `merge_pair` (`try_to_merge_two_pages`, extended to runs),
//! `merge_with_frame` (onto frames of the stable index), `merge_tile` (onto a new
//! tile of one content), `merge_zero` (`try_to_merge_with_zero_page`), the records
//! and counters of what merged (`record_merged`, `record_run`), and the VMA budget
//! merging is charged to.
//!
//! Invariants: a page is remapped only inside its write-protect window (see
//! `window`) after it was compared equal, byte for byte, with what it is to map;
//! a frame filled for a pair is checked against the key it was allocated with;
//! new references are taken before old ones are dropped; every merge is charged
//! to the VMA budget first (2 per page, an upper bound), so the budget is never
//! passed, except by moves off retired segments, which may use what
//! `Mem::move_allowance` allows past it (half of `vma_reserve`).

#![forbid(unsafe_code)]

use super::runs::{joined_prefix, Slot, MIN_TILE, TILE_BELOW_ALLOWANCE};
use super::{checksum_of, Core, Mem, Target};
use crate::pool::FrameId;
use crate::region::{PageRec, State, DEFERRED, SUM_TRACKED};

impl<M: Mem> Core<M> {
    /// Write-protect `t` (and the run after it that matches the frames after `f`),
    /// compare again, remap with one mapping, wake.
    pub(super) fn merge_with_frame(&mut self, t: Target, f: FrameId, hash: u64) -> bool {
        self.merge_with_frame_from(t, f, hash, None)
    }

    /// `merge_with_frame` for a page that maps frame `was` now (a frame of a retired
    /// segment, or of our own pool in a domain: see `move_off`), or none. A run of
    /// pages moving from one run of frames to another replaces their mapping with one
    /// mapping and adds at most 2 VMAs (where it ends inside a mapping): charged 2 per
    /// run, off a retired segment past the budget if need be (`charge_move`), so that
    /// pages leave a retired segment even when the budget is spent.
    pub(super) fn merge_with_frame_from(
        &mut self,
        t: Target,
        f: FrameId,
        hash: u64,
        was: Option<FrameId>,
    ) -> bool {
        let page = self.page;
        let charged = match was {
            Some(w) if self.frames.on_retired(w) => self.charge_move(t.addr),
            _ => self.charge_vmas(t.addr, 1),
        };
        if !charged {
            return false;
        }
        let mut f = f;
        let mut run = self.stable_run_of(t, f);
        run[0] = Slot::Join(was);
        if was.is_none() && run.len() == 1 && self.vma_allowance < TILE_BELOW_ALLOWANCE {
            // One content repeated, with the VMA budget running low: map a run of it
            // onto a tile of frames. (Not before: a tile's first run saves nothing, so
            // small counts of one content keep the kernel's figures exactly.)
            let same = self.same_content_run(t, f);
            if same >= MIN_TILE {
                match self.tile_for(t, f, hash) {
                    Some((g, r)) => (f, run) = (g, r),
                    None => return self.merge_tile(t, f, same),
                }
            }
        }
        let n = run.len();
        let len = n * page;
        if self.protect(t.addr, len).is_err() {
            self.release_failed(t.addr, len);
            self.counters.merge_failures += 1;
            return false;
        }
        let mut cur = std::mem::take(&mut self.buf2);
        // Compared under protection: the run ends before the first page that differs
        // from its frame (it was planned by checksums, see `stable_run_of`).
        let mut k = n;
        let mut covered = Vec::new();
        for (i, &slot) in run.iter().enumerate() {
            let a = t.addr + i * page;
            let same = match slot {
                Slot::Join(_) => matches!(
                    self.mem.equals_frame(a, t.owned, f + i as FrameId),
                    Ok(true)
                ),
                Slot::Cover => {
                    let read = self.mem.read(a, t.owned, &mut cur).is_ok();
                    if read {
                        covered.push((i, cur.clone()));
                    }
                    read
                }
            };
            if !same {
                k = i;
                break;
            }
        }
        self.buf2 = cur;
        let k = joined_prefix(&run, k);
        if k == 0 {
            self.release_failed(t.addr, len);
            self.counters.merge_failures += 1;
            return false;
        }
        if k < n {
            self.release_tail(t.addr, len, k * page);
            run.truncate(k);
            covered.retain(|&(i, _)| i < k);
        }
        let len = k * page;
        let Ok(filled) = self.mem.map_frames(t.addr, k, t.prot, f, &covered) else {
            self.release_failed(t.addr, len);
            self.counters.merge_failures += 1;
            return false;
        };
        self.mem.release(t.addr, len, false);
        self.record_run(t.addr, f, &run, filled);
        self.changes += 1;
        true
    }

    /// Map `n` pages from `t`, all holding the bytes of frame `f`, onto a new tile of
    /// `n` consecutive frames with those bytes (one mapping): later runs of the same
    /// content map the tile too, so that one content repeated costs one VMA per run,
    /// not one per page (consecutive pages cannot share one frame in one mapping).
    pub(super) fn merge_tile(&mut self, t: Target, f: FrameId, n: usize) -> bool {
        let page = self.page;
        let len = n * page;
        let hash = self.frames.hash(f);
        let Some(g0) = self.frames.alloc_run(&vec![hash; n]) else {
            return false;
        };
        let content = self.mem.frame(f).to_vec();
        let fail = |core: &mut Self, protected: bool| {
            if protected {
                core.release_failed(t.addr, len);
            }
            for g in g0..g0 + n as FrameId {
                let _ = core.mem.punch(g);
                core.frames.discard(g);
            }
            core.counters.merge_failures += 1;
            false
        };
        if (0..n).any(|i| self.mem.write_frame(g0 + i as FrameId, &content).is_err()) {
            return fail(self, false);
        }
        if self.protect(t.addr, len).is_err() {
            return fail(self, true);
        }
        let same = (0..n).all(|i| {
            matches!(
                self.mem.equals(t.addr + i * page, t.owned, &content),
                Ok(true)
            )
        });
        if !same || self.mem.map_frames(t.addr, n, t.prot, g0, &[]).is_err() {
            return fail(self, true);
        }
        self.mem.release(t.addr, len, false);
        for i in 0..n {
            let g = g0 + i as FrameId;
            self.stable.push(hash, g, |f| self.frames.hash(f));
            self.record_merged(t.addr + i * page, g);
        }
        self.changes += 1;
        true
    }

    /// `try_to_merge_two_pages`, extended to runs: both runs protected, compared
    /// again, copied into consecutive new frames, each remapped with one mapping
    /// (one VMA per run instead of one per page).
    pub(super) fn merge_pair(&mut self, t: Target, other: usize, hash: u64) -> bool {
        let page = self.page;
        let o = self.target_at(other).expect("tracked");
        // Each side is one mapping, at most 2 VMAs, whatever the run's length.
        if !self.charge_vmas(t.addr, 2) {
            self.keep_visiting(other);
            return false;
        }
        let mut run = self.run_of(t, o, hash);
        if self.defer(t.addr, o.addr, run.len()) {
            self.refund_vmas(2);
            return false;
        }
        let in_place = match run.len() {
            1 => self.frame_in_place(t.addr, o.addr),
            _ => None,
        };
        let allocated = match in_place {
            Some(g) => self.frames.alloc_at(g, hash),
            None => self.frames.alloc_run(&run.hashes),
        };
        let f0 = match allocated {
            Some(f) => f,
            None => {
                run.truncate(1);
                match self.frames.alloc(hash) {
                    Some(f) => f,
                    None => return false,
                }
            }
        };
        let n = run.len();
        let len = n * page;
        let fail = |core: &mut Self, which: &[usize], n: usize| {
            for &a in which {
                core.release_failed(a, n * page);
            }
            // The frames may hold bytes already: give their memory back.
            for f in f0..f0 + n as FrameId {
                let _ = core.mem.punch(f);
                core.frames.discard(f);
            }
            core.counters.merge_failures += 1;
            false
        };
        if self.protect(t.addr, len).is_err() {
            return fail(self, &[t.addr], n);
        }
        if self.protect(o.addr, len).is_err() {
            return fail(self, &[t.addr, o.addr], n);
        }
        // Compare both runs again now that neither can change: the run ends before the
        // first pair that differs (it was planned by checksums, see `run_of`).
        let (mut a, mut b) = (vec![0u8; page], vec![0u8; page]);
        let (mut t_cov, mut o_cov) = (Vec::new(), Vec::new());
        let mut k = n;
        for i in 0..n {
            let (ta, oa) = (t.addr + i * page, o.addr + i * page);
            let same = if run.t[i] == Slot::Cover {
                let read = self.mem.read(ta, t.owned, &mut a).is_ok()
                    && self.mem.read(oa, o.owned, &mut b).is_ok();
                if read {
                    t_cov.push((i, a.clone()));
                    o_cov.push((i, b.clone()));
                }
                read
            } else {
                matches!(self.mem.same_pages(ta, t.owned, oa, o.owned), Ok(true))
            };
            if !same {
                k = i;
                break;
            }
        }
        // Fill the frames of each stretch of joined pages from `t`'s (protected, so still
        // the bytes just found equal to `o`'s), and check each frame against the key it
        // was allocated with (the pages' checksum at their last visit, the volatility
        // check): a pair written since, equal on both sides, ends the run there too.
        let mut k = joined_prefix(&run.t, k);
        let mut i = 0;
        while i < k {
            if run.t[i] == Slot::Cover {
                i += 1;
                continue;
            }
            let s = i;
            while i < k && run.t[i] != Slot::Cover {
                i += 1;
            }
            let (f, at) = (f0 + s as FrameId, t.addr + s * page);
            if self.mem.fill_frames(f, at, t.owned, i - s).is_err() {
                k = s;
                break;
            }
            let stale = if t.owned {
                // The frames hold the protected pages' bytes now (written whole): those
                // of memory ksm owns are hashed in place, where they are mapped already
                // (a frame just written would cost a page fault of the pool's view).
                (s..i).find(|&j| {
                    let read = self.mem.read(at + (j - s) * page, true, &mut a).is_ok();
                    !(read && checksum_of(&a).0 == run.hashes[j])
                })
            } else {
                (s..i).find(|&j| checksum_of(self.mem.frame(f0 + j as FrameId)).0 != run.hashes[j])
            };
            if let Some(j) = stale {
                k = j;
                break;
            }
        }
        let k = joined_prefix(&run.t, k);
        if k == 0 {
            return fail(self, &[t.addr, o.addr], n);
        }
        if k < n {
            self.release_tail(t.addr, len, k * page);
            self.release_tail(o.addr, len, k * page);
            // The frames past the run may hold bytes already: give their memory back.
            for f in f0 + k as FrameId..f0 + n as FrameId {
                let _ = self.mem.punch(f);
                self.frames.discard(f);
            }
            run.truncate(k);
            t_cov.retain(|&(i, _)| i < k);
            o_cov.retain(|&(i, _)| i < k);
        }
        let (n, len) = (k, k * page);
        let Ok(t_filled) = self.mem.map_frames(t.addr, n, t.prot, f0, &t_cov) else {
            return fail(self, &[t.addr, o.addr], n);
        };
        // Whether the other side's mapping may have filled free frames' holes; None if
        // it failed (that side stays as it was).
        let o_filled = self.mem.map_frames(o.addr, n, o.prot, f0, &o_cov).ok();
        self.mem.release(t.addr, len, false);
        if o_filled.is_some() {
            self.mem.release(o.addr, len, false);
        } else {
            self.release_failed(o.addr, len);
        }
        for (i, &h) in run.hashes.iter().enumerate() {
            let f = f0 + i as FrameId;
            if run.t[i] == Slot::Cover {
                // Covered on both sides: the frame holds nothing anyone maps.
                self.frames.discard(f);
            } else {
                self.stable.push(h, f, |f| self.frames.hash(f));
            }
        }
        self.record_run(t.addr, f0, &run.t, t_filled);
        match o_filled {
            Some(filled) => self.record_run(o.addr, f0, &run.o, filled),
            None => self.counters.merge_failures += 1,
        }
        self.changes += 1;
        true
    }

    /// `try_to_merge_with_zero_page`: write-protect, check the page is still all zero,
    /// drop it (it reads the kernel's zero page from then on), unprotect.
    pub(super) fn merge_zero(&mut self, t: Target) -> bool {
        let page = self.page;
        // Dropping a page inside a pool mapping would bring the frame's bytes back.
        if self.rec(t.addr).is_some_and(|r| r.covered()) {
            return false;
        }
        if self.protect(t.addr, page).is_err() {
            self.release_failed(t.addr, page);
            self.counters.merge_failures += 1;
            return false;
        }
        let mut cur = std::mem::take(&mut self.buf2);
        let zero = self.mem.read(t.addr, t.owned, &mut cur).is_ok() && cur.iter().all(|&b| b == 0);
        self.buf2 = cur;
        let done = zero && self.mem.zap(t.addr).is_ok();
        self.release_failed(t.addr, page);
        if !done {
            self.counters.merge_failures += 1;
            return false;
        }
        let rec = self.rec(t.addr).expect("tracked");
        *self.rec_mut(t.addr) = PageRec::fresh(State::Zero, rec.flags());
        self.counters.rmap_items -= 1;
        self.counters.ksm_zero_pages += 1;
        self.counters.merges += 1;
        self.changes += 1;
        true
    }

    /// The page at `addr` maps frame `f` now: its record leaves whatever index it was
    /// in (smart-scan age reset, as the kernel's shared fields are) and counts.
    fn record_merged(&mut self, addr: usize, f: FrameId) {
        self.add_frame_ref(f);
        self.uncover(addr);
        let r = self.rec_mut(addr);
        let was_unstable = r.state() == State::Unstable;
        *r = PageRec::fresh(State::Stable, r.flags() & !(SUM_TRACKED | DEFERRED));
        r.set_stable(f);
        if was_unstable {
            self.counters.pages_unshared -= 1;
        }
        self.counters.merges += 1;
    }

    /// The pages from `start` map frames `f0, f0+1, …` now, or cover them (see
    /// `Slot`). New references are taken before old ones are dropped, so that no
    /// frame of the run is freed on the way. A covered offset whose frame is free is
    /// punched if assembling the run may have given that hole memory (`filled`, as
    /// `Mem::map_frames` said).
    fn record_run(&mut self, start: usize, f0: FrameId, run: &[Slot], filled: bool) {
        self.mapped_runs.push((start, run.len()));
        for (i, &slot) in run.iter().enumerate() {
            let (a, g) = (start + i * self.page, f0 + i as FrameId);
            match slot {
                Slot::Join(_) => self.record_merged(a, g),
                Slot::Cover => self.cover(a, g),
            }
        }
        for (i, &slot) in run.iter().enumerate() {
            match slot {
                Slot::Join(Some(old)) => self.drop_frame_ref(old),
                Slot::Cover if filled && !self.frames.is_live(f0 + i as FrameId) => {
                    let _ = self.mem.punch(f0 + i as FrameId);
                }
                Slot::Join(None) | Slot::Cover => {}
            }
        }
    }

    /// Charge the VMA budget for `pages` remaps of the visit of `addr`; false (and
    /// counted, see `put_off`) if it would pass it.
    ///
    /// The charge (2 per page, the most a remap can add) is an upper bound: runs of
    /// pages on consecutive frames coalesce into one VMA. So when the allowance runs
    /// out, the real count is read again, at most once per 256 charges, so that a
    /// process really at its budget does not recount for every page.
    pub(super) fn charge_vmas(&mut self, addr: usize, pages: u64) -> bool {
        if !self.vma_room(pages) {
            self.put_off(addr);
            return false;
        }
        let need = 2 * pages;
        self.charges_since_count += 1;
        self.vma_allowance -= need;
        true
    }

    /// What `charge_vmas(_, pages)` took, given back: the merge was not attempted.
    fn refund_vmas(&mut self, pages: u64) {
        self.charges_since_count -= 1;
        self.vma_allowance += 2 * pages;
    }

    /// The visit of `addr` put a merge off because of the VMA budget: counted in
    /// `vma_budget_skips` for every merge refused, and once per full scan in the pages
    /// put off (`Counters::vma_put_off_pages`: one page that merging would have saved;
    /// a visit may be refused a merge onto a frame, then a pair).
    pub(super) fn put_off(&mut self, addr: usize) {
        self.counters.vma_budget_skips += 1;
        self.keep_visiting(addr);
        if self.put_off_last != Some(addr) {
            self.put_off_last = Some(addr);
            self.put_off_now += 1;
            if self.counters.full_scans == 0 {
                self.counters.vma_put_off_pages = self.put_off_now;
            }
        }
    }

    /// A page whose merge the VMA budget put off is not aged by smart scan: it did not
    /// fail to merge (the kernel's would have merged), so every full scan visits it,
    /// counts it in `vma_put_off_pages` and merges it once the budget has room.
    pub(super) fn keep_visiting(&mut self, addr: usize) {
        let p = self.rec_mut(addr);
        p.set_age(0);
        p.set_skips(0);
    }

    /// Whether the VMA budget may have room for a page's merge, without counting:
    /// the allowance as last counted, or a count due (a full scan began, and the
    /// first `vma_room` counts again). See `DomainState::needs_visit`.
    pub(super) fn vma_room_known(&self) -> bool {
        self.vma_allowance >= 2 || self.vma_count_due
    }

    /// Whether the VMA budget has room for `pages` remaps (as `charge_vmas` would
    /// charge them), the real count read again as `charge_vmas` says; nothing charged.
    pub(super) fn vma_room(&mut self, pages: u64) -> bool {
        let need = 2 * pages;
        if self.vma_count_due || (self.vma_allowance < need && self.charges_since_count >= 256) {
            self.refresh_vma_allowance();
        }
        self.vma_allowance >= need
    }

    /// Read the VMA budget afresh now (see `count_vmas_when_needed` for the lazy way).
    pub fn refresh_vma_allowance(&mut self) {
        let n = self.mem.vma_allowance();
        self.set_vma_allowance(n);
    }

    /// Read the VMA budget afresh before this full scan's first merge, not now: a
    /// scan that merges nothing (memory that has settled) then counts no VMA (the
    /// count reads /proc/self/maps, a quarter of such a scan's CPU with 15,000 VMAs).
    pub fn count_vmas_when_needed(&mut self) {
        self.vma_count_due = true;
    }

    /// Charge a move of a run off a retired segment (see `merge_with_frame_from`): 2
    /// VMAs, from the budget if it has room for them, else past it from
    /// `Mem::move_allowance`. False, and the move waits, when neither has room.
    pub(super) fn charge_move(&mut self, addr: usize) -> bool {
        if self.vma_room(1) {
            return self.charge_vmas(addr, 1);
        }
        let room = *self
            .move_allowance
            .get_or_insert_with(|| self.mem.move_allowance());
        if room < 2 {
            return false;
        }
        self.move_allowance = Some(room - 2);
        true
    }

    /// Set the VMA budget from a count the caller already has.
    pub fn set_vma_allowance(&mut self, n: u64) {
        self.move_allowance = None;
        self.vma_allowance = n;
        self.charges_since_count = 0;
        self.vma_count_due = false;
    }
}
