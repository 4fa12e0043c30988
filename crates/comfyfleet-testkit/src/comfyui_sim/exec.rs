//! The worker (`main.prompt_worker`) and the executor (`PromptExecutor.execute_async`,
//! `execution.execute`, `ExecutionList`), with the progress registry and the built-in nodes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinSet;

use super::catalogue::{Catalogue, Kind, NodeDef};
use super::config::HangMidNode;
use super::files::Files;
use super::image::Image;
use super::json::{J, Obj, jobj};
use super::py;
use super::queue::{CacheEntry, QueueItem, Val, heap_pop};
use super::server::{Inner, now_ms};
use super::validate::is_link;

const SENSITIVE_EXTRA_DATA_KEYS: [&str; 2] = ["auth_token_comfy_org", "api_key_comfy_org"];

/// How a node run ended.
#[derive(Debug)]
enum NodeFail {
    Interrupted,
    Error {
        exception_type: String,
        message: String,
        traceback: Vec<String>,
        current_inputs: J,
    },
}

/// A node's outputs and UI dict.
#[derive(Debug)]
struct NodeOut {
    outputs: Vec<Val>,
    ui: Option<Obj>,
}

type NodeResult = Result<NodeOut, NodeFail>;

/// What `execute_async` leaves for `task_done`.
struct Outcome {
    outputs: Obj,
    meta: Obj,
    messages: Vec<J>,
    success: bool,
    terminal: &'static str,
}

/// `prompt_worker`: one prompt at a time.
pub(crate) async fn worker(inner: Arc<Inner>) {
    loop {
        let item = take_next(&inner).await;
        if inner.faults.get().hang_after_accept {
            inner.stat(|s| s.faults_fired += 1);
            while inner.faults.get().hang_after_accept {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        inner.mark_started(&item.prompt_id);
        let outcome = Exec::new(inner.clone(), &item).run().await;
        task_done(&inner, &item, outcome);
        let mut st = inner.state();
        consume_flags(&mut st);
    }
}

fn consume_flags(st: &mut super::server::State) {
    st.unload_models = false;
    if std::mem::take(&mut st.free_memory) {
        st.cache.entries.clear();
        st.success = true;
    }
}

async fn take_next(inner: &Arc<Inner>) -> QueueItem {
    loop {
        {
            let mut st = inner.state();
            consume_flags(&mut st);
            if let Some(item) = heap_pop(&mut st.queue) {
                st.running = Some(item.clone());
                inner.queue_updated(&st);
                inner.stat(|s| {
                    s.prompts_started += 1;
                    s.max_concurrent = s.max_concurrent.max(1);
                });
                return item;
            }
        }
        inner.wake.notified().await;
    }
}

/// `PromptQueue.task_done` + the final `executing {node: null}`.
fn task_done(inner: &Inner, item: &QueueItem, out: Outcome) {
    let client_id = {
        let mut st = inner.state();
        st.running = None;
        if st.history.len() > inner.config.history_cap {
            st.history.pop_oldest();
        }
        let mut extra = item.extra_data.clone();
        if let J::Obj(o) = &mut extra {
            for k in SENSITIVE_EXTRA_DATA_KEYS {
                o.remove(k);
            }
        }
        let tuple = J::Arr(vec![
            item.number.clone(),
            J::from(item.prompt_id.as_str()),
            J::Obj(item.prompt.clone()),
            extra,
            J::from(item.outputs.clone()),
        ]);
        let entry = jobj! {
            "prompt" => tuple,
            "outputs" => out.outputs,
            "status" => jobj!{
                "status_str" => if out.success { "success" } else { "error" },
                "completed" => out.success,
                "messages" => out.messages,
            },
            "meta" => out.meta,
        };
        st.history.insert(item.prompt_id.clone(), entry);
        inner.mark_finished(&item.prompt_id);
        inner.queue_updated(&st);
        if inner.fire(|f| &mut f.evict_history) {
            st.history.remove(&item.prompt_id);
        }
        st.client_id.clone()
    };
    inner.stat(|s| {
        s.prompts_executed += 1;
        match out.terminal {
            "execution_success" => s.prompts_succeeded += 1,
            "execution_interrupted" => s.prompts_interrupted += 1,
            _ => s.prompts_failed += 1,
        }
    });
    if let Some(c) = client_id {
        inner.emit(
            "executing",
            jobj! {"node" => J::Null, "prompt_id" => item.prompt_id.as_str()},
            Some(&c),
        );
    }
}

// ---- progress registry ------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct NodeProg {
    state: &'static str,
    value: J,
    max: J,
}

/// `ProgressRegistry` + `WebUIProgressHandler` + the `hijack_progress` hook.
#[derive(Debug)]
struct Reporter {
    inner: Arc<Inner>,
    prompt_id: String,
    client_id: Option<String>,
    reg: Mutex<Vec<(String, NodeProg)>>,
}

impl Reporter {
    fn with<R>(&self, id: &str, f: impl FnOnce(&mut NodeProg) -> R) -> R {
        let mut reg = self.reg.lock().unwrap_or_else(PoisonError::into_inner);
        let idx = match reg.iter().position(|(k, _)| k == id) {
            Some(i) => i,
            None => {
                reg.push((
                    id.to_owned(),
                    NodeProg {
                        state: "pending",
                        value: J::from(0i64),
                        max: J::from(1i64),
                    },
                ));
                reg.len() - 1
            }
        };
        let r = f(&mut reg[idx].1);
        // `_send_progress_state`: every non-pending node.
        let mut nodes = Obj::new();
        for (k, p) in reg.iter().filter(|(_, p)| p.state != "pending") {
            nodes.insert(
                k.clone(),
                jobj! {
                    "value" => p.value.clone(),
                    "max" => p.max.clone(),
                    "state" => p.state,
                    "node_id" => k.as_str(),
                    "prompt_id" => self.prompt_id.as_str(),
                    "display_node_id" => k.as_str(),
                    "parent_node_id" => J::Null,
                    "real_node_id" => k.as_str(),
                },
            );
        }
        self.inner.emit(
            "progress_state",
            jobj! {"prompt_id" => self.prompt_id.as_str(), "nodes" => nodes},
            self.client_id.as_deref(),
        );
        r
    }
    fn start(&self, id: &str) {
        self.with(id, |p| {
            p.state = "running";
            p.value = J::float(0.0);
            p.max = J::float(1.0);
        });
    }
    fn finish(&self, id: &str) {
        self.with(id, |p| {
            p.state = "finished";
            p.value = p.max.clone();
        });
    }
    /// A `ProgressBar` tick: `progress_state`, then `progress`.
    fn tick(&self, id: &str, value: f64, max: f64) {
        self.with(id, |p| {
            p.state = "running";
            p.value = J::float(value);
            p.max = J::float(max);
        });
        self.inner.emit(
            "progress",
            jobj! {"value" => value, "max" => max, "prompt_id" => self.prompt_id.as_str(), "node" => id},
            self.client_id.as_deref(),
        );
    }
}

// ---- execution list ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct ExecList {
    pending: Vec<String>,
    block_count: HashMap<String, usize>,
    blocking: HashMap<String, Vec<String>>,
    staged: Option<String>,
    external_blocks: usize,
}

impl ExecList {
    fn add_node(&mut self, id: &str, prompt: &Obj, cached: &dyn Fn(&str) -> bool) {
        let mut stack = vec![id.to_owned()];
        let mut links: Vec<(String, String)> = Vec::new();
        while let Some(uid) = stack.pop() {
            if self.pending.contains(&uid) {
                continue;
            }
            self.pending.push(uid.clone());
            self.block_count.insert(uid.clone(), 0);
            self.blocking.insert(uid.clone(), Vec::new());
            let Some(inputs) = prompt
                .get(&uid)
                .and_then(|n| n.get("inputs"))
                .and_then(J::as_obj)
            else {
                continue;
            };
            for (_, v) in inputs.iter() {
                if let Some((from, _)) = is_link(v) {
                    if !prompt.contains(from) {
                        continue;
                    }
                    if !cached(from) {
                        stack.push(from.to_owned());
                    }
                    links.push((from.to_owned(), uid.clone()));
                }
            }
        }
        for (from, to) in links {
            if !cached(&from) {
                self.add_node(&from, prompt, cached);
                let b = self.blocking.entry(from).or_default();
                if !b.contains(&to) {
                    b.push(to.clone());
                    *self.block_count.entry(to).or_default() += 1;
                }
            }
        }
    }
    fn ready(&self) -> Vec<String> {
        self.pending
            .iter()
            .filter(|n| self.block_count.get(*n).copied().unwrap_or(0) == 0)
            .cloned()
            .collect()
    }
    fn complete(&mut self) {
        if let Some(id) = self.staged.take() {
            self.pending.retain(|n| n != &id);
            for b in self.blocking.remove(&id).unwrap_or_default() {
                if let Some(c) = self.block_count.get_mut(&b) {
                    *c = c.saturating_sub(1);
                }
            }
        }
    }
    fn block(&mut self, id: &str) {
        self.external_blocks += 1;
        *self.block_count.entry(id.to_owned()).or_default() += 1;
    }
    fn unblock(&mut self, id: &str) {
        self.external_blocks = self.external_blocks.saturating_sub(1);
        if let Some(c) = self.block_count.get_mut(id) {
            *c = c.saturating_sub(1);
        }
    }
}

// ---- executor ---------------------------------------------------------------------------------

type Inputs = Vec<(String, Vec<Option<Val>>)>;

struct Exec {
    inner: Arc<Inner>,
    prompt_id: String,
    prompt: Obj,
    extra_data: J,
    outputs_to_execute: Vec<String>,
    client_id: Option<String>,
    messages: Vec<J>,
    executed: Vec<String>,
    sigs: HashMap<String, String>,
    list: ExecList,
    pending_async: HashMap<String, NodeResult>,
    tasks: JoinSet<(String, NodeResult)>,
    reporter: Arc<Reporter>,
}

enum Step {
    Success,
    Pending,
    Failure(NodeFail),
}

impl Exec {
    fn new(inner: Arc<Inner>, item: &QueueItem) -> Exec {
        let client_id = match item.extra_data.get("client_id") {
            None | Some(J::Null) => None,
            Some(J::Str(s)) => Some(s.clone()),
            // Not a string: a sid no socket can have.
            Some(other) => Some(format!("\u{0}{}", other.to_json())),
        };
        let reporter = Arc::new(Reporter {
            inner: inner.clone(),
            prompt_id: item.prompt_id.clone(),
            client_id: client_id.clone(),
            reg: Mutex::new(Vec::new()),
        });
        Exec {
            inner,
            prompt_id: item.prompt_id.clone(),
            prompt: item.prompt.clone(),
            extra_data: item.extra_data.clone(),
            outputs_to_execute: item.outputs.clone(),
            client_id,
            messages: Vec::new(),
            executed: Vec::new(),
            sigs: HashMap::new(),
            list: ExecList::default(),
            pending_async: HashMap::new(),
            tasks: JoinSet::new(),
            reporter,
        }
    }

    /// Sent only when the prompt has a client (`if server.client_id is not None`).
    fn emit_client(&self, event: &str, data: J) {
        if let Some(c) = &self.client_id {
            self.inner.emit(event, data, Some(c));
        }
    }

    /// `PromptExecutor.add_message`.
    fn add_message(&mut self, event: &str, mut data: Obj, broadcast: bool) {
        data.insert("timestamp", now_ms());
        let data = J::Obj(data);
        self.messages
            .push(J::Arr(vec![J::from(event), data.clone()]));
        if self.client_id.is_some() || broadcast {
            self.inner.emit(event, data, self.client_id.as_deref());
        }
    }

    fn def(&self, id: &str) -> Option<Arc<NodeDef>> {
        let class_type = self.prompt.get(id)?.get("class_type")?.as_str()?;
        self.inner.catalogue().get(class_type)
    }

    fn is_cached(&self, id: &str) -> bool {
        let Some(sig) = self.sigs.get(id) else {
            return false;
        };
        self.inner.state().cache.entries.contains_key(sig)
    }

    async fn run(mut self) -> Outcome {
        self.inner.interrupt.store(false, Ordering::SeqCst);
        {
            let mut st = self.inner.state();
            st.client_id = self.client_id.clone();
        }
        let mut start = Obj::new();
        start.insert("prompt_id", self.prompt_id.as_str());
        self.add_message("execution_start", start, false);

        self.sigs = signatures(&self.inner, &self.prompt);
        let cached_nodes: Vec<String> = {
            let mut st = self.inner.state();
            let keep: HashSet<&String> = self.sigs.values().collect();
            st.cache.entries.retain(|k, _| keep.contains(k));
            self.prompt
                .keys()
                .filter(|k| {
                    self.sigs
                        .get(*k)
                        .is_some_and(|s| st.cache.entries.contains_key(s))
                })
                .map(str::to_owned)
                .collect()
        };
        let mut cached_msg = Obj::new();
        cached_msg.insert("nodes", J::from(cached_nodes));
        cached_msg.insert("prompt_id", self.prompt_id.as_str());
        self.add_message("execution_cached", cached_msg, false);

        // `all_node_ids()` is a set; the recorded server listed them newest-first.
        let current_outputs: Vec<String> = self.prompt.keys().rev().map(str::to_owned).collect();
        let prompt = self.prompt.clone();
        let mut list = ExecList::default();
        {
            let is_cached = |id: &str| self.is_cached(id);
            for o in &self.outputs_to_execute {
                list.add_node(o, &prompt, &is_cached);
            }
        }
        self.list = list;

        let mut terminal = "execution_success";
        while !self.list.pending.is_empty() {
            let id = match self.stage().await {
                Some(id) => id,
                None => {
                    let node_id = self.list.pending.first().cloned().unwrap_or_default();
                    self.handle_error(
                        &node_id,
                        NodeFail::Error {
                            exception_type: "graph.DependencyCycleError".to_owned(),
                            message: "Dependency cycle detected".to_owned(),
                            traceback: Vec::new(),
                            current_inputs: J::Arr(Vec::new()),
                        },
                        &current_outputs,
                    );
                    terminal = "execution_error";
                    break;
                }
            };
            let step = self.execute(&id).await;
            self.inner.state().success = !matches!(step, Step::Failure(_));
            match step {
                Step::Failure(f) => {
                    terminal = if matches!(f, NodeFail::Interrupted) {
                        "execution_interrupted"
                    } else {
                        "execution_error"
                    };
                    self.handle_error(&id, f, &current_outputs);
                    break;
                }
                Step::Pending => self.list.staged = None,
                Step::Success => self.list.complete(),
            }
        }
        if terminal == "execution_success" {
            let mut m = Obj::new();
            m.insert("prompt_id", self.prompt_id.as_str());
            self.add_message("execution_success", m, false);
        }
        // History outputs: the UI cache entries of this prompt's nodes.
        let (mut outputs, mut meta) = (Obj::new(), Obj::new());
        {
            let mut st = self.inner.state();
            for id in self.prompt.keys() {
                let ui = self
                    .sigs
                    .get(id)
                    .and_then(|s| st.cache.entries.get(s))
                    .and_then(|e| e.ui.clone());
                if let Some(ui) = ui {
                    outputs.insert(id, ui.get("output").cloned().unwrap_or(J::Null));
                    meta.insert(id, ui.get("meta").cloned().unwrap_or(J::Null));
                }
            }
            st.last_node_id = None;
        }
        let success = self.inner.state().success;
        self.tasks.abort_all();
        Outcome {
            outputs,
            meta,
            messages: std::mem::take(&mut self.messages),
            success,
            terminal,
        }
    }

    fn handle_join(&mut self, res: Result<(String, NodeResult), tokio::task::JoinError>) {
        let Ok((id, r)) = res else { return };
        self.pending_async.insert(id.clone(), r);
        self.list.unblock(&id);
    }

    /// `stage_node_execution` with `ux_friendly_pick_node`.
    async fn stage(&mut self) -> Option<String> {
        loop {
            while let Some(res) = self.tasks.try_join_next() {
                self.handle_join(res);
            }
            let ready = self.list.ready();
            if !ready.is_empty() {
                let pick = self.pick(&ready);
                self.list.staged = Some(pick.clone());
                return Some(pick);
            }
            if self.list.external_blocks == 0 {
                return None;
            }
            let res = self.tasks.join_next().await?;
            self.handle_join(res);
        }
    }

    fn pick(&self, ready: &[String]) -> String {
        let is_output = |id: &str| self.def(id).is_some_and(|d| d.output_node);
        let is_async = |id: &str| self.def(id).is_some_and(|d| d.is_async);
        let blocking = |id: &str| self.list.blocking.get(id).cloned().unwrap_or_default();
        if let Some(n) = ready.iter().find(|n| is_output(n) || is_async(n)) {
            return n.clone();
        }
        if let Some(n) = ready
            .iter()
            .find(|n| blocking(n).iter().any(|b| is_output(b)))
        {
            return n.clone();
        }
        if let Some(n) = ready.iter().find(|n| {
            blocking(n)
                .iter()
                .any(|b| blocking(b).iter().any(|b1| is_output(b1)))
        }) {
            return n.clone();
        }
        ready[0].clone()
    }

    fn handle_error(&mut self, node_id: &str, fail: NodeFail, current_outputs: &[String]) {
        let class_type = self
            .prompt
            .get(node_id)
            .and_then(|n| n.get("class_type"))
            .cloned()
            .unwrap_or(J::Null);
        let mut mes = Obj::new();
        mes.insert("prompt_id", self.prompt_id.as_str());
        mes.insert("node_id", node_id);
        mes.insert("node_type", class_type);
        mes.insert("executed", J::from(self.executed.clone()));
        match fail {
            NodeFail::Interrupted => self.add_message("execution_interrupted", mes, true),
            NodeFail::Error {
                exception_type,
                message,
                traceback,
                current_inputs,
            } => {
                mes.insert("exception_message", message);
                mes.insert("exception_type", exception_type);
                mes.insert("traceback", J::from(traceback));
                mes.insert("current_inputs", current_inputs);
                mes.insert("current_outputs", J::from(current_outputs.to_vec()));
                self.add_message("execution_error", mes, false);
            }
        }
    }

    async fn interrupted(&self) -> NodeFail {
        tokio::time::sleep(self.inner.scaled(self.inner.config.interrupt_latency)).await;
        NodeFail::Interrupted
    }

    /// `execution.execute` for one node.
    async fn execute(&mut self, id: &str) -> Step {
        let Some(def) = self.def(id) else {
            let class_type = self
                .prompt
                .get(id)
                .and_then(|n| n.get("class_type"))
                .map(py::repr)
                .unwrap_or_default();
            return Step::Failure(NodeFail::Error {
                exception_type: "KeyError".to_owned(),
                message: format!("{class_type}\n"),
                traceback: Vec::new(),
                current_inputs: J::obj(),
            });
        };
        let sig = self.sigs.get(id).cloned().unwrap_or_default();
        let cached = self.inner.state().cache.entries.get(&sig).cloned();
        if let Some(entry) = cached {
            let output = entry
                .ui
                .as_ref()
                .and_then(|u| u.get("output"))
                .cloned()
                .unwrap_or(J::Null);
            self.emit_client(
                "executed",
                jobj! {"node" => id, "display_node" => id, "output" => output, "prompt_id" => self.prompt_id.as_str()},
            );
            self.reporter.finish(id);
            return Step::Success;
        }
        let result = if let Some(r) = self.pending_async.remove(id) {
            r
        } else {
            self.reporter.start(id);
            let inputs = self.gather_inputs(id, &def);
            if let Some(c) = &self.client_id {
                self.inner.state().last_node_id = Some(id.to_owned());
                self.inner.emit(
                    "executing",
                    jobj! {"node" => id, "display_node" => id, "prompt_id" => self.prompt_id.as_str()},
                    Some(c),
                );
            }
            if self.inner.interrupted() {
                return Step::Failure(self.interrupted().await);
            }
            if def.is_async {
                self.spawn_async(id, &def, &inputs);
                return Step::Pending;
            }
            if let Err(f) = hang_if_configured(&self.inner, &def.name).await {
                return Step::Failure(f);
            }
            if let Some(d) = self.inner.config.node_durations.get(&def.name) {
                tokio::time::sleep(self.inner.scaled(*d)).await;
            }
            self.inner.stat(|s| s.nodes_executed += 1);
            run_sync(
                &self.inner,
                id,
                &def,
                &inputs,
                &self.prompt,
                &self.extra_data,
            )
        };
        let out = match result {
            Ok(o) => o,
            Err(f) => return Step::Failure(f),
        };
        let ui_entry = out.ui.filter(|u| !u.is_empty()).map(|ui| {
            jobj! {
                "meta" => jobj!{"node_id" => id, "display_node" => id, "parent_node" => J::Null, "real_node_id" => id},
                "output" => ui,
            }
        });
        if let Some(ui) = &ui_entry {
            let output = ui.get("output").cloned().unwrap_or(J::Null);
            self.emit_client(
                "executed",
                jobj! {"node" => id, "display_node" => id, "output" => output, "prompt_id" => self.prompt_id.as_str()},
            );
        }
        self.inner.state().cache.entries.insert(
            sig,
            CacheEntry {
                outputs: Arc::new(out.outputs),
                ui: ui_entry,
            },
        );
        self.reporter.finish(id);
        if !self.executed.iter().any(|e| e == id) {
            self.executed.push(id.to_owned());
        }
        Step::Success
    }

    /// `get_input_data`: linked values from the cache, declared widgets, hidden inputs.
    fn gather_inputs(&self, id: &str, def: &NodeDef) -> Inputs {
        let mut out: Inputs = Vec::new();
        if let Some(inputs) = self
            .prompt
            .get(id)
            .and_then(|n| n.get("inputs"))
            .and_then(J::as_obj)
        {
            let st = self.inner.state();
            for (x, v) in inputs.iter() {
                if let Some((from, socket)) = is_link(v) {
                    let idx = socket.as_f64().unwrap_or(0.0) as i64;
                    let val = self
                        .sigs
                        .get(from)
                        .and_then(|s| st.cache.entries.get(s))
                        .and_then(|e| {
                            usize::try_from(idx)
                                .ok()
                                .and_then(|i| e.outputs.get(i))
                                .cloned()
                        });
                    out.push((x.to_owned(), vec![val]));
                } else if def.input(x).is_some() {
                    out.push((x.to_owned(), vec![Some(Val::Json(v.clone()))]));
                }
            }
        }
        for (name, kind) in &def.hidden {
            let v = match *kind {
                "PROMPT" => J::Obj(self.prompt.clone()),
                "EXTRA_PNGINFO" => self
                    .extra_data
                    .get("extra_pnginfo")
                    .cloned()
                    .unwrap_or(J::Null),
                "UNIQUE_ID" => J::from(id),
                _ => J::Null,
            };
            out.push(((*name).to_owned(), vec![Some(Val::Json(v))]));
        }
        out
    }

    fn spawn_async(&mut self, id: &str, def: &NodeDef, inputs: &Inputs) {
        let value = arg(inputs, "value").cloned().unwrap_or(Val::Json(J::Null));
        let seconds = arg(inputs, "seconds")
            .and_then(json_of)
            .and_then(J::as_f64)
            .unwrap_or(0.0);
        let inner = self.inner.clone();
        let reporter = self.reporter.clone();
        let node = id.to_owned();
        let class = def.name.clone();
        self.list.block(id);
        self.tasks.spawn(async move {
            let r = test_sleep(&inner, &reporter, &node, &class, value, seconds).await;
            (node, r)
        });
    }
}

/// `TestSleep.sleep`: `ProgressBar(seconds)` updated every 10 ms (scaled), interrupt checked in
/// the hook before each update.
async fn test_sleep(
    inner: &Arc<Inner>,
    rep: &Reporter,
    node: &str,
    class: &str,
    value: Val,
    seconds: f64,
) -> NodeResult {
    inner.stat(|s| s.nodes_executed += 1);
    let scale = inner.config.time_scale;
    let tick = inner
        .scaled(Duration::from_millis(10))
        .max(Duration::from_millis(1));
    let start = tokio::time::Instant::now();
    let mut now = 0.0;
    while now < seconds {
        now = if scale > 0.0 {
            start.elapsed().as_secs_f64() / scale
        } else {
            seconds
        };
        if inner.interrupted() {
            tokio::time::sleep(inner.scaled(inner.config.interrupt_latency)).await;
            return Err(NodeFail::Interrupted);
        }
        hang_if_configured(inner, class).await?;
        rep.tick(node, now.min(seconds), seconds);
        tokio::time::sleep(tick).await;
    }
    Ok(NodeOut {
        outputs: vec![value],
        ui: None,
    })
}

/// The hang-mid-node fault: stuck until interrupted (unless it ignores interrupts) or cleared.
async fn hang_if_configured(inner: &Arc<Inner>, class: &str) -> Result<(), NodeFail> {
    let matches = |h: &Option<HangMidNode>| {
        h.as_ref()
            .is_some_and(|h| h.class_type.as_deref().is_none_or(|c| c == class))
    };
    if !matches(&inner.faults.get().hang_mid_node) {
        return Ok(());
    }
    inner.stat(|s| s.faults_fired += 1);
    loop {
        let h = inner.faults.get().hang_mid_node;
        if !matches(&h) {
            return Ok(());
        }
        if inner.interrupted() && h.is_some_and(|h| !h.ignore_interrupt) {
            tokio::time::sleep(inner.scaled(inner.config.interrupt_latency)).await;
            return Err(NodeFail::Interrupted);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Input signatures (`CacheKeySetInputSignature`): class, `IS_CHANGED`, node id for
/// `UNIQUE_ID` classes, sorted inputs with links replaced by the ancestor's signature.
fn signatures(inner: &Inner, prompt: &Obj) -> HashMap<String, String> {
    fn sig(
        cat: &Catalogue,
        files: &Files,
        prompt: &Obj,
        id: &str,
        memo: &mut HashMap<String, String>,
        visiting: &mut HashSet<String>,
        nan: &mut u64,
    ) -> String {
        if let Some(s) = memo.get(id) {
            return s.clone();
        }
        let mut unique_nan = || {
            *nan += 1;
            format!("NaN#{nan}#{}", fastrand::u64(..))
        };
        let Some(node) = prompt.get(id) else {
            return unique_nan();
        };
        let class_type = node
            .get("class_type")
            .and_then(J::as_str)
            .unwrap_or_default();
        let Some(def) = cat.get(class_type) else {
            return unique_nan();
        };
        if !visiting.insert(id.to_owned()) {
            return unique_nan();
        }
        let is_changed = if def.kind == Kind::LoadImage {
            let name = node
                .get("inputs")
                .and_then(|i| i.get("image"))
                .map(py::py_str)
                .unwrap_or_default();
            match files.read(&files.annotated_path(&name)) {
                Some(b) => {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    b.hash(&mut h);
                    J::from(format!("{:016x}", h.finish()))
                }
                None => J::from(unique_nan()),
            }
        } else {
            J::Bool(false)
        };
        let mut parts = vec![J::from(class_type), is_changed];
        if def.has_unique_id() {
            parts.push(J::from(id));
        }
        if let Some(inputs) = node.get("inputs").and_then(J::as_obj) {
            let mut keys: Vec<&str> = inputs.keys().collect();
            keys.sort_unstable();
            for k in keys {
                let v = inputs.get(k).cloned().unwrap_or(J::Null);
                let entry = match is_link(&v) {
                    Some((from, socket)) => {
                        let s = sig(cat, files, prompt, from, memo, visiting, nan);
                        J::Arr(vec![
                            J::from(k),
                            J::Arr(vec![J::from("ANCESTOR"), J::from(s), socket.clone()]),
                        ])
                    }
                    None => J::Arr(vec![J::from(k), v]),
                };
                parts.push(entry);
            }
        }
        visiting.remove(id);
        let s = J::Arr(parts).to_json();
        memo.insert(id.to_owned(), s.clone());
        s
    }
    // Lock order everywhere: catalogue before files.
    let cat = inner.catalogue().clone();
    let files = inner.files();
    let mut memo = HashMap::new();
    let mut visiting = HashSet::new();
    let mut nan = 0;
    for id in prompt.keys() {
        sig(&cat, &files, prompt, id, &mut memo, &mut visiting, &mut nan);
    }
    memo
}

// ---- built-in nodes ---------------------------------------------------------------------------

fn arg<'a>(inputs: &'a Inputs, name: &str) -> Option<&'a Val> {
    inputs
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.first())
        .and_then(Option::as_ref)
}

fn json_of(v: &Val) -> Option<&J> {
    match v {
        Val::Json(j) => Some(j),
        _ => None,
    }
}

/// `format_value`.
fn format_value(v: &Option<Val>) -> J {
    match v {
        None => J::Null,
        Some(Val::Image(img)) => J::from(img.tensor_repr()),
        Some(Val::Mask(m)) => J::from(format!("tensor(<mask {}x{}>)", m.h, m.w)),
        Some(Val::Json(j @ (J::Null | J::Bool(_) | J::Num(_) | J::Str(_)))) => j.clone(),
        Some(Val::Json(j)) => J::from(py::repr(j)),
    }
}

fn current_inputs(inputs: &Inputs) -> J {
    let mut o = Obj::new();
    for (k, vs) in inputs {
        o.insert(k.clone(), J::Arr(vs.iter().map(format_value).collect()));
    }
    J::Obj(o)
}

fn exec_frames(base: &str) -> Vec<String> {
    let carets = |n: usize, pad: usize| format!("{}{}", " ".repeat(pad), "^".repeat(n));
    vec![
        format!(
            "  File \"{base}/execution.py\", line 496, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n{}\n",
            carets(163, 62)
        ),
        format!(
            "  File \"{base}/execution.py\", line 315, in get_output_data\n    return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n{}\n",
            carets(209, 20)
        ),
        format!(
            "  File \"{base}/execution.py\", line 289, in _async_map_node_over_list\n    await process_inputs(input_dict, i)\n"
        ),
        format!(
            "  File \"{base}/execution.py\", line 277, in process_inputs\n    result = f(**inputs)\n             ^^^^^^^^^^^\n"
        ),
    ]
}

fn node_error(
    inner: &Inner,
    inputs: &Inputs,
    exception_type: &str,
    message: String,
    extra_frames: Vec<String>,
) -> NodeFail {
    let mut traceback = exec_frames(&inner.config.base_dir);
    traceback.extend(extra_frames);
    NodeFail::Error {
        exception_type: exception_type.to_owned(),
        message: format!("{message}\n"),
        traceback,
        current_inputs: current_inputs(inputs),
    }
}

fn need_image(
    inner: &Inner,
    inputs: &Inputs,
    name: &str,
    attr: &str,
) -> Result<Arc<Image>, NodeFail> {
    match arg(inputs, name) {
        Some(Val::Image(i)) => Ok(i.clone()),
        other => {
            let t = match other {
                None => "NoneType",
                Some(Val::Mask(_)) => "Tensor",
                Some(Val::Image(_)) => "Tensor",
                Some(Val::Json(j)) => py::type_name(j),
            };
            Err(node_error(
                inner,
                inputs,
                "AttributeError",
                format!("'{t}' object has no attribute '{attr}'"),
                Vec::new(),
            ))
        }
    }
}

fn int_arg(inputs: &Inputs, name: &str) -> i64 {
    arg(inputs, name)
        .and_then(json_of)
        .and_then(|j| j.as_i64().or_else(|| j.as_f64().map(|f| f as i64)))
        .unwrap_or(0)
}

fn run_sync(
    inner: &Inner,
    id: &str,
    def: &NodeDef,
    inputs: &Inputs,
    prompt: &Obj,
    extra: &J,
) -> NodeResult {
    let one = |v: Val| {
        Ok(NodeOut {
            outputs: vec![v],
            ui: None,
        })
    };
    match def.kind {
        Kind::EmptyImage => {
            let (w, h, b) = (
                int_arg(inputs, "width"),
                int_arg(inputs, "height"),
                int_arg(inputs, "batch_size"),
            );
            let color = int_arg(inputs, "color");
            one(Val::Image(Arc::new(Image::empty(
                b.max(0) as usize,
                w.max(0) as usize,
                h.max(0) as usize,
                color,
            ))))
        }
        Kind::ImageInvert => {
            let img = need_image(inner, inputs, "image", "__rsub__")?;
            one(Val::Image(Arc::new(img.invert())))
        }
        Kind::ImageScale => {
            let img = need_image(inner, inputs, "image", "movedim")?;
            let (w, h) = (
                int_arg(inputs, "width").max(0) as usize,
                int_arg(inputs, "height").max(0) as usize,
            );
            let crop = arg(inputs, "crop").and_then(json_of).and_then(J::as_str) == Some("center");
            match img.scale(w, h, crop) {
                Ok(i) => one(Val::Image(Arc::new(i))),
                Err(e) => Err(node_error(inner, inputs, "RuntimeError", e, Vec::new())),
            }
        }
        Kind::ImageBlur => {
            let img = need_image(inner, inputs, "image", "to")?;
            let r = int_arg(inputs, "blur_radius").max(0) as usize;
            let sigma = arg(inputs, "sigma")
                .and_then(json_of)
                .and_then(J::as_f64)
                .unwrap_or(1.0);
            one(Val::Image(Arc::new(img.blur(r, sigma))))
        }
        Kind::SaveImage | Kind::PreviewImage => {
            let img = need_image(inner, inputs, "images", "__getitem__")?;
            let preview = def.kind == Kind::PreviewImage;
            let prefix = if preview {
                let suffix: String = (0..5)
                    .map(|_| {
                        let chars = b"abcdefghijklmnopqrstupvxyz";
                        chars[fastrand::usize(..chars.len())] as char
                    })
                    .collect();
                format!("ComfyUI_temp_{suffix}")
            } else {
                arg(inputs, "filename_prefix")
                    .and_then(json_of)
                    .map(py::py_str)
                    .unwrap_or_else(|| "ComfyUI".to_owned())
            };
            let pnginfo = extra.get("extra_pnginfo").cloned();
            let mut files = inner.files();
            let dir = if preview {
                files.temp_dir()
            } else {
                files.output_dir()
            };
            match save_images(
                &mut files,
                &img,
                &prefix,
                &dir,
                prompt,
                pnginfo.as_ref(),
                preview,
            ) {
                Ok(images) => {
                    let mut ui = Obj::new();
                    ui.insert("images", J::Arr(images));
                    Ok(NodeOut {
                        outputs: Vec::new(),
                        ui: Some(ui),
                    })
                }
                Err(msg) => {
                    let base = &inner.config.base_dir;
                    let frames = vec![
                        format!(
                            "  File \"{base}/nodes.py\", line 1590, in save_images\n    full_output_folder, filename, counter, subfolder, filename_prefix = folder_paths.get_save_image_path(filename_prefix, self.output_dir, images[0].shape[1], images[0].shape[0])\n{}{}\n",
                            " ".repeat(72),
                            "^".repeat(106)
                        ),
                        format!(
                            "  File \"{base}/folder_paths.py\", line 397, in get_save_image_path\n    raise Exception(err)\n"
                        ),
                    ];
                    drop(files);
                    Err(node_error(inner, inputs, "Exception", msg, frames))
                }
            }
        }
        Kind::LoadImage => {
            let name = arg(inputs, "image")
                .and_then(json_of)
                .map(py::py_str)
                .unwrap_or_default();
            let files = inner.files();
            let path = files.annotated_path(&name);
            let Some(bytes) = files.read(&path) else {
                drop(files);
                return Err(node_error(
                    inner,
                    inputs,
                    "FileNotFoundError",
                    format!(
                        "[Errno 2] No such file or directory: {}",
                        py::str_repr(&path)
                    ),
                    Vec::new(),
                ));
            };
            drop(files);
            match Image::from_png(&bytes) {
                Ok((img, mask)) => Ok(NodeOut {
                    outputs: vec![Val::Image(Arc::new(img)), Val::Mask(Arc::new(mask))],
                    ui: None,
                }),
                Err(e) => Err(node_error(
                    inner,
                    inputs,
                    "PIL.UnidentifiedImageError",
                    format!("{e}: {}", py::str_repr(&path)),
                    Vec::new(),
                )),
            }
        }
        Kind::TestSleep | Kind::Custom => {
            let _ = id;
            let passthrough = inputs
                .iter()
                .find(|(k, v)| {
                    !def.hidden.iter().any(|(h, _)| h == k)
                        && v.first().is_some_and(Option::is_some)
                })
                .and_then(|(_, v)| v.first().cloned().flatten())
                .unwrap_or(Val::Json(J::Null));
            let outputs = if def.outputs.is_empty() {
                Vec::new()
            } else {
                vec![passthrough]
            };
            Ok(NodeOut { outputs, ui: None })
        }
    }
}

/// `folder_paths.get_save_image_path` + `SaveImage.save_images`.
fn save_images(
    files: &mut Files,
    img: &Image,
    prefix: &str,
    output_dir: &str,
    prompt: &Obj,
    extra_pnginfo: Option<&J>,
    preview: bool,
) -> Result<Vec<J>, String> {
    let prefix = compute_vars(prefix, img.w, img.h);
    let norm = py::normpath(&prefix);
    let subfolder = py::dirname(&norm);
    let filename = py::basename(&norm).to_owned();
    let full = py::join(output_dir, &subfolder);
    let full_abs = py::abspath(&full, files.base());
    let common = py::commonpath(output_dir, &full_abs);
    if common != output_dir {
        return Err(format!(
            "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {full_abs}\n         output_dir: {output_dir}\n         commonpath: {common}"
        ));
    }
    let prefix_len = py::basename(&prefix).chars().count();
    let mut counter = 1i64;
    if files.is_dir(&full) {
        let mut best: Option<i64> = None;
        // Only names starting with `filename_` can match (ComfyUI lists the whole folder and
        // filters; same result).
        for name in files.list_dir_starting(&full, &format!("{filename}_")) {
            let chars: Vec<char> = name.chars().collect();
            let head: String = chars.iter().take(prefix_len + 1).collect();
            let rest: String = chars.iter().skip(prefix_len + 1).collect();
            let digits = rest
                .split('_')
                .next()
                .unwrap_or("")
                .trim()
                .parse::<i64>()
                .unwrap_or(0);
            let Some(stem) = head.strip_suffix('_') else {
                continue;
            };
            if stem.chars().count() == prefix_len && stem == filename {
                best = Some(best.map_or(digits, |b: i64| b.max(digits)));
            }
        }
        if let Some(b) = best {
            counter = b + 1;
        }
    }
    let mut texts = vec![("prompt".to_owned(), py::json_dumps(&J::Obj(prompt.clone())))];
    if let Some(J::Obj(extra)) = extra_pnginfo {
        for (k, v) in extra.iter() {
            texts.push((k.to_owned(), py::json_dumps(v)));
        }
    }
    let mut results = Vec::new();
    for b in 0..img.batch {
        let name_b = filename.replace("%batch_num%", &b.to_string());
        let file = format!("{name_b}_{counter:05}_.png");
        let bytes = img.to_png(b, &texts, preview)?;
        files.write(&py::join(&full, &file), Bytes::from(bytes));
        results.push(jobj! {"filename" => file, "subfolder" => subfolder.as_str(), "type" => if preview { "temp" } else { "output" }});
        counter += 1;
    }
    Ok(results)
}

/// `%width%`, `%height%`, `%year%`… (UTC; the server uses local time).
fn compute_vars(input: &str, w: usize, h: usize) -> String {
    if !input.contains('%') {
        return input.to_owned();
    }
    let secs = now_ms().div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // civil_from_days (Howard Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    input
        .replace("%width%", &w.to_string())
        .replace("%height%", &h.to_string())
        .replace("%year%", &year.to_string())
        .replace("%month%", &format!("{month:02}"))
        .replace("%day%", &format!("{day:02}"))
        .replace("%hour%", &format!("{:02}", sod / 3600))
        .replace("%minute%", &format!("{:02}", sod % 3600 / 60))
        .replace("%second%", &format!("{:02}", sod % 60))
}
