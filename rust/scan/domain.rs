//! The algorithm's side of a merge domain (no I/O: the engine carries what is
//! collected here to and from the domain's broker).
//!
//! * A page that becomes a candidate (unchanged since its last visit, nothing in
//!   either index to merge with) has its checksum **announced**, once.
//! * A checksum the domain asks us to **publish** (another member announced it
//!   too) queues a page with that checksum to be copied into a new sealed
//!   segment: at once if a visit found the page a candidate (its record says so),
//!   else at the next visit of such a page; pages queued together (over up to
//!   `PUBLISH_WAIT_BATCHES` batches) are copied in address order, so that a run of
//!   pages becomes a run of frames that the other members map with one mapping.
//! * Two pages of this process with the same bytes are not merged onto a frame of
//!   the process's own pool, as outside a domain, but the same way: one is queued
//!   for a segment, and both merge onto its frame at their next visit. So every
//!   frame made while in a domain can be mapped by the other members. (The engine
//!   takes its own segments in at once, without waiting for the broker: merging
//!   inside the process goes on when no broker answers.)
//! * A segment received from the domain enters the stable index, frame by frame,
//!   under the checksums it came with (the broker checked them against the sealed
//!   bytes; here a wrong one could only make a frame unfindable or a compare fail).
//!   From then on a page merges onto it exactly as onto a frame of its own pool:
//!   after write-protection and a byte-for-byte comparison (see `merge.rs`).
//! * A retired segment (or every segment, when the domain is left) leaves the
//!   index; its block is dropped once no page maps it.
//! * Pages merged before joining are on frames of the process's own pool, which no
//!   other member can map. In a domain they move onto domain frames as pages on a
//!   retired segment do: their contents are announced, and once a segment with the
//!   same bytes is in the index, runs of them move onto it (see `moves_off`). They
//!   are looked at only in full scans after something that may let them move (the
//!   join, a segment taken in that holds one of their contents, the domain asking
//!   for one, a new broker), so a settled member does not visit them.
//!
//! Counting: a page on a domain frame counts in `pages_sharing` (a page saved);
//! the frame's one copy is the domain's, counted once by the domain's statistics
//! (`pages_shared` there), by no member. So a member's figures never go negative
//! when it is the only local user of a peer's frame.

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};

use super::runs::MIN_TILE;
use super::sums::{SumSet, Sums};
use super::{key_of, Core, Mem, Target};
use crate::domain::broker::twin_run_max;
use crate::pool::{self, FrameId, FrameTable};
use crate::region::{Region, State};
use crate::stats::{hash_table_bytes, shrink_if_sparse};

/// Most checksums announced per batch (the rest wait for the next visit).
const ANNOUNCE_MAX: usize = 1 << 16;
/// A page queued to be published: its address, whether ksm owns its memory, and the
/// checksum it is published under.
pub type Queued = (usize, bool, u32);

/// Most pages queued for publishing at a time (one segment's worth).
const PUBLISH_MAX: usize = crate::pool::BLOCK_FRAMES as usize;

/// Batches pages queued to publish wait for more before their segment is built
/// (unless the queue fills a segment, a full scan ends, or no broker answers): a
/// segment per batch made ~100-frame segments at the default `pages_to_scan`,
/// each a descriptor and a mapping in every member, and a place where runs of
/// merged pages must break.
pub(super) const PUBLISH_WAIT_BATCHES: u32 = 16;

/// Figures of the member's domain activity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainCounters {
    /// Checksums announced.
    pub announced: u64,
    /// Pages copied into segments we published.
    pub published: u64,
    /// Segments received (ours included) and taken into the index.
    pub segments: u64,
    /// Segments retired by the domain.
    pub retired: u64,
    /// Pages given private copies again because their segment was retired
    /// (compaction); they merge again onto new segments.
    pub evicted: u64,
}

/// What a batch found for the domain (see `Core::take_domain_out`).
#[derive(Debug, Default)]
pub struct DomainOut {
    pub announce: Vec<u32>,
    pub claim: Vec<u32>,
    /// Checksums the domain asked for that no page of ours holds any more.
    pub decline: Vec<u32>,
    /// Pages to copy into a new segment: address, owned, checksum.
    pub publish: Vec<Queued>,
    /// The checksums of `publish` that were queued (not repeats held in place, see
    /// `Core::with_twins`): what `domain_published` is told was asked.
    pub asked: Vec<u32>,
}

/// What the core keeps of its domain.
#[derive(Debug, Default)]
pub struct DomainState {
    /// Contents announced (until a segment holding them is taken in): one for every
    /// candidate of a member whose pages nobody else holds, so a sorted vector.
    announced: SumSet,
    /// Checksums asked for, with the full scan (count) in which they were asked.
    /// (Keys the broker sent: hashed with the default, keyed hasher.)
    wanted: HashMap<u32, u64>,
    /// Full scans ended since joining.
    scans: u64,
    /// Asked-for checksums no page held for a whole full scan: to decline.
    decline: Vec<u32>,
    announce: Vec<u32>,
    publish: Vec<Queued>,
    /// The full scan in which the first page of `publish` was queued, and the batches
    /// it has waited since (see `PUBLISH_WAIT_BATCHES`).
    publish_since: (u64, u32),
    /// The page budget of the latest batch (`pages_to_scan`).
    pub(super) batch_budget: u64,
    /// Checksums queued to publish, or published and not yet taken in: queued once.
    publishing: Sums,
    /// Contents this process holds twice, claimed from the domain (once), to claim.
    claimed: Sums,
    claim: Vec<u32>,
    /// Segments retired for compaction whose pages of ours are to move off: (the
    /// segment's id, the full scan at whose end they move; see `retire_segment`).
    /// By id: a segment dropped meanwhile may have its block of frame ids reused.
    evict_due: Vec<(u64, u64)>,
    /// Whether a broker answers now (else contents held twice are published at once).
    connected: bool,
    /// Members of the domain, as the broker last said.
    members: u32,
    /// Something happened that may let pages on frames of our own pool move onto
    /// domain frames: the next full scan visits them (see `Core::moves_off`).
    private_due: bool,
    /// This full scan visits pages on frames of our own pool (`private_due` when it
    /// began, and some such frame was in use).
    pub(super) private_now: bool,
    pub counters: DomainCounters,
}

impl DomainState {
    /// Bytes of the state's tables (hash sets count a control byte per slot).
    pub(super) fn metadata_bytes(&self) -> usize {
        use std::mem::size_of;
        self.announced.metadata_bytes()
            + hash_table_bytes(self.publishing.capacity(), size_of::<u32>())
            + hash_table_bytes(self.claimed.capacity(), size_of::<u32>())
            + hash_table_bytes(self.wanted.capacity(), size_of::<(u32, u64)>())
            + (self.decline.capacity() + self.announce.capacity() + self.claim.capacity())
                * size_of::<u32>()
            + self.publish.capacity() * size_of::<Queued>()
            + self.evict_due.capacity() * size_of::<(u64, u64)>()
    }

    /// A content now has a frame in the index: nothing more to ask or say about it.
    /// Its announcement and claim are forgotten too (each member kept a checksum for
    /// every content it announced, 4.4 bytes per tracked page in a settled member of
    /// 4 x 64 MiB): a page holding it merges onto the frame at its next visit, and one
    /// that cannot is a candidate that announces it again, which the broker answers
    /// by asking nobody (the content is published).
    fn forget_published(&mut self, c: u32) {
        self.wanted.remove(&c);
        self.publishing.remove(&c);
        self.announced.remove(c);
        self.claimed.remove(&c);
    }

    /// Whether a candidate with `checksum` has something to do with the domain (not
    /// announced yet, or asked for), so that its visit cannot be skipped. With no
    /// `vma_room` (the process is at its VMA budget) nothing is announced (see
    /// `domain_candidate`): a page not yet announced may then be skipped as in a
    /// process in no domain (visited at every scan, each written page of a member
    /// past its budget was hashed at every scan: a third more CPU per full scan after
    /// a random half of 4 × 256 MiB was written).
    pub(super) fn needs_visit(&self, checksum: u32, vma_room: bool) -> bool {
        (vma_room && !self.announced.contains(checksum)) || self.wanted.contains_key(&checksum)
    }

    /// Whether a page on frame `f` moves off it in this full scan (see
    /// `Core::moves_off`): a frame of our own pool, in a scan that looks at them.
    pub(super) fn moves_private(&self, frames: &FrameTable, f: FrameId) -> bool {
        self.private_now && private_movable(frames, f)
    }

    /// A full scan begins: whether it visits pages on frames of our own pool.
    pub(super) fn begin_scan(&mut self, private_in_use: bool) {
        self.private_now = std::mem::take(&mut self.private_due) && private_in_use;
    }

    /// Queue the page at `t` to be copied into the next segment, once per checksum.
    fn queue(&mut self, t: Target, checksum: u32) -> bool {
        if self.publish.len() >= PUBLISH_MAX {
            // Held here, no room: still asked for (declined only once a whole full scan
            // found no page holding it, see `Core::domain_end_scan`).
            if let Some(at) = self.wanted.get_mut(&checksum) {
                *at = self.scans;
            }
            return false;
        }
        if !self.publishing.insert(checksum) {
            return false;
        }
        self.wanted.remove(&checksum);
        if self.publish.is_empty() {
            self.publish_since = (self.scans, 0);
        }
        self.publish.push((t.addr, t.owned, checksum));
        true
    }

    /// Whether the pages queued to publish go into a segment now (see
    /// `PUBLISH_WAIT_BATCHES`); counts a batch waited if not.
    fn publish_due(&mut self) -> bool {
        if self.publish.is_empty() {
            return false;
        }
        let (scan, waited) = self.publish_since;
        // Batches of a segment's worth of pages or more make full segments anyway, and
        // publish at once (held, 4 workers of 256 MiB at `pages_to_scan` 10,000 ended
        // with 17 of 172,906 pages fewer shared than the kernel; why is not known).
        let due = self.publish.len() >= PUBLISH_MAX
            || self.batch_budget >= PUBLISH_MAX as u64
            || !self.connected
            || scan != self.scans
            || waited >= PUBLISH_WAIT_BATCHES;
        if !due {
            self.publish_since.1 += 1;
        }
        due
    }
}

/// Whether a page merged onto frame `f` of our own pool may move onto a domain
/// frame: not a domain frame, nor one of a tile (at least `MIN_TILE` consecutive
/// frames of one content, which map a repeated content with one mapping per run;
/// one domain frame per content would take a mapping per page).
pub(super) fn private_movable(frames: &FrameTable, f: FrameId) -> bool {
    if pool::is_domain(f) {
        return false;
    }
    let h = frames.hash(f);
    let same = |g: FrameId| !pool::is_domain(g) && frames.is_live(g) && frames.hash(g) == h;
    let reach = MIN_TILE as FrameId - 1;
    let below = (1..=reach)
        .take_while(|&k| f.checked_sub(k).is_some_and(same))
        .count();
    let above = (1..=reach)
        .take_while(|&k| f.checked_add(k).is_some_and(same))
        .count();
    below + 1 + above < MIN_TILE
}

impl<M: Mem> Core<M> {
    /// Join a domain: candidates are announced from the next visit on. Until the
    /// engine says a broker answers, contents held twice are published at once.
    /// Pages merged before are looked at in the next full scan (see `moves_off`).
    pub fn join_domain(&mut self) {
        if self.domain.is_none() {
            self.domain = Some(DomainState {
                private_due: true,
                ..DomainState::default()
            });
        }
    }

    /// Whether a merged page on frame `f` is visited to move off it onto a domain
    /// frame (see `move_off`): a frame of a retired segment, or in a domain, in a full
    /// scan that looks at them, a frame of our own pool (not a tile's).
    pub(super) fn moves_off(&self, f: FrameId) -> bool {
        self.frames.on_retired(f)
            || self
                .domain
                .as_ref()
                .is_some_and(|d| d.moves_private(&self.frames, f))
    }

    /// Whether contents under index keys `keys` (a segment taken in, or asked for) may
    /// let pages on frames of our own pool move, where the next full scan does not
    /// look at them anyway: a frame of our pool in use holds one of those keys.
    fn private_may_move(&self, keys: impl IntoIterator<Item = u64>) -> bool {
        let hash_of = |f| self.frames.hash(f);
        let due = self.domain.as_ref().is_none_or(|d| d.private_due);
        !due && self.counters.pages_shared > 0
            && keys
                .into_iter()
                .any(|k| self.stable.get(k, &hash_of).any(|f| !pool::is_domain(f)))
    }

    /// Whether a segment's worth of pages is queued to publish: the batch ends at
    /// this page, so that they go out now and the visits after it can queue more
    /// (see `Core::scan_batch`).
    pub(super) fn publish_queue_full(&self) -> bool {
        self.domain
            .as_ref()
            .is_some_and(|d| d.publish.len() >= PUBLISH_MAX)
    }

    /// The budget left of the latest batch, if it ended early because a segment's
    /// worth of pages was queued to publish (taken: the engine publishes them and goes
    /// on with the batch).
    pub fn take_publish_cut(&mut self) -> Option<u64> {
        self.publish_cut.take()
    }

    /// A full scan begins (see `DomainState::begin_scan`).
    pub(super) fn domain_begin_scan(&mut self) {
        let private_in_use = self.counters.pages_shared > 0;
        if let Some(d) = &mut self.domain {
            d.begin_scan(private_in_use);
        }
    }

    /// Whether the core is in a domain.
    pub fn in_domain(&self) -> bool {
        self.domain.is_some()
    }

    /// Leave the domain: every segment leaves the index (pages on them stay merged,
    /// their segments' blocks go once no page maps them).
    pub fn leave_domain(&mut self) {
        self.domain = None;
        for id in self.frames.segment_ids() {
            self.retire_segment(id, false);
        }
    }

    /// A (new) broker: what was announced to the old one is said again.
    pub fn domain_connected(&mut self) {
        if let Some(d) = &mut self.domain {
            d.announced.clear();
            d.claimed.clear();
            d.wanted.clear();
            d.private_due = true;
        }
    }

    /// The domain, of `members` members, asks us to publish frames of these checksums.
    pub fn domain_wants(&mut self, members: u32, sums: &[u32]) {
        if self.domain.is_none() {
            return;
        }
        // A page on a frame of our own pool may hold one of them.
        let private = self.private_may_move(sums.iter().map(|&c| key_of(c)));
        // A page this full scan put into the unstable index under one of them is queued
        // now: it was a candidate at its visit (it held still since the visit before),
        // which announced it. Else it would wait for its next visit, a full scan later,
        // and the members that asked with it (its bytes are read, and checked by the
        // broker, when the segment is built; see `take_domain_out`).
        let mut found: Vec<(Target, u32)> = sums
            .iter()
            .filter_map(|&c| {
                let a = self.unstable_candidate(key_of(c), None)?;
                Some((self.target_at(a)?, c))
            })
            .collect();
        // An ask that comes just after a full scan began finds the index emptied: the
        // records still say which pages were candidates with which checksums (one
        // pass over them, for the checksums not found above).
        if found.len() < sums.len() {
            let mut missing: HashSet<u32> = sums.iter().copied().collect();
            for (_, c) in &found {
                missing.remove(c);
            }
            // A bit per checksum's low bits, looked at first: most records hold none of
            // the few checksums missing, and a bit costs less than a hash look-up.
            let mut bits = [0u64; 64];
            for &c in &missing {
                bits[(c as usize >> 6) & 63] |= 1 << (c & 63);
            }
            let maybe = |c: u32| bits[(c as usize >> 6) & 63] & (1 << (c & 63)) != 0;
            let page = self.page;
            let mut at: Vec<(usize, u32)> = Vec::new();
            for r in self.regions.values() {
                if missing.is_empty() {
                    break;
                }
                for (i, p) in r.pages.iter().enumerate() {
                    if p.state() == State::Unstable
                        && maybe(p.checksum())
                        && p.advised()
                        && missing.remove(&p.checksum())
                    {
                        at.push((r.start + i * page, p.checksum()));
                    }
                }
            }
            found.extend(
                at.into_iter()
                    .filter_map(|(a, c)| Some((self.target_at(a)?, c))),
            );
        }
        let Some(d) = &mut self.domain else { return };
        let now = d.scans;
        d.members = members;
        d.wanted.extend(sums.iter().map(|&c| (c, now)));
        d.private_due |= private;
        for (t, c) in found {
            d.queue(t, c);
        }
    }

    /// Checksums to announce, to claim, and pages to copy into a new segment
    /// (address, owned, checksum), collected since the last call: the pages once
    /// enough have been queued or have waited long enough (see
    /// `PUBLISH_WAIT_BATCHES`), and only those still advised here (a page let go
    /// meanwhile is not read: its checksum is asked for again, or declined).
    pub fn take_domain_out(&mut self) -> DomainOut {
        let Some(d) = &mut self.domain else {
            return DomainOut::default();
        };
        let mut publish = match d.publish_due() {
            true => std::mem::take(&mut d.publish),
            false => Vec::new(),
        };
        let page = self.page;
        let (regions, frames) = (&self.regions, &self.frames);
        publish.retain_mut(|(addr, owned, c)| {
            // Still advised, with the checksum it was queued under, and not merged
            // meanwhile (a segment with its bytes may have come), unless it is moving
            // off a retired segment's frame or one of our own pool (see `move_off`).
            let here = regions
                .range(..=*addr)
                .next_back()
                .map(|(_, r)| r)
                .filter(|r| *addr < r.end(page))
                .filter(|r| {
                    let p = r.pages[(*addr - r.start) / page];
                    p.advised()
                        && match p.state() {
                            State::Stable => {
                                (frames.on_retired(p.frame()) || private_movable(frames, p.frame()))
                                    && frames.hash(p.frame()) == u64::from(*c)
                            }
                            _ => p.checksum() == *c,
                        }
                });
            if let Some(r) = here {
                *owned = r.owned;
                return true;
            }
            d.publishing.remove(c);
            d.wanted.insert(*c, d.scans);
            false
        });
        publish.sort_unstable_by_key(|p| p.0);
        let held = self.with_twins(&publish);
        let taken = held.as_ref().map_or(publish.len(), |h| h.1);
        let Some(d) = &mut self.domain else {
            return DomainOut::default();
        };
        // What did not fit this segment, for lack of room once repeats were held in
        // place, stays queued for the next one (still `publishing`): asked, not yet.
        let mut rest = publish.split_off(taken);
        let asked = publish.iter().map(|p| p.2).collect();
        if !rest.is_empty() {
            rest.append(&mut d.publish);
            d.publish = rest;
        }
        let publish = held.map_or(publish, |h| h.0);
        d.counters.announced += d.announce.len() as u64;
        d.counters.published += publish.len() as u64;
        DomainOut {
            announce: std::mem::take(&mut d.announce),
            claim: std::mem::take(&mut d.claim),
            decline: std::mem::take(&mut d.decline),
            publish,
            asked,
        }
    }

    /// `publish` (in address order), with the repeats between its pages held in place
    /// (see `broker::twin_run_max`): where at most `twin_run_max` pages lie between
    /// two pages of it in one region, and each of them holds a content published or
    /// queued already (merged onto a domain frame, or unmerged with a checksum queued
    /// here or with a domain frame in the index), they are copied into the segment
    /// too, in place. Another member's run of the data then maps them with the pages
    /// around them, one mapping, instead of breaking twice to map the frames made
    /// where those contents first occurred.
    ///
    /// None if no repeat is held in this domain (`publish` goes as it is). A segment
    /// holds at most `PUBLISH_MAX` frames, the queue's size: also returns how many
    /// pages of `publish` it holds; the others no longer fit once repeats are held,
    /// and are queued for the next segment. (Held only where room was left, a full
    /// queue, which a scan of a segment's worth of pages per batch makes every time,
    /// held none: 16 members of 64 MiB of stdlib data published their first segments
    /// without them, and a member's data broke at ~220 short repeats more.)
    fn with_twins(&self, publish: &[Queued]) -> Option<(Vec<Queued>, usize)> {
        let d = self.domain.as_ref()?;
        let most = twin_run_max(d.members);
        if most == 0 || publish.len() < 2 {
            return None;
        }
        let page = self.page;
        let hash_of = |f| self.frames.hash(f);
        let zero = self.use_zero_pages.then_some(self.zero_checksum);
        // The checksum page `i` of `r` would be copied under, if it is such a repeat.
        let repeat = |r: &Region, i: usize| -> Option<u32> {
            let p = r.pages[i];
            if !p.advised() || p.covered() {
                return None;
            }
            let c = match p.state() {
                State::Stable => {
                    let f = p.frame();
                    (pool::is_domain(f) && !self.frames.retired(f))
                        .then(|| self.frames.hash(f) as u32)?
                }
                State::Volatile | State::Unstable => {
                    let c = p.checksum();
                    let known = d.publishing.contains(&c)
                        || self.stable.get(key_of(c), &hash_of).any(pool::is_domain);
                    known.then_some(c)?
                }
                _ => return None,
            };
            (zero != Some(c)).then_some(c)
        };
        let mut out = Vec::with_capacity(publish.len());
        for (k, &here) in publish.iter().enumerate() {
            if out.len() == PUBLISH_MAX {
                return Some((out, k));
            }
            out.push(here);
            let Some(&(next, _, _)) = publish.get(k + 1) else {
                break;
            };
            // (Sorted; a page queued twice, under two checksums, repeats its address.)
            let gap = ((next - here.0) / page).saturating_sub(1);
            if gap == 0 || gap > most {
                continue;
            }
            let Some(r) = self.region_at(here.0).filter(|r| next < r.end(page)) else {
                continue;
            };
            let first = (here.0 - r.start) / page + 1;
            // Room for them (the next page then starts the next segment if need be).
            if out.len() + gap > PUBLISH_MAX {
                continue;
            }
            let twins: Option<Vec<u32>> = (first..first + gap).map(|i| repeat(r, i)).collect();
            if let Some(twins) = twins {
                out.extend(
                    twins
                        .into_iter()
                        .enumerate()
                        .map(|(j, c)| (here.0 + (j + 1) * page, r.owned, c)),
                );
            }
        }
        Some((out, publish.len()))
    }

    /// The domain's counters (zero outside a domain).
    pub fn domain_counters(&self) -> DomainCounters {
        self.domain.as_ref().map(|d| d.counters).unwrap_or_default()
    }

    /// Take in segment `id` whose frames have checksums `sums` (as the segment came,
    /// see the module's comment): its frames enter the stable index. Returns its
    /// first frame id (the engine maps the segment's view there), or None if it is
    /// here already, no block is left, or we are in no domain.
    pub fn add_segment(&mut self, id: u64, sums: &[u32]) -> Option<FrameId> {
        let d = self.domain.as_mut()?;
        let keys: Vec<u64> = sums.iter().map(|&c| key_of(c)).collect();
        let Some(f0) = self.frames.add_segment(id, &keys) else {
            // Held already: retired when we left the domain, offered again now that we
            // joined it again (the broker offers live segments only). Back in the index,
            // the view we have kept serving; our pages on it stay where they are.
            if let Some((f0, n)) = self.frames.unretire_segment(id) {
                let frames = &self.frames;
                self.stable.reserve(n as usize, |f| frames.hash(f));
                for f in f0..f0 + n {
                    let k = frames.hash(f);
                    self.stable.push(k, f, |f| frames.hash(f));
                    d.forget_published(k as u32);
                }
                d.evict_due.retain(|&(seg, _)| seg != id);
                self.changes += 1;
            }
            return None;
        };
        // Pages on frames of our own pool may move onto it if it holds their content
        // (asked before its frames enter the index).
        let private = self.private_may_move(keys.iter().copied());
        let Some(d) = &mut self.domain else {
            return None;
        };
        d.private_due |= private;
        let frames = &self.frames;
        self.stable.reserve(keys.len(), |f| frames.hash(f));
        for (i, &k) in keys.iter().enumerate() {
            self.stable.push(k, f0 + i as FrameId, |f| frames.hash(f));
            d.forget_published(k as u32);
        }
        d.counters.segments += 1;
        // New frames to merge onto: the next full scan is not a settled one.
        self.changes += 1;
        Some(f0)
    }

    /// Segment `id` is retired: its frames leave the index. With `evict` (the domain
    /// retired it: nobody maps it, or too much of it is mapped by nobody to be worth
    /// its memory), the pages of ours still on it get private copies again at the end
    /// of the next full scan, so that the kernel can free it once no member maps it;
    /// they merge again, onto new segments, at their next visits (the domain's
    /// compaction). Without, they stay (leaving the domain keeps merged pages merged).
    pub fn retire_segment(&mut self, id: u64, evict: bool) {
        let Some((f0, n)) = self.frames.retire_segment(id) else {
            // Retired here already (we left the domain since it came) and now by the
            // domain too: our pages on it go as from any segment the domain retired.
            if let Some(d) = self.domain.as_mut().filter(|_| evict) {
                if self.frames.segment(id).is_some() && !d.evict_due.iter().any(|&(s, _)| s == id) {
                    d.evict_due.push((id, d.scans + 1));
                }
            }
            return;
        };
        for f in f0..f0 + n {
            let h = self.frames.hash(f);
            self.stable.remove(h, f, |f| self.frames.hash(f));
            if let Some(d) = &mut self.domain {
                // Its contents are candidates to announce again (they are no longer
                // published): a page moved off it merges again through the domain.
                d.announced.remove(h as u32);
                d.claimed.remove(&(h as u32));
                d.publishing.remove(&(h as u32));
            }
        }
        if let Some(d) = &mut self.domain {
            d.counters.retired += 1;
            if evict {
                // Not now: at the end of the first full scan that begins after this
                // one. By then every page written before the retirement has been
                // visited and given a mapping of its own, so the VMA budget says
                // whether the pages moved off can merge again. (Moving pages off at
                // once, while writes were still being found, let a member move pages
                // off that its own writes then left no room to merge again: memory
                // lost, not won, while other members kept the segment alive.)
                d.evict_due.push((id, d.scans + 1));
            }
        }
    }

    /// Move our pages off the segments retired for compaction whose time has come
    /// (see `retire_segment`), as far as the VMA budget allows. An unmerge that fails
    /// leaves its pages merged: still correct, the segment then lives on.
    fn evict_retired_due(&mut self) {
        let Some(d) = &mut self.domain else { return };
        let now = d.scans;
        let mut due = Vec::new();
        d.evict_due.retain(|&(id, at)| {
            let ripe = at <= now;
            if ripe {
                due.push(id);
            }
            !ripe
        });
        // Still held (and so still retired): a segment no page maps any more is gone.
        let due: Vec<(FrameId, u32)> = due
            .into_iter()
            .filter_map(|id| self.frames.segment(id))
            .filter(|&(f0, _)| self.frames.retired(f0))
            .collect();
        if due.is_empty() {
            return;
        }
        // Counted afresh: a write copying a merged page away splits its mapping
        // without a charge, so the allowance may be stale.
        self.refresh_vma_allowance();
        for runs in self.pages_on(&due, false) {
            for (s, e) in runs {
                // Moving a run off splits its mapping (2 VMAs at most), and its pages then
                // merge again (2 at most each): a run for which the VMA budget has no room
                // stays on the retired segment (correct, and its memory goes once no page
                // maps it). Evicting regardless put members over the budget, after which
                // nothing merged again and the new segments were retired in turn.
                let pages = ((e - s) / self.page) as u64;
                if !self.vma_room(1 + pages) {
                    continue;
                }
                self.vma_allowance = self.vma_allowance.saturating_sub(2);
                if self.unmerge_range(s, e).is_ok() {
                    if let Some(d) = &mut self.domain {
                        d.counters.evicted += pages;
                    }
                }
            }
        }
    }

    /// For each of `segs` (a segment's first frame id and frames; segments are
    /// apart), the runs of pages mapping one of its frames or covered at one, as
    /// address ranges in address order. One pass over the records for all of them;
    /// with `covered_only` (no page is merged onto those segments: their blocks count
    /// no page) over the covered runs only, so that segments a covered page keeps
    /// cost little to look at again before every batch.
    fn pages_on(&self, segs: &[(FrameId, u32)], covered_only: bool) -> Vec<Vec<(usize, usize)>> {
        let page = self.page;
        let mut order: Vec<usize> = (0..segs.len()).collect();
        order.sort_unstable_by_key(|&k| segs[k].0);
        let end = |k: usize| u64::from(segs[k].0) + u64::from(segs[k].1);
        // (segment, first address, end address) of each piece found.
        let mut found: Vec<(usize, usize, usize)> = Vec::new();
        for r in self.regions.values() {
            if covered_only {
                for (i, n, g) in r.covered_runs() {
                    // Pages i..i+n cover offsets g..g+n: their part on each segment.
                    let (g, n64) = (u64::from(g), n as u64);
                    let mut o = order.partition_point(|&k| end(k) <= g);
                    while let Some(&k) = order.get(o) {
                        let f0 = u64::from(segs[k].0);
                        if f0 >= g + n64 {
                            break;
                        }
                        let (lo, hi) = (f0.max(g) - g, end(k).min(g + n64) - g);
                        let a = r.start + (i + lo as usize) * page;
                        found.push((k, a, a + (hi - lo) as usize * page));
                        o += 1;
                    }
                }
                continue;
            }
            if r.pages.uniform().is_some_and(|p| !p.in_pool_mapping()) {
                continue; // nothing merged, nothing covered
            }
            for (i, p) in r.pages.iter().enumerate() {
                let g = if p.state() == State::Stable {
                    Some(p.frame())
                } else {
                    r.covered_frame(i)
                };
                let Some(g) = g else { continue };
                let o = order.partition_point(|&k| segs[k].0 <= g);
                let Some(&k) = o.checked_sub(1).and_then(|o| order.get(o)) else {
                    continue;
                };
                if u64::from(g) < end(k) {
                    let a = r.start + i * page;
                    found.push((k, a, a + page));
                }
            }
        }
        found.sort_unstable();
        let mut out: Vec<Vec<(usize, usize)>> = vec![Vec::new(); segs.len()];
        for (k, s, e) in found {
            match out[k].last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out[k].push((s, e)),
            }
        }
        out
    }

    /// The retired segments no page maps any more, forgotten: (id, first frame id),
    /// for the engine to unmap.
    ///
    /// A page covered inside a run onto such a segment (its own private copy in a
    /// mapping of the segment's file, see `Slot::Cover`) still maps that file, which the
    /// kernel would then keep whole, counted by no member: it gets a mapping of its own
    /// first. A segment with a covered page that could not is kept, and tried again at
    /// the next call.
    pub fn drop_unmapped_segments(&mut self) -> Vec<(u64, FrameId)> {
        let unmapped = self.frames.unmapped_segments();
        if unmapped.is_empty() {
            return Vec::new();
        }
        let segs: Vec<(FrameId, u32)> = unmapped.iter().map(|&(_, f0, n)| (f0, n)).collect();
        let mut covered = self.pages_on(&segs, true);
        if covered.iter().any(|v| !v.is_empty()) {
            for &(s, e) in covered.iter().flatten() {
                // A failure leaves the page covered (correct): the segment then stays.
                let _ = self.unmerge_range(s, e);
            }
            covered = self.pages_on(&segs, true);
        }
        let mut gone = Vec::new();
        for (&(id, f0, _), left) in unmapped.iter().zip(&covered) {
            if left.is_empty() && self.frames.drop_segment(id) {
                gone.push((id, f0));
            }
        }
        gone
    }

    /// A page with `checksum` became a candidate (nothing to merge with here): tell
    /// the domain, or copy it into a segment if the domain asked for this checksum.
    /// Whether the domain has been told, or the page is queued or its content being
    /// published (false: an announcement or a queue was full, or no VMA room).
    ///
    /// A process at its VMA budget announces nothing (nor claims, below): it could not
    /// merge onto the frame it asks for, and a segment that no member can map is
    /// retired in turn, its pages announced again (seen as segments published and
    /// retired by the hundred once a random half of the members' pages was written).
    ///
    /// `moving`: the page is on a retired segment's frame, and moving it onto a new
    /// frame costs no VMA (see `merge_with_frame_from`): announced whatever the budget.
    pub(super) fn domain_candidate(&mut self, t: Target, checksum: u32, moving: bool) -> bool {
        let Some(d) = &self.domain else { return false };
        let wanted = d.wanted.contains_key(&checksum);
        let fresh = !wanted && d.announce.len() < ANNOUNCE_MAX && !d.announced.contains(checksum);
        // (The budget is looked at only for something new to say: a settled scan
        // passes its candidates without counting VMAs.)
        if fresh && !moving && !self.vma_room(1) {
            return false;
        }
        let Some(d) = &mut self.domain else {
            return false;
        };
        if wanted {
            d.queue(t, checksum) || d.publishing.contains(&checksum)
        } else if fresh {
            d.announced.insert(checksum);
            d.announce.push(checksum);
            true
        } else {
            d.announced.contains(checksum)
        }
    }

    /// A page on frame `f` of our own pool could not be said to the domain for want
    /// of room in a queue: the next full scan looks at such pages again.
    pub(super) fn private_again(&mut self) {
        if let Some(d) = &mut self.domain {
            d.private_due = true;
        }
    }

    /// Two pages of this process hold the same bytes (an unstable-index match): in a
    /// domain their frame is made in a segment, so that other members can map it too.
    pub(super) fn domain_publish(&mut self, t: Target, checksum: u32) {
        let Some(d) = &self.domain else { return };
        // Asked for, or no broker to ask: publish (merging inside the process goes on
        // without one). Else another member may hold it too: the broker says who
        // publishes it.
        let publish = d.wanted.contains_key(&checksum) || !d.connected;
        let fresh = !publish && d.claim.len() < ANNOUNCE_MAX && !d.claimed.contains(&checksum);
        if fresh && !self.vma_room(1) {
            return;
        }
        let Some(d) = &mut self.domain else { return };
        if publish {
            d.queue(t, checksum);
        } else if fresh {
            d.claimed.insert(checksum);
            d.claim.push(checksum);
        }
    }

    /// The engine built a segment of the pages `take_domain_out` queued with checksums
    /// `asked`, holding `built` (None: the build failed). A checksum asked and not built
    /// is released: asked for again if the build failed (a later visit queues it),
    /// declined if the page no longer held it (the broker may then ask another
    /// member). Returns the checksums to decline.
    pub fn domain_published(&mut self, asked: &[u32], built: Option<&[u32]>) -> Vec<u32> {
        let Some(d) = &mut self.domain else {
            return Vec::new();
        };
        let done: HashSet<u32> = built.unwrap_or(&[]).iter().copied().collect();
        let mut decline = Vec::new();
        for &c in asked {
            if done.contains(&c) {
                continue; // released when the segment is taken in
            }
            d.publishing.remove(&c);
            if built.is_none() {
                d.wanted.insert(c, d.scans);
            } else {
                decline.push(c);
            }
        }
        decline
    }

    /// A full scan ended: what was asked for before it began and no page held during
    /// it is declined (the page changed), so that the domain asks another member.
    pub(super) fn domain_end_scan(&mut self) {
        self.evict_retired_due();
        if let Some(d) = &mut self.domain {
            let scans = d.scans;
            let stale: Vec<u32> = d
                .wanted
                .iter()
                .filter(|&(_, &at)| at < scans)
                .map(|(&c, _)| c)
                .collect();
            for c in &stale {
                d.wanted.remove(c);
            }
            d.decline.extend(stale);
            d.scans += 1;
            // Tables that filled while the domain settled, and are (nearly) empty
            // since, give their memory back: a settled member's asks and pages
            // being published are few, and an empty table kept its size (3-5 bytes
            // per tracked page in a member of 4 x 64 MiB).
            shrink_if_sparse(&mut d.wanted);
            for set in [&mut d.publishing, &mut d.claimed] {
                shrink_if_sparse(set);
            }
            d.announced.fold();
        }
    }

    /// Whether a broker answers now, or may soon (the engine says so before every
    /// batch). When it stops being expected, what was claimed and not answered is
    /// forgotten: those contents are published here at their next visits.
    pub fn set_domain_connected(&mut self, connected: bool) {
        if let Some(d) = &mut self.domain {
            if d.connected && !connected {
                d.claimed.clear();
            }
            d.connected = connected;
        }
    }
}
