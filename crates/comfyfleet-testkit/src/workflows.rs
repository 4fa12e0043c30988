//! Small API-format workflows for tests, benches and the demo.

use comfyfleet_core::Workflow;
use serde_json::json;

/// `EmptyImage → ImageInvert → SaveImage`, the shape of the recorded `invert` trace.
pub fn invert() -> Workflow {
    Workflow::from_value(json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "fleet"}}
    }))
    .expect("a fixed, valid workflow")
}

/// `EmptyImage → TestSleep(seconds) → ImageInvert → SaveImage`, like the recorded `slow` and
/// `long_sleep` workflows. The fake backend sleeps `seconds` in node 2 with progress ticks.
pub fn sleep(seconds: f64) -> Workflow {
    Workflow::from_value(json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255}},
        "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": seconds}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "fleet_sleep"}}
    }))
    .expect("a fixed, valid workflow")
}

/// Like [`sleep`] with another widget value: same structure hash, other content hash. Only the
/// `SaveImage` node's inputs change with `prefix`: a ComfyUI that ran the same sleep before
/// serves it from its cache and does no work — vary an upstream input for work every time.
pub fn sleep_with_prefix(seconds: f64, prefix: &str) -> Workflow {
    Workflow::from_value(json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255}},
        "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": seconds}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}}
    }))
    .expect("a fixed, valid workflow")
}

/// A workflow using a node class most backends lack (`FleetNoSuchNode`), as in the recorded
/// `missing_node` trace.
pub fn missing_node() -> Workflow {
    Workflow::from_value(json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "FleetNoSuchNode", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "fleet_missing"}}
    }))
    .expect("a fixed, valid workflow")
}

/// The node classes the standard fake backend has.
pub const STANDARD_CLASSES: &[&str] = &[
    "EmptyImage",
    "ImageInvert",
    "SaveImage",
    "PreviewImage",
    "TestSleep",
    "LoadImage",
];
