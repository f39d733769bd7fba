//! `domain_hub`: the broker's bookkeeping (`ksm::domain::broker::Hub`) under
//! random joins, leaves, announces, claims, the clock's ticks, publishes (with
//! segment ids, new and taken), declines, usage reports (of segments known and
//! unknown, any age and bitmap), scan-done and statistics queries, messages only a
//! broker sends, messages from members gone or never joined, and refusals, checked
//! against a model.
//!
//! Every message a member sends goes through `encode` and `decode` first, as it
//! does between processes, so the hub only sees what the decoder lets through.
//!
//! Checked after every step:
//! * `Hub::check_invariants()` holds;
//! * every `Out` goes to a live member; a `Segment` names a segment the hub holds
//!   and carries its descriptor, nothing else carries one;
//! * a join is answered with a `Welcome` (a new number, never one used before, and
//!   the member count) and every segment the domain holds, to the new member only;
//! * a publish of a new segment goes to every member, with its publisher; one of a
//!   segment the hub holds, or without a descriptor, is refused and goes nowhere;
//! * a checksum is asked to be published (`PleasePublish`) of at most one member
//!   at a time (until it publishes it, declines it or leaves) and never of the
//!   member that announced it first; exactly the announced checksums the model
//!   expects are asked for (a second member announced a checksum no segment holds
//!   and no one is asked for);
//! * a claim (a content one member holds twice) is asked of the claimer at once in
//!   a domain of one member, or if another member announced it; else it is held,
//!   and asked of the claimer at the first tick `CLAIM_HOLD_MS` or more after the
//!   claim, unless another member announced or claimed it meanwhile (asked of that
//!   one), or it was published, or the claimer declined it or left;
//! * a scan-done retires exactly the segments every member reported at age ≥
//!   `RETIRE_AGE` of which no frame is in use, or more than a fifth (and at least
//!   `COMPACT_DEAD`) are not (a frame in use: mapped by some member, and not a twin
//!   of a frame of a segment of lower id that stays and that every member has had
//!   as long) while the frames no member maps are more than a `COMPACT_WASTE_DIV`-th
//!   of those mapped, or some of its mapped frames are such twins; every member is
//!   told;
//! * `stats()` (and the `Stats` reply) agrees with a model computed from the last
//!   usage reports: `pages_shared` = `live_frames` = frames mapped by some member,
//!   `pages_sharing` = Σ pages − frames mapped (per segment, never below 0),
//!   `pool_bytes` = Σ frames × page, segments, members, retired and refused counts,
//!   where a retired segment counts on while some member reports pages on it (until
//!   it reports none, or leaves);
//! * messages only a broker sends are refused (counted), and change nothing.

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::{Arbitrary, Unstructured};
use ksm::domain::broker::{
    Hub, MemberId, Out, ANNOUNCERS, CLAIM_HOLD_MS, COMPACT_DEAD, COMPACT_WASTE_DIV, RETIRE_AGE,
    TWIN_RUN_MAX,
};
use ksm::domain::proto::{decode, DomainStats, Msg, SegUsage, BITMAP_WORDS, VERSION};
use ksm::scan::fake::IntMap;

/// Page size the hub counts with.
const PAGE: u32 = 4096;
/// Checksums come from a small set, so that members announce the same ones.
const SUMS: u8 = 12;
/// Segment ids come from a small set, so that ids are published twice and usage
/// names segments known and unknown.
const IDS: u8 = 6;

/// Who sends: the `i`-th live member (modulo), or, if `gone`, a member that left
/// or never joined.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Who {
    pub i: u8,
    pub gone: bool,
}

/// One segment in a usage report: segment `seg` (an id of the small set, or any
/// id if `any`), `pages`, `age` (mostly near `RETIRE_AGE`) and a bitmap.
#[derive(Arbitrary, Debug, Clone)]
pub struct Use {
    pub seg: u8,
    pub any: Option<u64>,
    pub pages: u8,
    pub age: u8,
    pub bits: Bits,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Bits {
    None,
    /// `x` in word 0 (the first 64 frames).
    Low(u64),
    /// Frame `i` (modulo the bitmap).
    One(u16),
    /// `x` in every word.
    All(u64),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    Join,
    Leave(Who),
    /// Checksums `s % SUMS`.
    Announce(Who, Vec<u8>),
    /// Checksums `s % SUMS` held twice by the member.
    Claim(Who, Vec<u8>),
    /// The broker's clock moves on by `ms × 16` milliseconds.
    Tick(u8),
    /// A segment `seg % IDS` (the caller's identity of the sealed memfd; `None`:
    /// the publish came without one) of frames with checksums `s % SUMS` (or
    /// `frames` frames of checksums counted up from `first`, if `frames` is set).
    Publish {
        who: Who,
        seg: Option<u8>,
        sums: Vec<u8>,
        frames: Option<(u8, u8)>,
    },
    Decline(Who, Vec<u8>),
    Usage(Who, Vec<Use>),
    ScanDone(Who),
    StatsQuery(Who),
    /// A message only a broker sends (or `Hello`, which comes before membership).
    BrokerOnly(Who, u8),
    /// The loop refused something (a bad peer, a malformed packet).
    Refuse,
}

#[derive(Debug, Clone)]
pub struct Input {
    pub ops: Vec<Op>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let ops = u.arbitrary_iter()?.collect::<arbitrary::Result<_>>()?;
        Ok(Input { ops })
    }

    fn arbitrary_take_rest(mut u: Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut ops = Vec::new();
        while !u.is_empty() {
            ops.push(Op::arbitrary(&mut u)?);
        }
        Ok(Input { ops })
    }
}

/// What the model keeps of a segment.
#[derive(Debug, Clone)]
struct Seg {
    frames: u32,
    sums: Vec<u32>,
}

/// The model of the domain.
#[derive(Debug, Default)]
struct Model {
    /// Live members, in the order they joined.
    members: BTreeSet<MemberId>,
    /// Every number ever given.
    ever: BTreeSet<MemberId>,
    segs: BTreeMap<u64, Seg>,
    /// The last report of each member, by segment.
    usage: IntMap<MemberId, IntMap<u64, SegUsage>>,
    /// Members that have reported (a usage report or a scan-done): only they have a
    /// say in what is retired.
    active: BTreeSet<MemberId>,
    /// The members that announced a checksum (no segment holds it), first first, at
    /// most `ANNOUNCERS`.
    first: IntMap<u32, Vec<MemberId>>,
    /// The member asked to publish a checksum, until it publishes, declines or leaves.
    asked: IntMap<u32, MemberId>,
    /// Retired segments some member still reports pages on, and their frames.
    retiring: BTreeMap<u64, u32>,
    retired: u64,
    refused: u64,
    /// Claims held: checksum → the claimer and when it claimed.
    held: BTreeMap<u32, (MemberId, u64)>,
    /// The clock.
    now: u64,
}

impl Model {
    fn published(&self, s: u32) -> bool {
        self.segs.values().any(|g| g.sums.contains(&s))
    }

    /// Frames of segment `id` mapped by some member (the OR of the reports), and
    /// pages mapping them (the sum of the reports).
    fn mapped(&self, id: u64) -> ([u64; BITMAP_WORDS], u64) {
        let mut bits = [0u64; BITMAP_WORDS];
        let mut pages = 0;
        for m in &self.members {
            if let Some(u) = self.usage.get(m).and_then(|r| r.get(&id)) {
                for (b, w) in bits.iter_mut().zip(&u.mapped) {
                    *b |= w;
                }
                pages += u64::from(u.pages);
            }
        }
        // Bits past the segment's frames are not frames: the hub drops them.
        let frames = (self.segs.get(&id).map(|g| g.frames))
            .or(self.retiring.get(&id).copied())
            .unwrap_or(0);
        for (i, w) in bits.iter_mut().enumerate() {
            let first = 64 * i as u32;
            if first >= frames {
                *w = 0;
            } else if frames - first < 64 {
                *w &= (1u64 << (frames - first)) - 1;
            }
        }
        (bits, pages)
    }

    /// The segments a scan-done retires, in id order: those every member reported at
    /// age ≥ `RETIRE_AGE` of which no frame is in use (mapped by some member, and not
    /// a twin: its checksum held by a segment of lower id that stays and that every
    /// member reported at that age too, unless held in place: one of at most
    /// `TWIN_RUN_MAX` twins in a row between frames that are none), or more than a
    /// fifth and at least
    /// `COMPACT_DEAD` frames are not, while the segments' frames that no member maps
    /// are more than a `COMPACT_WASTE_DIV`-th of those mapped or some of its mapped
    /// frames are twins (not held in place).
    fn to_retire(&self) -> Vec<u64> {
        if !self.members.iter().any(|m| self.active.contains(m)) {
            return Vec::new();
        }
        let aged = |id: u64| {
            self.members
                .iter()
                .filter(|m| self.active.contains(m))
                .all(|m| {
                    self.usage
                        .get(m)
                        .and_then(|r| r.get(&id))
                        .is_some_and(|u| u.age >= RETIRE_AGE)
                })
        };
        // Frames mapped by no member in all the segments, against those mapped: partly
        // dead segments are compacted only above a twentieth (or for their twins).
        let (mut all, mut on) = (0u64, 0u64);
        for (&id, g) in &self.segs {
            let (bits, _) = self.mapped(id);
            all += u64::from(g.frames);
            on += bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        }
        let compact = (all - on) * COMPACT_WASTE_DIV > on;
        let mut out: Vec<u64> = Vec::new();
        for (&id, g) in &self.segs {
            let (bits, _) = self.mapped(id);
            let twin = |c: u32| {
                self.segs
                    .range(..id)
                    .any(|(&k, h)| !out.contains(&k) && aged(k) && h.sums.contains(&c))
            };
            let is_twin = |i: usize| g.sums.get(i).is_some_and(|&c| twin(c));
            // A twin held in place: in a run of at most `TWIN_RUN_MAX` twins with a
            // frame that is none on either side.
            let in_place = |i: usize| {
                let n = g.frames as usize;
                let lo = (0..=i).rev().find(|&j| !is_twin(j));
                let hi = (i..n).find(|&j| !is_twin(j));
                matches!((lo, hi), (Some(lo), Some(hi)) if hi - lo - 1 <= TWIN_RUN_MAX)
            };
            let mapped = |i: usize| i < 64 * BITMAP_WORDS && bits[i / 64] & (1 << (i % 64)) != 0;
            let in_use = (0..g.frames as usize)
                .filter(|&i| mapped(i) && (!is_twin(i) || in_place(i)))
                .count() as u32;
            let twin_dead = (0..g.frames as usize).any(|i| mapped(i) && is_twin(i) && !in_place(i));
            let dead = g.frames - in_use;
            let partly = dead >= COMPACT_DEAD && 5 * dead > g.frames && (twin_dead || compact);
            if aged(id) && (in_use == 0 || partly) {
                out.push(id);
            }
        }
        out
    }

    fn stats(&self) -> DomainStats {
        let mut st = DomainStats {
            members: self.members.len() as u32,
            segments: self.segs.len() as u32,
            segments_retired: self.retired,
            refused: self.refused,
            ..Default::default()
        };
        let held = (self.segs.iter().map(|(&id, g)| (id, g.frames)))
            .chain(self.retiring.iter().map(|(&id, &f)| (id, f)));
        for (id, seg_frames) in held {
            let (bits, pages) = self.mapped(id);
            let frames: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
            st.pages_shared += frames;
            st.live_frames += frames;
            st.pages_sharing += pages.saturating_sub(frames);
            st.pool_bytes += u64::from(seg_frames) * u64::from(PAGE);
        }
        st
    }

    fn retire(&mut self, id: u64) {
        let g = self.segs.remove(&id).expect("a segment held");
        self.retiring.insert(id, g.frames);
        self.forget_unmapped_retiring();
        self.retired += 1;
    }

    /// Retired segments no live member reports pages on are forgotten.
    fn forget_unmapped_retiring(&mut self) {
        let ids: Vec<u64> = self.retiring.keys().copied().collect();
        for id in ids {
            let mapped = self.members.iter().any(|m| {
                self.usage
                    .get(m)
                    .and_then(|r| r.get(&id))
                    .is_some_and(|u| u.pages > 0)
            });
            if !mapped {
                self.retiring.remove(&id);
                for r in self.usage.values_mut() {
                    r.remove(&id);
                }
            }
        }
    }

    /// A checksum is no longer a candidate, asked for nor held once a segment holds it.
    fn forget_published(&mut self, sums: &[u32]) {
        for s in sums {
            self.first.remove(s);
            self.asked.remove(s);
            self.held.remove(s);
        }
    }

    /// `m` announces `s` (no segment holds it): remembered, at most `ANNOUNCERS`.
    fn add_announcer(&mut self, s: u32, m: MemberId) {
        let who = self.first.entry(s).or_default();
        if !who.contains(&m) && who.len() < ANNOUNCERS {
            who.push(m);
        }
    }

    /// `m` no longer announces `s`.
    fn drop_announcer(&mut self, s: u32, m: MemberId) {
        if let Some(who) = self.first.get_mut(&s) {
            who.retain(|&x| x != m);
            if who.is_empty() {
                self.first.remove(&s);
            }
        }
    }

    /// Who is asked for `s` once its publisher left or declined: another announcer
    /// than the first, the latest, if any.
    fn reassign(&mut self, s: u32) -> Option<MemberId> {
        if self.published(s) || self.asked.contains_key(&s) {
            return None;
        }
        let w = *self.first.get(&s)?.get(1..)?.last()?;
        self.asked.insert(s, w);
        Some(w)
    }

    /// The (member, checksum) pairs asked for in `outs`, sorted.
    fn asks(outs: &[Out]) -> Vec<(MemberId, u32)> {
        let mut got: Vec<(MemberId, u32)> = outs
            .iter()
            .flat_map(|o| -> Vec<(MemberId, u32)> {
                match &o.msg {
                    Msg::PleasePublish { sums, .. } => sums.iter().map(|&s| (o.to, s)).collect(),
                    other => panic!("expected only requests to publish, got {other:?}"),
                }
            })
            .collect();
        got.sort_unstable();
        got
    }
}

fn sum(s: u8) -> u32 {
    // Spread over the checksum space (the hub must not depend on small values).
    u32::from(s % SUMS).wrapping_mul(0x9E37_79B9)
}

fn seg_id(s: u8) -> u64 {
    1 + u64::from(s % IDS)
}

/// What a member sends, as the hub receives it: encoded and decoded.
fn wire(m: Msg) -> Msg {
    let b = m.encode();
    decode(&b, m.fds()).expect("a member's message decodes")
}

struct Harness {
    hub: Hub,
    model: Model,
}

impl Harness {
    fn who(&self, w: Who) -> Option<MemberId> {
        if w.gone {
            // A number that left, or the next one (never joined).
            let gone: Vec<MemberId> = self
                .model
                .ever
                .difference(&self.model.members)
                .copied()
                .collect();
            let next = self.model.ever.last().map_or(1, |&m| m + 1);
            return Some(if gone.is_empty() || w.i.is_multiple_of(4) {
                next + u32::from(w.i)
            } else {
                gone[usize::from(w.i) % gone.len()]
            });
        }
        let v: Vec<MemberId> = self.model.members.iter().copied().collect();
        (!v.is_empty()).then(|| v[usize::from(w.i) % v.len()])
    }

    /// Checks of every out, whatever the step.
    fn check_outs(&self, outs: &[Out]) {
        for o in outs {
            assert!(
                self.model.members.contains(&o.to),
                "{o:?} to a member not there"
            );
            match (&o.msg, o.segment) {
                (Msg::Segment { id, .. }, Some(s)) => {
                    assert_eq!(*id, s, "a segment with another's descriptor");
                    assert!(self.hub.has_segment(s), "segment {s} sent, not held");
                }
                (Msg::Segment { .. }, None) => panic!("{o:?} without its descriptor"),
                (_, Some(_)) => panic!("{o:?} carries a descriptor"),
                _ => {}
            }
        }
    }

    /// The retirements among `outs` (the rest returned): exactly the segments the
    /// model retires now, each told to every member; the model then retires them.
    fn retired_as_expected(&mut self, outs: Vec<Out>) -> Vec<Out> {
        let mut retired: BTreeMap<u64, Vec<MemberId>> = BTreeMap::new();
        let mut rest = Vec::new();
        for o in outs {
            match o.msg {
                Msg::Retire { id } => retired.entry(id).or_default().push(o.to),
                _ => rest.push(o),
            }
        }
        let all: Vec<MemberId> = self.model.members.iter().copied().collect();
        for (&id, to) in &retired {
            assert!(
                self.model.segs.contains_key(&id),
                "segment {id} retired twice"
            );
            assert_eq!(to, &all, "every member told of retiring {id}");
        }
        if all.is_empty() {
            // The last member left: nothing is retired (for the next one to join).
            assert!(retired.is_empty());
            return rest;
        }
        let want = self.model.to_retire();
        assert_eq!(
            retired.keys().copied().collect::<Vec<u64>>(),
            want,
            "segments retired (usage: {:?})",
            self.model.usage
        );
        for &id in retired.keys() {
            self.model.retire(id);
        }
        rest
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Join => {
                let before: BTreeSet<u64> = self.model.segs.keys().copied().collect();
                let (m, outs) = self.hub.join();
                assert!(
                    self.model.ever.last().is_none_or(|&l| m > l),
                    "member number {m} given again"
                );
                self.model.members.insert(m);
                self.model.ever.insert(m);
                self.check_outs(&outs);
                assert!(outs.iter().all(|o| o.to == m), "a join told someone else");
                assert_eq!(
                    outs.first().map(|o| &o.msg),
                    Some(&Msg::Welcome {
                        member: m,
                        members: self.model.members.len() as u32
                    })
                );
                let segs: BTreeSet<u64> = outs[1..]
                    .iter()
                    .map(|o| match o.msg {
                        Msg::Segment {
                            id,
                            frames,
                            ref sums,
                            ..
                        } => {
                            assert_eq!(frames, self.model.segs[&id].frames);
                            assert_eq!(sums, &self.model.segs[&id].sums, "its checksums");
                            id
                        }
                        ref x => panic!("a join answered with {x:?}"),
                    })
                    .collect();
                assert_eq!(outs.len() - 1, segs.len(), "a segment sent twice");
                assert_eq!(segs, before, "a new member gets every segment");
            }
            Op::Leave(w) => {
                let Some(m) = self.who(*w) else { return };
                let outs = self.hub.leave(m);
                self.check_outs(&outs);
                let mut expect = Vec::new();
                let mut outs: Vec<Out> = outs;
                if self.model.members.remove(&m) {
                    self.model.usage.remove(&m);
                    self.model.active.remove(&m);
                    self.model.held.retain(|_, &mut (c, _)| c != m);
                    self.model.forget_unmapped_retiring();
                    let sums: Vec<u32> = self.model.first.keys().copied().collect();
                    for s in sums {
                        self.model.drop_announcer(s, m);
                    }
                    let mine: Vec<u32> = self
                        .model
                        .asked
                        .iter()
                        .filter(|&(_, &x)| x == m)
                        .map(|(&s, _)| s)
                        .collect();
                    for &s in &mine {
                        self.model.asked.remove(&s);
                    }
                    for s in mine {
                        if let Some(w) = self.model.reassign(s) {
                            expect.push((w, s));
                        }
                    }
                    // What only its pages kept is retired at once (after the requests).
                    outs = self.retired_as_expected(outs);
                }
                expect.sort_unstable();
                assert_eq!(Model::asks(&outs), expect, "asked again after a leave");
            }
            Op::Announce(w, s) => {
                let Some(m) = self.who(*w) else { return };
                let sums: Vec<u32> = s.iter().map(|&x| sum(x)).collect();
                let live = self.model.members.contains(&m);
                let (first_before, asked_before) =
                    (self.model.first.clone(), self.model.asked.clone());
                // The model's expectation, checksum by checksum.
                let mut expect = Vec::new();
                if live {
                    for &s in &sums {
                        if self.model.published(s) {
                            continue;
                        }
                        self.model.add_announcer(s, m);
                        if self.model.asked.contains_key(&s) {
                            continue;
                        }
                        if self.model.first[&s][0] != m {
                            self.model.held.remove(&s);
                            self.model.asked.insert(s, m);
                            expect.push(s);
                        }
                    }
                }
                let outs = self.hub.on_message(m, wire(Msg::Announce { sums }), None);
                self.check_outs(&outs);
                let mut got = Vec::new();
                for o in &outs {
                    let Msg::PleasePublish { sums, .. } = &o.msg else {
                        panic!("an announce answered with {o:?}");
                    };
                    assert_eq!(o.to, m, "asked someone else than the announcer");
                    for &s in sums {
                        assert!(
                            first_before
                                .get(&s)
                                .is_none_or(|who| who.first() != Some(&m)),
                            "checksum {s:#x} asked of {m}, the first to announce it: {:?}",
                            first_before.get(&s)
                        );
                        assert!(
                            !asked_before.contains_key(&s) && !got.contains(&s),
                            "checksum {s:#x} asked of {m} while asked of {:?}",
                            asked_before.get(&s)
                        );
                        got.push(s);
                    }
                }
                assert_eq!(got, expect, "checksums asked for");
            }
            Op::Claim(w, s) => {
                let Some(m) = self.who(*w) else { return };
                let sums: Vec<u32> = s.iter().map(|&x| sum(x)).collect();
                let mut expect = Vec::new();
                if self.model.members.contains(&m) {
                    let wait = self.model.members.len() > 1;
                    for &s in &sums {
                        if self.model.published(s) {
                            continue;
                        }
                        let others = self
                            .model
                            .first
                            .get(&s)
                            .is_some_and(|who| who.iter().any(|&x| x != m));
                        self.model.add_announcer(s, m);
                        if self.model.asked.contains_key(&s) {
                            continue;
                        }
                        match self.model.held.get(&s) {
                            Some(&(c, _)) if c == m => continue,
                            None if wait && !others => {
                                self.model.held.insert(s, (m, self.model.now));
                                continue;
                            }
                            _ => {}
                        }
                        self.model.held.remove(&s);
                        self.model.asked.insert(s, m);
                        expect.push((m, s));
                    }
                }
                let outs = self.hub.on_message(m, wire(Msg::Claim { sums }), None);
                self.check_outs(&outs);
                expect.sort_unstable();
                assert_eq!(Model::asks(&outs), expect, "asked after a claim");
            }
            Op::Tick(ms) => {
                self.model.now += u64::from(*ms) * 16;
                let outs = self.hub.tick(self.model.now);
                self.check_outs(&outs);
                let now = self.model.now;
                let due: Vec<(u32, MemberId)> = self
                    .model
                    .held
                    .iter()
                    .filter(|&(_, &(_, since))| now >= since + CLAIM_HOLD_MS)
                    .map(|(&s, &(m, _))| (s, m))
                    .collect();
                let mut expect = Vec::new();
                for (s, m) in due {
                    self.model.held.remove(&s);
                    if !self.model.published(s) && !self.model.asked.contains_key(&s) {
                        self.model.asked.insert(s, m);
                        expect.push((m, s));
                    }
                }
                expect.sort_unstable();
                assert_eq!(Model::asks(&outs), expect, "asked at a tick");
            }
            Op::Publish {
                who,
                seg,
                sums,
                frames,
            } => {
                let Some(m) = self.who(*who) else { return };
                let mut sums: Vec<u32> = match frames {
                    Some((n, first)) => (0..u32::from(*n))
                        .map(|i| sum(first.wrapping_add(i as u8)))
                        .collect(),
                    None => sums.iter().map(|&x| sum(x)).collect(),
                };
                if sums.is_empty() {
                    sums.push(sum(0));
                }
                let n = sums.len() as u32;
                let id = seg.map(seg_id);
                let live = self.model.members.contains(&m);
                let msg = wire(Msg::Publish {
                    frames: n,
                    sums: sums.clone(),
                });
                let outs = self.hub.on_message(m, msg, id);
                self.check_outs(&outs);
                match id {
                    _ if !live => assert!(outs.is_empty()),
                    Some(id)
                        if !self.model.segs.contains_key(&id)
                            && !self.model.retiring.contains_key(&id) =>
                    {
                        self.model.segs.insert(
                            id,
                            Seg {
                                frames: n,
                                sums: sums.clone(),
                            },
                        );
                        self.model.forget_published(&sums);
                        let to: Vec<MemberId> = outs.iter().map(|o| o.to).collect();
                        let all: Vec<MemberId> = self.model.members.iter().copied().collect();
                        assert_eq!(to, all, "a segment goes to every member once");
                        for o in &outs {
                            assert_eq!(
                                o.msg,
                                Msg::Segment {
                                    id,
                                    frames: n,
                                    publisher: m,
                                    sums: sums.clone(),
                                }
                            );
                        }
                    }
                    // A segment held already, or no descriptor: refused.
                    _ => {
                        assert!(outs.is_empty(), "a refused publish sent {outs:?}");
                        self.model.refused += 1;
                    }
                }
            }
            Op::Decline(w, s) => {
                let Some(m) = self.who(*w) else { return };
                let sums: Vec<u32> = s.iter().map(|&x| sum(x)).collect();
                let outs = self
                    .hub
                    .on_message(m, wire(Msg::Decline { sums: sums.clone() }), None);
                self.check_outs(&outs);
                let mut expect = Vec::new();
                if self.model.members.contains(&m) {
                    for s in sums {
                        self.model.drop_announcer(s, m);
                        if self.model.held.get(&s).is_some_and(|&(c, _)| c == m) {
                            self.model.held.remove(&s);
                        }
                        if self.model.asked.get(&s) == Some(&m) {
                            self.model.asked.remove(&s);
                            if let Some(w) = self.model.reassign(s) {
                                expect.push((w, s));
                            }
                        }
                    }
                }
                expect.sort_unstable();
                assert_eq!(Model::asks(&outs), expect, "asked again after a decline");
            }
            Op::Usage(w, uses) => {
                let Some(m) = self.who(*w) else { return };
                let segs: Vec<SegUsage> = uses
                    .iter()
                    .take(8)
                    .map(|u| {
                        let mut mapped = [0u64; BITMAP_WORDS];
                        match u.bits {
                            Bits::None => {}
                            Bits::Low(x) => mapped[0] = x,
                            Bits::One(i) => {
                                let i = usize::from(i) % (64 * BITMAP_WORDS);
                                mapped[i / 64] |= 1 << (i % 64);
                            }
                            Bits::All(x) => mapped = [x; BITMAP_WORDS],
                        }
                        SegUsage {
                            id: u.any.unwrap_or(seg_id(u.seg)),
                            pages: u32::from(u.pages),
                            age: RETIRE_AGE - 2 + u32::from(u.age % 5),
                            mapped,
                        }
                    })
                    .collect();
                let outs = self
                    .hub
                    .on_message(m, wire(Msg::Usage { segs: segs.clone() }), None);
                // A segment the domain does not hold, reported with pages on it, is
                // retired again for the member (it missed the retirement).
                // So is a retired one it reports pages on for the first time (it
                // missed the retirement).
                let mut expect = Vec::new();
                if self.model.members.contains(&m) {
                    let mut known: Vec<u64> = self
                        .model
                        .usage
                        .get(&m)
                        .map(|r| r.keys().copied().collect())
                        .unwrap_or_default();
                    for u in &segs {
                        let live = self.model.segs.contains_key(&u.id);
                        let retiring = self.model.retiring.contains_key(&u.id);
                        let missed = retiring && !known.contains(&u.id);
                        if (!live && !retiring || missed) && u.pages > 0 {
                            expect.push(Out {
                                to: m,
                                msg: Msg::Retire { id: u.id },
                                segment: None,
                            });
                        }
                        if live || retiring {
                            if retiring && u.pages == 0 {
                                known.retain(|&k| k != u.id);
                            } else {
                                known.push(u.id);
                            }
                        }
                    }
                }
                assert_eq!(outs, expect, "a usage report's answer");
                if self.model.members.contains(&m) {
                    self.model.active.insert(m);
                    let r = self.model.usage.entry(m).or_default();
                    for u in segs {
                        if self.model.segs.contains_key(&u.id) {
                            r.insert(u.id, u);
                        } else if self.model.retiring.contains_key(&u.id) {
                            // No pages on a retired segment: the member let it go.
                            if u.pages == 0 {
                                r.remove(&u.id);
                            } else {
                                r.insert(u.id, u);
                            }
                        }
                    }
                    self.model.forget_unmapped_retiring();
                }
            }
            Op::ScanDone(w) => {
                let Some(m) = self.who(*w) else { return };
                let outs = self.hub.on_message(m, wire(Msg::ScanDone), None);
                self.check_outs(&outs);
                if !self.model.members.contains(&m) {
                    assert!(outs.is_empty());
                    return;
                }
                self.model.active.insert(m);
                let rest = self.retired_as_expected(outs);
                assert!(rest.is_empty(), "a scan-done answered with {rest:?}");
            }
            Op::StatsQuery(w) => {
                let Some(m) = self.who(*w) else { return };
                let outs = self.hub.on_message(m, wire(Msg::StatsQuery), None);
                self.check_outs(&outs);
                if self.model.members.contains(&m) {
                    assert_eq!(
                        outs,
                        vec![Out {
                            to: m,
                            msg: Msg::Stats(self.model.stats()),
                            segment: None
                        }]
                    );
                } else {
                    assert!(outs.is_empty());
                }
            }
            Op::BrokerOnly(w, k) => {
                let Some(m) = self.who(*w) else { return };
                let (msg, seg) = match k % 6 {
                    0 => (
                        Msg::Hello {
                            version: VERSION,
                            page: PAGE,
                            name: "d".into(),
                        },
                        None,
                    ),
                    1 => (
                        Msg::Welcome {
                            member: m,
                            members: 1,
                        },
                        None,
                    ),
                    2 => (
                        Msg::Segment {
                            id: seg_id(*k),
                            frames: 1,
                            publisher: m,
                            sums: vec![*k as u32],
                        },
                        Some(seg_id(*k)),
                    ),
                    3 => (
                        Msg::PleasePublish {
                            members: 1,
                            sums: vec![sum(*k)],
                        },
                        None,
                    ),
                    4 => (Msg::Retire { id: seg_id(*k) }, None),
                    _ => (Msg::Stats(DomainStats::default()), None),
                };
                let outs = self.hub.on_message(m, wire(msg), seg);
                assert!(outs.is_empty(), "a broker's message answered: {outs:?}");
                if self.model.members.contains(&m) {
                    self.model.refused += 1;
                }
            }
            Op::Refuse => {
                self.hub.refuse();
                self.model.refused += 1;
            }
        }
    }

    fn check(&self) {
        self.hub.check_invariants();
        assert_eq!(self.hub.members(), self.model.members.len());
        assert_eq!(
            self.hub.segment_ids(),
            self.model.segs.keys().copied().collect::<Vec<_>>(),
            "segments held"
        );
        assert_eq!(self.hub.stats(), self.model.stats(), "statistics");
        assert_eq!(
            self.hub.holding(),
            !self.model.held.is_empty(),
            "claims held"
        );
        // At most one member is asked for a checksum (a map), and it is a live one.
        for m in self.model.asked.values() {
            assert!(self.model.members.contains(m), "asked of member {m}, gone");
        }
    }
}

pub fn run(input: &Input) {
    let mut h = Harness {
        hub: Hub::new(PAGE),
        model: Model::default(),
    };
    h.check();
    for op in &input.ops {
        h.apply(op);
        h.check();
    }
}

/// Run raw fuzzer bytes (for use without libFuzzer).
pub fn run_bytes(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}
