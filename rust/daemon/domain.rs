//! The engine's side of a merge domain: joining and leaving, and the exchange
//! with the domain at every batch boundary (see `domain::client` for the thread
//! that talks to the broker, `scan::domain` for what the algorithm does).
//!
//! Rules kept here:
//! * Nothing blocks on the domain under the state lock: the exchange only takes
//!   the link's inbox and fills its outbox. Dropping a link (which joins its
//!   thread) happens after the state lock is released.
//! * A segment taken from the domain is first checked by the link's thread
//!   (sealed memfd of the claimed size; its checksums, which the broker checked
//!   against its bytes, are keys only), then its frames enter the index and its
//!   read-only view is handed to the Os.
//! * Segments we publish are built from our own pages' bytes, read as every visit
//!   reads them (ksm's own memory directly, other memory fault-safely), written
//!   into a new memfd and sealed before any other process can see it. A page that
//!   cannot be read is left out; a segment that cannot be built or sealed is not
//!   sent (counted), and nothing else changes.

#![forbid(unsafe_code)]

use std::ffi::CStr;

use super::{Engine, State};
use crate::domain::broker::RETIRE_AGE;
use crate::domain::client::{Inbound, Link, LinkStats, Outbound, SegmentView, Spawner};
use crate::domain::proto::{self, Msg, SegUsage, BITMAP_WORDS};
use crate::error::{Error, Result};
use crate::scan::{page_checksum, Mem, Queued};
use crate::sys::memfd::Memfd;

/// Name of the memfds of segments this process publishes (seen in /proc/PID/maps).
pub const SEGMENT_NAME: &CStr = c"ksm-segment";

/// What a member knows of its domain, for statistics.
#[derive(Clone, Debug, Default)]
pub struct MemberStats {
    pub name: Option<String>,
    pub link: LinkStats,
    /// Segments this process holds (retired ones still mapped included).
    pub segments: u64,
    /// Pages of this process that map frames of segments.
    pub pages: u64,
    pub announced: u64,
    pub published: u64,
    /// Pages moved off retired segments (compaction), to merge again.
    pub evicted: u64,
    /// Segments that could not be built or sealed (their pages stay as they were).
    pub publish_failures: u64,
    pub last_error: Option<String>,
}

/// Rung by the domain's thread when something arrives (a segment, a request to
/// publish): a scanner that pauses between full scans (see `Engine::idle_pause`)
/// starts its next batch at once.
fn ring_scanner() {
    if let Some(e) = super::ENGINE.get() {
        e.wake.notify_all();
    }
}

impl Engine {
    /// Join domain `name` (see the Python `ksm.join`). Joining the same name again
    /// does nothing; another name while joined is refused.
    pub fn join(&'static self, name: &str, spawner: Spawner) -> Result<()> {
        if let Some(e) = proto::name_error(name) {
            return Err(Error::Value(e));
        }
        let mut st = self.lock();
        match &st.domain {
            Some(l) if l.name() == name => return Ok(()),
            Some(l) => {
                return Err(Error::State(format!(
                    "this process is in domain {:?}: call ksm.leave() before joining {name:?}",
                    l.name()
                )))
            }
            None => {}
        }
        if let super::Availability::Unavailable(why) = self.availability() {
            return Err(Error::errno(
                libc::EINVAL,
                format!("merging is not available in this process: {why}"),
            ));
        }
        let link = Link::start(name, spawner, ring_scanner)
            .map_err(|e| Error::io("joining a merge domain", e))?;
        st.core.join_domain();
        st.domain = Some(link);
        st.publish_failures = 0;
        // New frames may come: the scanner's next full scan is not a settled one.
        self.wake.notify_all();
        Ok(())
    }

    /// Leave the domain, if in one: pages merged with other members stay merged
    /// (their frames cannot change), no new merge with them starts.
    pub fn leave(&self) {
        let link = {
            let mut st = self.lock();
            let link = st.domain.take();
            st.core.leave_domain();
            Self::drop_unmapped_segments(&mut st);
            link
        };
        // Joins the link's thread: outside the state lock.
        drop(link);
    }

    /// A round trip to the domain's broker (see `Link::ask_sync`), waiting at most
    /// `timeout` without holding the state lock: the domain's statistics, or None if
    /// in no domain or no broker answered.
    pub fn domain_sync(&self, timeout: std::time::Duration) -> Option<proto::DomainStats> {
        let (ticket, syncer) = {
            let st = self.lock();
            let link = st.domain.as_ref()?;
            (link.ask_sync(), link.syncer())
        };
        syncer.wait(ticket, timeout)
    }

    /// The domain joined, if any.
    pub fn domain(&self) -> Option<String> {
        self.lock().domain.as_ref().map(|l| l.name().to_owned())
    }

    /// This member's figures of its domain.
    pub fn member_stats(&self) -> MemberStats {
        let st = self.lock();
        let (segments, pages) = st.core.frames().domain_totals();
        let c = st.core.domain_counters();
        MemberStats {
            name: st.domain.as_ref().map(|l| l.name().to_owned()),
            link: st.domain.as_ref().map(Link::stats).unwrap_or_default(),
            segments: segments as u64,
            pages,
            announced: c.announced,
            published: c.published,
            evicted: c.evicted,
            publish_failures: st.publish_failures,
            last_error: st.domain.as_ref().and_then(Link::last_error),
        }
    }

    /// Before a batch: take in what the domain said (segments enter the index before
    /// the pages that may merge onto them are visited).
    pub(super) fn domain_take_in(st: &mut State) {
        let Some(link) = &st.domain else {
            return;
        };
        st.core.set_domain_connected(link.broker_expected());
        // Consecutive asks to publish are taken in together: each call may read every
        // page record once (see `Core::domain_wants`).
        let mut wants: Option<(u32, Vec<u32>)> = None;
        for m in link.take() {
            if !matches!(m, Inbound::PleasePublish(..)) {
                if let Some((members, sums)) = wants.take() {
                    st.core.domain_wants(members, &sums);
                }
            }
            match m {
                Inbound::Connected { first } => {
                    // A new broker knows nothing of our segments yet: report in full.
                    st.usage_reported = (0, 0);
                    st.usage_scan_done.clear();
                    st.usage_aged = false;
                    st.usage_scan_done_totals = (0, 0);
                    if !first {
                        st.core.domain_connected();
                    }
                }
                Inbound::Segment(view) => {
                    if let Some(f0) = st.core.add_segment(view.id, &view.sums) {
                        st.core.mem.add_segment(f0, view);
                    }
                }
                Inbound::PleasePublish(members, sums) => match &mut wants {
                    Some((m, all)) => {
                        *m = members;
                        all.extend(sums);
                    }
                    None => wants = Some((members, sums)),
                },
                Inbound::Retire(id) => st.core.retire_segment(id, true),
            }
        }
        if let Some((members, sums)) = wants {
            st.core.domain_wants(members, &sums);
        }
        Self::drop_unmapped_segments(st);
    }

    /// After a batch: send what it found (candidates to announce, pages to publish).
    pub(super) fn domain_send_out(st: &mut State) {
        if st.domain.is_none() {
            return;
        }
        let found = st.core.take_domain_out();
        let mut out: Vec<Outbound> = found
            .announce
            .chunks(proto::MAX_SUMS)
            .map(|c| Outbound::Msg(Msg::Announce { sums: c.to_vec() }))
            .chain(
                found
                    .claim
                    .chunks(proto::MAX_SUMS)
                    .map(|c| Outbound::Msg(Msg::Claim { sums: c.to_vec() })),
            )
            .chain(
                found
                    .decline
                    .chunks(proto::MAX_SUMS)
                    .map(|c| Outbound::Msg(Msg::Decline { sums: c.to_vec() })),
            )
            .collect();
        if !found.publish.is_empty() {
            let asked = found.asked;
            match Self::build_segment(st, &found.publish) {
                Ok(Some((memfd, sums))) => {
                    let decline = st.core.domain_published(&asked, Some(&sums));
                    if !decline.is_empty() {
                        out.push(Outbound::Msg(Msg::Decline { sums: decline }));
                    }
                    // Taken in at once: merging inside this process does not wait for
                    // the broker (nor stops when none answers). The broker's copy of
                    // it, when it comes back, is recognised and dropped.
                    match Self::own_view(&memfd, &sums, st.core.page_size()) {
                        Ok(view) => {
                            if let Some(f0) = st.core.add_segment(view.id, &view.sums) {
                                st.core.mem.add_segment(f0, view);
                            }
                        }
                        Err(_) => st.publish_failures += 1,
                    }
                    out.push(Outbound::Publish(memfd, sums));
                }
                Ok(None) => {
                    let decline = st.core.domain_published(&asked, Some(&[]));
                    if !decline.is_empty() {
                        out.push(Outbound::Msg(Msg::Decline { sums: decline }));
                    }
                }
                // Not built (no memory, no seal): asked for again at a later visit.
                Err(_) => {
                    st.publish_failures += 1;
                    st.core.domain_published(&asked, None);
                }
            }
        }
        if let Some(link) = &st.domain {
            link.send(out);
        }
        Self::send_usage(st, false);
    }

    /// At the end of a full scan: tell the domain how much of each segment we map.
    pub(super) fn domain_report(st: &mut State) {
        Self::send_usage(st, true);
    }

    /// Tell the domain how much of each segment we map: after a batch that changed it,
    /// so that the domain's figures follow merging closely, and at the end of a full
    /// scan (`ScanDone`, which lets the broker age and retire segments) when the
    /// report differs from the last one sent with `ScanDone`. Ages are reported up to
    /// the broker's retirement age only (older is the same to it), so a settled member
    /// sends nothing, however fast it scans.
    fn send_usage(st: &mut State, scan_done: bool) {
        let Some(link) = &st.domain else {
            return;
        };
        // What the report is made from: the segments held, and every change of which
        // frames our pages map (a page moving from one segment to another leaves the
        // totals as they were, not this count).
        let totals = (
            st.core.frames().domain_totals().0 as u64,
            st.core.frames().domain_changes(),
        );
        if scan_done {
            // Unchanged since the last report with `ScanDone`, every age past retirement:
            // nothing to say, nor to compute (a settled scan stays as cheap as outside a
            // domain).
            if st.usage_aged && totals == st.usage_scan_done_totals {
                return;
            }
        } else if totals == st.usage_reported {
            return;
        }
        st.usage_reported = totals;
        let usage: Vec<SegUsage> = st
            .core
            .frames()
            .segment_usage()
            .into_iter()
            .map(|(id, pages, age, mapped)| {
                let mut bits = [0u64; BITMAP_WORDS];
                for (i, _) in mapped.iter().enumerate().filter(|(_, &m)| m) {
                    bits[i / 64] |= 1 << (i % 64);
                }
                SegUsage {
                    id,
                    pages: u32::try_from(pages).unwrap_or(u32::MAX),
                    age: age.min(RETIRE_AGE),
                    mapped: bits,
                }
            })
            .collect();
        if scan_done {
            st.usage_aged = usage.iter().all(|u| u.age >= RETIRE_AGE);
            st.usage_scan_done_totals = totals;
            if usage == st.usage_scan_done {
                return;
            }
        }
        let mut out: Vec<Outbound> = usage
            .chunks(proto::MAX_USAGE)
            .map(|c| Outbound::Msg(Msg::Usage { segs: c.to_vec() }))
            .collect();
        if scan_done {
            out.push(Outbound::Msg(Msg::ScanDone));
            st.usage_scan_done = usage;
        }
        link.send(out);
    }

    /// Unmap the retired segments no page of ours maps any more.
    /// The domain is told (a report of no pages on each), so that it stops counting
    /// their memory once no member maps them.
    fn drop_unmapped_segments(st: &mut State) {
        let gone = st.core.drop_unmapped_segments();
        for &(_, f0) in &gone {
            st.core.mem.drop_segment(f0);
        }
        if let (Some(link), false) = (&st.domain, gone.is_empty()) {
            let none = |&(id, _): &(u64, crate::pool::FrameId)| SegUsage {
                id,
                pages: 0,
                age: 0,
                mapped: [0; BITMAP_WORDS],
            };
            link.send(gone.chunks(proto::MAX_USAGE).map(|c| {
                Outbound::Msg(Msg::Usage {
                    segs: c.iter().map(none).collect(),
                })
            }));
        }
    }

    /// A read-only view of a segment we just sealed, to take it in ourselves.
    fn own_view(memfd: &Memfd, sums: &[u32], page: usize) -> std::io::Result<SegmentView> {
        let memfd = memfd.try_clone()?;
        let size = sums.len() * page;
        let view = crate::sys::mman::Mapping::read_only_view(memfd.raw(), size)?;
        let (_, id) = memfd.identity()?;
        Ok(SegmentView {
            id,
            frames: sums.len() as u32,
            sums: sums.to_vec(),
            own: true,
            memfd,
            view,
        })
    }

    /// A sealed segment holding the bytes of `pages` (address, owned, checksum) as they
    /// are now, in that order, with their checksums; None if no page could be read.
    fn build_segment(
        st: &mut State,
        pages: &[Queued],
    ) -> std::io::Result<Option<(Memfd, Vec<u32>)>> {
        let page = st.core.page_size();
        // Page by page into the file: no buffer of the segment's size (a large buffer
        // freed again would stay in the allocator's heap, memory every member pays).
        let memfd = Memfd::create_sealable(SEGMENT_NAME, (pages.len() * page) as u64)?;
        let mut sums = Vec::with_capacity(pages.len());
        let mut buf = vec![0u8; page];
        for &(addr, owned, _) in pages {
            // Read now: the bytes may have changed since the visit. Whatever they are,
            // a page merges onto a frame only after comparing equal to it.
            if st.core.mem.read(addr, owned, &mut buf).is_ok() {
                memfd.write_at((sums.len() * page) as u64, &buf)?;
                sums.push(page_checksum(&buf));
            }
        }
        if sums.is_empty() {
            return Ok(None);
        }
        // Pages that could not be read leave no hole: the file ends after the last.
        memfd.set_len((sums.len() * page) as u64)?;
        memfd.seal()?;
        Ok(Some((memfd, sums)))
    }
}
