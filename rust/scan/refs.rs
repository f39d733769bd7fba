//! Frame references: taking and dropping a page's reference to a frame (with
//! `pages_shared`, `pages_sharing` and the stable index), forgetting a record,
//! the records of memory that vanished behind ksm's back (their frames wait as
//! suspects), and the frames held back after a fork.
//!
//! Invariants: a frame's reference count equals the number of `Stable` records
//! naming it; a frame with no reference leaves the stable index and is punched
//! (at once, or when an unmerge ends); a frame whose last user vanished is never
//! freed blindly (an `mremap` may have moved the mapping) but waits as a suspect
//! until no mapping of this process holds it.

#![forbid(unsafe_code)]

use super::{Core, Mem, Presence};
use crate::pool::{self, FrameId, Release};
use crate::region::{PageRec, Region, State, ADVISED};

impl<M: Mem> Core<M> {
    /// Drop the record of `addr` back to `Untracked`, releasing what it held.
    pub(super) fn forget(&mut self, addr: usize) {
        self.forget_as(addr, false);
    }

    /// `forget`; `vanished`: the page's memory disappeared behind our back, so a frame
    /// it held becomes a suspect instead of being freed (see `forget_vanished`).
    fn forget_as(&mut self, addr: usize, vanished: bool) {
        let rec = *self.rec_mut(addr);
        match rec.state() {
            State::Untracked => return,
            // Not an rmap_item (see `State::Zero`): only its own counter.
            State::Zero => {
                self.counters.ksm_zero_pages -= 1;
                self.rec_mut(addr).set_state(State::Untracked);
                return;
            }
            State::Inherited => {
                let r = self.rec_mut(addr);
                r.set_state(State::Untracked);
                return;
            }
            State::Unstable => self.counters.pages_unshared -= 1,
            State::Stable if vanished => {
                self.frames.decref_suspect(rec.frame());
                self.frame_ref_dropped(rec.frame());
            }
            State::Stable => self.drop_frame_ref(rec.frame()),
            State::Volatile => {}
        }
        self.counters.rmap_items -= 1;
        let r = self.rec_mut(addr);
        // Its mapping may still cover a frame offset (see `IN_POOL`): kept by the region.
        *r = PageRec::fresh(State::Untracked, r.flags());
    }

    pub(super) fn add_frame_ref(&mut self, f: FrameId) {
        // A domain frame's one copy is the domain's, counted once in its statistics,
        // not by any member: every page of ours on it is a page saved.
        if pool::is_domain(f) {
            self.frames.incref(f);
            self.counters.pages_sharing += 1;
        } else if self.frames.incref(f) == 1 {
            self.counters.pages_shared += 1;
        } else {
            self.counters.pages_sharing += 1;
        }
    }

    pub(super) fn drop_frame_ref(&mut self, f: FrameId) {
        let release = self.frames.decref(f);
        self.frame_ref_dropped(f);
        if let Release::Free(f) = release {
            match &mut self.punch_later {
                Some(later) => later.push(f),
                // A failed punch leaks the frame's bytes but never corrupts data.
                None => {
                    let _ = self.mem.punch(f);
                }
            }
        }
    }

    /// Counters and stable index after a frame lost a reference.
    fn frame_ref_dropped(&mut self, f: FrameId) {
        if pool::is_domain(f) {
            // It stays in the index with no reference (offered) until retired.
            self.counters.pages_sharing -= 1;
        } else if self.frames.refs(f) == 0 {
            self.counters.pages_shared -= 1;
            let h = self.frames.hash(f);
            self.stable.remove(h, f, |f| self.frames.hash(f));
        } else {
            self.counters.pages_sharing -= 1;
        }
    }

    /// The memory of `addr` vanished (the application unmapped it, or mapped something
    /// else there): forget the page and its advice, as the kernel forgets a VMA's. A
    /// frame it held is not freed blindly, since an `mremap` may have moved the mapping
    /// elsewhere: it waits as a suspect until `free_unmapped_suspects`.
    pub fn forget_vanished(&mut self, addr: usize) {
        self.forget_as(addr, true);
        let r = self.rec_mut(addr);
        let was_advised = r.advised();
        r.clear(ADVISED);
        self.advised -= u64::from(was_advised);
        self.unsettle();
    }

    /// Forget a whole region whose memory vanished (see `forget_vanished`).
    pub fn remove_vanished_region(&mut self, start: usize) {
        let Some(r) = self.regions.get(&start) else {
            return;
        };
        let n = r.pages.len();
        if r.pages
            .uniform()
            .is_some_and(|p| p.state() == State::Untracked)
        {
            // Records never created: nothing held, the advice goes with the region.
            self.unsettle();
        } else {
            for i in 0..n {
                self.forget_vanished(start + i * self.page);
            }
        }
        self.remove_region(start);
    }

    /// At fork: the free frames that covered pages sit over stay out of use until no
    /// child maps the pool (a child discarding such a page reads that frame; it must
    /// never hold bytes the parent wrote after the fork).
    pub fn reserve_covered_frames(&mut self) {
        let offsets: Vec<FrameId> = self
            .regions
            .values()
            .flat_map(Region::covered_frames)
            .collect();
        for g in offsets {
            self.frames.reserve_until_quiet(g);
        }
    }

    /// Whether a page of `[s, e)` recorded as merged still maps its frame (a
    /// file-backed PTE: not yet discarded by the application's MADV_DONTNEED).
    pub fn frame_mapped_in(&mut self, s: usize, e: usize) -> bool {
        let merged: Vec<usize> = self
            .pages_in(s, e)
            .filter(|(_, r)| matches!(r.state(), State::Stable | State::Inherited))
            .map(|(a, _)| a)
            .collect();
        merged.into_iter().any(|a| {
            let mut p = [Presence::Absent];
            self.mem.probe(a, &mut p).is_ok() && p[0] == Presence::File
        })
    }

    /// Punch the suspect frames that `mapped` says no mapping of this process holds.
    pub fn free_unmapped_suspects(&mut self, mapped: impl Fn(FrameId) -> bool) {
        for f in self.frames.clear_suspects(mapped) {
            let _ = self.mem.punch(f);
        }
        self.frames.trim();
    }

    /// Punch the frames held back since a fork, now that no other process maps the pool.
    pub fn pool_quiet(&mut self) {
        for f in self.frames.quiet() {
            let _ = self.mem.punch(f);
        }
        self.frames.trim();
    }
}
