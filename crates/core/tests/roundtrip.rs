//! DESIGN §4.8: the controller is stateless; it stores the whole model in the target's registry (as JSON) and
//! rebuilds it on the next command. The rebuilt model must be identical and behave identically.

mod common;

use common::*;
use relive_core::{
    Error, FORMAT_VERSION, FuncId, FuncSpec, Model, ObjectId, ObjectSpec, PatchSpec, Range, ThreadStack, Tid,
};

fn exe() -> ObjectId {
    ObjectId::from_build_id("abc123")
        .with_soname("libsvc.so.1")
        .with_path("/usr/lib/libsvc.so.1")
}

fn spec(name: &str, func: &str, old: Range, new: Range) -> PatchSpec {
    PatchSpec::new(name).object(ObjectSpec::new(exe()).func(FuncSpec::new(func, old, new)))
}

/// A model in the middle of a stalled replace transition over a stacked pair, with stubs and threads.
fn busy_model() -> Sim {
    let mut sim = Sim::new();
    sim.spawn(1, ThreadStack::reliable(vec![0x9000, 0x8000]));
    sim.spawn(2, ThreadStack::reliable(vec![0x9000, 0x8000]));
    let (f_old, g_old) = (Range::new(0x1000, 0x1100), Range::new(0x2000, 0x2100));
    sim.load_and_settle(spec("a", "f", f_old, Range::new(0x10_0000, 0x10_0100)).state(7, 1));
    sim.load_and_settle(spec("b", "f", f_old, Range::new(0x20_0000, 0x20_0100)).stacking(true));
    sim.model
        .register_stub(&FuncId::new(exe(), "f", 0), Range::new(0x7000, 0x7040))
        .unwrap();
    sim.set_stack(2, ThreadStack::reliable(vec![0x20_0010, 0x8000]));
    sim.load(
        spec("r", "g", g_old, Range::new(0x30_0000, 0x30_0100))
            .replace(true)
            .state(7, 2),
    )
    .unwrap();
    assert!(!sim.settle());
    sim
}

#[test]
fn serde_model_round_trips_through_json_mid_transition() {
    let sim = busy_model();
    let json = serde_json::to_string(&sim.model).unwrap();
    let back: Model = serde_json::from_str(&json).unwrap();
    assert_eq!(back, sim.model);

    // Stable top-level field names, with the format version first.
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        json.starts_with(&format!(r#"{{"format_version":{FORMAT_VERSION},"#)),
        "{json}"
    );
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "coming",
            "format_version",
            "max_depth",
            "patches",
            "stacks",
            "stubs",
            "threads",
            "tls_image",
            "transition"
        ]
    );
    assert_eq!(v["format_version"], FORMAT_VERSION);
    assert_eq!(v["transition"]["target"], "patched");
    assert_eq!(
        v["threads"]["patched"],
        serde_json::json!([1]),
        "threads are tid lists per state"
    );
    assert_eq!(v["threads"]["unpatched"], serde_json::json!([2]));
    assert_eq!(v["threads"]["pending"], serde_json::json!([2]));

    // The rebuilt model behaves exactly like the original.
    let mut a = sim.model.clone();
    let mut b = back;
    let stack = ThreadStack::reliable(vec![0x9000, 0x8000]);
    assert_eq!(a.try_switch(Tid(2), &stack), b.try_switch(Tid(2), &stack));
    assert_eq!(a.try_complete(), b.try_complete());
    assert!(a.transition().is_none());
    assert_eq!(a, b);
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap()
    );
}

#[test]
fn serde_rejects_an_unknown_format_version() {
    let sim = busy_model();
    let mut v: serde_json::Value = serde_json::to_value(&sim.model).unwrap();
    v["format_version"] = 99.into();
    let err = serde_json::from_value::<Model>(v).unwrap_err().to_string();
    let expected = Error::UnsupportedFormat {
        found: 99,
        supported: FORMAT_VERSION,
    }
    .to_string();
    assert!(err.contains(&expected), "{err}");
}

#[test]
fn serde_outputs_and_errors_serialize_for_json_output() {
    let mut m = Model::new();
    let out = m
        .enable(spec("a", "f", Range::new(1, 9), Range::new(100, 109)))
        .unwrap();
    let json = serde_json::to_string(&out).unwrap();
    assert!(json.contains(r#""event":"enabling_patch""#), "{json}");
    let err = m
        .check_enable(&spec("b", "f", Range::new(1, 9), Range::new(200, 209)))
        .unwrap_err();
    let json = serde_json::to_string(&err).unwrap();
    assert!(json.contains(r#""kind":"busy""#), "{json}");
    assert_eq!(serde_json::from_str::<Error>(&json).unwrap(), err);
}

#[test]
fn serde_rejects_inconsistent_thread_lists() {
    let sim = busy_model();
    let mut v: serde_json::Value = serde_json::to_value(&sim.model).unwrap();
    v["threads"]["idle"] = serde_json::json!([1]);
    let err = serde_json::from_value::<Model>(v.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("thread 1 is listed in two states"), "{err}");
    v["threads"]["idle"] = serde_json::json!([]);
    v["threads"]["pending"] = serde_json::json!([5]);
    let err = serde_json::from_value::<Model>(v).unwrap_err().to_string();
    assert!(err.contains("pending thread 5 has no state"), "{err}");
}
