//! Real progress: [`ProgressTracker`] turns node events into an overall percent that never goes
//! backwards within an attempt and reaches 100 % only on success.
//!
//! Overall percent = (finished nodes + fraction of the running nodes) / nodes that will execute.
//! Cached nodes count as finished. Nodes the backend adds at run time (node expansion) are shown
//! as the current node but do not change the total.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::workflow::{NodeId, Workflow};

/// A progress snapshot, as stored with the job and sent in events.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Progress {
    /// Overall percent, 0–100 (100 only once succeeded).
    pub percent: f32,
    /// Nodes that will execute.
    pub nodes_total: u32,
    /// Nodes finished (or cached).
    pub nodes_done: u32,
    /// The node running now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub current_node: Option<NodeId>,
    /// Its class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_class: Option<String>,
    /// The running node's own step (`value` of `max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_value: Option<f64>,
    /// The running node's step count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_max: Option<f64>,
    /// Estimated time left, from past runs of the same workflow structure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum NodeState {
    Running(f64),
    Finished,
}

/// Computes [`Progress`] from node events for one attempt.
#[derive(Debug, Clone)]
pub struct ProgressTracker {
    known: BTreeSet<NodeId>,
    classes: HashMap<NodeId, String>,
    states: HashMap<NodeId, NodeState>,
    current: Option<NodeId>,
    node_value: Option<(f64, f64)>,
    last_percent: f32,
    done: bool,
}

impl ProgressTracker {
    /// A tracker for a workflow; every node is expected to execute.
    pub fn new(workflow: &Workflow) -> Self {
        let known: BTreeSet<NodeId> = workflow.node_ids().into_iter().collect();
        let classes = known
            .iter()
            .filter_map(|n| workflow.class_of(n).map(|c| (n.clone(), c.to_owned())))
            .collect();
        ProgressTracker {
            known,
            classes,
            states: HashMap::new(),
            current: None,
            node_value: None,
            last_percent: 0.0,
            done: false,
        }
    }

    /// Nodes served from cache count as finished.
    pub fn cached(&mut self, nodes: &[NodeId]) {
        for n in nodes {
            self.states.insert(n.clone(), NodeState::Finished);
        }
    }

    /// A node began executing.
    pub fn node_started(&mut self, node: &str) {
        let entry = self
            .states
            .entry(node.to_owned())
            .or_insert(NodeState::Running(0.0));
        if let NodeState::Finished = entry {
            // Re-entered (lazy inputs, node expansion): it stays counted as finished.
        }
        self.current = Some(node.to_owned());
        self.node_value = None;
    }

    /// The running node reported a step. Values may be floats; out-of-range values are clamped.
    pub fn node_progress(&mut self, node: &str, value: f64, max: f64) {
        let frac = if max > 0.0 && value.is_finite() && max.is_finite() {
            (value / max).clamp(0.0, 1.0)
        } else {
            0.0
        };
        match self.states.get_mut(node) {
            Some(NodeState::Finished) => {}
            Some(NodeState::Running(f)) => *f = f.max(frac),
            None => {
                self.states
                    .insert(node.to_owned(), NodeState::Running(frac));
            }
        }
        self.current = Some(node.to_owned());
        self.node_value = Some((value, max));
    }

    /// A node finished.
    pub fn node_finished(&mut self, node: &str) {
        self.states.insert(node.to_owned(), NodeState::Finished);
        if self.current.as_deref() == Some(node) {
            self.node_value = None;
        }
    }

    /// The execution succeeded: 100 %.
    pub fn succeeded(&mut self) {
        self.done = true;
        self.last_percent = 100.0;
    }

    /// The current snapshot. `elapsed` is the attempt's running time; `expected` the typical total
    /// run time of this workflow structure, when known.
    pub fn snapshot(&mut self, elapsed: Duration, expected: Option<Duration>) -> Progress {
        let total = self.known.len().max(1);
        let mut done = 0usize;
        let mut partial = 0.0f64;
        for n in &self.known {
            match self.states.get(n) {
                Some(NodeState::Finished) => done += 1,
                Some(NodeState::Running(f)) => partial += f,
                None => {}
            }
        }
        let raw = if self.done {
            100.0
        } else {
            // Capped below 100 until success: finished nodes are not a finished job.
            (((done as f64 + partial) / total as f64) * 100.0).min(99.0) as f32
        };
        let percent = raw.max(self.last_percent);
        self.last_percent = percent;
        let eta_ms = if self.done {
            Some(0)
        } else {
            match expected {
                Some(exp) if exp > elapsed => Some(exp - elapsed),
                Some(_) => None,
                None if percent >= 10.0 => {
                    let secs =
                        elapsed.as_secs_f64() * f64::from(100.0 - percent) / f64::from(percent);
                    Some(Duration::from_secs_f64(secs.max(0.0)))
                }
                None => None,
            }
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        };
        let current = if self.done {
            None
        } else {
            self.current.clone()
        };
        Progress {
            percent,
            nodes_total: u32::try_from(total).unwrap_or(u32::MAX),
            nodes_done: u32::try_from(done).unwrap_or(u32::MAX),
            current_class: current.as_ref().and_then(|n| self.classes.get(n).cloned()),
            current_node: current,
            node_value: self.node_value.map(|(v, _)| v).filter(|_| !self.done),
            node_max: self.node_value.map(|(_, m)| m).filter(|_| !self.done),
            eta_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn four_nodes() -> Workflow {
        Workflow::from_value(json!({
            "1": {"class_type": "EmptyImage"},
            "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0]}},
            "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}}
        }))
        .unwrap()
    }

    #[test]
    fn percent_counts_finished_and_running_fraction() {
        let mut t = ProgressTracker::new(&four_nodes());
        let z = Duration::ZERO;
        assert_eq!(t.snapshot(z, None).percent, 0.0);
        t.cached(&["1".into()]);
        assert_eq!(t.snapshot(z, None).percent, 25.0);
        t.node_started("2");
        t.node_progress("2", 5.0, 10.0);
        let p = t.snapshot(z, None);
        assert_eq!(p.percent, 37.5);
        assert_eq!(p.current_node.as_deref(), Some("2"));
        assert_eq!(p.current_class.as_deref(), Some("TestSleep"));
        assert_eq!((p.node_value, p.node_max), (Some(5.0), Some(10.0)));
        t.node_finished("2");
        t.node_finished("3");
        t.node_finished("4");
        assert_eq!(
            t.snapshot(z, None).percent,
            99.0,
            "never 100 before success"
        );
        t.succeeded();
        let p = t.snapshot(z, None);
        assert_eq!(p.percent, 100.0);
        assert_eq!(p.eta_ms, Some(0));
        assert_eq!(p.current_node, None);
    }

    #[test]
    fn eta_from_expected_duration_or_rate() {
        let mut t = ProgressTracker::new(&four_nodes());
        let p = t.snapshot(Duration::from_secs(2), Some(Duration::from_secs(10)));
        assert_eq!(p.eta_ms, Some(8_000));
        t.node_finished("1");
        t.node_finished("2");
        let p = t.snapshot(Duration::from_secs(4), None);
        assert_eq!(p.eta_ms, Some(4_000));
    }

    #[test]
    fn weird_values_are_clamped() {
        let mut t = ProgressTracker::new(&four_nodes());
        t.node_progress("2", 50.0, 10.0);
        t.node_progress("3", f64::NAN, 1.0);
        t.node_progress("9.0.1", 1.0, 2.0);
        let p = t.snapshot(Duration::ZERO, None);
        assert_eq!(p.percent, 25.0);
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Cached(u8),
        Start(u8),
        Tick(u8, f64, f64),
        Finish(u8),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (1u8..6).prop_map(Ev::Cached),
            (1u8..6).prop_map(Ev::Start),
            (1u8..6, -5.0f64..50.0, -1.0f64..40.0).prop_map(|(n, v, m)| Ev::Tick(n, v, m)),
            (1u8..6).prop_map(Ev::Finish),
        ]
    }

    proptest! {
        #[test]
        fn never_goes_backwards_and_never_100_before_success(events in proptest::collection::vec(ev(), 0..60)) {
            let mut t = ProgressTracker::new(&four_nodes());
            let mut last = 0.0f32;
            for e in events {
                match e {
                    Ev::Cached(n) => t.cached(&[n.to_string()]),
                    Ev::Start(n) => t.node_started(&n.to_string()),
                    Ev::Tick(n, v, m) => t.node_progress(&n.to_string(), v, m),
                    Ev::Finish(n) => t.node_finished(&n.to_string()),
                }
                let p = t.snapshot(Duration::from_secs(1), None).percent;
                prop_assert!(p >= last, "{p} < {last}");
                prop_assert!(p < 100.0);
                prop_assert!(p >= 0.0);
                last = p;
            }
            t.succeeded();
            prop_assert_eq!(t.snapshot(Duration::ZERO, None).percent, 100.0);
        }
    }
}
