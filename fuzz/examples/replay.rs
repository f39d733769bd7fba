//! Run fuzz inputs without libFuzzer, printing each as parsed:
//! `cargo run --release --example replay -- <TARGET> FILE...`
//! (from fuzz/). A failing input panics with the broken assertion.

use arbitrary::{Arbitrary, Unstructured};

fn show<'a, T: Arbitrary<'a> + std::fmt::Debug>(data: &'a [u8]) {
    match T::arbitrary_take_rest(Unstructured::new(data)) {
        Ok(input) => println!("{input:#?}"),
        Err(e) => println!("(not parsed: {e})"),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().expect("usage: replay TARGET FILE...");
    for path in args {
        let data = std::fs::read(&path).expect("readable input");
        println!("== {path}");
        match target.as_str() {
            "merge_model" => {
                show::<ksm_fuzz::merge_model::Input>(&data);
                ksm_fuzz::merge_model::run_bytes(&data);
            }
            "frame_table" => {
                show::<ksm_fuzz::frame_table::Input>(&data);
                ksm_fuzz::frame_table::run_bytes(&data);
            }
            "uffd_msg" => {
                show::<ksm_fuzz::uffd_msg::Input>(&data);
                ksm_fuzz::uffd_msg::run_bytes(&data);
            }
            "knobs" => {
                show::<ksm_fuzz::knobs::Input>(&data);
                ksm_fuzz::knobs::run_bytes(&data);
            }
            "domain_msg" => {
                show::<ksm_fuzz::domain_msg::Input>(&data);
                ksm_fuzz::domain_msg::run_bytes(&data);
            }
            "domain_hub" => {
                show::<ksm_fuzz::domain_hub::Input>(&data);
                ksm_fuzz::domain_hub::run_bytes(&data);
            }
            t => panic!("unknown target {t}"),
        }
        println!("ok");
    }
}
