//! Run fuzz inputs without libFuzzer, printing each as parsed:
//! `cargo run --release --example replay -- <merge_model|frame_table|uffd_msg> FILE...`
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
            t => panic!("unknown target {t}"),
        }
        println!("ok");
    }
}
