//! Run planning: the pages after a matched one that can merge with it as one run
//! (one mapping per side, consecutive frames): `stable_run_of` for a run onto
//! frames in use, `run_of` for a run of pairs onto new frames, covered pages
//! (`Slot::Cover`) that keep a run whole, and tiles (frames repeating one
//! content) for a content repeated many times when the VMA budget runs low.
//!
//! Invariants: runs are planned from the records alone (no byte is read but a
//! frame's): `merge` compares every page under protection and ends the run before
//! the first that differs; a run never ends with a covered page and never holds
//! more than `MAX_COVER` covered pages in a row; only a page merged in a short run
//! (`MAX_REHOME`) moves into another run.

#![forbid(unsafe_code)]

use super::{checksum_of, key_of, Core, Mem, Presence, Target};
use crate::pool::{self, FrameId};
use crate::region::State;

/// Most pages merged as one run (one mapping per side).
const MAX_RUN: usize = 2048;

/// Most frames in a tile (see `merge_tile`): a tile's first run saves nothing, so
/// tiles stay short of `MAX_RUN`.
pub(super) const MAX_TILE: usize = 512;

/// Pages merged in runs shorter than this move into a longer run that reaches them.
const MAX_REHOME: usize = 512;

/// Most consecutive pages a run covers (see `Slot::Cover`); a run never ends with one.
const MAX_COVER: usize = 2;

/// Fewest pages of one repeated content worth a tile of frames of their own.
pub(super) const MIN_TILE: usize = 8;

/// Tiles are used once fewer VMAs than this are left in the budget (an eighth of
/// the default budget of `vm.max_map_count` 65530 / 2).
pub(super) const TILE_BELOW_ALLOWANCE: u64 = 4096;

/// One page of a run that merges with one mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Slot {
    /// It maps the run's frame; the frame it maps now if it is merged already.
    Join(Option<FrameId>),
    /// Its bytes differ from the frame's: it keeps them, as a private copy inside the
    /// run's mapping (`IN_POOL`), so that the run stays one mapping.
    Cover,
}

/// Pairs of pages that merge as one run (see `Core::run_of`): per pair, the index
/// hash of its bytes (unused where covered) and each side's slot.
pub(super) struct PairRun {
    pub(super) hashes: Vec<u64>,
    pub(super) t: Vec<Slot>,
    pub(super) o: Vec<Slot>,
}

impl PairRun {
    pub(super) fn len(&self) -> usize {
        self.hashes.len()
    }

    fn push(&mut self, hash: u64, t: Slot, o: Slot) {
        self.hashes.push(hash);
        self.t.push(t);
        self.o.push(o);
    }

    pub(super) fn truncate(&mut self, n: usize) {
        self.hashes.truncate(n);
        self.t.truncate(n);
        self.o.truncate(n);
    }
}

/// How many of the first `k` slots of `run` stay in it: up to the last joined page
/// (a run never ends with a covered page).
pub(super) fn joined_prefix(run: &[Slot], k: usize) -> usize {
    run[..k]
        .iter()
        .rposition(|&s| s != Slot::Cover)
        .map_or(0, |i| i + 1)
}

/// Pages probed at a time while a run is extended.
const AHEAD: usize = 64;

/// Presence of the pages a run is being extended over, probed `AHEAD` at a time
/// (one block per side of a pair run): valid while that one run is planned.
struct Ahead {
    blocks: [(usize, [Presence; AHEAD]); 2],
    next: usize,
}

impl Ahead {
    fn new() -> Self {
        Ahead {
            blocks: [(usize::MAX, [Presence::Absent; AHEAD]); 2],
            next: 0,
        }
    }
}

impl<M: Mem> Core<M> {
    /// Whether the page at `x` can join a run that `want` starts (see `run_eligible`),
    /// with its bytes read into `buf` and, if unmerged, its checksum unchanged since its
    /// last visit (the kernel's volatility rule).
    fn run_candidate(
        &mut self,
        x: usize,
        want: Target,
        merged: bool,
        ahead: &mut Ahead,
        buf: &mut [u8],
    ) -> bool {
        match self.run_eligible(x, want, merged, ahead) {
            None => false,
            Some(None) => {
                self.mem.read(x, want.owned, buf).is_ok()
                    && self
                        .rec(x)
                        .is_some_and(|r| r.checksum() == checksum_of(buf).1)
            }
            // Its bytes are its frame's for as long as it maps it (a write would have
            // made it a private anonymous page); compared again under protection.
            Some(Some(g)) => {
                buf.copy_from_slice(self.mem.frame(g));
                true
            }
        }
    }

    /// `run_key`, and present as a page that joins a run must be (see `present_for_run`):
    /// None if the page cannot join a run, else the frame it maps now if it is merged.
    fn run_eligible(
        &mut self,
        x: usize,
        want: Target,
        merged: bool,
        ahead: &mut Ahead,
    ) -> Option<Option<FrameId>> {
        let (_, was) = self.run_key(x, want, merged)?;
        self.present_for_run(ahead, x, was).then_some(was)
    }

    /// By its record alone (no syscall, no byte read): whether the page at `x` may join
    /// a run that `want` starts (advised, with the run's protection, unmerged or, with
    /// `merged`, merged in a short run), with the index key of its bytes as last seen
    /// (its checksum at its last visit; its frame's if merged) and the frame it maps.
    fn run_key(&self, x: usize, want: Target, merged: bool) -> Option<(u64, Option<FrameId>)> {
        let rec = self.rec(x)?;
        let r = self.region_at(x)?;
        if !rec.advised() || r.prot_of((x - r.start) / self.page) != want.prot {
            return None;
        }
        match rec.state() {
            State::Volatile | State::Unstable => Some((key_of(rec.checksum()), None)),
            State::Stable
                if merged && (self.moves_off(rec.frame()) || self.in_short_run(x, rec.frame())) =>
            {
                Some((self.frames.hash(rec.frame()), Some(rec.frame())))
            }
            _ => None,
        }
    }

    /// Presence of the page at `x`, probed with the pages after it (see `Ahead`).
    fn presence_ahead(&mut self, ahead: &mut Ahead, x: usize) -> Option<Presence> {
        let span = AHEAD * self.page;
        let start = x - x % span;
        let i = (x - start) / self.page;
        if let Some((_, p)) = ahead.blocks.iter().find(|(s, _)| *s == start) {
            return Some(p[i]);
        }
        // A block of ksm's own memory with no page in a pool mapping holds no page of
        // a file: the cheaper probe says as much.
        let anonymous = self
            .region_at(start)
            .filter(|r| start + span <= r.end(self.page))
            .is_some_and(|r| self.only_anonymous(r.start, start, AHEAD));
        let slot = &mut ahead.blocks[ahead.next];
        ahead.next ^= 1;
        slot.0 = usize::MAX;
        if anonymous {
            self.mem.probe_anonymous(start, &mut slot.1).ok()?;
        } else {
            self.mem.probe(start, &mut slot.1).ok()?;
        }
        slot.0 = start;
        Some(slot.1[i])
    }

    /// Whether the page at `x`, merged on frame `g`, is in a short run: fewer than
    /// `MAX_REHOME` pages around it map the frames around `g` (one mapping). Only such
    /// a page moves into another run: a longer run is worth more whole, and taking a
    /// page out of it would split it and leave its frames shared by fewer pages.
    fn in_short_run(&self, x: usize, g: FrameId) -> bool {
        let page = self.page;
        let Some(r) = self.region_at(x) else {
            return false;
        };
        let on = |a: usize, want: Option<FrameId>| {
            want.is_some_and(|w| {
                (r.start..r.end(page)).contains(&a)
                    && self
                        .rec(a)
                        .is_some_and(|p| p.state() == State::Stable && p.frame() == w)
            })
        };
        let mut len = 1;
        while len < MAX_REHOME && on(x.wrapping_sub(len * page), g.checked_sub(len as FrameId)) {
            len += 1;
        }
        let mut k = 1;
        while len < MAX_REHOME && on(x + k * page, g.checked_add(k as FrameId)) {
            len += 1;
            k += 1;
        }
        len < MAX_REHOME
    }

    /// The pages from `t` that can map frames `f, f+1, …` as one run (at least `t`,
    /// which matched `f`): the following pages qualify (see `run_key`) while their
    /// recorded checksum is the next frame's, which must be in use with room left; a
    /// page whose checksum differs between pages that qualify is covered (see
    /// `can_cover_page`).
    ///
    /// Planned from the records alone (no byte is read: the merge compares every page
    /// under protection and ends the run before the first that differs), so there is no
    /// volatility check either: the kernel's ksmd, too, looks for a page in the stable
    /// tree before it checks its checksum.
    pub(super) fn stable_run_of(&mut self, t: Target, f: FrameId) -> Vec<Slot> {
        let page = self.page;
        let t_end = self.region_at(t.addr).map_or(t.addr, |r| r.end(page));
        let mut run = vec![Slot::Join(None)];
        let mut pending = 0;
        let mut ahead = Ahead::new();
        while run.len() < MAX_RUN {
            let n = run.len();
            let (x, g) = (t.addr + n * page, f + n as FrameId);
            if x >= t_end || !self.frames.exists(g) {
                break;
            }
            let Some((key, was)) = self.run_key(x, t, true) else {
                break;
            };
            // Already on this very frame (or on the run's own) is no move worth making.
            if was.is_some_and(|w| (f..=g).contains(&w)) {
                break;
            }
            let join = self.has_room(f, g)
                && match was {
                    Some(w) => self.mem.frame(w) == self.mem.frame(g),
                    None => key == self.frames.hash(g),
                };
            // A page to cover is probed only once a page that joins follows it (see
            // `covers_present`): most runs end at their first cover.
            if join
                && self.present_for_run(&mut ahead, x, was)
                && self.covers_present(&mut ahead, &[t.addr], n, pending)
            {
                run.push(Slot::Join(was));
                pending = 0;
            } else if !join && was.is_none() && pending < MAX_COVER && self.can_cover_page(t, x) {
                run.push(Slot::Cover);
                pending += 1;
            } else {
                break;
            }
        }
        run.truncate(run.len() - pending);
        run
    }

    /// Whether the page at `x` is present as a page that can join a run must be: a
    /// private anonymous page if unmerged (`was` None), its frame's page if merged.
    fn present_for_run(&mut self, ahead: &mut Ahead, x: usize, was: Option<FrameId>) -> bool {
        let want = match was {
            None => Presence::Anon,
            Some(_) => Presence::File,
        };
        self.presence_ahead(ahead, x) == Some(want)
    }

    /// Whether the `pending` pages to cover before page `n` of the runs from each of
    /// `starts` (the last `pending` slots planned) are present as a page to cover must
    /// be (see `present_for_run`). Checked only once a page that joins follows them, as
    /// it was checked when each was planned before: a run never ends in covered pages,
    /// so those that stay pending are dropped unprobed.
    fn covers_present(
        &mut self,
        ahead: &mut Ahead,
        starts: &[usize],
        n: usize,
        pending: usize,
    ) -> bool {
        let page = self.page;
        (n - pending..n).all(|k| {
            starts
                .iter()
                .all(|&s| self.present_for_run(ahead, s + k * page, None))
        })
    }

    /// Whether the page at `x` of run `t` may be covered (see `Slot::Cover`): read-write
    /// memory only (a covered page's copy is written into the mapping before it is
    /// moved in place), and not a page of zeros (by its recorded checksum) that
    /// `use_zero_pages` would drop.
    fn can_cover_page(&self, t: Target, x: usize) -> bool {
        t.prot == libc::PROT_READ | libc::PROT_WRITE
            && !(self.use_zero_pages
                && self
                    .rec(x)
                    .is_some_and(|r| r.checksum() == self.zero_checksum))
    }

    /// How many pages from `t` (at least `t`, which matched) hold the bytes of frame
    /// `f` and could join a run (see `run_candidate`): one content repeated.
    pub(super) fn same_content_run(&mut self, t: Target, f: FrameId) -> usize {
        let page = self.page;
        let t_end = self.region_at(t.addr).map_or(t.addr, |r| r.end(page));
        let mut a = vec![0u8; page];
        let mut n = 1;
        let mut ahead = Ahead::new();
        while n < MAX_TILE && t.addr + n * page < t_end {
            if !self.run_candidate(t.addr + n * page, t, false, &mut ahead, &mut a)
                || self.mem.frame(f) != &a[..]
            {
                break;
            }
            n += 1;
        }
        n
    }

    /// A tile of this content with room (frames `g, g+1, …` holding the same bytes)
    /// that a run of pages from `t` can map, with the run's length.
    pub(super) fn tile_for(
        &mut self,
        t: Target,
        f: FrameId,
        hash: u64,
    ) -> Option<(FrameId, Vec<Slot>)> {
        let room = |core: &Self, start: FrameId, g: FrameId| {
            core.has_room(start, g) && core.frames.hash(g) == hash
        };
        let key_of = |g| self.frames.hash(g);
        let starts: Vec<FrameId> = self
            .stable
            .get(hash, &key_of)
            .filter(|&g| g != f && room(self, g, g) && room(self, g, g + 1))
            .collect();
        for g in starts {
            if self.mem.frame(g) != self.mem.frame(f) {
                continue;
            }
            let run = self.stable_run_of(t, g);
            if run.len() >= 2 && run.iter().all(|&s| s != Slot::Cover) {
                return Some((g, run));
            }
        }
        None
    }

    /// The frame after the one the page before `t` maps, if it has room and this
    /// page's key (the caller compares the bytes):
    /// merging there continues that page's run (its mapping extends the VMA before),
    /// where another frame of the same content would split it.
    pub(super) fn continuing_frame(&self, t: Target, hash: u64) -> Option<FrameId> {
        let r = self.region_at(t.addr)?;
        if t.addr == r.start {
            return None;
        }
        let left = self.rec(t.addr - self.page)?;
        if left.state() != State::Stable {
            return None;
        }
        let g = left.frame().checked_add(1)?;
        (self.has_room(left.frame(), g) && self.frames.hash(g) == hash).then_some(g)
    }

    /// Whether frame `g` can take one more page in a run of frames from `start`: a
    /// frame in use with room left (`max_page_sharing`), or a domain frame offered or
    /// in use with room, of the same segment as `start` (one mapping maps one segment).
    pub(super) fn has_room(&self, start: FrameId, g: FrameId) -> bool {
        if !self.frames.exists(g) {
            return false;
        }
        let refs = self.frames.refs(g);
        if pool::is_domain(g) {
            pool::is_domain(start)
                && pool::same_block(start, g)
                && !self.frames.retired(g)
                && refs < self.max_page_sharing
        } else {
            !pool::is_domain(start) && (1..self.max_page_sharing).contains(&refs)
        }
    }

    /// The pairs of pages from `t` and from `o` (at least the first pair, already
    /// found equal) that can merge as one run: the following pairs qualify while both
    /// pages can join a run (see `run_key`: a page merged already moves into the run),
    /// have the same checksum as last seen (the merge compares them byte for byte under
    /// protection, and checks that checksum on the frame it fills, see `merge_pair`),
    /// the two runs do not overlap and do not map one frame already; a pair of unmerged
    /// pages whose checksums differ between pairs that qualify is covered on both sides
    /// (see `can_cover_page`). Pages of zeros stop a run when `use_zero_pages` is on.
    pub(super) fn run_of(&mut self, t: Target, o: Target, hash: u64) -> PairRun {
        let page = self.page;
        let mut run = PairRun {
            hashes: vec![hash],
            t: vec![Slot::Join(None)],
            o: vec![Slot::Join(None)],
        };
        let bounds = |core: &Self, a: usize| {
            core.region_at(a)
                .map(|r| (r.start, r.end(page)))
                .expect("tracked")
        };
        let ((_, t_end), (_, o_end)) = (bounds(self, t.addr), bounds(self, o.addr));
        let dist = t.addr.abs_diff(o.addr);
        let zero = self.use_zero_pages.then_some(key_of(self.zero_checksum));
        let mut pending = 0;
        let mut ahead = Ahead::new();
        while run.len() < MAX_RUN {
            let n = run.len();
            let (ta, oa) = (t.addr + n * page, o.addr + n * page);
            if ta >= t_end || oa >= o_end || (n + 1) * page > dist {
                break;
            }
            // Planned by the records alone: the merge compares every pair under protection
            // (and checks the frames against these keys) and ends the run before the
            // first that differs.
            let (Some((kt, wt)), Some((ko, wo))) =
                (self.run_key(ta, t, true), self.run_key(oa, o, true))
            else {
                break;
            };
            let shared = wt.is_some() && wt == wo;
            if shared || zero == Some(kt) {
                break;
            }
            let join = match (wt, wo) {
                (Some(g), Some(h)) => self.mem.frame(g) == self.mem.frame(h),
                _ => kt == ko,
            };
            // Pages to cover are probed only once a pair that joins follows them (see
            // `covers_present`): a lone pair's run ends at its first cover, unprobed.
            if join
                && self.present_for_run(&mut ahead, ta, wt)
                && self.present_for_run(&mut ahead, oa, wo)
                && self.covers_present(&mut ahead, &[t.addr, o.addr], n, pending)
            {
                run.push(kt, Slot::Join(wt), Slot::Join(wo));
                pending = 0;
            } else if !join
                && wt.is_none()
                && wo.is_none()
                && pending < MAX_COVER
                && self.can_cover_page(t, ta)
                && self.can_cover_page(o, oa)
            {
                run.push(0, Slot::Cover, Slot::Cover);
                pending += 1;
            } else {
                break;
            }
        }
        run.truncate(run.len() - pending);
        run
    }

    /// The frame where `t` and `o` can merge in place: both are private copies inside
    /// pool mappings covering the same free frame (see `Slot::Cover`), so mapping that
    /// frame keeps both mappings whole.
    pub(super) fn frame_in_place(&self, t: usize, o: usize) -> Option<FrameId> {
        let g = self.in_pool(t)?;
        (self.in_pool(o) == Some(g) && self.frames.is_free(g)).then_some(g)
    }
}
