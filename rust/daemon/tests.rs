//! The engine against the real kernel: merging under racing writers.
//!
//! This is the prototype's t1 race test (docs/design.md, "The mechanism")
//! run through the engine: a native writer thread stores counters into pages that
//! scans keep merging.
//! Every store is read back at once, so a store that landed on a page just
//! before it was replaced would be seen; at the end every frame must still hold
//! exactly the common content (a frame written through would differ).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

const PAGES: usize = 32;
const COUNTER: usize = 64; // byte offset of the counter in each page

/// Run until at least this many writes (2 million, or 1 million per `KSM_STRESS_SECONDS`
/// second for a longer run), giving up after a time limit well inside CI's minute.
fn target_writes() -> (u64, Duration) {
    match std::env::var("KSM_STRESS_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
    {
        Some(secs) => ((secs * 1e6) as u64, Duration::from_secs_f64(secs * 4.0)),
        None => (2_000_000, Duration::from_secs(40)),
    }
}

#[test]
fn no_write_is_lost_while_pages_merge() {
    let engine = Engine::get().unwrap();
    if let Availability::Unavailable(why) = engine.availability() {
        eprintln!("skipped: {why}");
        return;
    }
    let page = sys::page_size();
    let common: Vec<u8> = (0..page).map(|i| (i * 7 + 3) as u8).collect();
    let mem = Arc::new(Mapping::anonymous(PAGES * page).unwrap());
    for p in 0..PAGES {
        mem.copy_in(p * page, &common);
    }
    engine
        .madvise(mem.addr(), mem.len(), MADV_MERGEABLE)
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let before = engine.snapshot();
    let writer = {
        let (mem, stop, writes) = (mem.clone(), stop.clone(), writes.clone());
        let rest: [u8; 8] = common[COUNTER..COUNTER + 8].try_into().unwrap();
        std::thread::spawn(move || -> Result<Vec<u64>, String> {
            let mut last = vec![u64::from_ne_bytes(rest); PAGES];
            let (mut seed, mut k) = (0x9E37_79B9_7F4A_7C15u64, 0u64);
            let mut got = [0u8; 8];
            while !stop.load(Ordering::Relaxed) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let p = (seed % PAGES as u64) as usize;
                let off = p * page + COUNTER;
                k += 1;
                // Write a new value, read it back; then put the common bytes back so the
                // page becomes identical to the others again and can merge.
                for v in [k, u64::from_ne_bytes(rest)] {
                    mem.copy_in(off, &v.to_ne_bytes());
                    mem.copy_out(off, &mut got);
                    if u64::from_ne_bytes(got) != v {
                        return Err(format!(
                            "page {p}: wrote {v:#x}, read back {:#x}",
                            u64::from_ne_bytes(got)
                        ));
                    }
                    last[p] = v;
                    writes.fetch_add(1, Ordering::Relaxed);
                }
                // A pause, so that some pages stay identical long enough to merge.
                for _ in 0..(seed % 256) {
                    std::hint::spin_loop();
                }
            }
            Ok(last)
        })
    };
    let (target, limit) = target_writes();
    let deadline = Instant::now() + limit;
    while writes.load(Ordering::Relaxed) < target && Instant::now() < deadline {
        engine.scan(1).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let last = writer
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("lost write: {e}"));
    let during = engine.snapshot();

    let mut got = [0u8; 8];
    for (p, &v) in last.iter().enumerate() {
        mem.copy_out(p * page + COUNTER, &mut got);
        assert_eq!(u64::from_ne_bytes(got), v, "page {p}: final value lost");
    }
    for f in engine.frame_contents() {
        assert!(f == common, "a frame was modified");
    }
    let merges = during.merges - before.merges;
    let cows = during.cows - before.cows;
    let n = writes.load(Ordering::Relaxed);
    eprintln!("{n} writes, {merges} merges, {cows} copy-on-writes of merged pages, 0 lost");
    assert!(n >= target.min(1_000_000), "only {n} writes in {limit:?}");
    assert!(
        merges > 1000 && cows > 100,
        "too little merging to prove anything: {merges} merges, {cows} cows"
    );
    engine
        .madvise(mem.addr(), mem.len(), MADV_UNMERGEABLE)
        .unwrap();
    for p in 0..PAGES {
        let mut buf = vec![0u8; page];
        mem.copy_out(p * page, &mut buf);
        assert_eq!(&buf[..COUNTER], &common[..COUNTER]);
    }
}
