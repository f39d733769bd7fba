//! The frame offset under each covered page of a region, kept as runs.
//!
//! A covered page (`IN_POOL`) lies inside a mapping of the frame pool, so the
//! offset under it goes up by one from page to page for as long as the mapping
//! lasts: neighbouring covered pages of one mapping make one run of 10 bytes
//! (first page, first offset, length up to 65,535 pages). A page written inside a
//! merged copy is covered, so memory whose merged pages are then written has up to
//! one covered page in two; pages written at random there average two pages a run,
//! 5 bytes a page, where a hash map took ~18 bytes each (and 12-byte runs 6).
//!
//! The runs live in two sorted vectors: `runs`, rebuilt by [`Covered::compact`],
//! and `recent`, the runs added since, held to about the square root of `runs`'
//! length, so that adding a run costs a short move in `recent` plus its share of
//! the next rebuild. Lookups search both. A run emptied by removals stays in `runs`
//! with length 0 until the next rebuild; every run, empty or not, ends at or before
//! the next one's first page, which is what makes the binary search exact.

#![forbid(unsafe_code)]

use crate::pool::FrameId;

/// Pages `first .. first + len` of the region cover frame offsets
/// `frame .. frame + len`. 10 bytes: a run holds at most `MAX_LEN` pages (a longer
/// stretch is several runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, packed(2))]
struct Run {
    first: u32,
    frame: FrameId,
    len: u16,
}

/// Most pages in a run.
const MAX_LEN: u32 = u16::MAX as u32;

/// A run length known to be no longer than a run's (a part of one).
fn part(n: u32) -> u16 {
    u16::try_from(n).expect("a part of a run")
}

impl Run {
    fn len(&self) -> u32 {
        u32::from(self.len)
    }

    fn end(&self) -> u32 {
        self.first + self.len()
    }

    /// `frame + len`: the offset page `end()` would cover to continue the run.
    fn frame_end(&self) -> Option<FrameId> {
        self.frame.checked_add(self.len())
    }

    /// Whether one more page fits.
    fn has_room(&self) -> bool {
        self.len() < MAX_LEN
    }
}

/// Runs added since the last rebuild, at least (a rebuild of a short `runs` is cheap).
const RECENT_MIN: usize = 64;

/// Frame offsets under covered pages, by page index (see the module's text).
#[derive(Clone, Debug, Default)]
pub struct Covered {
    runs: Vec<Run>,
    recent: Vec<Run>,
    /// Runs of length 0 in `runs`.
    empty: usize,
    /// Pages covered.
    pages: usize,
}

/// The run of `v` (sorted, each ending at or before the next one's start) that may
/// hold page `i`: the last one starting at or before it.
fn last_at_or_before(v: &[Run], i: u32) -> Option<usize> {
    v.partition_point(|r| r.first <= i).checked_sub(1)
}

/// The offset under page `i` if a run of `v` holds it.
fn find(v: &[Run], i: u32) -> Option<(usize, FrameId)> {
    let k = last_at_or_before(v, i)?;
    let r = v[k];
    (i - r.first < r.len()).then(|| (k, r.frame + (i - r.first)))
}

/// Page `i` (held by no run) joins a run of `v` that it continues at either end
/// with offset `g`, keeping `v` sorted and its runs apart. False if none.
fn extend(v: &mut [Run], i: u32, g: FrameId) -> bool {
    let k = v.partition_point(|r| r.first <= i);
    if let Some(p) = k.checked_sub(1) {
        let prev = v[p];
        let next_clear = v.get(k).is_none_or(|n| n.first > i);
        if prev.len > 0
            && prev.has_room()
            && prev.end() == i
            && prev.frame_end() == Some(g)
            && next_clear
        {
            v[p].len += 1;
            return true;
        }
    }
    if let Some(next) = v.get(k).copied() {
        let prev_clear = k == 0 || v[k - 1].end() <= i;
        if next.len > 0
            && next.has_room()
            && next.first == i + 1
            && g.checked_add(1) == Some(next.frame)
            && prev_clear
        {
            v[k] = Run {
                first: i,
                len: next.len + 1,
                frame: g,
            };
            return true;
        }
    }
    false
}

impl Covered {
    /// The frame offset under page `i`, if it is covered.
    pub fn get(&self, i: u32) -> Option<FrameId> {
        find(&self.runs, i)
            .or_else(|| find(&self.recent, i))
            .map(|(_, g)| g)
    }

    /// Pages covered.
    pub fn len(&self) -> usize {
        self.pages
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Page `i` covers frame offset `g` (replacing what it covered).
    pub fn insert(&mut self, i: u32, g: FrameId) {
        self.remove(i);
        self.pages += 1;
        if extend(&mut self.runs, i, g) || extend(&mut self.recent, i, g) {
            return;
        }
        let k = self.recent.partition_point(|r| r.first < i);
        self.recent.insert(
            k,
            Run {
                first: i,
                len: 1,
                frame: g,
            },
        );
        self.compact_if_due();
    }

    /// Rebuild `runs` once `recent` outgrew the square root of its length, or a
    /// quarter of it is empty runs.
    fn compact_if_due(&mut self) {
        if self.empty > RECENT_MIN.max(self.runs.len() / 4)
            || self.recent.len() > RECENT_MIN.max(self.runs.len().isqrt())
        {
            self.compact();
        }
    }

    /// Page `i` covers nothing any more; what it covered, if anything.
    pub fn remove(&mut self, i: u32) -> Option<FrameId> {
        let g = self.take(i);
        if g.is_some() && self.pages == 0 {
            // Nothing covered: nothing held.
            *self = Covered::default();
        }
        g
    }

    fn take(&mut self, i: u32) -> Option<FrameId> {
        if let Some((k, g)) = find(&self.runs, i) {
            self.pages -= 1;
            let r = self.runs[k];
            let tail = Run {
                first: i + 1,
                len: part(r.end() - i - 1),
                frame: g.wrapping_add(1),
            };
            if i == r.first {
                // The run loses its first page: it starts one later, or is empty.
                self.runs[k] = tail;
                if tail.len == 0 {
                    self.empty += 1;
                }
            } else {
                self.runs[k].len = part(i - r.first);
                if tail.len > 0 {
                    // Its pages after `i` go to `recent`, in order.
                    let at = self.recent.partition_point(|x| x.first < tail.first);
                    self.recent.insert(at, tail);
                }
            }
            self.compact_if_due();
            return Some(g);
        }
        let (k, g) = find(&self.recent, i)?;
        self.pages -= 1;
        let r = self.recent[k];
        let head = Run {
            len: part(i - r.first),
            ..r
        };
        let tail = Run {
            first: i + 1,
            len: part(r.end() - i - 1),
            frame: g.wrapping_add(1),
        };
        match (head.len, tail.len) {
            (0, 0) => {
                self.recent.remove(k);
            }
            (0, _) => self.recent[k] = tail,
            (_, 0) => self.recent[k] = head,
            _ => {
                self.recent[k] = head;
                self.recent.insert(k + 1, tail);
            }
        }
        Some(g)
    }

    /// Rebuild `runs` from both vectors: empty runs dropped, runs that continue each
    /// other joined, and room for exactly what is left.
    pub fn compact(&mut self) {
        let mut out: Vec<Run> =
            Vec::with_capacity(self.runs.len() - self.empty + self.recent.len());
        let mut a = self.runs.iter().filter(|r| r.len > 0).peekable();
        let mut b = self.recent.iter().peekable();
        loop {
            let r = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.first < y.first => a.next(),
                (Some(_), Some(_)) | (None, Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, None) => break,
            };
            let r = *r.expect("peeked");
            match out.last_mut() {
                Some(last)
                    if last.end() == r.first
                        && last.frame_end() == Some(r.frame)
                        && last.len() + r.len() <= MAX_LEN =>
                {
                    last.len += r.len;
                }
                _ => out.push(r),
            }
        }
        out.shrink_to_fit();
        self.runs = out;
        self.recent = Vec::new();
        self.empty = 0;
    }

    /// Every frame offset under a covered page.
    pub fn frames(&self) -> impl Iterator<Item = FrameId> + '_ {
        self.runs().flat_map(|(_, n, g)| (0..n).map(move |k| g + k))
    }

    /// The runs of covered pages, `(first page, pages, offset under the first)`, in
    /// no particular order; runs that continue each other may come apart.
    pub fn runs(&self) -> impl Iterator<Item = (u32, u32, FrameId)> + '_ {
        self.runs
            .iter()
            .chain(&self.recent)
            .filter(|r| r.len > 0)
            .map(|r| (r.first, r.len(), r.frame))
    }

    /// Split off the pages from index `at` on, renumbered from 0.
    pub fn split_off(&mut self, at: u32) -> Covered {
        self.compact();
        let k = self.runs.partition_point(|r| r.first < at);
        let mut tail = self.runs.split_off(k);
        if let Some(last) = self.runs.last_mut() {
            if last.end() > at {
                let cut = at - last.first;
                tail.insert(
                    0,
                    Run {
                        first: at,
                        len: part(last.len() - cut),
                        frame: last.frame + cut,
                    },
                );
                last.len = part(cut);
            }
        }
        for r in &mut tail {
            r.first -= at;
        }
        self.runs.shrink_to_fit();
        let moved: usize = tail.iter().map(|r| r.len() as usize).sum();
        self.pages -= moved;
        Covered {
            runs: tail,
            recent: Vec::new(),
            empty: 0,
            pages: moved,
        }
    }

    /// Bytes held (by capacity).
    pub fn metadata_bytes(&self) -> usize {
        (self.runs.capacity() + self.recent.capacity()) * size_of::<Run>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Checks `c` against the model, page by page and as a whole.
    fn check(c: &Covered, model: &BTreeMap<u32, FrameId>, pages: u32) {
        for i in 0..pages {
            assert_eq!(c.get(i), model.get(&i).copied(), "page {i}");
        }
        assert_eq!(c.len(), model.len());
        let mut frames: Vec<_> = c.frames().collect();
        let mut want: Vec<_> = model.values().copied().collect();
        frames.sort_unstable();
        want.sort_unstable();
        assert_eq!(frames, want);
        for v in [&c.runs, &c.recent] {
            assert!(v.windows(2).all(|w| w[0].end() <= w[1].first), "{v:?}");
        }
        assert_eq!(c.runs.iter().filter(|r| r.len == 0).count(), c.empty);
    }

    #[test]
    fn neighbouring_pages_of_one_mapping_make_one_run() {
        let mut c = Covered::default();
        for i in 100..1100 {
            c.insert(i, 5000 + i);
        }
        assert_eq!(c.runs.len() + c.recent.len(), 1);
        assert_eq!(c.get(600), Some(5600));
        c.compact();
        assert_eq!(c.metadata_bytes(), 10);
        // Backwards too, and a run is cut where the offsets jump.
        let mut c = Covered::default();
        for i in (0..10).rev() {
            c.insert(i, 70 + i);
        }
        c.insert(10, 7);
        assert_eq!(c.runs.len() + c.recent.len(), 2);
        assert_eq!((c.get(9), c.get(10)), (Some(79), Some(7)));
    }

    #[test]
    fn half_the_pages_at_random_cost_about_5_bytes_each() {
        // A 128 MiB copy with one page in two written at random: ~8,192 runs of
        // 16,384 pages.
        let mut c = Covered::default();
        let mut next = crate::testing::xorshift(0x9E37_79B9_7F4A_7C15);
        let mut n = 0;
        for i in 0..32768u32 {
            if next() & 1 == 1 {
                c.insert(i, i);
                n += 1;
            }
        }
        c.compact();
        let per_page = c.metadata_bytes() as f64 / n as f64;
        assert!((4.0..6.0).contains(&per_page), "{per_page} bytes a page");
    }

    #[test]
    fn a_stretch_longer_than_a_run_holds_is_two_runs() {
        let mut c = Covered::default();
        for i in 0..70_000 {
            c.insert(i, 1_000 + i);
        }
        c.compact();
        assert_eq!(c.runs.len(), 2);
        assert_eq!(c.runs[0].len(), MAX_LEN);
        for i in [0, 65_534, 65_535, 65_536, 69_999] {
            assert_eq!(c.get(i), Some(1_000 + i));
        }
        assert_eq!((c.len(), c.frames().count()), (70_000, 70_000));
        assert_eq!(c.remove(65_535), Some(66_535));
        c.compact();
        let tail = c.split_off(66_000);
        assert_eq!((c.len(), tail.len()), (65_999, 4_000));
        assert_eq!(tail.get(3_999), Some(70_999));
    }

    #[test]
    fn random_inserts_and_removals_match_a_map() {
        for seed in 1..=40u64 {
            let mut c = Covered::default();
            let mut model = BTreeMap::new();
            let mut next = crate::testing::xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let pages = 64 + (seed as u32 % 4) * 300;
            for step in 0..3000 {
                let r = next();
                let i = (r % u64::from(pages)) as u32;
                match (r >> 32) % 8 {
                    // Mostly offsets that continue a mapping, sometimes not.
                    0..=3 => {
                        let g = if (r >> 40) % 4 == 0 {
                            (r >> 44) as u32 % 64
                        } else {
                            1000 + i
                        };
                        c.insert(i, g);
                        model.insert(i, g);
                    }
                    4..=6 => assert_eq!(c.remove(i), model.remove(&i), "seed {seed} step {step}"),
                    _ => {
                        if step % 5 == 0 {
                            let at = (r >> 40) as u32 % pages;
                            let tail = c.split_off(at);
                            let tail_model: BTreeMap<u32, FrameId> = model
                                .split_off(&at)
                                .into_iter()
                                .map(|(k, v)| (k - at, v))
                                .collect();
                            check(&tail, &tail_model, pages - at);
                            // Put the tail back, page by page.
                            for (&k, &v) in &tail_model {
                                c.insert(k + at, v);
                                model.insert(k + at, v);
                            }
                        } else {
                            c.compact();
                        }
                    }
                }
                if step % 97 == 0 {
                    check(&c, &model, pages);
                }
            }
            check(&c, &model, pages);
        }
    }

    #[test]
    fn removing_every_page_in_order_leaves_nothing_held() {
        let mut c = Covered::default();
        for i in 0..5000 {
            c.insert(i, if i % 3 == 0 { 9 } else { 100 + i });
        }
        for i in 0..5000 {
            assert!(c.remove(i).is_some());
        }
        assert!(c.is_empty());
        assert_eq!(c.metadata_bytes(), 0);
    }

    #[test]
    fn offsets_near_the_top_of_the_id_space_do_not_overflow() {
        let mut c = Covered::default();
        c.insert(0, FrameId::MAX);
        c.insert(1, 0);
        c.insert(3, FrameId::MAX);
        c.insert(2, FrameId::MAX - 1);
        assert_eq!(c.get(0), Some(FrameId::MAX));
        assert_eq!(c.get(1), Some(0));
        assert_eq!(c.get(2), Some(FrameId::MAX - 1));
        assert_eq!(c.get(3), Some(FrameId::MAX));
        c.compact();
        assert_eq!(c.frames().count(), 4);
        assert_eq!(c.remove(0), Some(FrameId::MAX));
        assert_eq!(c.remove(3), Some(FrameId::MAX));
        assert_eq!((c.get(1), c.get(2)), (Some(0), Some(FrameId::MAX - 1)));
    }
}
