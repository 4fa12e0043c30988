//! `Workflow::from_json` on arbitrary bytes: validation must never panic, and whatever it accepts
//! must survive a serialise → parse round trip with the same graph and the same hashes.

#![no_main]

use std::collections::BTreeMap;

use comfyfleet_core::{InputOverrides, Workflow};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = Workflow::from_json(text);
    // The serde path (how the HTTP API and the stores read a workflow) agrees with from_json.
    let via_serde = serde_json::from_str::<Workflow>(text);
    assert_eq!(
        parsed.is_ok(),
        via_serde.is_ok(),
        "from_json and Deserialize disagree"
    );
    let Ok(wf) = parsed else {
        return;
    };
    assert_eq!(Some(&wf), via_serde.as_ref().ok());

    // Round trip through the wire form.
    let json = serde_json::to_string(&wf).expect("a validated graph serialises");
    let again = Workflow::from_json(&json).expect("a serialised workflow parses again");
    assert_eq!(wf.structure_hash(), again.structure_hash());
    assert_eq!(wf.content_hash(), again.content_hash());
    assert_eq!(wf, again);
    let from_value = Workflow::from_value(wf.to_value()).expect("to_value validates");
    assert_eq!(wf, from_value);

    // Cheap accessors and their promises.
    assert!(!wf.is_empty());
    let ids = wf.node_ids();
    assert_eq!(ids.len(), wf.len());
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "node_ids sorted");
    for id in &ids {
        let class = wf.class_of(id).expect("every validated node has a class");
        assert!(!class.trim().is_empty());
    }
    assert!(!wf.required_classes().is_empty());
    for m in wf.referenced_models() {
        assert!(wf.class_of(&m.node).is_some());
    }

    // No overrides: the same workflow; a widget value (not a link) never changes the structure.
    assert_eq!(wf.with_overrides(&InputOverrides::new()).as_ref(), Ok(&wf));
    let first = ids[0].clone();
    let overrides: InputOverrides = BTreeMap::from([(
        first,
        BTreeMap::from([("__fuzz_widget".to_owned(), Value::from(7))]),
    )]);
    if let Ok(changed) = wf.with_overrides(&overrides) {
        assert_eq!(wf.structure_hash(), changed.structure_hash());
    }
});
