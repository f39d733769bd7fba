//! Helpers shared by the unit tests.

#![forbid(unsafe_code)]

/// A small deterministic generator (xorshift64): the same sequence for the same
/// seed (not 0), for model tests that want many spread values without a crate.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}
