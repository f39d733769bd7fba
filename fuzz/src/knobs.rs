//! `knobs`: `Knobs::set` on any name and value, against the table of what each
//! knob accepts (`knobs::KNOBS`, the kernel's ranges, docs/kernel-contract.md,
//! “Knobs”).
//!
//! Checked after every call: an unknown name is an attribute error and nothing
//! changes; a value in the knob's range (an int in `lo..=hi`, 0/1 for on/off
//! knobs, "none"/"scan-time" with an optional trailing newline for the mode) is
//! taken and reads back; anything else is a value error that names the knob and
//! the accepted values, and changes nothing. Never a panic.

use arbitrary::{Arbitrary, Unstructured};
use ksm::daemon::knobs::{self, Kind, Knobs, Value};
use ksm::error::Error;

#[derive(Arbitrary, Debug, Clone)]
pub enum Name {
    /// One of the knobs (index modulo their count).
    Known(u8),
    /// Any string.
    Other(String),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Val {
    Int(i64),
    /// Near a boundary of the knob: `lo`/`hi` plus a small offset.
    NearLo(i8),
    NearHi(i8),
    Str(String),
    Mode(bool, bool),
}

#[derive(Arbitrary, Debug, Clone)]
pub struct Input {
    pub ops: Vec<(Name, Val)>,
}

pub fn run(input: &Input) {
    let mut k = Knobs::default();
    for (name, val) in &input.ops {
        let name = match name {
            Name::Known(i) => knobs::KNOBS[usize::from(*i) % knobs::KNOBS.len()]
                .0
                .to_string(),
            Name::Other(s) => s.clone(),
        };
        let kind = knobs::kind(&name);
        let (lo, hi) = match kind {
            Ok(Kind::Int { lo, hi }) => (lo, hi),
            _ => (0, 1),
        };
        let value = match val {
            Val::Int(v) => Value::Int(*v),
            Val::NearLo(d) => Value::Int(lo.saturating_add(i64::from(*d))),
            Val::NearHi(d) => Value::Int(hi.saturating_add(i64::from(*d))),
            Val::Str(s) => Value::Str(s.clone()),
            Val::Mode(scan, nl) => Value::Str(format!(
                "{}{}",
                if *scan { "scan-time" } else { "none" },
                if *nl { "\n" } else { "" }
            )),
        };
        let before = k;
        let r = k.set(&name, &value);
        let Ok(kind) = kind else {
            assert!(matches!(r, Err(Error::Attribute(_))), "{name:?}: {r:?}");
            assert_eq!(k, before);
            continue;
        };
        let accepted = match (kind, &value) {
            (Kind::Int { lo, hi }, Value::Int(v)) => (lo..=hi).contains(v),
            (Kind::Bool, Value::Int(v)) => *v == 0 || *v == 1,
            (Kind::Mode, Value::Str(s)) => {
                matches!(s.strip_suffix('\n').unwrap_or(s), "none" | "scan-time")
            }
            _ => false,
        };
        if accepted {
            assert!(r.is_ok(), "{name} = {value:?} refused: {r:?}");
            let got = k.get(&name).expect("a knob reads back");
            match (&value, &got) {
                (Value::Int(v), Value::Int(g)) => assert_eq!(v, g, "{name}"),
                (Value::Str(s), Value::Str(g)) => {
                    assert_eq!(s.strip_suffix('\n').unwrap_or(s), g, "{name}")
                }
                _ => panic!("{name}: {value:?} read back as {got:?}"),
            }
        } else {
            match &r {
                Err(Error::Value(m)) => {
                    assert!(
                        m.contains(&name) && m.contains(&knobs::accepted(&name)),
                        "{m}"
                    )
                }
                other => panic!("{name} = {value:?}: {other:?}"),
            }
            assert_eq!(
                k, before,
                "{name} = {value:?} refused but changed the knobs"
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
