//! `frame_table`: `FrameTable` against a model of reference counts and forks.
//!
//! The model does not copy the implementation's epochs: it marks a frame
//! `exposed` when a fork happens while the frame is live (a child may map it)
//! and clears every mark at `quiet()`. The fork rule is then: a frame whose
//! last reference goes while it is exposed is `Deferred` (its bytes are kept),
//! otherwise `Free`; deferred frames come back from `quiet()` and only then
//! may be handed out again. Operations only use the API within its documented
//! preconditions (decref a referenced frame, discard a fresh unreferenced one).

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::{Arbitrary, Unstructured};
use ksm::pool::{FrameId, FrameTable, Release};

#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    /// Index keys are 32-bit checksums.
    Alloc {
        hash: u32,
    },
    /// Add a reference to the `i`-th live frame (modulo).
    Incref {
        i: u8,
    },
    /// Drop a reference from the `i`-th referenced frame (modulo).
    Decref {
        i: u8,
    },
    /// Abandon the `i`-th fresh (allocated, never referenced) frame (modulo).
    Discard {
        i: u8,
    },
    Fork,
    Quiet,
    /// Give back the free ids at the end of the table (the engine does this between
    /// operations, once no freed frame's key is still needed).
    Trim,
}

/// Parsed as the setup, then operations until the bytes run out (derived
/// `Vec` parsing would stop after a couple of operations on random bytes).
#[derive(Debug, Clone)]
pub struct Input {
    /// Capacity 1..=64.
    pub capacity: u8,
    pub ops: Vec<Op>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let capacity = u8::arbitrary(u)?;
        let ops = u.arbitrary_iter()?.collect::<arbitrary::Result<_>>()?;
        Ok(Input { capacity, ops })
    }

    fn arbitrary_take_rest(mut u: Unstructured<'a>) -> arbitrary::Result<Self> {
        let capacity = u8::arbitrary(&mut u)?;
        let mut ops = Vec::new();
        while !u.is_empty() {
            ops.push(Op::arbitrary(&mut u)?);
        }
        Ok(Input { capacity, ops })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Handed out; `fresh` until its first reference.
    Live {
        refs: u32,
        fresh: bool,
        exposed: bool,
        hash: u64,
    },
    /// Unreferenced but held back for a child.
    Deferred,
}

struct Model {
    capacity: u32,
    /// Frames not free (absent = free or never allocated).
    slots: BTreeMap<FrameId, Slot>,
    /// A fork happened since the last `quiet()`.
    forked: bool,
}

impl Model {
    fn nth(&self, i: u8, pred: impl Fn(&Slot) -> bool) -> Option<FrameId> {
        let v: Vec<FrameId> = self
            .slots
            .iter()
            .filter(|(_, s)| pred(s))
            .map(|(&f, _)| f)
            .collect();
        (!v.is_empty()).then(|| v[usize::from(i) % v.len()])
    }
}

fn check(t: &FrameTable, m: &Model, trimmed: bool) {
    assert_eq!(t.live() as usize, m.slots.len(), "live frames");
    let deferred = m.slots.values().filter(|s| **s == Slot::Deferred).count();
    assert_eq!(t.deferred(), deferred, "deferred frames");
    assert_eq!(t.needs_quiet_check(), m.forked, "needs_quiet_check");
    for (&f, s) in &m.slots {
        match *s {
            Slot::Live { refs, hash, .. } => {
                assert_eq!(t.refs(f), refs, "refs of frame {f}");
                assert_eq!(t.hash(f), hash, "hash of frame {f}");
            }
            Slot::Deferred => assert_eq!(t.refs(f), 0, "refs of deferred frame {f}"),
        }
    }
    // Trimmed, the table ends at its last frame handed out: the free ids at its end
    // are given back, all the memory once no frame is live.
    let end = m.slots.keys().next_back().map_or(0, |&f| f as usize + 1);
    assert!(t.len() >= end, "table shorter than its frames");
    if trimmed {
        assert_eq!(t.len(), end, "table length after trim");
        if m.slots.is_empty() {
            assert_eq!(t.metadata_bytes(), 0, "memory kept with no frame live");
        }
    }
}

pub fn run(input: &Input) {
    let capacity = 1 + u32::from(input.capacity % 64);
    let mut t = FrameTable::new(capacity);
    let mut m = Model {
        capacity,
        slots: BTreeMap::new(),
        forked: false,
    };
    for op in &input.ops {
        match *op {
            Op::Alloc { hash } => match t.alloc(u64::from(hash)) {
                Some(f) => {
                    assert!(f < m.capacity, "frame {f} beyond capacity {}", m.capacity);
                    let prev = m.slots.insert(
                        f,
                        Slot::Live {
                            refs: 0,
                            fresh: true,
                            exposed: false,
                            hash: u64::from(hash),
                        },
                    );
                    assert!(prev.is_none(), "frame {f} handed out while {prev:?}");
                }
                None => assert_eq!(
                    m.slots.len() as u32,
                    m.capacity,
                    "alloc failed with free frames"
                ),
            },
            Op::Incref { i } => {
                if let Some(f) = m.nth(i, |s| matches!(s, Slot::Live { .. })) {
                    let n = t.incref(f);
                    let Some(Slot::Live { refs, fresh, .. }) = m.slots.get_mut(&f) else {
                        unreachable!()
                    };
                    *refs += 1;
                    *fresh = false;
                    assert_eq!(n, *refs, "incref result");
                }
            }
            Op::Decref { i } => {
                if let Some(f) = m.nth(i, |s| matches!(s, Slot::Live { refs, .. } if *refs > 0)) {
                    let r = t.decref(f);
                    let Some(Slot::Live { refs, exposed, .. }) = m.slots.get_mut(&f) else {
                        unreachable!()
                    };
                    *refs -= 1;
                    let expect = if *refs > 0 {
                        Release::Kept
                    } else if *exposed {
                        m.slots.insert(f, Slot::Deferred);
                        Release::Deferred
                    } else {
                        m.slots.remove(&f);
                        Release::Free(f)
                    };
                    assert_eq!(r, expect, "decref of frame {f}");
                }
            }
            Op::Discard { i } => {
                if let Some(f) = m.nth(i, |s| matches!(s, Slot::Live { fresh: true, .. })) {
                    t.discard(f);
                    m.slots.remove(&f);
                }
            }
            Op::Fork => {
                t.on_fork();
                m.forked = true;
                for s in m.slots.values_mut() {
                    if let Slot::Live { exposed, .. } = s {
                        *exposed = true;
                    }
                }
            }
            Op::Quiet => {
                let got: Vec<FrameId> = t.quiet();
                let set: BTreeSet<FrameId> = got.iter().copied().collect();
                assert_eq!(set.len(), got.len(), "quiet() returned a frame twice");
                let want: BTreeSet<FrameId> = m
                    .slots
                    .iter()
                    .filter(|(_, s)| **s == Slot::Deferred)
                    .map(|(&f, _)| f)
                    .collect();
                assert_eq!(set, want, "frames released by quiet()");
                m.slots.retain(|_, s| *s != Slot::Deferred);
                m.forked = false;
                for s in m.slots.values_mut() {
                    if let Slot::Live { exposed, .. } = s {
                        *exposed = false;
                    }
                }
            }
            Op::Trim => t.trim(),
        }
        check(&t, &m, matches!(op, Op::Trim));
    }
}

/// Run raw fuzzer bytes (for use without libFuzzer).
pub fn run_bytes(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}
