//! The messages of a merge domain: what members and their broker say to each
//! other over a `SOCK_SEQPACKET` socket (one message per packet, so no framing).
//!
//! Encoding: one tag byte, then fixed little-endian fields and length-prefixed
//! lists. A packet is at most [`MAX_MESSAGE`] bytes; longer lists are sent as
//! several messages. Descriptors travel beside the bytes (`SCM_RIGHTS`); the
//! messages that carry one say so ([`Msg::fds`]).
//!
//! Nothing decoded here is trusted: [`decode`] refuses any packet that is not
//! exactly one well-formed message (unknown tag, short or trailing bytes, lists
//! longer than a packet can hold, a descriptor count that does not match), and
//! what a well-formed message claims (checksums, sizes, who holds what) is only
//! ever a hint that the receiver checks against bytes it reads itself.

#![forbid(unsafe_code)]

/// The protocol's version: a broker and a member of different versions refuse each other.
pub const VERSION: u16 = 3;

/// Largest packet (seqpacket sockets refuse messages over the socket's send
/// buffer, about 208 KiB by default; this stays well below).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Most checksums in one message (after its tag, a count and one more `u32`).
pub const MAX_SUMS: usize = (MAX_MESSAGE - 12) / 4;

/// Frames a segment holds at most (and the frame ids a member gives each segment).
pub const SEGMENT_FRAMES: u32 = 4096;

/// 64-bit words of a segment's frame bitmap.
pub const BITMAP_WORDS: usize = SEGMENT_FRAMES as usize / 64;

/// Most segments described in one [`Msg::Usage`].
pub const MAX_USAGE: usize = (MAX_MESSAGE - 8) / (8 + 4 + 4 + 8 * BITMAP_WORDS);

/// How much of a segment one member maps: the frames it maps (one bit each) and
/// how many of its pages map them in all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegUsage {
    /// The segment's identity (its inode number, which every process sees alike).
    pub id: u64,
    /// Pages of this member mapping frames of the segment.
    pub pages: u32,
    /// Full scans this member completed with the segment in its index.
    pub age: u32,
    /// Bit `i` set: frame `i` is mapped by at least one page of this member.
    pub mapped: [u64; BITMAP_WORDS],
}

/// Statistics of a domain, counted as the kernel counts its system-wide ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainStats {
    /// Processes joined now.
    pub members: u32,
    /// Frames mapped by at least one page of some member.
    pub pages_shared: u64,
    /// Σ over frames of (pages mapping it − 1), all members.
    pub pages_sharing: u64,
    /// Bytes of the segments the domain holds (frames mapped or not).
    pub pool_bytes: u64,
    /// Frames mapped by at least one page (the part of `pool_bytes` in use).
    pub live_frames: u64,
    /// Segments the domain holds.
    pub segments: u32,
    /// Segments given up because (almost) nothing mapped them any more.
    pub segments_retired: u64,
    /// Messages the broker refused (malformed, lying, or from a process it rejects).
    pub refused: u64,
}

/// One message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    // Member → broker.
    /// First message of a member: protocol version, page size, and the domain name.
    Hello {
        version: u16,
        page: u32,
        name: String,
    },
    /// Checksums of pages that are candidates for merging (nothing to merge with yet).
    Announce { sums: Vec<u32> },
    /// A new sealed segment (one descriptor) of `frames` frames, with their checksums
    /// as the publisher computed them (receivers compute their own).
    Publish { frames: u32, sums: Vec<u32> },
    /// Checksums the broker asked this member to publish that it no longer holds.
    Decline { sums: Vec<u32> },
    /// Checksums of contents this member holds twice or more itself: it may publish
    /// them unless another member does (the broker answers with `PleasePublish`).
    Claim { sums: Vec<u32> },
    /// How much of each segment this member maps (part of a report).
    Usage { segs: Vec<SegUsage> },
    /// A full scan ended: the report (the `Usage` messages before) is complete.
    ScanDone,
    /// Ask for the domain's statistics (members and non-members alike).
    StatsQuery,
    // Broker → member.
    /// Reply to `Hello`: the member's number in the domain and how many there are.
    Welcome { member: u32, members: u32 },
    /// A segment (one descriptor) of `frames` frames, published by member `publisher`,
    /// with its frames' checksums (the broker checked them against the sealed bytes;
    /// to a member they are keys for its index, hints as every claim: a page is
    /// remapped only after its bytes compare equal to the frame's).
    Segment {
        id: u64,
        frames: u32,
        publisher: u32,
        sums: Vec<u32>,
    },
    /// Publish frames with these checksums (another member holds the same candidates).
    /// `members`: how many members the domain has (it sets how many repeated pages a
    /// segment holds in place, see `broker::twin_run_max`).
    PleasePublish { members: u32, sums: Vec<u32> },
    /// Nobody maps this segment any more: forget it (pages still on it keep it).
    Retire { id: u64 },
    /// Reply to `StatsQuery`.
    Stats(DomainStats),
}

/// Why a packet was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    UnknownTag(u8),
    /// Fewer bytes than the message needs.
    Short,
    /// Bytes left over after the message.
    Trailing,
    /// A list longer than a packet can hold, or a count that does not match.
    BadLength,
    /// A name that is not UTF-8.
    BadName,
    /// The message needs a descriptor and has none, or has one it must not.
    Descriptors,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed domain message: {self:?}")
    }
}

impl Msg {
    /// Descriptors the message carries.
    pub fn fds(&self) -> usize {
        match self {
            Msg::Publish { .. } | Msg::Segment { .. } => 1,
            _ => 0,
        }
    }

    fn tag(&self) -> u8 {
        match self {
            Msg::Hello { .. } => 1,
            Msg::Announce { .. } => 2,
            Msg::Publish { .. } => 3,
            Msg::Decline { .. } => 4,
            Msg::Usage { .. } => 5,
            Msg::ScanDone => 6,
            Msg::StatsQuery => 7,
            Msg::Claim { .. } => 8,
            Msg::Welcome { .. } => 101,
            Msg::Segment { .. } => 102,
            Msg::PleasePublish { .. } => 103,
            Msg::Retire { .. } => 104,
            Msg::Stats(_) => 105,
        }
    }

    /// The packet's bytes. Panics if a list is longer than one packet holds (callers
    /// split lists with [`MAX_SUMS`] and [`MAX_USAGE`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![self.tag()];
        let sums = |b: &mut Vec<u8>, s: &[u32]| {
            assert!(s.len() <= MAX_SUMS, "list longer than a packet");
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            for x in s {
                b.extend_from_slice(&x.to_le_bytes());
            }
        };
        match self {
            Msg::Hello {
                version,
                page,
                name,
            } => {
                b.extend_from_slice(&version.to_le_bytes());
                b.extend_from_slice(&page.to_le_bytes());
                assert!(name.len() <= 255);
                b.push(name.len() as u8);
                b.extend_from_slice(name.as_bytes());
            }
            Msg::Announce { sums: s } | Msg::Decline { sums: s } | Msg::Claim { sums: s } => {
                sums(&mut b, s)
            }
            Msg::PleasePublish { members, sums: s } => {
                b.extend_from_slice(&members.to_le_bytes());
                sums(&mut b, s);
            }
            Msg::Publish { frames, sums: s } => {
                b.extend_from_slice(&frames.to_le_bytes());
                sums(&mut b, s);
            }
            Msg::Usage { segs } => {
                assert!(segs.len() <= MAX_USAGE, "list longer than a packet");
                b.extend_from_slice(&(segs.len() as u32).to_le_bytes());
                for s in segs {
                    b.extend_from_slice(&s.id.to_le_bytes());
                    b.extend_from_slice(&s.pages.to_le_bytes());
                    b.extend_from_slice(&s.age.to_le_bytes());
                    for w in &s.mapped {
                        b.extend_from_slice(&w.to_le_bytes());
                    }
                }
            }
            Msg::ScanDone | Msg::StatsQuery => {}
            Msg::Welcome { member, members } => {
                b.extend_from_slice(&member.to_le_bytes());
                b.extend_from_slice(&members.to_le_bytes());
            }
            Msg::Segment {
                id,
                frames,
                publisher,
                sums: s,
            } => {
                b.extend_from_slice(&id.to_le_bytes());
                b.extend_from_slice(&frames.to_le_bytes());
                b.extend_from_slice(&publisher.to_le_bytes());
                sums(&mut b, s);
            }
            Msg::Retire { id } => b.extend_from_slice(&id.to_le_bytes()),
            Msg::Stats(s) => {
                b.extend_from_slice(&s.members.to_le_bytes());
                for v in [
                    s.pages_shared,
                    s.pages_sharing,
                    s.pool_bytes,
                    s.live_frames,
                    s.segments_retired,
                    s.refused,
                ] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b.extend_from_slice(&s.segments.to_le_bytes());
            }
        }
        debug_assert!(b.len() <= MAX_MESSAGE);
        b
    }
}

/// A cursor over a packet's bytes.
struct Rd<'a>(&'a [u8]);

impl Rd<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Short);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// A count of items of `size` bytes each, checked against what is left.
    fn count(&mut self, size: usize, max: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > max || n.saturating_mul(size) > self.0.len() {
            return Err(DecodeError::BadLength);
        }
        Ok(n)
    }
    fn sums(&mut self) -> Result<Vec<u32>, DecodeError> {
        let n = self.count(4, MAX_SUMS)?;
        (0..n).map(|_| self.u32()).collect()
    }
}

/// Decode one packet that arrived with `fds` descriptors.
pub fn decode(packet: &[u8], fds: usize) -> Result<Msg, DecodeError> {
    if packet.len() > MAX_MESSAGE {
        return Err(DecodeError::BadLength);
    }
    let mut r = Rd(packet);
    let tag = r.u8().map_err(|_| DecodeError::Empty)?;
    let msg = match tag {
        1 => {
            let version = r.u16()?;
            let page = r.u32()?;
            let n = r.u8()? as usize;
            let name = std::str::from_utf8(r.take(n)?).map_err(|_| DecodeError::BadName)?;
            Msg::Hello {
                version,
                page,
                name: name.to_owned(),
            }
        }
        2 => Msg::Announce { sums: r.sums()? },
        3 => {
            let frames = r.u32()?;
            let sums = r.sums()?;
            if frames == 0 || frames > SEGMENT_FRAMES || sums.len() != frames as usize {
                return Err(DecodeError::BadLength);
            }
            Msg::Publish { frames, sums }
        }
        4 => Msg::Decline { sums: r.sums()? },
        5 => {
            let n = r.count(8 + 4 + 4 + 8 * BITMAP_WORDS, MAX_USAGE)?;
            let mut segs = Vec::with_capacity(n);
            for _ in 0..n {
                let id = r.u64()?;
                let pages = r.u32()?;
                let age = r.u32()?;
                let mut mapped = [0u64; BITMAP_WORDS];
                for w in &mut mapped {
                    *w = r.u64()?;
                }
                segs.push(SegUsage {
                    id,
                    pages,
                    age,
                    mapped,
                });
            }
            Msg::Usage { segs }
        }
        6 => Msg::ScanDone,
        7 => Msg::StatsQuery,
        8 => Msg::Claim { sums: r.sums()? },
        101 => Msg::Welcome {
            member: r.u32()?,
            members: r.u32()?,
        },
        102 => {
            let id = r.u64()?;
            let frames = r.u32()?;
            let publisher = r.u32()?;
            let sums = r.sums()?;
            if frames == 0 || frames > SEGMENT_FRAMES || sums.len() != frames as usize {
                return Err(DecodeError::BadLength);
            }
            Msg::Segment {
                id,
                frames,
                publisher,
                sums,
            }
        }
        103 => Msg::PleasePublish {
            members: r.u32()?,
            sums: r.sums()?,
        },
        104 => Msg::Retire { id: r.u64()? },
        105 => {
            let members = r.u32()?;
            let mut v = [0u64; 6];
            for x in &mut v {
                *x = r.u64()?;
            }
            let segments = r.u32()?;
            Msg::Stats(DomainStats {
                members,
                pages_shared: v[0],
                pages_sharing: v[1],
                pool_bytes: v[2],
                live_frames: v[3],
                segments_retired: v[4],
                refused: v[5],
                segments,
            })
        }
        t => return Err(DecodeError::UnknownTag(t)),
    };
    if !r.0.is_empty() {
        return Err(DecodeError::Trailing);
    }
    if msg.fds() != fds {
        return Err(DecodeError::Descriptors);
    }
    Ok(msg)
}

/// Why a domain name is refused, if it is: names become file names in a directory
/// of the user's, so they are plain, short, and never a path.
pub fn name_error(name: &str) -> Option<String> {
    let rule = "a domain name is 1 to 64 bytes, with no '/' or NUL, and not '.' or '..'";
    let what = if name.is_empty() {
        "is empty"
    } else if name.len() > 64 {
        "is longer than 64 bytes"
    } else if name.contains('/') {
        "contains '/'"
    } else if name.contains('\0') {
        "contains NUL"
    } else if name == "." || name == ".." {
        "is '.' or '..'"
    } else {
        return None;
    };
    Some(format!("domain name {name:?} {what}: {rule}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Msg> {
        let mut mapped = [0u64; BITMAP_WORDS];
        mapped[3] = 0xF0;
        vec![
            Msg::Hello {
                version: VERSION,
                page: 4096,
                name: "workers".into(),
            },
            Msg::Announce {
                sums: vec![1, 2, 3],
            },
            Msg::Publish {
                frames: 2,
                sums: vec![9, 8],
            },
            Msg::Decline { sums: vec![] },
            Msg::Claim { sums: vec![4, 5] },
            Msg::Usage {
                segs: vec![SegUsage {
                    id: 77,
                    pages: 12,
                    age: 3,
                    mapped,
                }],
            },
            Msg::ScanDone,
            Msg::StatsQuery,
            Msg::Welcome {
                member: 3,
                members: 4,
            },
            Msg::Segment {
                id: 5,
                frames: 4096,
                publisher: 2,
                sums: (0..4096).collect(),
            },
            Msg::PleasePublish {
                members: 16,
                sums: vec![u32::MAX],
            },
            Msg::Retire { id: u64::MAX },
            Msg::Stats(DomainStats {
                members: 2,
                pages_shared: 3,
                pages_sharing: 4,
                pool_bytes: 5,
                live_frames: 6,
                segments: 7,
                segments_retired: 8,
                refused: 9,
            }),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all() {
            let b = m.encode();
            assert!(b.len() <= MAX_MESSAGE);
            assert_eq!(decode(&b, m.fds()), Ok(m.clone()));
        }
    }

    #[test]
    fn lists_of_the_most_checksums_fit_a_packet() {
        let full = vec![7u32; MAX_SUMS];
        for m in [
            Msg::Announce { sums: full.clone() },
            Msg::PleasePublish {
                members: u32::MAX,
                sums: full.clone(),
            },
        ] {
            let b = m.encode();
            assert!(b.len() <= MAX_MESSAGE, "{} bytes", b.len());
            assert_eq!(decode(&b, 0), Ok(m));
        }
    }

    #[test]
    fn malformed_packets_are_refused() {
        for m in all() {
            let b = m.encode();
            for cut in 0..b.len() {
                assert!(decode(&b[..cut], m.fds()).is_err(), "{m:?} cut at {cut}");
            }
            let mut long = b.clone();
            long.push(0);
            assert_eq!(decode(&long, m.fds()), Err(DecodeError::Trailing));
            assert_eq!(decode(&b, m.fds() + 1), Err(DecodeError::Descriptors));
        }
        // A count claiming more than the packet holds.
        let mut b = vec![2u8];
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&b, 0), Err(DecodeError::BadLength));
        // A segment of 0 frames, or of more than a segment holds (one checksum each),
        // or with a checksum more or fewer than its frames.
        for (frames, n) in [
            (0u32, 0u32),
            (SEGMENT_FRAMES + 1, SEGMENT_FRAMES + 1),
            (2, 1),
            (2, 3),
        ] {
            let mut b = vec![102u8];
            b.extend_from_slice(&1u64.to_le_bytes());
            b.extend_from_slice(&frames.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
            (0..n).for_each(|c| b.extend_from_slice(&c.to_le_bytes()));
            assert_eq!(
                decode(&b, 1),
                Err(DecodeError::BadLength),
                "{frames} frames, {n} sums"
            );
        }
        assert_eq!(decode(&[200], 0), Err(DecodeError::UnknownTag(200)));
        assert_eq!(decode(&[], 0), Err(DecodeError::Empty));
    }

    #[test]
    fn names_follow_the_rules() {
        assert_eq!(name_error("workers"), None);
        assert_eq!(name_error(&"x".repeat(64)), None);
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(name_error(bad).is_some(), "{bad:?}");
        }
        assert!(name_error(&"x".repeat(65))
            .unwrap()
            .contains("longer than 64"));
    }
}
