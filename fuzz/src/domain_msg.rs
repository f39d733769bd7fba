//! `domain_msg`: the merge domain's decoder (`ksm::domain::proto::decode`) on any
//! bytes and any descriptor count.
//!
//! Checked:
//! * `decode` never panics, whatever the packet and descriptor count;
//! * whatever decodes re-encodes (`Msg::encode`) to exactly the packet (no field
//!   lost, moved or normalised), and carries exactly `Msg::fds()` descriptors;
//! * what decodes keeps the rules a well-formed message obeys: lists no longer
//!   than a packet holds, a `Publish` of 1..=`SEGMENT_FRAMES` frames with one
//!   checksum each, a `Segment` of 1..=`SEGMENT_FRAMES` frames;
//! * a message built from arbitrary fields (lists up to the most a packet holds)
//!   encodes within `MAX_MESSAGE`, decodes to itself with its descriptor count
//!   and is refused with any other count; every strict prefix of it is refused,
//!   and so is it with a byte appended;
//! * the built message's packet with one byte changed, cut, or grown decodes only
//!   to a message that re-encodes to the changed packet;
//! * a packet longer than `MAX_MESSAGE` is refused, even one that starts with a
//!   whole well-formed message.

use arbitrary::{Arbitrary, Unstructured};
use ksm::domain::proto::{
    decode, DomainStats, Msg, SegUsage, BITMAP_WORDS, MAX_MESSAGE, MAX_SUMS, MAX_USAGE,
    SEGMENT_FRAMES,
};

/// A list of checksums: as given, or `n` of them (up to the most a packet holds)
/// drawn from `seed`.
#[derive(Arbitrary, Debug, Clone)]
pub enum Sums {
    Given(Vec<u32>),
    Many { n: u16, seed: u32 },
}

impl Sums {
    fn list(&self, max: usize) -> Vec<u32> {
        match self {
            Sums::Given(v) => v.iter().copied().take(max).collect(),
            Sums::Many { n, seed } => {
                let n = usize::from(*n) % (max + 1);
                let mut x = u64::from(*seed) | 1;
                (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u32
                    })
                    .collect()
            }
        }
    }
}

/// One segment's usage, built from fields: `bits` in word `word` of the bitmap,
/// or every word from `fill` if `full`.
#[derive(Arbitrary, Debug, Clone)]
pub struct Use {
    pub id: u64,
    pub pages: u32,
    pub age: u32,
    pub word: u8,
    pub bits: u64,
    pub full: bool,
}

impl Use {
    fn seg(&self) -> SegUsage {
        let mut mapped = [0u64; BITMAP_WORDS];
        if self.full {
            for (i, w) in mapped.iter_mut().enumerate() {
                *w = self.bits.rotate_left(i as u32);
            }
        } else {
            mapped[usize::from(self.word) % BITMAP_WORDS] = self.bits;
        }
        SegUsage {
            id: self.id,
            pages: self.pages,
            age: self.age,
            mapped,
        }
    }
}

/// A message built from fields (made well-formed: lists cut to what a packet
/// holds, a `Publish` with one checksum per frame).
#[derive(Arbitrary, Debug, Clone)]
pub enum Built {
    Hello {
        version: u16,
        page: u32,
        name: String,
    },
    Announce(Sums),
    Publish(Sums),
    Decline(Sums),
    /// `n` usages (up to `MAX_USAGE`) repeating `uses` with their ids counted up.
    Usage {
        uses: Vec<Use>,
        n: Option<u8>,
    },
    ScanDone,
    StatsQuery,
    Welcome {
        member: u32,
        members: u32,
    },
    Segment {
        id: u64,
        frames: u16,
        publisher: u32,
        seed: u32,
    },
    PleasePublish {
        members: u32,
        sums: Sums,
    },
    Retire {
        id: u64,
    },
    Stats {
        members: u32,
        v: [u64; 6],
        segments: u32,
    },
}

impl Built {
    fn msg(&self) -> Msg {
        match self {
            Built::Hello {
                version,
                page,
                name,
            } => {
                // At most 255 bytes, cut on a character boundary.
                let mut end = name.len().min(255);
                while !name.is_char_boundary(end) {
                    end -= 1;
                }
                Msg::Hello {
                    version: *version,
                    page: *page,
                    name: name[..end].to_owned(),
                }
            }
            Built::Announce(s) => Msg::Announce {
                sums: s.list(MAX_SUMS),
            },
            Built::Publish(s) => {
                let mut sums = s.list(SEGMENT_FRAMES as usize);
                if sums.is_empty() {
                    sums.push(0);
                }
                Msg::Publish {
                    frames: sums.len() as u32,
                    sums,
                }
            }
            Built::Decline(s) => Msg::Decline {
                sums: s.list(MAX_SUMS),
            },
            Built::Usage { uses, n } => {
                let segs: Vec<SegUsage> = match n {
                    Some(n) if !uses.is_empty() => (0..usize::from(*n) % (MAX_USAGE + 1))
                        .map(|i| {
                            let mut s = uses[i % uses.len()].seg();
                            s.id = s.id.wrapping_add(i as u64);
                            s
                        })
                        .collect(),
                    _ => uses.iter().take(MAX_USAGE).map(Use::seg).collect(),
                };
                Msg::Usage { segs }
            }
            Built::ScanDone => Msg::ScanDone,
            Built::StatsQuery => Msg::StatsQuery,
            Built::Welcome { member, members } => Msg::Welcome {
                member: *member,
                members: *members,
            },
            Built::Segment {
                id,
                frames,
                publisher,
                seed,
            } => {
                let frames = 1 + u32::from(*frames) % SEGMENT_FRAMES;
                Msg::Segment {
                    id: *id,
                    frames,
                    publisher: *publisher,
                    sums: (0..frames).map(|i| i.wrapping_mul(*seed | 1)).collect(),
                }
            }
            Built::PleasePublish { members, sums } => Msg::PleasePublish {
                members: *members,
                sums: sums.list(MAX_SUMS),
            },
            Built::Retire { id } => Msg::Retire { id: *id },
            Built::Stats {
                members,
                v,
                segments,
            } => Msg::Stats(DomainStats {
                members: *members,
                pages_shared: v[0],
                pages_sharing: v[1],
                pool_bytes: v[2],
                live_frames: v[3],
                segments_retired: v[4],
                refused: v[5],
                segments: *segments,
            }),
        }
    }
}

/// A change to the built message's packet.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Change {
    /// Byte `at` (modulo the length) set to `to`.
    Set { at: u16, to: u8 },
    /// Byte `at` (modulo the length) xor-ed with `x`.
    Flip { at: u16, x: u8 },
    /// Cut to `len` (modulo the length) bytes.
    Cut { len: u16 },
    /// `n` bytes of `b` appended.
    Grow { n: u8, b: u8 },
}

#[derive(Debug, Clone)]
pub struct Input {
    /// Descriptors that came with `raw` (0..=3).
    pub fds: u8,
    pub built: Built,
    pub change: Change,
    /// Also decode a packet of `MAX_MESSAGE + 1 + n` bytes starting with the built
    /// message's packet.
    pub long: Option<u8>,
    /// A packet as received.
    pub raw: Vec<u8>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Input {
            raw: Vec::<u8>::arbitrary(u)?,
            fds: u8::arbitrary(u)?,
            built: Built::arbitrary(u)?,
            change: Change::arbitrary(u)?,
            long: Option::<u8>::arbitrary(u)?,
        })
    }

    fn arbitrary_take_rest(mut u: Unstructured<'a>) -> arbitrary::Result<Self> {
        // The raw packet first, so that libFuzzer's mutations of the input's start
        // reach the decoder directly.
        let raw_len = usize::from(u16::arbitrary(&mut u)?);
        let raw = u.bytes(raw_len.min(u.len()))?.to_vec();
        Ok(Input {
            raw,
            fds: u8::arbitrary(&mut u)?,
            built: Built::arbitrary(&mut u)?,
            change: Change::arbitrary(&mut u)?,
            long: Option::<u8>::arbitrary(&mut u)?,
        })
    }
}

/// Decode `packet` with `fds` descriptors; if it decodes, check it is the packet's
/// one reading (re-encodes to the same bytes) and obeys the message rules.
fn decode_checked(packet: &[u8], fds: usize) -> Option<Msg> {
    let m = decode(packet, fds).ok()?;
    assert!(
        packet.len() <= MAX_MESSAGE,
        "a packet over MAX_MESSAGE taken"
    );
    assert_eq!(m.fds(), fds, "{m:?} decoded with {fds} descriptors");
    assert_eq!(m.encode(), packet, "encode(decode(p)) != p for {m:?}");
    match &m {
        Msg::Hello { name, .. } => assert!(name.len() <= 255),
        Msg::Announce { sums } | Msg::Decline { sums } | Msg::PleasePublish { sums, .. } => {
            assert!(sums.len() <= MAX_SUMS)
        }
        Msg::Publish { frames, sums } => {
            assert!((1..=SEGMENT_FRAMES).contains(frames), "{frames} frames");
            assert_eq!(sums.len(), *frames as usize, "one checksum per frame");
        }
        Msg::Usage { segs } => assert!(segs.len() <= MAX_USAGE),
        Msg::Segment { frames, sums, .. } => {
            assert!((1..=SEGMENT_FRAMES).contains(frames), "{frames} frames");
            assert_eq!(sums.len(), *frames as usize, "one checksum per frame");
        }
        _ => {}
    }
    Some(m)
}

pub fn run(input: &Input) {
    // 1. Any bytes, any descriptor count.
    let fds = usize::from(input.fds % 4);
    decode_checked(&input.raw, fds);

    // 2. A message built from fields round-trips, with its descriptors only.
    let m = input.built.msg();
    let b = m.encode();
    assert!(b.len() <= MAX_MESSAGE, "{} bytes encoded", b.len());
    assert_eq!(decode_checked(&b, m.fds()), Some(m.clone()), "round trip");
    for other in 0..3 {
        if other != m.fds() {
            assert!(decode(&b, other).is_err(), "{m:?} taken with {other} fds");
        }
    }
    // Every strict prefix is short of something; one byte more is trailing.
    // (All prefixes of a long packet would cost a quadratic time: a sample.)
    let step = (b.len() / 64).max(1);
    for cut in (0..b.len()).step_by(step).chain(b.len().checked_sub(1)) {
        assert!(decode(&b[..cut], m.fds()).is_err(), "{m:?} cut at {cut}");
    }
    let mut grown = b.clone();
    grown.push(0);
    assert!(
        decode(&grown, m.fds()).is_err(),
        "{m:?} with a trailing byte"
    );

    // 3. The packet changed: whatever still decodes is that packet's one reading.
    let mut p = b.clone();
    match input.change {
        Change::Set { at, to } => {
            let i = usize::from(at) % p.len();
            p[i] = to;
        }
        Change::Flip { at, x } => {
            let i = usize::from(at) % p.len();
            p[i] ^= x;
        }
        Change::Cut { len } => p.truncate(usize::from(len) % p.len()),
        Change::Grow { n, b } => p.extend(std::iter::repeat_n(b, usize::from(n))),
    }
    for f in 0..3 {
        decode_checked(&p, f);
    }

    // 4. Over MAX_MESSAGE: refused, even after a well-formed message.
    if let Some(n) = input.long {
        let mut long = b;
        long.resize(MAX_MESSAGE + 1 + usize::from(n), n);
        for f in 0..3 {
            assert!(
                decode(&long, f).is_err(),
                "a packet of {} bytes",
                long.len()
            );
        }
    }
}

/// Run raw fuzzer bytes (for use without libFuzzer).
pub fn run_bytes(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}
