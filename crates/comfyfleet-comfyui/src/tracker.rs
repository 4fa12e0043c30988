//! [`PromptTracker`]: turns ComfyUI's messages about one prompt into comfyfleet
//! [`ExecutionEvent`]s — real per-node progress, cached nodes, outputs and exactly one terminal
//! event. It is fed by both paths (WebSocket messages and history polling); whichever reports
//! the end first wins and everything after it is ignored.

use std::collections::{BTreeSet, HashMap};

use comfyfleet_core::{Artifact, BackendId, ExecutionEvent, NodeId};

use crate::protocol::{
    HistoryOutcome, ServerMessage, classify_execution_error, history_artifacts,
    is_execution_blocked, node_artifacts,
};

/// Interprets one prompt's messages. See the module documentation.
#[derive(Debug)]
pub struct PromptTracker {
    prompt_id: String,
    backend: BackendId,
    started: bool,
    seen_progress_state: bool,
    running: BTreeSet<NodeId>,
    finished: BTreeSet<NodeId>,
    last_progress: HashMap<NodeId, f64>,
    artifacts: Vec<Artifact>,
    terminal: bool,
    ended: bool,
}

impl PromptTracker {
    /// A tracker for `prompt_id` on `backend`.
    pub fn new(prompt_id: impl Into<String>, backend: BackendId) -> Self {
        PromptTracker {
            prompt_id: prompt_id.into(),
            backend,
            started: false,
            seen_progress_state: false,
            running: BTreeSet::new(),
            finished: BTreeSet::new(),
            last_progress: HashMap::new(),
            artifacts: Vec::new(),
            terminal: false,
            ended: false,
        }
    }

    /// The prompt.
    pub fn prompt_id(&self) -> &str {
        &self.prompt_id
    }

    /// A terminal event has been produced.
    pub fn is_terminal(&self) -> bool {
        self.terminal
    }

    /// It started executing (we saw `execution_start` or a node).
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// The server said the prompt is over (`executing {node: null}`) but no terminal event came:
    /// ask the history.
    pub fn needs_history(&self) -> bool {
        self.ended && !self.terminal
    }

    fn start(&mut self, out: &mut Vec<ExecutionEvent>) {
        if !self.started {
            self.started = true;
            out.push(ExecutionEvent::Started);
        }
    }

    fn finish_node(&mut self, node: &str, out: &mut Vec<ExecutionEvent>) {
        if self.finished.insert(node.to_owned()) {
            self.running.remove(node);
            out.push(ExecutionEvent::NodeFinished {
                node: node.to_owned(),
            });
        }
    }

    fn close_running(&mut self, out: &mut Vec<ExecutionEvent>) {
        let running: Vec<NodeId> = self.running.iter().cloned().collect();
        for n in running {
            self.finish_node(&n, out);
        }
    }

    /// Feeds one message. Messages about other prompts are ignored; messages without a prompt id
    /// (old servers' `progress`, the reconnect `executing`) are taken as ours — the caller only
    /// passes them when this prompt is the one running.
    pub fn handle(&mut self, msg: &ServerMessage) -> Vec<ExecutionEvent> {
        let mut out = Vec::new();
        if self.terminal {
            return out;
        }
        if let Some(p) = msg.prompt_id()
            && p != self.prompt_id
        {
            return out;
        }
        match msg {
            ServerMessage::ExecutionStart { .. } => self.start(&mut out),
            ServerMessage::ExecutionCached { nodes, .. } => {
                self.start(&mut out);
                let fresh: Vec<NodeId> = nodes
                    .iter()
                    .filter(|n| self.finished.insert((*n).clone()))
                    .cloned()
                    .collect();
                if !fresh.is_empty() {
                    out.push(ExecutionEvent::Cached { nodes: fresh });
                }
            }
            ServerMessage::Executing {
                node: Some(node), ..
            } => {
                self.start(&mut out);
                if !self.seen_progress_state {
                    // Servers without progress_state: a new node means the previous one is done
                    // (the best information they give).
                    let others: Vec<NodeId> = self
                        .running
                        .iter()
                        .filter(|n| *n != node)
                        .cloned()
                        .collect();
                    for n in others {
                        self.finish_node(&n, &mut out);
                    }
                }
                if !self.running.contains(node) {
                    self.running.insert(node.clone());
                    self.finished.remove(node);
                    out.push(ExecutionEvent::NodeStarted { node: node.clone() });
                }
            }
            ServerMessage::Executing { node: None, .. } => {
                self.ended = true;
            }
            ServerMessage::Progress {
                node, value, max, ..
            } => {
                self.start(&mut out);
                if let Some(node) = node.clone().or_else(|| self.running.iter().next().cloned()) {
                    self.last_progress.insert(node.clone(), *value);
                    out.push(ExecutionEvent::Progress {
                        node,
                        value: *value,
                        max: *max,
                    });
                }
            }
            ServerMessage::ProgressState { nodes, .. } => {
                self.seen_progress_state = true;
                for (id, p) in nodes {
                    let moved = self
                        .last_progress
                        .get(id)
                        .is_none_or(|last| p.value > *last);
                    match p.state.as_str() {
                        "finished" if self.running.contains(id) => self.finish_node(id, &mut out),
                        // progress_state repeats the legacy `progress` tick; report a value only
                        // when it moved.
                        "running" if p.value > 0.0 && moved => {
                            self.last_progress.insert(id.clone(), p.value);
                            out.push(ExecutionEvent::Progress {
                                node: id.clone(),
                                value: p.value,
                                max: p.max,
                            });
                        }
                        _ => {}
                    }
                }
            }
            ServerMessage::Executed { node, output, .. } => {
                let artifacts = node_artifacts(&self.backend, node, output);
                if !artifacts.is_empty() {
                    self.artifacts.extend(artifacts.iter().cloned());
                    out.push(ExecutionEvent::NodeOutput {
                        node: node.clone(),
                        artifacts,
                    });
                }
            }
            ServerMessage::ExecutionSuccess { .. } => {
                self.start(&mut out);
                self.close_running(&mut out);
                self.terminal = true;
                out.push(ExecutionEvent::Succeeded {
                    artifacts: self.artifacts.clone(),
                });
            }
            ServerMessage::ExecutionError { data, .. } => {
                if !is_execution_blocked(data) {
                    self.terminal = true;
                    out.push(ExecutionEvent::Failed {
                        error: classify_execution_error(data),
                    });
                }
            }
            ServerMessage::ExecutionInterrupted { .. } => {
                self.terminal = true;
                out.push(ExecutionEvent::Interrupted);
            }
            ServerMessage::Status { .. } | ServerMessage::Other { .. } => {}
        }
        out
    }

    /// Ends the prompt from its history entry (the polling path, or after `executing null`
    /// without a terminal message). The history's outputs are authoritative: they include what
    /// a broken socket missed.
    pub fn handle_history(&mut self, outcome: &HistoryOutcome) -> Vec<ExecutionEvent> {
        let mut out = Vec::new();
        if self.terminal {
            return out;
        }
        self.terminal = true;
        match outcome {
            HistoryOutcome::Succeeded(outputs) => {
                self.start(&mut out);
                self.close_running(&mut out);
                let artifacts = history_artifacts(&self.backend, outputs);
                let artifacts = if artifacts.is_empty() {
                    self.artifacts.clone()
                } else {
                    artifacts
                };
                out.push(ExecutionEvent::Succeeded { artifacts });
            }
            HistoryOutcome::Failed(data) => out.push(ExecutionEvent::Failed {
                error: classify_execution_error(data),
            }),
            HistoryOutcome::Interrupted => out.push(ExecutionEvent::Interrupted),
        }
        out
    }

    /// Artifacts seen so far through `executed` messages.
    pub fn artifacts(&self) -> &[Artifact] {
        &self.artifacts
    }
}
