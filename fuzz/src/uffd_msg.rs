//! `uffd_msg`: `Msg::decode` on any 32 bytes never panics and round-trips with
//! an independent encoder written from `struct uffd_msg` (<linux/userfaultfd.h>):
//! re-encoding a decoded message over its own bytes gives them back (no field lost
//! or moved), and a message built from fields decodes to itself.
//!
//! Layout: `__u8 event; __u8 reserved1; __u16 reserved2; __u32 reserved3;`
//! then the union at offset 8: pagefault `{__u64 flags; __u64 address; __u32 ptid}`,
//! fork `{__u32 ufd}`, remap `{__u64 from, to, len}`, remove/unmap `{__u64 start, end}`.

use arbitrary::{Arbitrary, Unstructured};
use ksm::sys::uffd::{
    Msg, EVENT_FORK, EVENT_PAGEFAULT, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP, MSG_SIZE,
};

#[derive(Arbitrary, Debug, Clone)]
pub struct Input {
    /// Raw message bytes, as read(2) from the userfaultfd returns them.
    pub raw: [u8; MSG_SIZE],
    /// A message built from fields, then encoded.
    pub built: Built,
    /// Bytes for the reserved/unused parts of the encoding of `built`.
    pub filler: [u8; MSG_SIZE],
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Built {
    PageFault { addr: u64, flags: u64, tid: u32 },
    Fork { fd: u32 },
    Remap { from: u64, to: u64, len: u64 },
    Remove { start: u64, end: u64 },
    Unmap { start: u64, end: u64 },
    Unknown { event: u8 },
}

fn put(b: &mut [u8; MSG_SIZE], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

/// Encode a message into `b`, leaving the bytes it does not use as they are.
fn encode(m: &Msg, b: &mut [u8; MSG_SIZE]) {
    match *m {
        Msg::PageFault { addr, flags, tid } => {
            b[0] = EVENT_PAGEFAULT;
            put(b, 8, &flags.to_ne_bytes());
            put(b, 16, &addr.to_ne_bytes());
            put(b, 24, &tid.to_ne_bytes());
        }
        Msg::Fork { fd } => {
            b[0] = EVENT_FORK;
            put(b, 8, &fd.to_ne_bytes());
        }
        Msg::Remap { from, to, len } => {
            b[0] = EVENT_REMAP;
            put(b, 8, &from.to_ne_bytes());
            put(b, 16, &to.to_ne_bytes());
            put(b, 24, &len.to_ne_bytes());
        }
        Msg::Remove { start, end } => {
            b[0] = EVENT_REMOVE;
            put(b, 8, &start.to_ne_bytes());
            put(b, 16, &end.to_ne_bytes());
        }
        Msg::Unmap { start, end } => {
            b[0] = EVENT_UNMAP;
            put(b, 8, &start.to_ne_bytes());
            put(b, 16, &end.to_ne_bytes());
        }
        Msg::Unknown { event } => b[0] = event,
    }
}

fn known(event: u8) -> bool {
    matches!(
        event,
        EVENT_PAGEFAULT | EVENT_FORK | EVENT_REMAP | EVENT_REMOVE | EVENT_UNMAP
    )
}

pub fn run(input: &Input) {
    // 1. Any bytes decode without panicking.
    let raw = &input.raw;
    let m = Msg::decode(raw);
    // 2. Re-encoding over the same bytes gives the same bytes (nothing lost or moved).
    let mut again = *raw;
    encode(&m, &mut again);
    assert_eq!(&again, raw, "encode(decode(b)) != b");
    // 3. A message built from fields, encoded over arbitrary filler, decodes to itself.
    let built = match input.built {
        Built::PageFault { addr, flags, tid } => Msg::PageFault { addr, flags, tid },
        Built::Fork { fd } => Msg::Fork { fd },
        Built::Remap { from, to, len } => Msg::Remap { from, to, len },
        Built::Remove { start, end } => Msg::Remove { start, end },
        Built::Unmap { start, end } => Msg::Unmap { start, end },
        // An unknown event must stay unknown (a known code would decode as that event).
        Built::Unknown { event } if known(event) => Msg::Unknown { event: 0 },
        Built::Unknown { event } => Msg::Unknown { event },
    };
    let mut b = input.filler;
    encode(&built, &mut b);
    assert_eq!(Msg::decode(&b), built, "decode(encode(m)) != m");
}

/// Run raw fuzzer bytes (for use without libFuzzer).
pub fn run_bytes(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}
