//! The kernel's batch: `scan_batch` visits up to a budget of pages from the cursor,
//! probing presence (and, under write tracking, what was written) many pages at a
//! time, passing over the stretches a visit would leave as they are without a
//! visit each (`pass_stretch`), and taking checksums ahead of the visits on
//! `hash_threads` threads (`sum_ahead`); `end_full_scan` closes a full scan.
//!
//! Invariants: a batch never runs past the end of a full scan; the unstable index
//! serves one full scan and is emptied at its start and end; a page passed over
//! here ends exactly as its visit would have left it (records and counters); a
//! checksum taken ahead serves only the batch that took it, and only for a page
//! not in a merge window since (see `window`).

#![forbid(unsafe_code)]

use super::index::PairFilter;
use super::visit::{skip_age, Seen};
use super::{checksum, key_of, Core, Mem, Presence};
use crate::region::{PageRec, State, SUM_TRACKED};

/// Whether the visit of a page with record `p`, probed `pres` (and `unchanged` under
/// write tracking), would read and hash it (see `Core::visit`): an advised, present,
/// unmerged page whose checksum is not trusted, unless smart scan skips it
/// (`Core::should_skip`, which ages pages the same way whatever their state).
fn hashed_by_visit(p: PageRec, pres: Presence, unchanged: bool, smart: bool) -> bool {
    let unmerged = match p.state() {
        State::Untracked => true,
        State::Volatile | State::Unstable => !(unchanged && p.sum_tracked()),
        State::Stable | State::Inherited | State::Zero => false,
    };
    p.advised() && pres == Presence::Anon && unmerged && !(smart && p.smart_skip_due())
}

/// Fewest pages a batch probes at a time (unless the region ends first).
const PROBE_BATCH: usize = 512;

/// Where pages map frames, a batch is probed with write tracking only if at least
/// one page in this many is unmerged (see `Core::tracked_probe`).
const TRACKED_PROBE_SHARE: usize = 16;

/// Most pages a batch probes at a time, budget allowing: enough for checksums taken
/// ahead of the visits to be shared between threads (see `Core::sum_ahead`).
const PROBE_BATCH_MAX: usize = 4096;

/// Most checksums taken ahead of the visits at once: enough for threads to start at a
/// negligible cost (see `os::Os::checksums`: each takes 1,024 at least, so at most
/// 4 threads hash at once).
const SUMS_AHEAD: usize = PROBE_BATCH_MAX;

/// Fewest checksums taken ahead at once. A merge makes those of the pages it remaps
/// useless (a run extends forward from the page visited, over pages whose checksums
/// were taken): after one, the next takes this few, doubling while no merge wastes
/// them, so that scans that merge much waste little and scans that merge nothing
/// soon take `SUMS_AHEAD` at a time.
const SUMS_AHEAD_MIN: usize = 64;

/// Checksums taken ahead of the visits of one batch (see `Core::sum_ahead`): per page
/// from `start`, the checksum its visit is to use instead of reading and hashing it.
pub(super) struct SumsAhead {
    start: usize,
    sums: Vec<Option<u32>>,
    /// How many to take next time.
    window: usize,
    /// Whether a merge window took some of these away unused.
    wasted: bool,
}

impl Default for SumsAhead {
    fn default() -> Self {
        SumsAhead {
            start: 0,
            sums: Vec::new(),
            window: SUMS_AHEAD,
            wasted: false,
        }
    }
}

impl SumsAhead {
    /// Start over for `pages` pages from `start`; returns how many checksums to take.
    fn reset(&mut self, start: usize, pages: usize) -> usize {
        self.window = if self.wasted {
            SUMS_AHEAD_MIN
        } else {
            (self.window * 2).min(SUMS_AHEAD)
        };
        self.wasted = false;
        self.start = start;
        self.sums.clear();
        self.sums.resize(pages, None);
        self.window
    }

    /// Those of a batch serve the batch only; how many to take is kept.
    fn clear(&mut self) {
        self.sums = Vec::new();
    }

    /// The checksum taken ahead for the page at `addr`, if any (at most once).
    pub(super) fn take(&mut self, addr: usize, page: usize) -> Option<u32> {
        let i = addr.checked_sub(self.start)? / page;
        self.sums.get_mut(i)?.take()
    }

    /// Forget those of `[addr, addr+len)` (pages a merge window takes).
    pub(super) fn forget(&mut self, addr: usize, len: usize, page: usize) {
        let end = self.start + self.sums.len() * page;
        let (s, e) = (addr.max(self.start), (addr + len).min(end));
        if s < e {
            for c in &mut self.sums[(s - self.start) / page..(e - self.start).div_ceil(page)] {
                self.wasted |= c.take().is_some();
            }
        }
    }
}

impl<M: Mem> Core<M> {
    /// The unstable index of the full scan that begins: for the `expect` pages not
    /// merged, only those whose checksum another of them held too (see `PairFilter`:
    /// the others cannot pair in this scan), and in a domain the candidates it has not
    /// heard of (the domain asks for pages by checksum, found in the index).
    fn begin_unstable_index(&mut self, expect: usize) {
        self.filter_peak = 0;
        // The pages not merged that this scan visits: smart scan skips those it skipped
        // before while their skips last (see `should_skip`).
        let smart = self.smart_scan;
        let keys = self.regions.values().flat_map(move |r| {
            r.pages
                .iter()
                .filter(move |p| {
                    p.advised()
                        && matches!(p.state(), State::Volatile | State::Unstable)
                        && !(smart && p.smart_skip_due())
                })
                .map(|p| p.checksum())
        });
        // In a domain a candidate the domain has not heard of goes in whatever the
        // filter says (see `UnstableIndex::push_unfiltered`): the table is sized for
        // those too. One it has heard of (a content nobody else held when announced,
        // such as a page the member wrote) stays out unless it may pair here: a
        // member of 4 x 256 MiB whose half was written held its written pages in the
        // index at every full scan, 19.0 bytes per tracked page in all, 15.0 now.
        let unheard = self.domain.as_ref().map_or(0, |d| {
            keys.clone().filter(|&c| d.needs_visit(c, true)).count()
        });
        let (pairs, through, transient) = PairFilter::build(keys);
        if through.saturating_mul(4) > expect.saturating_mul(3) {
            // Most keys held twice (pairs the VMA budget keeps apart, say): the filter
            // would save little of the index and cost its bits on top.
            self.unstable.reset(expect);
        } else {
            self.unstable
                .reset_filtered((through + unheard).min(expect), pairs);
        }
        // The table of keys met once lived only while the filter was built.
        self.filter_peak = self.metadata_bytes() + transient as u64;
    }

    /// Visit up to `budget` pages (the kernel's batch). Returns `true` when a full
    /// scan completed during this call (a batch never runs past the end of a scan).
    pub fn scan_batch(&mut self, budget: u64) -> bool {
        let page = self.page;
        if self.cursor.is_none() {
            // Sized for the pages that may enter it: those not merged.
            let c = &self.counters;
            let merged = c.pages_shared + c.pages_sharing + c.ksm_zero_pages;
            let expect = usize::try_from(self.advised.saturating_sub(merged)).unwrap_or(0);
            self.begin_unstable_index(expect);
            self.domain_begin_scan();
            self.cursor = Some(0);
        }
        let mut scanned = 0u64;
        if let Some(d) = &mut self.domain {
            d.batch_budget = budget;
        }
        // The batch ends early when the queue of pages to publish fills during it (not
        // when it was full already: nothing took it out, as when the core is driven
        // without an engine).
        let cut_when_full = !self.publish_queue_full();
        // Whatever a batch that ended early (a panic) left is no snapshot of this one's.
        self.sums_ahead.clear();
        self.mapped_runs.clear();
        // With more than one hash thread, checksums are taken ahead of the visits; for
        // memory ksm does not own always (it is read many pages per system call then).
        let threads = self.hash_threads > 1;
        let mut pres = vec![Presence::Absent; PROBE_BATCH_MAX];
        let (mut tracked, mut unchanged) =
            (vec![false; PROBE_BATCH_MAX], vec![false; PROBE_BATCH_MAX]);
        while scanned < budget {
            let cur = self.cursor.expect("set above");
            // The next region at or after the cursor.
            let next = self
                .regions
                .range(..=cur)
                .next_back()
                .filter(|(_, r)| cur < r.end(page))
                .or_else(|| self.regions.range(cur..).next())
                .map(|(_, r)| (r.start, r.end(page)));
            let Some((rstart, rend)) = next else {
                // Every page visited: the pairs put off, then the scan's end.
                self.sums_ahead.clear();
                let (_, done) = self.merge_deferred(budget - scanned);
                if !done {
                    return false;
                }
                self.end_full_scan();
                return true;
            };
            let from = cur.max(rstart);
            self.start_tracking(rstart);
            // As many pages as the budget lets visits reach, up to `PROBE_BATCH_MAX` (as
            // many whatever `hash_threads` says, so that it changes nothing else).
            let batch = (budget - scanned).clamp(PROBE_BATCH as u64, PROBE_BATCH_MAX as u64);
            let n = ((rend - from) / page).min(batch as usize);
            let tracking = self.tracked_probe(rstart, from, n);
            let probed = if let Some(frames) = tracking {
                self.mem.probe_tracked(
                    from,
                    &mut pres[..n],
                    &mut tracked[..n],
                    &mut unchanged[..n],
                    frames,
                )
            } else {
                tracked[..n].fill(false);
                unchanged[..n].fill(false);
                self.mem.probe(from, &mut pres[..n])
            };
            if probed.is_err() {
                pres[..n].fill(Presence::Absent);
                tracked[..n].fill(false);
                unchanged[..n].fill(false);
            }
            // The probe took the written state of these pages (the next one will not
            // report those writes again): whatever was not vouched for unchanged loses
            // its trust now, whether or not this batch gets to visit it.
            if let Some(r) = self.regions.get_mut(&rstart) {
                let base = (from - r.start) / page;
                let untrusted = r.pages.uniform().is_some_and(|p| !p.sum_tracked());
                let recs: &mut [PageRec] = if untrusted {
                    &mut []
                } else {
                    r.pages.range_mut(base..base + n)
                };
                for (p, &u) in recs.iter_mut().zip(&unchanged[..n]) {
                    if !u {
                        p.clear(SUM_TRACKED);
                    }
                }
            }
            let ahead = threads || self.regions.get(&rstart).is_some_and(|r| !r.owned);
            let mut i = 0;
            // Pages before this one had their checksums taken ahead (if they needed any).
            let mut summed = 0;
            while i < n && scanned < budget {
                if ahead && i >= summed {
                    summed = self.sum_ahead(
                        rstart,
                        from,
                        i,
                        (&pres[..n], &unchanged[..n]),
                        budget - scanned,
                    );
                }
                let (passed, counted) = self.pass_stretch(
                    rstart,
                    from,
                    i,
                    (&pres[..n], &unchanged[..n]),
                    budget - scanned,
                );
                i += passed;
                scanned += counted;
                if i == n || scanned >= budget {
                    break;
                }
                let addr = from + i * page;
                i += 1;
                if let Some(rec) = self.rec(addr) {
                    let seen = Seen {
                        pres: pres[i - 1],
                        tracked: tracked[i - 1],
                        unchanged: unchanged[i - 1],
                        tracking: tracking.is_some(),
                    };
                    let merges = self.counters.merges;
                    self.mapped_runs.clear();
                    if rec.advised() && self.visit(addr, seen) {
                        scanned += 1;
                    }
                    // A merge remaps pages, often the run of pages after this one (a run
                    // only ever extends forward from the page visited): what the batch's
                    // probe said of them is stale. Where the visit mapped runs, their
                    // pages are known without a probe (see `known_after_merge`); else
                    // they are probed again at once (else `visit` would probe each on
                    // its own): the pages after this one on the frames after its, the
                    // run just mapped. (Not every page in a pool mapping after it:
                    // where pages move from one run of frames to another, that was the
                    // rest of the batch at every move.) Should that fail, the stale
                    // answers stay: `visit` looks again at a merged page.
                    let known = self.counters.merges != merges
                        && i < n
                        && self.known_after_merge(addr, from, &mut pres[..n]);
                    if self.counters.merges != merges && i < n && !known {
                        let run = self.pool_offset(addr);
                        let j = (i..n)
                            .find(|&j| {
                                let want = run.and_then(|g| g.checked_add((j + 1 - i) as u32));
                                want.is_none() || self.pool_offset(from + j * page) != want
                            })
                            .unwrap_or(n);
                        let mut fresh = [Presence::Absent; PROBE_BATCH_MAX];
                        let fresh = &mut fresh[..j - i];
                        if j > i && self.mem.probe(from + i * page, fresh).is_ok() {
                            pres[i..j].copy_from_slice(fresh);
                        }
                    }
                    // A segment's worth of pages queued to publish: end the batch here,
                    // so that they go out now (members wait for them) and the pages
                    // after this one can be queued in turn. Else the visits after it,
                    // queueing nothing, left what was asked of this member to the next
                    // full scan, and at its end declined what was asked before this one
                    // began: asked again of another member, a full scan of its later.
                    if cut_when_full && self.publish_queue_full() && scanned < budget {
                        self.cursor = Some(from + i * page);
                        self.sums_ahead.clear();
                        self.publish_cut = Some(budget - scanned);
                        return false;
                    }
                }
            }
            self.cursor = Some(from + i * page);
        }
        self.sums_ahead.clear();
        false
    }

    /// After the visit of `addr` merged: if it mapped a run from `addr` (`record_run`),
    /// the presence of the batch's pages (from `from`) that the visit's runs mapped,
    /// set without a probe, and true; false if the batch must probe again.
    ///
    /// A page of such a run whose record is `Stable` maps its frame now: it was
    /// remapped just now, under protection (a run only takes a page already merged
    /// to move it, see `stable_run_of`), so a probe would find it a page of a file, or
    /// no page if its PTE could not be put in place (the same for a merged page, see
    /// `pass_stretch`). A write since (copy-on-write) shows at the next full scan, as
    /// one just after a probe would. A covered page keeps the private copy the batch
    /// probed. Pages past a run were not touched: their probe stands.
    fn known_after_merge(&self, addr: usize, from: usize, pres: &mut [Presence]) -> bool {
        let page = self.page;
        if !self.mapped_runs.iter().any(|&(s, _)| s == addr) {
            return false;
        }
        let first = (addr - from) / page + 1;
        for &(start, len) in &self.mapped_runs {
            let lo = start.max(from + first * page);
            let hi = (start + len * page).min(from + pres.len() * page);
            // A run lies in one region: its records are read from there.
            let Some(r) = self.region_at(lo).filter(|_| lo < hi) else {
                continue;
            };
            for a in (lo..hi.min(r.end(page))).step_by(page) {
                if r.pages[(a - r.start) / page].state() == State::Stable {
                    pres[(a - from) / page] = Presence::File;
                }
            }
        }
        true
    }

    /// The scan reached the region at `rstart`: start its write tracking if that was
    /// left for now (see `Region::track_pending`). No page of it was visited yet, so no
    /// checksum of it is trusted; a region with merged pages keeps its synchronous
    /// registration (a merge would have moved them there anyway).
    fn start_tracking(&mut self, rstart: usize) {
        let page = self.page;
        let Some(r) = self.regions.get_mut(&rstart) else {
            return;
        };
        if !r.track_pending {
            return;
        }
        r.track_pending = false;
        let (s, e) = (r.start, r.end(page));
        if !self.has_merged_pages(s, e) {
            self.mem.retrack(s, e - s);
        }
    }

    /// Run until `n` full scans have completed (finishing a scan in progress first).
    pub fn scan_full(&mut self, n: u64) {
        if !self.at_scan_start() {
            while !self.scan_batch(u64::MAX) {}
        }
        for _ in 0..n {
            while !self.scan_batch(u64::MAX) {}
        }
    }

    fn end_full_scan(&mut self) {
        self.deferred = 0;
        self.deferred_at = None;
        // The unstable index serves one full scan (a page's record says `Unstable`, but
        // not since which scan: entries must not outlive theirs), and its memory is
        // given back rather than kept between scans.
        self.scan_end_metadata = self.metadata_bytes().max(self.filter_peak);
        self.unstable.reset(0);
        self.cursor = None;
        self.frames.trim();
        let frames = &self.frames;
        self.stable.trim(|f| frames.hash(f));
        self.frames.age_segments();
        self.domain_end_scan();
        self.counters.full_scans += 1;
        self.counters.vma_put_off_pages = std::mem::take(&mut self.put_off_now);
        self.put_off_last = None;
        self.settled = self.changes == 0;
        self.changes = 0;
    }

    /// How the `n` pages from `from` (in the region at `rstart`) are probed: `None`
    /// without write tracking, else whether some page may map a frame (see
    /// `Mem::probe_tracked`). Not tracked: memory ksm does not own, and where pages
    /// map frames, a batch with fewer than `n / TRACKED_PROBE_SHARE` unmerged pages
    /// (none, once merged memory has settled). There tracking takes a second walk of
    /// the batch's mappings (`PAGEMAP_SCAN` passes over a pool mapping when it takes
    /// what was written), which costs more than it saves: a merged region with 1 %
    /// of its pages changed has a few dozen unmerged pages per batch, smart scan
    /// skips most of them, and a merge domain's member has ~600 mappings per batch.
    fn tracked_probe(&self, rstart: usize, from: usize, n: usize) -> Option<bool> {
        let r = self.regions.get(&rstart).filter(|r| r.owned)?;
        if self.only_anonymous(rstart, from, n) {
            return Some(false);
        }
        let base = (from - r.start) / self.page;
        let unmerged = |p: &PageRec| !matches!(p.state(), State::Stable | State::Inherited);
        (r.pages.count_in(base..base + n, unmerged) * TRACKED_PROBE_SHARE >= n).then_some(true)
    }

    /// Whether the `n` pages from `from` (in the region at `rstart`) are all in
    /// anonymous mappings: ksm's own memory (which only ksm maps anything over) where
    /// no page is merged, inherited or covered.
    pub(super) fn only_anonymous(&self, rstart: usize, from: usize, n: usize) -> bool {
        let Some(r) = self.regions.get(&rstart) else {
            return false;
        };
        let base = (from - r.start) / self.page;
        r.owned && !r.pages.any_in(base..base + n, PageRec::in_pool_mapping)
    }

    /// From page `i` of the batch at `from` (in the region at `rstart`), the pages a
    /// visit would deal with without looking at their bytes, done here as `visit`
    /// would: not advised; merged and still mapping its frame (scanned, nothing to
    /// do); skipped by smart scan (present, unmerged, and
    /// `should_skip` would skip it); or unchanged since a checksum taken under write
    /// tracking, with no candidate in any index (it goes into the unstable index
    /// again). Returns how many pages, and how many of them count as scanned (at
    /// most `budget`). Once memory has settled this is most pages: no record read
    /// twice, no region looked up per page.
    fn pass_stretch(
        &mut self,
        rstart: usize,
        from: usize,
        i: usize,
        seen: (&[Presence], &[bool]),
        budget: u64,
    ) -> (usize, u64) {
        let (pres, unchanged) = seen;
        let page = self.page;
        let (smart, zero) = (
            self.smart_scan,
            self.use_zero_pages.then_some(self.zero_checksum),
        );
        let vma_room = self.vma_room_known();
        let Core {
            regions,
            counters,
            stable,
            frames,
            unstable,
            domain,
            ..
        } = self;
        let Some(r) = regions.get_mut(&rstart) else {
            return (0, 0);
        };
        let base = (from - r.start) / page;
        // Asked once per call, not per merged page: most scans hold no retired segment.
        let retired_held = domain.is_some() && frames.any_retired();
        let private = domain.as_ref().filter(|d| d.private_now);
        let (mut k, mut scanned) = (i, 0);
        while k < pres.len() {
            let idx = base + k;
            let p = r.pages[idx];
            if !p.advised() {
                k += 1;
                continue;
            }
            // (A page on a retired segment's frame is visited, and in some scans one on
            // a frame of our own pool: it moves off, see `move_off`.)
            if p.state() == State::Stable
                && pres[k] != Presence::Anon
                && scanned < budget
                && !(retired_held && frames.on_retired(p.frame()))
                && !private.is_some_and(|d| d.moves_private(frames, p.frame()))
            {
                // `visit`: still maps its frame, a KSM page on its node; scanned.
                counters.pages_scanned += 1;
                scanned += 1;
                k += 1;
                continue;
            }
            if pres[k] != Presence::Anon || !matches!(p.state(), State::Volatile | State::Unstable)
            {
                break;
            }
            // In a domain, a page that a frame of the index may take, or that the domain
            // has not heard of or asks for, is not skipped: frames arrive from other
            // members at any scan. (Asked only of a page smart scan would skip: the
            // look-ups miss the caches, and made for every unmerged page of every scan
            // they cost a member's scanner a measurable share of its CPU while it
            // waited for segments.)
            let offered = || {
                domain.as_ref().is_some_and(|d| {
                    d.needs_visit(p.checksum(), vma_room)
                        || stable.contains(key_of(p.checksum()), |f| frames.hash(f))
                })
            };
            if smart && p.smart_skip_due() && !offered() {
                // `should_skip`: skipped.
                let q = &mut r.pages[idx];
                q.set_age(q.age().saturating_add(1));
                q.set_skips(q.skips() - 1);
                if q.state() == State::Unstable {
                    counters.pages_unshared -= 1;
                }
                q.set_state(State::Volatile);
                counters.pages_skipped += 1;
                k += 1;
                continue;
            }
            let key = key_of(p.checksum());
            let quiet = unchanged[k]
                && p.sum_tracked()
                && scanned < budget
                && zero != Some(p.checksum())
                && !stable.contains(key, |f| frames.hash(f))
                && !unstable.may_contain(&key)
                // A full table (or none yet) grows at a visit, which reads the keys.
                && (!unstable.admits(&key) || unstable.has_room(1))
                && !(idx > 0 && r.pages[idx - 1].state() == State::Stable)
                // A candidate the domain has not heard of, or asks for: a visit's work.
                && !domain.as_ref().is_some_and(|d| d.needs_visit(p.checksum(), vma_room));
            if !quiet {
                break;
            }
            // `visit` with a trusted checksum and nothing to compare: `should_skip`
            // (not skipped), counted as scanned, back into the unstable index.
            let q = &mut r.pages[idx];
            if smart {
                let age = q.age();
                q.set_age(age.saturating_add(1));
                if age >= 3 && q.skips() == 0 {
                    q.set_skips(skip_age(age));
                }
            }
            if q.state() == State::Volatile {
                counters.pages_unshared += 1;
            }
            q.set_state(State::Unstable);
            unstable.push_reserved(key, from + k * page);
            counters.pages_scanned += 1;
            scanned += 1;
            k += 1;
        }
        (k - i, scanned)
    }

    /// Take, on `hash_threads` threads, the checksums that the visits of the next pages
    /// of the batch at `from` (in the region at `rstart`), from its page `i` on, would
    /// take by reading and hashing each page: those of up to `SUMS_AHEAD` pages (fewer
    /// after a merge wasted some, see `SUMS_AHEAD_MIN`; at most `budget`), kept in
    /// `sums_ahead` for their visits. Returns the index past the pages looked at.
    ///
    /// Nothing changes but when the bytes are read: a checksum taken ahead is a
    /// snapshot of the page taken in this batch, after its probe, as the visit's read
    /// is; a visit still reads the bytes before it compares them with anything, and a
    /// merge compares them under write-protection. A merge window takes the
    /// checksums of its pages away (`Core::protect`): a page it remaps is no unmerged
    /// page any more, and one it gives back may have been written meanwhile without
    /// the write tracker's knowledge (see `protect`).
    pub(super) fn sum_ahead(
        &mut self,
        rstart: usize,
        from: usize,
        i: usize,
        (pres, unchanged): (&[Presence], &[bool]),
        budget: u64,
    ) -> usize {
        let page = self.page;
        let smart = self.smart_scan;
        let Some(r) = self.regions.get(&rstart) else {
            return pres.len();
        };
        let (base, owned) = ((from - r.start) / page, r.owned);
        let window = self.sums_ahead.reset(from + i * page, pres.len() - i);
        let most = budget.min(window as u64) as usize;
        let mut addrs = Vec::with_capacity(most.min(pres.len() - i));
        let mut k = i;
        // No further than the batch's visits can reach (`budget` pages from here, at
        // most): a checksum its visit never takes is taken again by the next batch.
        while k < pres.len() && addrs.len() < most && ((k - i) as u64) < budget {
            if hashed_by_visit(r.pages[base + k], pres[k], unchanged[k], smart) {
                addrs.push(from + k * page);
            }
            k += 1;
        }
        self.sums_ahead.sums.truncate(k - i);
        if addrs.is_empty() {
            return k;
        }
        let mut sums = vec![None; addrs.len()];
        self.mem
            .checksums(&addrs, owned, self.hash_threads, checksum, &mut sums);
        for (a, c) in addrs.into_iter().zip(sums) {
            self.sums_ahead.sums[(a - self.sums_ahead.start) / page] = c;
        }
        k
    }
}
