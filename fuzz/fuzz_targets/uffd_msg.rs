#![no_main]
//! See `ksm_fuzz::uffd_msg` (fuzz/src/uffd_msg.rs) for what this target checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: ksm_fuzz::uffd_msg::Input| ksm_fuzz::uffd_msg::run(&input));
