//! The broker of one merge domain: a small process that the first member
//! starts, which keeps the domain's hints (who announced which checksum, which
//! segments exist) and hands segments to every member. It never reads or maps
//! a frame and nobody trusts it: members compare every frame with their own
//! page before mapping it. It exits when the last member has gone, and its
//! death loses nothing (members keep their merged pages and start a new one).
//!
//! [`Hub`] is the domain's bookkeeping, pure (fuzzed): messages in, messages
//! out. [`serve`] is the loop around it: the listening socket in a directory
//! only the user can enter, every peer's uid checked with `SO_PEERCRED`,
//! segments checked to be sealed before anyone else sees them, a member that
//! sends a malformed message or stops reading dropped, no one else affected.
//!
//! The rules of the hints (the kernel's unstable → stable step, across
//! processes): a checksum announced by one member and then by another makes
//! the broker ask the second to publish a frame of its own page (once: the
//! checksum is then assigned to it until it publishes or declines); a
//! published segment goes to every member, which merges onto its frames on
//! its next visit of a page with the same bytes. A segment that no member maps
//! after every member has finished two full scans with it is retired.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use super::proto::{self, DomainStats, Msg, SegUsage, BITMAP_WORDS, MAX_SUMS};
use crate::sys::memfd::Memfd;
use crate::sys::unix::{self, Socket};

/// Full scans every member must have had with a segment before an unused one is
/// retired.
pub const RETIRE_AGE: u32 = 10;

/// Dead frames (mapped by no member) that make a partly dead segment worth
/// compacting: more than a fifth of its frames are dead (so that the pool stays
/// within 25 % of its live frames), and at least this many. Members move their pages
/// off it, and those merge again onto new segments. (Compaction once churned: a
/// member moved pages off on a stale VMA allowance and could not merge them again,
/// and members at their budget announced contents they could not merge, so new
/// segments nobody mapped were retired in turn, by the hundred. A member now counts
/// its VMAs before moving pages off, and announces nothing at its budget.)
pub const COMPACT_DEAD: u32 = 64;

/// Whether a segment of `frames` frames, `live` of them in use (mapped by some member,
/// and not a twin, see `Hub::retire_unused`), is worth retiring: unused, or partly
/// dead (see [`COMPACT_DEAD`]) where `compacting` (the pool wastes more than
/// [`COMPACT_WASTE_DIV`] allows, or some of its dead frames are twins).
pub fn worth_retiring(frames: u32, live: u32, compacting: bool) -> bool {
    let dead = frames.saturating_sub(live);
    live == 0 || (compacting && dead >= COMPACT_DEAD && 5 * dead > frames)
}

/// Frames of the domain's segments that no member maps, as a share of those mapped,
/// above which partly dead segments are compacted: more than a twentieth. Below it,
/// a partly dead segment is retired only if some of its dead frames are twins (pages
/// that move onto the twin save a page each). Compacting moves every page on the
/// segment's live frames and publishes them again: a few segments of the first
/// publications, about half dead once the pool's large segments arrived,
/// were retired ~0.1 s after 4 workers of 256 MiB had settled, to free ~300 KiB of
/// a 160 MiB pool, and the domain's counts moved for another 0.1-0.2 s.
pub const COMPACT_WASTE_DIV: u64 = 20;

/// Whether the sealed segment `seg` of `size` bytes holds, page by page, bytes of the
/// checksums `sums` (a member that claims otherwise is refused: its segment is not
/// passed on). Read once here, by the broker, instead of by every member that takes
/// the segment in (that hashing was 9 % of the CPU samples while 16 members of 64 MiB
/// settled). An error is the broker's (mapping the segment: address space, memory),
/// not a lie of the member's.
fn sums_hold(seg: &Memfd, size: u64, page: u32, sums: &[u32]) -> io::Result<bool> {
    let page = page as usize;
    let view = crate::sys::mman::Mapping::read_only_view(seg.raw(), size as usize)?;
    Ok(sums
        .iter()
        .enumerate()
        .all(|(i, &c)| crate::scan::page_checksum(view.bytes(i * page, page)) == c))
}

/// How many frames a usage bitmap says are mapped.
fn frames_in(bits: &[u64; BITMAP_WORDS]) -> u64 {
    bits.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Most pages in a row whose contents have a frame already that a publisher copies
/// into its segment again, in place (see [`twin_run_max`]).
pub const TWIN_RUN_MAX: usize = 8;

/// How many pages in a row, at most, whose contents have a frame already a member
/// copies again into the segment it publishes, where they sit between pages it
/// publishes, in a domain of `members` (0: none).
///
/// A content repeated inside the data (the same page in two files, say) has one
/// frame, where it first occurred: every member's mapping of the data breaks twice
/// at each repeat, to map that frame and come back. Holding the repeat again in
/// place costs its frames once, in the domain, and saves every member those two
/// mappings: kernel memory, a slot of the VMA budget, and ~1 µs of every full scan
/// (measured: settled members of 16 × 64 MiB of stdlib data had 2,200 mappings
/// each, 1,440 of them at repeats, and scanned at twice the cost per page of one
/// process holding the same data). A run of `n` repeated pages is held again where
/// it saves at least 8 mappings per frame (`2 × members ≥ 8 × n`): in a domain of 16
/// members, repeats of up to 4 pages (measured with 16 × 64 MiB, held in every
/// segment: ~800 frames more, pages saved 99.6 % of the kernel's instead of 100 %, a
/// member's mappings ~950–1,000 instead of ~1,650 with claims held, ~2,100 before);
/// in one of 4, single pages; of fewer, none.
pub fn twin_run_max(members: u32) -> usize {
    (members as usize / 4).min(TWIN_RUN_MAX)
}

/// Announcers of one checksum the broker remembers.
pub const ANNOUNCERS: usize = 4;

/// How long a content that one member holds twice (a claim) waits, in a domain of
/// several members, for another member to announce it, in milliseconds (see
/// [`Hub::tick`]).
///
/// Whoever publishes a content decides where its frame sits. A member that scans
/// ahead of the others (it joined first, or its scan began first) finds the contents
/// it holds twice before anyone else announces anything: claimed at once, their first
/// occurrences all went into segments of its own, in a few hundred short ranges,
/// while the rest of the data was published by the second member to announce it.
/// Every member's data then mapped both, alternating at each such range (measured,
/// 16 members of 64 MiB of stdlib data: ~950 of ~1,800 boundaries in a member's
/// mappings of its data). Held for a moment, those contents are announced by the
/// members behind too, and published with the rest, in order. Members behind may be
/// seconds behind: workers that join when they start (`KSM_DOMAIN`) and then load
/// their data finish loading over a second or more on a busy machine (measured, 16
/// such workers of 64 MiB: with claims held only while members were joining, a
/// member's data mapped 1,000–1,750 segment mappings, with the wait counted from the
/// claim 680–780). A member left alone with such a content (nobody else holds it)
/// publishes it once the wait is over; a domain of one member does not wait.
pub const CLAIM_HOLD_MS: u64 = 2000;

/// A member's number in its domain (never reused while the broker lives).
pub type MemberId = u32;

/// What the hub wants sent: to whom, what, and which segment's descriptor goes with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Out {
    pub to: MemberId,
    pub msg: Msg,
    /// The segment whose descriptor the message carries.
    pub segment: Option<u64>,
}

#[derive(Debug, Default)]
struct Member {
    /// The member's last report, by segment.
    usage: HashMap<u64, SegUsage>,
    /// It has reported at least once (a usage report or a scan's end): a member
    /// that never scans (a process that joined through `KSM_DOMAIN` and holds no
    /// memory, such as a multiprocessing parent) has no say in what is retired.
    active: bool,
}

#[derive(Debug)]
struct Segment {
    frames: u32,
    sums: Vec<u32>,
}

/// The domain's bookkeeping (no I/O).
#[derive(Debug, Default)]
pub struct Hub {
    page: u32,
    next_member: MemberId,
    members: BTreeMap<MemberId, Member>,
    /// Checksum → the members that announced it (a candidate, no frame yet), first
    /// first, at most [`ANNOUNCERS`]: when the member asked to publish it leaves or
    /// declines, another is asked.
    candidates: HashMap<u32, Vec<MemberId>>,
    /// Checksum → the member asked to publish it.
    assigned: HashMap<u32, MemberId>,
    /// Checksums of frames in live segments (a hint: no one is asked to publish them).
    published: HashMap<u32, u32>,
    segments: BTreeMap<u64, Segment>,
    /// Segments retired while some member's pages still map them, and their frames:
    /// their memory stays until the last such page leaves them (the member then
    /// reports the segment with no pages), so they still count in the pool.
    retiring: BTreeMap<u64, u32>,
    retired: u64,
    refused: u64,
    /// Checksums claimed (held twice by one member) that no other member announced:
    /// the claimer and when it claimed, asked to publish once the claim has waited
    /// [`CLAIM_HOLD_MS`] unless another member announces the checksum first.
    held: BTreeMap<u32, (MemberId, u64)>,
    /// Milliseconds on the broker's clock, as the last [`Hub::tick`] said.
    now_ms: u64,
}

impl Hub {
    pub fn new(page: u32) -> Self {
        Hub {
            page,
            next_member: 1,
            ..Default::default()
        }
    }

    pub fn members(&self) -> usize {
        self.members.len()
    }

    pub fn has_segment(&self, id: u64) -> bool {
        self.segments.contains_key(&id)
    }

    /// A message was refused (counted in the statistics).
    pub fn refuse(&mut self) {
        self.refused += 1;
    }

    /// A member joins: its number, the welcome and every segment the domain holds.
    pub fn join(&mut self) -> (MemberId, Vec<Out>) {
        let m = self.next_member;
        self.next_member += 1;
        self.members.insert(m, Member::default());
        let mut out = vec![Out {
            to: m,
            msg: Msg::Welcome {
                member: m,
                members: self.members.len() as u32,
            },
            segment: None,
        }];
        for (&id, s) in &self.segments {
            out.push(Out {
                to: m,
                msg: Msg::Segment {
                    id,
                    frames: s.frames,
                    publisher: 0,
                    sums: s.sums.clone(),
                },
                segment: Some(id),
            });
        }
        (m, out)
    }

    /// A member left (or died): what it announced is forgotten, and what it was asked
    /// to publish is asked of another member that announced it, if two are left (the
    /// messages returned); the segments it published stay (other members may map
    /// them), unless its pages were the ones that made them worth keeping: those are
    /// retired now, if members are left (they may be settled, with no scan-done to
    /// come).
    pub fn leave(&mut self, m: MemberId) -> Vec<Out> {
        if self.members.remove(&m).is_none() {
            return Vec::new();
        }
        self.forget_unmapped_retiring();
        let mine: Vec<u32> = self
            .assigned
            .iter()
            .filter(|&(_, &who)| who == m)
            .map(|(&s, _)| s)
            .collect();
        for s in &mine {
            self.assigned.remove(s);
        }
        self.held.retain(|_, &mut (who, _)| who != m);
        self.candidates.retain(|_, who| {
            who.retain(|&w| w != m);
            !who.is_empty()
        });
        let mut out = self.reassign(&mine);
        // (With no member left, nothing is retired: a member joining before the
        // broker's idle end gets the segments again, those it still holds too.)
        if !self.members.is_empty() {
            out.extend(self.retire_unused());
        }
        out
    }

    /// Ask another announcer of each of `sums` (not the first: its page is the one
    /// the others merge with) to publish it.
    fn reassign(&mut self, sums: &[u32]) -> Vec<Out> {
        let picks: Vec<(u32, MemberId)> = sums
            .iter()
            .filter_map(|&s| {
                let who = self.candidates.get(&s)?;
                who.get(1..)?.last().map(|&w| (s, w))
            })
            .collect();
        self.assign_all(picks)
    }

    /// Assign each checksum of `picks` to its member, unless it is published or
    /// assigned already (a claim of it waits no more), and ask each member for its
    /// checksums.
    fn assign_all(&mut self, picks: impl IntoIterator<Item = (u32, MemberId)>) -> Vec<Out> {
        let mut ask: BTreeMap<MemberId, Vec<u32>> = BTreeMap::new();
        for (s, w) in picks {
            if self.published.contains_key(&s) || self.assigned.contains_key(&s) {
                continue;
            }
            self.held.remove(&s);
            self.assigned.insert(s, w);
            ask.entry(w).or_default().push(s);
        }
        let members = self.members.len();
        ask.into_iter()
            .flat_map(|(to, sums)| please_publish(to, members, &sums))
            .collect()
    }

    /// A message from member `m` (already decoded). `segment`: the identity of the
    /// sealed segment a `Publish` carried (checked by the caller), if any.
    pub fn on_message(&mut self, m: MemberId, msg: Msg, segment: Option<u64>) -> Vec<Out> {
        if !self.members.contains_key(&m) {
            return Vec::new();
        }
        match msg {
            Msg::Announce { sums } => self.announce(m, &sums),
            Msg::Publish { frames, sums } => match segment {
                Some(id) => self.publish(m, id, frames, sums),
                None => {
                    self.refused += 1;
                    Vec::new()
                }
            },
            Msg::Claim { sums } => self.claim(m, &sums),
            Msg::Decline { sums } => {
                // `m` no longer holds them: another announcer is asked.
                let mut free = Vec::new();
                for s in sums {
                    if let Some(who) = self.candidates.get_mut(&s) {
                        who.retain(|&w| w != m);
                        if who.is_empty() {
                            self.candidates.remove(&s);
                        }
                    }
                    if self.assigned.get(&s) == Some(&m) {
                        self.assigned.remove(&s);
                        free.push(s);
                    }
                    if self.held.get(&s).is_some_and(|&(who, _)| who == m) {
                        self.held.remove(&s);
                    }
                }
                self.reassign(&free)
            }
            Msg::Usage { segs } => {
                let member = self.members.get_mut(&m).expect("checked");
                member.active = true;
                let mut out = Vec::new();
                for mut u in segs {
                    let retiring = self.retiring.get(&u.id).copied();
                    let Some(frames) = self.segments.get(&u.id).map(|s| s.frames).or(retiring)
                    else {
                        // A segment the domain does not hold, that `m` maps: retired
                        // while `m` was away (a broken link, a broker started anew), or
                        // never taken in (a publish lost). It is told again, so that
                        // its pages move off and its memory goes, as for any retired
                        // segment. (A publisher's own publish comes before its reports.)
                        if u.pages > 0 {
                            out.push(retire_to(m, u.id));
                        }
                        continue;
                    };
                    // Bits past the segment's frames are a lie: dropped, so that no
                    // figure can count more frames than the segment has.
                    for (i, w) in u.mapped.iter_mut().enumerate() {
                        let first = 64 * i as u32;
                        if first >= frames {
                            *w = 0;
                        } else if frames - first < 64 {
                            *w &= (1u64 << (frames - first)) - 1;
                        }
                    }
                    // Retired while `m` was away (it reports pages on it, and had not):
                    // told now, as above.
                    if retiring.is_some() && u.pages > 0 && !member.usage.contains_key(&u.id) {
                        out.push(retire_to(m, u.id));
                    }
                    if retiring.is_some() && u.pages == 0 {
                        member.usage.remove(&u.id);
                    } else {
                        member.usage.insert(u.id, u);
                    }
                }
                self.forget_unmapped_retiring();
                out
            }
            Msg::ScanDone => {
                self.members.get_mut(&m).expect("checked").active = true;
                self.retire_unused()
            }
            Msg::StatsQuery => vec![Out {
                to: m,
                msg: Msg::Stats(self.stats()),
                segment: None,
            }],
            // Only the broker says these, and Hello comes before membership.
            _ => {
                self.refused += 1;
                Vec::new()
            }
        }
    }

    /// Note that `m` announced `s` (at most [`ANNOUNCERS`] are remembered).
    fn add_announcer(&mut self, s: u32, m: MemberId) {
        let who = self.candidates.entry(s).or_default();
        if !who.contains(&m) && who.len() < ANNOUNCERS {
            who.push(m);
        }
    }

    /// Contents `m` holds twice itself: it publishes them, unless someone has or will.
    /// In a domain of several members, one nobody else announced waits (see
    /// [`CLAIM_HOLD_MS`]); a second member claiming it is asked at once, as a second
    /// announcer would be.
    fn claim(&mut self, m: MemberId, sums: &[u32]) -> Vec<Out> {
        let wait = self.members.len() > 1;
        let mut picks = Vec::new();
        for &s in sums {
            if self.published.contains_key(&s) {
                continue;
            }
            let others = self
                .candidates
                .get(&s)
                .is_some_and(|who| who.iter().any(|&w| w != m));
            self.add_announcer(s, m);
            if self.assigned.contains_key(&s) {
                continue;
            }
            match self.held.get(&s) {
                // Claimed by `m` already: it waits on.
                Some(&(c, _)) if c == m => {}
                None if wait && !others => {
                    self.held.insert(s, (m, self.now_ms));
                }
                _ => picks.push((s, m)),
            }
        }
        self.assign_all(picks)
    }

    /// Whether some claim waits for another member to announce its content.
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// The broker's clock says `now_ms` (never going back): the claims that have
    /// waited [`CLAIM_HOLD_MS`] are asked of their claimers.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Out> {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        let mut due: Vec<(u32, MemberId)> = Vec::new();
        self.held.retain(|&s, &mut (m, since)| {
            let waited = now >= since.saturating_add(CLAIM_HOLD_MS);
            if waited {
                due.push((s, m));
            }
            !waited
        });
        self.assign_all(due)
    }

    fn announce(&mut self, m: MemberId, sums: &[u32]) -> Vec<Out> {
        let mut picks = Vec::new();
        for &s in sums {
            if self.published.contains_key(&s) {
                continue;
            }
            self.add_announcer(s, m);
            if self.assigned.contains_key(&s) {
                continue;
            }
            // A second member holds it: that one publishes a frame of its own page.
            let first = self.candidates.get(&s).and_then(|who| who.first()).copied();
            if first.is_some_and(|f| f != m) {
                picks.push((s, m));
            }
        }
        self.assign_all(picks)
    }

    fn publish(&mut self, m: MemberId, id: u64, frames: u32, sums: Vec<u32>) -> Vec<Out> {
        // (A retired segment that pages still map is alive: no new one has its inode.)
        if self.segments.contains_key(&id) || self.retiring.contains_key(&id) {
            self.refused += 1;
            return Vec::new();
        }
        for &s in &sums {
            *self.published.entry(s).or_insert(0) += 1;
            self.candidates.remove(&s);
            self.assigned.remove(&s);
            self.held.remove(&s);
        }
        let out = self
            .members
            .keys()
            .map(|&to| Out {
                to,
                msg: Msg::Segment {
                    id,
                    frames,
                    publisher: m,
                    sums: sums.clone(),
                },
                segment: Some(id),
            })
            .collect();
        self.segments.insert(id, Segment { frames, sums });
        out
    }

    /// Frames of segment `id` mapped by some member, and pages mapping them in all.
    fn mapped(&self, id: u64) -> ([u64; BITMAP_WORDS], u64) {
        let mut bits = [0u64; BITMAP_WORDS];
        let mut pages = 0u64;
        for member in self.members.values() {
            if let Some(u) = member.usage.get(&id) {
                for (b, w) in bits.iter_mut().zip(&u.mapped) {
                    *b |= w;
                }
                pages += u64::from(u.pages);
            }
        }
        (bits, pages)
    }

    /// Retire the segments that nobody maps, or whose frames are mostly mapped by
    /// nobody (see [`COMPACT_DEAD`]; while the frames nobody maps in the segments
    /// held, retired ones aside, are more than a twentieth of those mapped, see
    /// [`COMPACT_WASTE_DIV`], or some of them are twins, below), once every member
    /// has had [`RETIRE_AGE`] full scans with them in its index (smart scan may pass
    /// over a page for up to 8 visits).
    ///
    /// A frame whose checksum a segment of lower id also holds counts as dead here (a
    /// content published twice, by members that could not hear of each other in
    /// time): the pages on it move onto that twin, which members find in their index
    /// by its bytes, and the content keeps one frame, as in the kernel. Unless it is
    /// a repeat held in place (see [`twin_run_max`]): one of at most
    /// [`TWIN_RUN_MAX`] such frames in a row, between frames of other contents.
    ///
    /// Only members that have reported count: one that never scans maps nothing, and
    /// waiting for its reports held every segment forever. With no such member,
    /// nothing is retired.
    fn retire_unused(&mut self) -> Vec<Out> {
        if !self.members.values().any(|m| m.active) {
            return Vec::new();
        }
        // The checksums of the segments of lower id that stay, and that every member
        // has had long enough to hold them in its index (the twin a page moves onto).
        let mut holder: HashSet<u32> = HashSet::new();
        let mut dead: Vec<u64> = Vec::new();
        let usage: Vec<[u64; BITMAP_WORDS]> =
            self.segments.keys().map(|&id| self.mapped(id).0).collect();
        // The pool's frames that nobody maps, against those mapped (see COMPACT_WASTE_DIV).
        let (all, mapped) = self
            .segments
            .values()
            .zip(&usage)
            .fold((0, 0), |(all, mapped), (s, bits)| {
                (all + u64::from(s.frames), mapped + frames_in(bits))
            });
        let compact = all.saturating_sub(mapped) * COMPACT_WASTE_DIV > mapped;
        for ((&id, s), bits) in self.segments.iter().zip(&usage) {
            let twins: Vec<bool> = (0..s.frames as usize)
                .map(|i| s.sums.get(i).is_some_and(|c| holder.contains(c)))
                .collect();
            let in_place = in_place_twins(&twins);
            let on = |i: usize| bits.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1);
            let live = (0..s.frames as usize)
                .filter(|&i| on(i) && (!twins[i] || in_place[i]))
                .count() as u32;
            let twin_dead = (0..s.frames as usize).any(|i| on(i) && twins[i] && !in_place[i]);
            let aged = self
                .members
                .values()
                .filter(|member| member.active)
                .all(|member| member.usage.get(&id).is_some_and(|u| u.age >= RETIRE_AGE));
            // Unused, or partly dead (its memory is the whole segment's): members move
            // their pages off it, onto twins or onto new segments.
            if aged && worth_retiring(s.frames, live, twin_dead || compact) {
                dead.push(id);
            } else if aged {
                holder.extend(s.sums.iter().copied());
            }
        }
        let mut out = Vec::new();
        for id in dead {
            out.extend(self.retire(id));
        }
        out
    }

    /// Forget segment `id`, telling every member (the caller closes its descriptor).
    pub fn retire(&mut self, id: u64) -> Vec<Out> {
        let Some(s) = self.segments.remove(&id) else {
            return Vec::new();
        };
        for sum in s.sums {
            if let Some(n) = self.published.get_mut(&sum) {
                *n -= 1;
                if *n == 0 {
                    self.published.remove(&sum);
                }
            }
        }
        // Its memory stays while pages of some member map it: counted on (see
        // `retiring`) until they have all left it.
        self.retiring.insert(id, s.frames);
        self.forget_unmapped_retiring();
        self.retired += 1;
        self.members.keys().map(|&to| retire_to(to, id)).collect()
    }

    /// Forget the retired segments that no member's pages map any more (reported so,
    /// or their members gone).
    fn forget_unmapped_retiring(&mut self) {
        let members = &mut self.members;
        self.retiring.retain(|id, _| {
            let mapped = members
                .values()
                .any(|m| m.usage.get(id).is_some_and(|u| u.pages > 0));
            if !mapped {
                for m in members.values_mut() {
                    m.usage.remove(id);
                }
            }
            mapped
        });
    }

    /// The ids of the segments the hub holds, oldest first.
    pub fn segment_ids(&self) -> Vec<u64> {
        self.segments.keys().copied().collect()
    }

    /// The domain's statistics, with the kernel's definitions over all members.
    pub fn stats(&self) -> DomainStats {
        let mut st = DomainStats {
            members: self.members.len() as u32,
            segments: self.segments.len() as u32,
            segments_retired: self.retired,
            refused: self.refused,
            ..Default::default()
        };
        // Retired segments that pages still map hold memory and share it as before.
        let held = (self.segments.iter().map(|(&id, s)| (id, s.frames)))
            .chain(self.retiring.iter().map(|(&id, &f)| (id, f)));
        for (id, seg_frames) in held {
            let (bits, pages) = self.mapped(id);
            let frames = frames_in(&bits);
            st.pages_shared += frames;
            st.pages_sharing += pages.saturating_sub(frames);
            st.live_frames += frames;
            st.pool_bytes += u64::from(seg_frames) * u64::from(self.page);
        }
        st
    }

    /// Check the hub's own rules (tests and fuzzing).
    pub fn check_invariants(&self) {
        for (s, who) in &self.candidates {
            assert!(
                !who.is_empty() && who.len() <= ANNOUNCERS,
                "announcers of {s}"
            );
            for m in who {
                assert!(
                    self.members.contains_key(m),
                    "checksum {s} held by a member gone"
                );
            }
            assert!(
                !self.published.contains_key(s),
                "{s} published and still a candidate"
            );
        }
        for (s, m) in &self.assigned {
            assert!(
                self.members.contains_key(m),
                "checksum {s} assigned to a member gone"
            );
            assert!(
                !self.published.contains_key(s),
                "{s} published and still assigned"
            );
        }
        for (s, (m, _)) in &self.held {
            assert!(
                self.members.contains_key(m),
                "checksum {s} held for a member gone"
            );
            assert!(
                !self.published.contains_key(s) && !self.assigned.contains_key(s),
                "{s} held and published or assigned"
            );
        }
        let mut count: HashMap<u32, u32> = HashMap::new();
        for seg in self.segments.values() {
            for &s in &seg.sums {
                *count.entry(s).or_insert(0) += 1;
            }
        }
        assert_eq!(
            count, self.published,
            "published checksums match the segments"
        );
        for member in self.members.values() {
            for id in member.usage.keys() {
                assert!(
                    self.segments.contains_key(id) || self.retiring.contains_key(id),
                    "usage of a segment gone"
                );
            }
        }
        for id in self.retiring.keys() {
            assert!(
                !self.segments.contains_key(id),
                "segment {id} retired and held"
            );
            assert!(
                self.members
                    .values()
                    .any(|m| m.usage.get(id).is_some_and(|u| u.pages > 0)),
                "retired segment {id} counted with no page on it"
            );
        }
    }
}

/// Of a segment's frames, which of those `twins` marks (holding a content published
/// before) are repeats held in place (see [`twin_run_max`]): in a run of at most
/// [`TWIN_RUN_MAX`] such frames, with a frame of another content on each side.
fn in_place_twins(twins: &[bool]) -> Vec<bool> {
    let frames = twins.len();
    let mut out = vec![false; frames];
    let mut i = 0;
    while i < frames {
        if !twins[i] {
            i += 1;
            continue;
        }
        let end = (i..frames).find(|&j| !twins[j]).unwrap_or(frames);
        if i > 0 && end < frames && end - i <= TWIN_RUN_MAX {
            out[i..end].fill(true);
        }
        i = end;
    }
    out
}

/// Tell member `to` that segment `id` is retired.
fn retire_to(to: MemberId, id: u64) -> Out {
    Out {
        to,
        msg: Msg::Retire { id },
        segment: None,
    }
}

/// `PleasePublish` messages asking member `to` for `sums` (as many as they take), in a
/// domain of `members`.
fn please_publish(to: MemberId, members: usize, sums: &[u32]) -> Vec<Out> {
    let members = u32::try_from(members).unwrap_or(u32::MAX);
    sums.chunks(MAX_SUMS)
        .map(|c| Out {
            to,
            msg: Msg::PleasePublish {
                members,
                sums: c.to_vec(),
            },
            segment: None,
        })
        .collect()
}

/// Send messages that carry no descriptor (requests to publish, retirements) outside
/// the loop's round of answers: a failure shows as the connection's end at the next
/// poll.
fn send_plain(conns: &[Conn], outs: Vec<Out>) {
    for o in outs {
        if let Some(c) = conns.iter().find(|c| c.member == Some(o.to)) {
            let _ = c.sock.send(&o.msg.encode(), &[], false);
        }
    }
}

/// How long a broker with no member waits for one before it exits.
const IDLE_EXIT: Duration = Duration::from_secs(2);

struct Conn {
    sock: Socket,
    /// The member's number once it said `Hello`; a connection that only asks for
    /// statistics never becomes a member.
    member: Option<MemberId>,
}

/// How often a broker renews the times of its socket, lock file and directory, so
/// that a cleaner of old files in /tmp (systemd-tmpfiles removes what has not
/// changed for 10 days) never removes a live broker's: a member finding no socket
/// would start a second broker, and the domain would be split in two.
const KEEP_FILES: Duration = Duration::from_secs(3600);

/// Renew `path`'s change time (its mode set again, unchanged).
fn keep(path: &Path) {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        let _ = std::fs::set_permissions(path, md.permissions());
    }
}

/// Run the broker of the domain whose socket is `sock_path` until no member has
/// been connected for a while. `lock` is the descriptor of the domain's lock file,
/// which the caller holds (`flock`) for as long as this runs: at most one broker
/// per domain.
pub fn serve(sock_path: &Path, name: &str) -> io::Result<()> {
    let page = crate::sys::page_size() as u32;
    // A socket file left by a broker that died: the lock says none runs now.
    let _ = std::fs::remove_file(sock_path);
    let listener = Socket::listen(sock_path)?;
    let uid = unix::euid();
    let mut hub = Hub::new(page);
    let mut fds: HashMap<u64, Memfd> = HashMap::new();
    let mut conns: Vec<Conn> = Vec::new();
    let mut idle_since = Some(Instant::now());
    let mut kept = Instant::now();
    let started = Instant::now();
    let mut buf = vec![0u8; proto::MAX_MESSAGE];
    loop {
        // Claims that waited long enough for another member, asked of their claimers.
        send_plain(&conns, hub.tick(started.elapsed().as_millis() as u64));
        if hub.members() == 0 && idle_since.is_some_and(|t| t.elapsed() >= IDLE_EXIT) {
            break;
        }
        if kept.elapsed() >= KEEP_FILES {
            keep(sock_path);
            keep(&sock_path.with_extension("lock"));
            if let Some(d) = sock_path.parent() {
                keep(d);
            }
            kept = Instant::now();
        }
        let mut watch = vec![listener.raw()];
        watch.extend(conns.iter().map(|c| c.sock.raw()));
        // (A claim that has waited is asked for within a tenth of its wait.)
        let ready = unix::poll_readable(&watch, (CLAIM_HOLD_MS / 10) as i32)?;
        if ready[0] {
            if let Ok(s) = listener.accept() {
                // Only the user's own processes (the directory is the user's alone; this
                // is the kernel's word on who connected, not the peer's).
                if s.peer_cred().is_ok_and(|c| c.uid == uid) && s.set_send_timeout(2000).is_ok() {
                    conns.push(Conn {
                        sock: s,
                        member: None,
                    });
                } else {
                    hub.refuse();
                }
            }
        }
        let mut drop_conns: Vec<usize> = Vec::new();
        let mut outs: Vec<Out> = Vec::new();
        let mut replies: Vec<(usize, Msg)> = Vec::new();
        for (i, c) in conns.iter_mut().enumerate() {
            // Connections accepted above were not polled yet.
            if ready.get(i + 1) != Some(&true) {
                continue;
            }
            let (n, mut got) = match c.sock.recv(&mut buf) {
                Ok(Some(x)) => x,
                // Closed, or a message that could not be whole: drop the connection.
                Ok(None) | Err(_) => {
                    drop_conns.push(i);
                    continue;
                }
            };
            let msg = match proto::decode(&buf[..n], got.len()) {
                Ok(m) => m,
                Err(_) => {
                    hub.refuse();
                    drop_conns.push(i);
                    continue;
                }
            };
            match (c.member, msg) {
                (
                    None,
                    Msg::Hello {
                        version,
                        page: p,
                        name: n,
                    },
                ) => {
                    if version != proto::VERSION || p != page || n != name {
                        hub.refuse();
                        drop_conns.push(i);
                        continue;
                    }
                    let (m, o) = hub.join();
                    c.member = Some(m);
                    idle_since = None;
                    outs.extend(o);
                }
                (None, Msg::StatsQuery) => replies.push((i, Msg::Stats(hub.stats()))),
                (Some(m), Msg::Publish { frames, sums }) => {
                    let seg = Memfd::from_owned(got.pop().expect("decode checked one fd"));
                    let size = u64::from(frames) * u64::from(page);
                    let id = seg.identity().map(|(_, ino)| ino).ok();
                    // Sealed, of the size it claims, new, and holding the bytes its
                    // checksums say: every member may map it, and index it by them. (Not
                    // checked for want of resources here, it is passed on all the same:
                    // to members its checksums are hints, and no page is remapped but
                    // onto bytes compared equal.)
                    let honest = |id| {
                        seg.is_sealed_segment(size)
                            && !hub.has_segment(id)
                            && sums_hold(&seg, size, page, &sums).unwrap_or(true)
                    };
                    match id {
                        Some(id) if honest(id) => {
                            outs.extend(hub.on_message(m, Msg::Publish { frames, sums }, Some(id)));
                            fds.insert(id, seg);
                        }
                        _ => {
                            hub.refuse();
                            drop_conns.push(i);
                        }
                    }
                }
                (Some(m), msg) => outs.extend(hub.on_message(m, msg, None)),
                (None, _) => {
                    hub.refuse();
                    drop_conns.push(i);
                }
            }
        }
        for (i, msg) in replies {
            if conns[i].sock.send(&msg.encode(), &[], true).is_err() {
                drop_conns.push(i);
            }
        }
        for o in outs {
            let Some(i) = conns.iter().position(|c| c.member == Some(o.to)) else {
                continue;
            };
            if drop_conns.contains(&i) {
                continue;
            }
            let fd: Vec<i32> = o
                .segment
                .and_then(|id| fds.get(&id))
                .map(|f| f.raw())
                .into_iter()
                .collect();
            if o.segment.is_some() && fd.is_empty() {
                continue;
            }
            // A member that does not read within the send timeout is dropped: it must
            // not stall the others.
            if conns[i].sock.send(&o.msg.encode(), &fd, false).is_err() {
                drop_conns.push(i);
            }
        }
        drop_conns.sort_unstable();
        drop_conns.dedup();
        let mut after_leaving = Vec::new();
        for i in drop_conns.into_iter().rev() {
            let c = conns.remove(i);
            if let Some(m) = c.member {
                after_leaving.extend(hub.leave(m));
            }
        }
        // What the members that left were asked to publish, asked of others.
        send_plain(&conns, after_leaving);
        // Segments retired by the hub: their descriptors go (members' mappings keep
        // the pages that still map them).
        let live: HashSet<u64> = hub.segment_ids().into_iter().collect();
        fds.retain(|id, _| live.contains(id));
        if hub.members() == 0 && idle_since.is_none() {
            idle_since = Some(Instant::now());
        }
    }
    let _ = std::fs::remove_file(sock_path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_of(outs: &[Out], to: MemberId) -> Vec<u32> {
        outs.iter()
            .filter(|o| o.to == to)
            .flat_map(|o| match &o.msg {
                Msg::PleasePublish { sums, .. } => sums.clone(),
                _ => vec![],
            })
            .collect()
    }

    #[test]
    fn the_second_announcer_publishes_and_everyone_gets_the_segment() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        let (b, _) = h.join();
        assert!(h
            .on_message(a, Msg::Announce { sums: vec![1, 2] }, None)
            .is_empty());
        let o = h.on_message(b, Msg::Announce { sums: vec![2, 3] }, None);
        assert_eq!(sums_of(&o, b), vec![2]);
        // Asked once only.
        let (c, _) = h.join();
        assert!(h
            .on_message(c, Msg::Announce { sums: vec![2] }, None)
            .is_empty());
        let o = publish(&mut h, b, 99, vec![2]);
        let to: Vec<_> = o.iter().map(|x| x.to).collect();
        assert_eq!(to, vec![a, b, c]);
        assert!(o.iter().all(|x| x.segment == Some(99)));
        // A published checksum asks nobody again.
        assert!(
            h.on_message(c, Msg::Announce { sums: vec![2, 1] }, None)
                .len()
                == 1
        );
        h.check_invariants();
        // A late member gets every segment.
        let (d, o) = h.join();
        assert!(o.iter().any(|x| x.to == d && x.segment == Some(99)));
        h.check_invariants();
    }

    #[test]
    fn a_content_held_twice_by_two_members_is_published_by_one() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        let (b, _) = h.join();
        // Nobody else announced them: asked of a once its claim has waited.
        assert!(h
            .on_message(a, Msg::Claim { sums: vec![7, 8] }, None)
            .is_empty());
        let o = h.tick(CLAIM_HOLD_MS);
        assert_eq!(sums_of(&o, a), vec![7, 8]);
        // b holds 7 twice too, and announces 8: nobody else is asked.
        assert!(h
            .on_message(b, Msg::Claim { sums: vec![7] }, None)
            .is_empty());
        assert!(h
            .on_message(b, Msg::Announce { sums: vec![8] }, None)
            .is_empty());
        h.check_invariants();
        // a declines 8 (its pages changed): 8 is free again for the next claim, b's
        // (asked once it has waited: nobody else holds 8 now).
        h.on_message(a, Msg::Decline { sums: vec![8] }, None);
        assert!(h
            .on_message(b, Msg::Claim { sums: vec![8] }, None)
            .is_empty());
        let o = h.tick(2 * CLAIM_HOLD_MS);
        assert_eq!(sums_of(&o, b), vec![8]);
        h.check_invariants();
    }

    #[test]
    fn a_claim_waits_for_another_member_to_announce_it() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        // Alone in its domain, a member publishes what it holds twice at once.
        let o = h.on_message(a, Msg::Claim { sums: vec![5] }, None);
        assert_eq!(sums_of(&o, a), vec![5]);
        let (b, _) = h.join();
        h.tick(100);
        // With another member, a's claims wait.
        let o = h.on_message(
            a,
            Msg::Claim {
                sums: vec![7, 8, 9],
            },
            None,
        );
        assert!(o.is_empty() && h.holding());
        h.check_invariants();
        // b announces 7 (it holds it once) and claims 8 (twice): b publishes both,
        // with the rest of what it announces, as the second member to hold them.
        let o = h.on_message(b, Msg::Announce { sums: vec![7] }, None);
        assert_eq!(sums_of(&o, b), vec![7]);
        let o = h.on_message(b, Msg::Claim { sums: vec![8] }, None);
        assert_eq!(sums_of(&o, b), vec![8]);
        h.check_invariants();
        // A claim of later waits from its own time.
        h.tick(600);
        let o = h.on_message(b, Msg::Claim { sums: vec![10] }, None);
        assert!(o.is_empty());
        // Not waited long enough yet: nothing is asked.
        assert!(h.tick(100 + CLAIM_HOLD_MS - 1).is_empty());
        // a's has: a publishes what nobody else announced; b's still waits.
        let o = h.tick(100 + CLAIM_HOLD_MS);
        assert_eq!(sums_of(&o, a), vec![9]);
        assert!(sums_of(&o, b).is_empty() && h.holding());
        let o = h.tick(600 + CLAIM_HOLD_MS);
        assert_eq!(sums_of(&o, b), vec![10]);
        assert!(!h.holding());
        h.check_invariants();
        // A claimer that leaves, or declines, takes its claim with it.
        let (c, _) = h.join();
        assert!(h
            .on_message(c, Msg::Claim { sums: vec![11] }, None)
            .is_empty());
        h.leave(c);
        assert!(!h.holding());
        assert!(h
            .on_message(a, Msg::Claim { sums: vec![12] }, None)
            .is_empty());
        h.on_message(a, Msg::Decline { sums: vec![12] }, None);
        assert!(!h.holding());
        assert!(h.tick(100_000).is_empty());
        h.check_invariants();
    }

    #[test]
    fn statistics_count_frames_once_and_pages_over_all_members() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        let (b, _) = h.join();
        publish(&mut h, a, 7, vec![1, 2, 3, 4]);
        // a maps frames 0 and 1 (3 pages), b maps frames 1 and 2 (2 pages).
        h.on_message(a, usage(7, 1, 0b011, 3), None);
        h.on_message(b, usage(7, 1, 0b110, 2), None);
        let s = h.stats();
        assert_eq!((s.members, s.pages_shared, s.pages_sharing), (2, 3, 2));
        assert_eq!((s.live_frames, s.pool_bytes, s.segments), (3, 4 * 4096, 1));
        h.leave(b);
        let s = h.stats();
        assert_eq!((s.members, s.pages_shared, s.pages_sharing), (1, 2, 1));
    }

    /// Member `m` publishes segment `id` of frames with checksums `sums`.
    fn publish(h: &mut Hub, m: MemberId, id: u64, sums: Vec<u32>) -> Vec<Out> {
        let frames = sums.len() as u32;
        h.on_message(m, Msg::Publish { frames, sums }, Some(id))
    }

    fn usage(id: u64, age: u32, bits: u64, pages: u32) -> Msg {
        let mut mapped = [0u64; BITMAP_WORDS];
        mapped[0] = bits;
        Msg::Usage {
            segs: vec![SegUsage {
                id,
                pages,
                age,
                mapped,
            }],
        }
    }

    /// A report of segment `id` at the retirement age, each of its `frames` frames
    /// mapped by one page.
    fn aged_all_mapped(id: u64, frames: u32) -> SegUsage {
        let mut mapped = [0u64; BITMAP_WORDS];
        for i in 0..frames as usize {
            mapped[i / 64] |= 1 << (i % 64);
        }
        SegUsage {
            id,
            pages: frames,
            age: RETIRE_AGE,
            mapped,
        }
    }

    #[test]
    fn a_segment_every_member_had_long_enough_and_nobody_maps_is_retired() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        let (b, _) = h.join();
        publish(&mut h, a, 1, vec![5]);
        // b has scanned (so it has a say), but not reported segment 1 yet.
        assert!(h.on_message(b, Msg::ScanDone, None).is_empty());
        h.on_message(a, usage(1, RETIRE_AGE, 0, 0), None);
        assert!(
            h.on_message(a, Msg::ScanDone, None).is_empty(),
            "b has not reported it"
        );
        h.on_message(b, usage(1, RETIRE_AGE - 1, 0, 0), None);
        assert!(
            h.on_message(b, Msg::ScanDone, None).is_empty(),
            "b had it too briefly"
        );
        h.on_message(b, usage(1, RETIRE_AGE, 1, 1), None);
        assert!(h.on_message(b, Msg::ScanDone, None).is_empty(), "b maps it");
        h.on_message(b, usage(1, RETIRE_AGE + 1, 0, 0), None);
        let o = h.on_message(b, Msg::ScanDone, None);
        assert_eq!(o.len(), 2, "retired, both told");
        assert!(!h.has_segment(1));
        assert_eq!(h.stats().segments_retired, 1);
        h.check_invariants();
    }

    /// A usage report of segment `id`: 64 pages on the frames `mapped`, held for
    /// `RETIRE_AGE` scans.
    fn aged_usage(id: u64, mapped: [u64; BITMAP_WORDS]) -> SegUsage {
        SegUsage {
            id,
            pages: 64,
            age: RETIRE_AGE,
            mapped,
        }
    }

    /// A frame bitmap with the first `n` frames mapped.
    fn first_frames(n: usize) -> [u64; BITMAP_WORDS] {
        let mut m = [0u64; BITMAP_WORDS];
        m[..n / 64].iter_mut().for_each(|w| *w = u64::MAX);
        if n % 64 != 0 {
            m[n / 64] = (1u64 << (n % 64)) - 1;
        }
        m
    }

    #[test]
    fn a_mostly_dead_segment_is_retired_for_compaction() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        publish(&mut h, a, 3, (0..640).collect());
        publish(&mut h, a, 4, (1000..1100).collect());
        // 4: 37 of 100 live, 63 dead: fewer than COMPACT_DEAD, kept.
        let small = first_frames(37);
        // 3: 576 of 640 live, 64 dead: not a fifth dead, kept.
        let report = |m3| Msg::Usage {
            segs: vec![aged_usage(3, m3), aged_usage(4, small)],
        };
        h.on_message(a, report(first_frames(576)), None);
        assert!(h.on_message(a, Msg::ScanDone, None).is_empty());
        // 3: 256 live, 384 dead: retired (its pages move off).
        h.on_message(a, report(first_frames(256)), None);
        assert_eq!(h.on_message(a, Msg::ScanDone, None).len(), 1);
        assert!(!h.has_segment(3));
        assert!(h.has_segment(4));
        h.check_invariants();
        // Its memory stays while pages map it: still in the pool and its live frames.
        let st = h.stats();
        assert_eq!((st.segments, st.segments_retired), (1, 1));
        assert_eq!(st.pool_bytes, (640 + 100) * 4096);
        assert_eq!(st.live_frames, 256 + 37);
        // Fewer pages on it: still counted, by what is mapped.
        h.on_message(a, report(first_frames(64)), None);
        assert_eq!(h.stats().live_frames, 64 + 37);
        h.check_invariants();
        // No page of the member on it any more: gone from the figures.
        let mut none = aged_usage(3, [0; BITMAP_WORDS]);
        none.pages = 0;
        h.on_message(a, Msg::Usage { segs: vec![none] }, None);
        h.check_invariants();
        let st = h.stats();
        assert_eq!((st.pool_bytes, st.live_frames), (100 * 4096, 37));
        // A report of it afterwards is of a segment unknown: ignored.
        h.on_message(a, report(first_frames(128)), None);
        assert_eq!(h.stats().pool_bytes, 100 * 4096);
        h.check_invariants();
    }

    #[test]
    fn a_partly_dead_segment_waits_while_the_pool_wastes_little() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        publish(&mut h, a, 3, (0..4096).collect());
        publish(&mut h, a, 4, (10_000..10_100).collect());
        // 4: 30 of 100 live (70 dead: worth compacting on its own), but the pool wastes
        // 70 frames against 4,126 live: kept.
        let some = first_frames(30);
        let report = |m3| Msg::Usage {
            segs: vec![aged_usage(3, m3), aged_usage(4, some)],
        };
        h.on_message(a, report(first_frames(4096)), None);
        assert!(h.on_message(a, Msg::ScanDone, None).is_empty());
        assert!(h.has_segment(4));
        // 3 loses a quarter of its live frames (1,024 dead, a twentieth and more of the
        // 3,102 live): both are retired.
        h.on_message(a, report(first_frames(3072)), None);
        assert_eq!(h.on_message(a, Msg::ScanDone, None).len(), 2);
        assert!(!h.has_segment(3) && !h.has_segment(4));
        h.check_invariants();
    }

    #[test]
    fn a_segment_of_contents_another_holds_already_is_retired() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        let (b, _) = h.join();
        // The same 100 contents published twice (as when two members could not hear
        // of each other in time), plus 10 contents only segment 9 holds.
        let twins: Vec<u32> = (0..100).collect();
        publish(&mut h, a, 8, twins.clone());
        let mut more = twins.clone();
        more.extend(500..510);
        publish(&mut h, b, 9, more);
        let report = aged_all_mapped;
        for m in [a, b] {
            h.on_message(
                m,
                Msg::Usage {
                    segs: vec![report(8, 100), report(9, 110)],
                },
                None,
            );
        }
        // Every frame mapped, but 100 of segment 9's are twins of segment 8's: 9 goes
        // (its pages move onto the twins, and its 10 others onto a new segment), 8
        // stays.
        let out = h.on_message(a, Msg::ScanDone, None);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|o| o.msg == Msg::Retire { id: 9 }));
        assert!(h.has_segment(8) && !h.has_segment(9));
        h.check_invariants();
    }

    #[test]
    fn repeats_held_in_place_stay_and_long_runs_of_twins_go() {
        // Segment 9 holds 200 contents of its own and 80 of segment 8's, every frame
        // mapped: in runs of at most `TWIN_RUN_MAX` between its own (repeats held in
        // place: it stays), or in one run of 80 (a range published twice: it goes).
        for (runs, retired) in [(TWIN_RUN_MAX, false), (80, true)] {
            let mut h = Hub::new(4096);
            let (a, _) = h.join();
            let (b, _) = h.join();
            publish(&mut h, a, 8, (0..80).collect());
            let mut sums: Vec<u32> = Vec::new();
            let (mut own, mut twins) = (1000u32..1200, 0u32..80);
            while sums.len() < 280 {
                sums.extend(own.by_ref().take(10));
                sums.extend(twins.by_ref().take(runs));
            }
            sums.extend(own);
            let frames = sums.len() as u32;
            publish(&mut h, b, 9, sums);
            let report = aged_all_mapped;
            for m in [a, b] {
                let segs = vec![report(8, 80), report(9, frames)];
                h.on_message(m, Msg::Usage { segs }, None);
            }
            h.on_message(a, Msg::ScanDone, None);
            assert_eq!(h.has_segment(9), !retired, "twins in runs of {runs}");
            assert!(h.has_segment(8));
            h.check_invariants();
        }
    }

    #[test]
    fn in_place_twins_are_short_runs_between_other_contents() {
        let got = |pat: &str| {
            let twins: Vec<bool> = pat.bytes().map(|b| b == b't').collect();
            in_place_twins(&twins)
                .iter()
                .map(|&b| if b { 'y' } else { '.' })
                .collect::<String>()
        };
        assert_eq!(got("ottoto"), ".yy.y.");
        // At either end of the segment: not between other contents.
        assert_eq!(got("ttoot"), ".....");
        let long = "o".to_string() + &"t".repeat(TWIN_RUN_MAX + 1) + "o";
        assert!(!got(&long).contains('y'));
    }

    #[test]
    fn twins_are_held_in_place_only_where_they_save_enough_mappings() {
        assert_eq!(twin_run_max(1), 0);
        assert_eq!(twin_run_max(3), 0);
        assert_eq!(twin_run_max(4), 1);
        assert_eq!(twin_run_max(16), 4);
        assert_eq!(twin_run_max(1000), TWIN_RUN_MAX);
        // The broker says how many members there are whenever it asks for frames.
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        let (b, _) = h.join();
        h.on_message(a, Msg::Announce { sums: vec![5] }, None);
        let o = h.on_message(b, Msg::Announce { sums: vec![5] }, None);
        assert!(o.iter().any(|o| o.msg
            == Msg::PleasePublish {
                members: 2,
                sums: vec![5]
            }));
    }

    #[test]
    fn a_retired_segment_counts_until_the_last_member_on_it_leaves() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        let (b, _) = h.join();
        publish(&mut h, a, 7, (0..8).collect());
        h.on_message(a, usage(7, RETIRE_AGE, 0b1, 1), None);
        h.on_message(b, usage(7, RETIRE_AGE, 0b110, 2), None);
        h.retire(7);
        h.check_invariants();
        assert_eq!(h.stats().pool_bytes, 8 * 4096);
        assert_eq!(h.stats().live_frames, 3);
        h.leave(a);
        assert_eq!(h.stats().live_frames, 2);
        h.leave(b);
        h.check_invariants();
        assert_eq!(h.stats().pool_bytes, 0);
    }

    #[test]
    fn what_a_leaving_member_was_asked_to_publish_is_asked_of_another() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        let (b, _) = h.join();
        let (c, _) = h.join();
        h.on_message(a, Msg::Announce { sums: vec![9] }, None);
        assert_eq!(
            sums_of(&h.on_message(b, Msg::Announce { sums: vec![9] }, None), b),
            vec![9]
        );
        assert!(
            h.on_message(c, Msg::Announce { sums: vec![9] }, None)
                .is_empty(),
            "b has it"
        );
        // b dies before publishing: c is asked (not a, whose page the others merge with).
        let o = h.leave(b);
        assert_eq!(sums_of(&o, c), vec![9]);
        h.check_invariants();
        // c declines (its page changed): only a is left, nobody to share with.
        assert!(h
            .on_message(c, Msg::Decline { sums: vec![9] }, None)
            .is_empty());
        h.check_invariants();
    }

    #[test]
    fn a_member_that_leaves_takes_its_hints_with_it() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        let (b, _) = h.join();
        h.on_message(a, Msg::Announce { sums: vec![1] }, None);
        h.leave(a);
        // b is first now: nobody to share with.
        assert!(h
            .on_message(b, Msg::Announce { sums: vec![1] }, None)
            .is_empty());
        h.check_invariants();
        // Messages only the broker sends are refused.
        h.on_message(b, Msg::Retire { id: 1 }, None);
        assert_eq!(h.stats().refused, 1);
    }

    #[test]
    fn a_segment_only_a_leaving_member_mapped_is_retired_when_it_leaves() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        let (b, _) = h.join();
        publish(&mut h, a, 1, vec![5]);
        h.on_message(a, usage(1, RETIRE_AGE, 1, 2), None);
        h.on_message(b, usage(1, RETIRE_AGE, 0, 0), None);
        assert!(h.on_message(a, Msg::ScanDone, None).is_empty(), "a maps it");
        assert!(h.on_message(b, Msg::ScanDone, None).is_empty(), "a maps it");
        // a exits; b has settled: its reports do not change, no scan-done comes.
        let out = h.leave(a);
        assert_eq!(out, vec![retire_to(b, 1)], "nobody maps segment 1 any more");
        assert!(h.segment_ids().is_empty());
        assert_eq!(h.leave(a), vec![], "a left already: nothing to do");
    }

    #[test]
    fn the_last_member_leaving_retires_nothing_for_the_next_one_to_join() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        publish(&mut h, a, 1, vec![5]);
        h.on_message(a, usage(1, RETIRE_AGE, 1, 2), None);
        assert!(h.leave(a).is_empty());
        assert_eq!(h.segment_ids(), vec![1]);
        // A member joining before the broker's idle end (a worker restarted) gets it.
        let (_, welcome) = h.join();
        assert!(welcome
            .iter()
            .any(|o| matches!(o.msg, Msg::Segment { id: 1, .. })));
    }

    #[test]
    fn a_member_back_from_a_broken_link_is_told_of_a_retirement_it_missed() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        let (b, _) = h.join();
        publish(&mut h, a, 1, vec![5]);
        // a's link breaks (a send timeout, EPIPE): the broker lets it go.
        h.leave(a);
        // Meanwhile b's scan ends: only b's report counts, and b maps nothing of 1.
        h.on_message(b, usage(1, RETIRE_AGE, 0, 0), None);
        let o = h.on_message(b, Msg::ScanDone, None);
        assert_eq!(o, vec![retire_to(b, 1)]);
        // a comes back as c, still holding 1 with 3 pages on it: told to let it go
        // (a report with no pages on it is not answered).
        let (c, _) = h.join();
        let o = h.on_message(c, usage(1, RETIRE_AGE, 1, 3), None);
        assert_eq!(o, vec![retire_to(c, 1)]);
        assert!(h.on_message(c, usage(1, RETIRE_AGE, 0, 0), None).is_empty());
        assert_eq!(
            h.stats().pool_bytes,
            0,
            "not counted: the domain does not hold it"
        );
    }

    #[test]
    fn a_member_back_from_a_broken_link_is_told_of_a_retirement_others_still_map() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        let (b, _) = h.join();
        publish(&mut h, a, 1, vec![5]);
        // a's link breaks: dropped. Segment 1 is retired while b still maps it.
        h.leave(a);
        h.on_message(b, usage(1, RETIRE_AGE, 1, 1), None);
        assert_eq!(h.retire(1).len(), 1, "told to b only");
        // a comes back as c, still holding 1 with pages on it: told now, once.
        let (c, _) = h.join();
        let o = h.on_message(c, usage(1, RETIRE_AGE, 1, 3), None);
        assert_eq!(o, vec![retire_to(c, 1)]);
        assert!(h.on_message(c, usage(1, RETIRE_AGE, 1, 2), None).is_empty());
        assert!(
            h.on_message(b, usage(1, RETIRE_AGE, 1, 1), None).is_empty(),
            "b knows"
        );
    }

    #[test]
    fn a_member_that_never_reports_has_no_say_in_what_is_retired() {
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        let (_idle, _) = h.join();
        publish(&mut h, a, 1, vec![5]);
        h.on_message(a, usage(1, RETIRE_AGE, 0, 0), None);
        let o = h.on_message(a, Msg::ScanDone, None);
        assert_eq!(o.len(), 2, "retired, told to both: {o:?}");
        // With no member that has reported, nothing is retired (a member that just
        // joined may be about to map it).
        let mut h = Hub::new(4096);
        let (a, _) = h.join();
        let (b, _) = h.join();
        publish(&mut h, a, 1, vec![5]);
        assert!(h.leave(a).is_empty(), "b has not reported yet");
        assert_eq!(h.segment_ids(), vec![1]);
        assert!(h.on_message(b, usage(1, 0, 1, 1), None).is_empty());
    }
}
