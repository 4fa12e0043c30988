//! [`Workflow`]: a ComfyUI API-format graph, validated on construction, with two stable hashes.
//!
//! * The **content hash** is SHA-256 over canonical JSON (keys sorted at every level, `_meta`
//!   dropped): two submissions with the same hash are the same computation.
//! * The **structure hash** covers node classes and links only, not widget values: the same
//!   workflow with another prompt text or seed has the same structure hash. Routing (warm
//!   backends) and blocking (a backend that hung on this workflow) key on it.
//!
//! Both hashes canonicalise key order themselves and never rely on `serde_json::Map` iteration
//! order, which flips when some crate in the build turns on `preserve_order`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// A node id inside a workflow (an opaque string such as `"3"` or `"57:12"`).
pub type NodeId = String;

/// File extensions that mark a widget value as a model file the backend must have.
const MODEL_EXTENSIONS: &[&str] = &[
    ".safetensors",
    ".ckpt",
    ".pt",
    ".pth",
    ".bin",
    ".gguf",
    ".sft",
    ".onnx",
];

/// Why a workflow was rejected. Every variant names the node and input at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WorkflowError {
    /// The JSON was not an object keyed by node id.
    #[error("workflow must be a JSON object keyed by node id, got {found}")]
    NotAnObject {
        /// What was found instead (`array`, `string`, …).
        found: &'static str,
    },
    /// The object had no nodes.
    #[error("workflow has no nodes")]
    Empty,
    /// A node id was the empty string.
    #[error("workflow has a node with an empty id")]
    EmptyNodeId,
    /// A node's value was not an object.
    #[error("node {node}: must be an object with class_type and inputs")]
    NodeNotAnObject {
        /// The node.
        node: NodeId,
    },
    /// `class_type` missing, empty or not a string.
    #[error("node {node}: missing or empty class_type")]
    MissingClassType {
        /// The node.
        node: NodeId,
    },
    /// `inputs` present but not an object.
    #[error("node {node}: inputs must be an object")]
    InputsNotAnObject {
        /// The node.
        node: NodeId,
    },
    /// An input holds a list that is not a `[node_id, output_index]` link.
    #[error(
        "node {node} input {input}: a list must be a link [\"node_id\", output_index] (wrap literal lists as {{\"__value__\": [...]}})"
    )]
    BadLink {
        /// The node.
        node: NodeId,
        /// The input name.
        input: String,
    },
    /// A link points at a node that is not in the workflow.
    #[error("node {node} input {input}: links to node {target}, which does not exist")]
    MissingLinkTarget {
        /// The node holding the link.
        node: NodeId,
        /// The input name.
        input: String,
        /// The missing node id.
        target: NodeId,
    },
    /// The links form a cycle.
    #[error("workflow has a dependency cycle through node {node}")]
    Cycle {
        /// One node on the cycle.
        node: NodeId,
    },
    /// An input override names a node that does not exist.
    #[error("input override for node {node}: no such node")]
    OverrideUnknownNode {
        /// The node named by the override.
        node: NodeId,
    },
    /// The text was not JSON at all.
    #[error("workflow is not valid JSON: {0}")]
    Json(String),
}

/// A stable hash, printed as lowercase hex.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkflowHash(String);

impl WorkflowHash {
    /// The hex digest.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, for logs and messages.
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(12)]
    }

    /// Wraps a hex digest read back from storage.
    pub fn from_hex(hex: impl Into<String>) -> Self {
        WorkflowHash(hex.into())
    }
}

impl fmt::Display for WorkflowHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for WorkflowHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkflowHash({})", self.short())
    }
}

/// A model file a workflow refers to (a string widget value with a model extension).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelRef {
    /// The node that names it.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub node: NodeId,
    /// The input name (`ckpt_name`, `lora_name`, …).
    pub input: String,
    /// The file name as written in the workflow.
    pub file: String,
}

/// Widget-value overrides applied to a workflow before it runs: node id → input name → value.
pub type InputOverrides = BTreeMap<NodeId, BTreeMap<String, Value>>;

/// A validated ComfyUI API-format workflow.
#[derive(Clone, PartialEq)]
pub struct Workflow {
    graph: Map<String, Value>,
    content: WorkflowHash,
    structure: WorkflowHash,
}

impl fmt::Debug for Workflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workflow")
            .field("nodes", &self.graph.len())
            .field("content", &self.content)
            .field("structure", &self.structure)
            .finish()
    }
}

impl Workflow {
    /// Validates a graph: at least one node, every node an object with a `class_type`, every list
    /// input a `[node_id, index]` link to an existing node, no cycles.
    pub fn from_value(value: Value) -> Result<Self, WorkflowError> {
        let graph = match value {
            Value::Object(m) => m,
            other => {
                return Err(WorkflowError::NotAnObject {
                    found: json_type(&other),
                });
            }
        };
        validate(&graph)?;
        let content = hash_hex(&canonical_content(&graph));
        let structure = hash_hex(&canonical_structure(&graph));
        Ok(Workflow {
            graph,
            content,
            structure,
        })
    }

    /// Parses and validates JSON text.
    pub fn from_json(text: &str) -> Result<Self, WorkflowError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| WorkflowError::Json(e.to_string()))?;
        Self::from_value(value)
    }

    /// The graph as sent to a backend.
    pub fn graph(&self) -> &Map<String, Value> {
        &self.graph
    }

    /// The graph as a JSON value.
    pub fn to_value(&self) -> Value {
        Value::Object(self.graph.clone())
    }

    /// Hash of the full content (without `_meta`).
    pub fn content_hash(&self) -> &WorkflowHash {
        &self.content
    }

    /// Hash of node classes and links only (widget values ignored).
    pub fn structure_hash(&self) -> &WorkflowHash {
        &self.structure
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.graph.len()
    }

    /// Always false: a validated workflow has at least one node.
    pub fn is_empty(&self) -> bool {
        self.graph.is_empty()
    }

    /// Node ids, sorted.
    pub fn node_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.graph.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The `class_type` of a node.
    pub fn class_of(&self, node: &str) -> Option<&str> {
        self.graph
            .get(node)
            .and_then(|n| n.get("class_type"))
            .and_then(Value::as_str)
    }

    /// Every node class the workflow uses; a backend lacking one of them cannot run it.
    pub fn required_classes(&self) -> BTreeSet<String> {
        self.graph
            .keys()
            .filter_map(|id| self.class_of(id).map(str::to_owned))
            .collect()
    }

    /// Model files named in widget values (by extension), for inventory checks.
    pub fn referenced_models(&self) -> Vec<ModelRef> {
        let mut out = Vec::new();
        for (id, node) in &self.graph {
            let Some(inputs) = node.get("inputs").and_then(Value::as_object) else {
                continue;
            };
            for (name, v) in inputs {
                if let Some(s) = v.as_str() {
                    let lower = s.to_ascii_lowercase();
                    if MODEL_EXTENSIONS.iter().any(|ext| lower.ends_with(ext)) {
                        out.push(ModelRef {
                            node: id.clone(),
                            input: name.clone(),
                            file: s.to_owned(),
                        });
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// A copy with widget values replaced; the result is validated again.
    pub fn with_overrides(&self, overrides: &InputOverrides) -> Result<Workflow, WorkflowError> {
        if overrides.is_empty() {
            return Ok(self.clone());
        }
        let mut graph = self.graph.clone();
        for (node, inputs) in overrides {
            let Some(Value::Object(n)) = graph.get_mut(node) else {
                return Err(WorkflowError::OverrideUnknownNode { node: node.clone() });
            };
            let entry = n
                .entry("inputs")
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(map) = entry else {
                return Err(WorkflowError::InputsNotAnObject { node: node.clone() });
            };
            for (k, v) in inputs {
                map.insert(k.clone(), v.clone());
            }
        }
        Workflow::from_value(Value::Object(graph))
    }
}

impl Serialize for Workflow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.graph.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Workflow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Workflow::from_value(v).map_err(serde::de::Error::custom)
    }
}

/// On the wire a workflow is the API-format graph itself: node id → `{class_type, inputs}`.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Workflow {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{
            AdditionalProperties, ArrayBuilder, ArrayItems, ObjectBuilder, OneOfBuilder, Schema,
            Type,
        };
        let link = ArrayBuilder::new()
            .prefix_items([
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("The source node's id."))
                    .build(),
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0))
                    .description(Some("The source node's output index."))
                    .build(),
            ])
            .items(ArrayItems::False)
            .min_items(Some(2))
            .description(Some(
                "A link to another node's output: `[node_id, output_index]`.",
            ));
        let widget = ObjectBuilder::new()
            .schema_type(
                [
                    Type::String,
                    Type::Number,
                    Type::Boolean,
                    Type::Object,
                    Type::Null,
                ]
                .into_iter()
                .collect::<utoipa::openapi::schema::SchemaType>(),
            )
            .description(Some(
                "A widget value; a literal list must be wrapped as `{\"__value__\": [...]}`.",
            ));
        let input = Schema::OneOf(OneOfBuilder::new().item(widget).item(link).build());
        let node = ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "One node. Other keys (such as `_meta`) are kept but play no part in running it.",
            ))
            .property(
                "class_type",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .pattern(Some(r"\S"))
                    .description(Some("The node class (`KSampler`, `SaveImage`, …).")),
            )
            .required("class_type")
            .property(
                "inputs",
                ObjectBuilder::new()
                    .schema_type(
                        [Type::Object, Type::Null]
                            .into_iter()
                            .collect::<utoipa::openapi::schema::SchemaType>(),
                    )
                    .additional_properties(Some(input))
                    .description(Some("Input name → widget value or link.")),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(true)));
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "A ComfyUI API-format workflow: node id → node. At least one node; every link \
                 points at an existing node; no cycles.",
            ))
            .min_properties(Some(1))
            .property_names(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1)),
            ))
            .additional_properties(Some(node))
            .examples([serde_json::json!({
                "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}
            })])
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Workflow {}

/// A workflow hash is a hex string.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for WorkflowHash {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some("A SHA-256 workflow hash: 64 lowercase hex digits."))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for WorkflowHash {}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `Some((target, index))` for a well-formed link, `None` for a widget value, `Err` for a list
/// that is not a link.
fn as_link(v: &Value) -> Result<Option<(&str, u64)>, ()> {
    match v {
        Value::Array(items) => match items.as_slice() {
            [Value::String(target), Value::Number(idx)] => {
                idx.as_u64().map(|i| Some((target.as_str(), i))).ok_or(())
            }
            _ => Err(()),
        },
        _ => Ok(None),
    }
}

fn validate(graph: &Map<String, Value>) -> Result<(), WorkflowError> {
    if graph.is_empty() {
        return Err(WorkflowError::Empty);
    }
    // Sorted iteration so the reported error does not depend on map order.
    let mut ids: Vec<&String> = graph.keys().collect();
    ids.sort();
    let mut edges: HashMap<&str, Vec<&str>> = HashMap::new();
    for id in &ids {
        if id.is_empty() {
            return Err(WorkflowError::EmptyNodeId);
        }
        let node =
            graph[id.as_str()]
                .as_object()
                .ok_or_else(|| WorkflowError::NodeNotAnObject {
                    node: (*id).clone(),
                })?;
        match node.get("class_type").and_then(Value::as_str) {
            Some(c) if !c.trim().is_empty() => {}
            _ => {
                return Err(WorkflowError::MissingClassType {
                    node: (*id).clone(),
                });
            }
        }
        let inputs = match node.get("inputs") {
            None | Some(Value::Null) => continue,
            Some(Value::Object(m)) => m,
            Some(_) => {
                return Err(WorkflowError::InputsNotAnObject {
                    node: (*id).clone(),
                });
            }
        };
        let mut names: Vec<&String> = inputs.keys().collect();
        names.sort();
        for name in names {
            match as_link(&inputs[name.as_str()]) {
                Ok(None) => {}
                Ok(Some((target, _))) => {
                    if !graph.contains_key(target) {
                        return Err(WorkflowError::MissingLinkTarget {
                            node: (*id).clone(),
                            input: name.clone(),
                            target: target.to_owned(),
                        });
                    }
                    edges.entry(id.as_str()).or_default().push(target);
                }
                Err(()) => {
                    return Err(WorkflowError::BadLink {
                        node: (*id).clone(),
                        input: name.clone(),
                    });
                }
            }
        }
    }
    find_cycle(&ids, &edges)
}

fn find_cycle(ids: &[&String], edges: &HashMap<&str, Vec<&str>>) -> Result<(), WorkflowError> {
    // Iterative three-colour DFS; workflows can be thousands of nodes deep, so no recursion.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    let mut marks: HashMap<&str, Mark> = HashMap::new();
    for start in ids {
        if marks.contains_key(start.as_str()) {
            continue;
        }
        let mut stack: Vec<(&str, usize)> = vec![(start.as_str(), 0)];
        marks.insert(start.as_str(), Mark::Visiting);
        while let Some((node, next)) = stack.pop() {
            let succ = edges.get(node).map(Vec::as_slice).unwrap_or(&[]);
            if next < succ.len() {
                stack.push((node, next + 1));
                let t = succ[next];
                match marks.get(t) {
                    Some(Mark::Visiting) => {
                        return Err(WorkflowError::Cycle { node: t.to_owned() });
                    }
                    Some(Mark::Done) => {}
                    None => {
                        marks.insert(t, Mark::Visiting);
                        stack.push((t, 0));
                    }
                }
            } else {
                marks.insert(node, Mark::Done);
            }
        }
    }
    Ok(())
}

fn canonical_content(graph: &Map<String, Value>) -> String {
    let mut stripped = Map::new();
    for (id, node) in graph {
        let mut node = node.clone();
        if let Value::Object(m) = &mut node {
            m.remove("_meta");
        }
        stripped.insert(id.clone(), node);
    }
    let mut out = String::new();
    write_canonical(&Value::Object(stripped), &mut out);
    out
}

fn canonical_structure(graph: &Map<String, Value>) -> String {
    let mut skeleton = Map::new();
    for (id, node) in graph {
        let class = node.get("class_type").cloned().unwrap_or(Value::Null);
        let mut links = Map::new();
        if let Some(inputs) = node.get("inputs").and_then(Value::as_object) {
            for (name, v) in inputs {
                if let Ok(Some(_)) = as_link(v) {
                    links.insert(name.clone(), v.clone());
                }
            }
        }
        let mut n = Map::new();
        n.insert("class_type".into(), class);
        n.insert("links".into(), Value::Object(links));
        skeleton.insert(id.clone(), Value::Object(n));
    }
    let mut out = String::new();
    write_canonical(&Value::Object(skeleton), &mut out);
    out
}

/// Canonical JSON: object keys sorted at every level, no whitespace.
pub fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                write_canonical(&m[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn hash_hex(text: &str) -> WorkflowHash {
    let digest = Sha256::digest(text.as_bytes());
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    WorkflowHash(hex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn invert() -> Value {
        json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}, "_meta": {"title": "Save"}}
        })
    }

    fn check_err(v: Value, expected: WorkflowError) {
        assert_eq!(Workflow::from_value(v).unwrap_err(), expected);
    }

    #[test]
    fn rejects_bad_graphs_with_the_node_at_fault() {
        check_err(json!([]), WorkflowError::NotAnObject { found: "array" });
        check_err(json!({}), WorkflowError::Empty);
        check_err(
            json!({"1": 5}),
            WorkflowError::NodeNotAnObject { node: "1".into() },
        );
        check_err(
            json!({"1": {"inputs": {}}}),
            WorkflowError::MissingClassType { node: "1".into() },
        );
        check_err(
            json!({"1": {"class_type": " "}}),
            WorkflowError::MissingClassType { node: "1".into() },
        );
        check_err(
            json!({"1": {"class_type": "A", "inputs": []}}),
            WorkflowError::InputsNotAnObject { node: "1".into() },
        );
        check_err(
            json!({"1": {"class_type": "A", "inputs": {"x": ["9", 0]}}}),
            WorkflowError::MissingLinkTarget {
                node: "1".into(),
                input: "x".into(),
                target: "9".into(),
            },
        );
        check_err(
            json!({"1": {"class_type": "A", "inputs": {"x": [1, 2, 3]}}}),
            WorkflowError::BadLink {
                node: "1".into(),
                input: "x".into(),
            },
        );
        check_err(
            json!({"1": {"class_type": "A", "inputs": {"x": ["1", -1]}}}),
            WorkflowError::BadLink {
                node: "1".into(),
                input: "x".into(),
            },
        );
        check_err(
            json!({"1": {"class_type": "A", "inputs": {"x": ["2", 0]}}, "2": {"class_type": "B", "inputs": {"y": ["1", 0]}}}),
            WorkflowError::Cycle { node: "1".into() },
        );
        assert!(matches!(
            Workflow::from_json("{not json"),
            Err(WorkflowError::Json(_))
        ));
    }

    #[test]
    fn accepts_wrapped_literal_lists_and_missing_inputs() {
        let w = Workflow::from_value(json!({
            "1": {"class_type": "A", "inputs": {"list": {"__value__": [1, 2, 3]}}},
            "2": {"class_type": "B"}
        }))
        .unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(
            w.required_classes(),
            BTreeSet::from(["A".to_string(), "B".to_string()])
        );
    }

    #[test]
    fn content_hash_ignores_meta_and_key_order() {
        let a = Workflow::from_value(invert()).unwrap();
        let mut v = invert();
        v["3"]["_meta"]["title"] = json!("Another title");
        let b = Workflow::from_value(v).unwrap();
        assert_eq!(a.content_hash(), b.content_hash());
        let reordered = Workflow::from_json(
            r#"{"3": {"inputs": {"filename_prefix": "x", "images": ["2", 0]}, "class_type": "SaveImage"},
                "2": {"inputs": {"image": ["1", 0]}, "class_type": "ImageInvert"},
                "1": {"inputs": {"color": 255, "batch_size": 1, "height": 64, "width": 64}, "class_type": "EmptyImage"}}"#,
        )
        .unwrap();
        assert_eq!(a.content_hash(), reordered.content_hash());
        assert_eq!(a.content_hash().as_str().len(), 64);
    }

    #[test]
    fn structure_hash_ignores_widget_values_but_not_links_or_classes() {
        let a = Workflow::from_value(invert()).unwrap();
        let mut v = invert();
        v["1"]["inputs"]["width"] = json!(512);
        v["3"]["inputs"]["filename_prefix"] = json!("other prompt text");
        let b = Workflow::from_value(v).unwrap();
        assert_ne!(a.content_hash(), b.content_hash());
        assert_eq!(a.structure_hash(), b.structure_hash());

        let mut c = invert();
        c["2"]["class_type"] = json!("ImageBlur");
        assert_ne!(
            a.structure_hash(),
            Workflow::from_value(c).unwrap().structure_hash()
        );
        let mut d = invert();
        d["3"]["inputs"]["images"] = json!(["1", 0]);
        assert_ne!(
            a.structure_hash(),
            Workflow::from_value(d).unwrap().structure_hash()
        );
    }

    #[test]
    fn overrides_apply_and_revalidate() {
        let w = Workflow::from_value(invert()).unwrap();
        let mut o = InputOverrides::new();
        o.entry("1".into())
            .or_default()
            .insert("width".into(), json!(128));
        let w2 = w.with_overrides(&o).unwrap();
        assert_eq!(w2.graph()["1"]["inputs"]["width"], json!(128));
        assert_eq!(w.structure_hash(), w2.structure_hash());
        let mut bad = InputOverrides::new();
        bad.entry("9".into())
            .or_default()
            .insert("x".into(), json!(1));
        assert_eq!(
            w.with_overrides(&bad).unwrap_err(),
            WorkflowError::OverrideUnknownNode { node: "9".into() }
        );
        let mut dangling = InputOverrides::new();
        dangling
            .entry("2".into())
            .or_default()
            .insert("image".into(), json!(["7", 0]));
        assert!(matches!(
            w.with_overrides(&dangling),
            Err(WorkflowError::MissingLinkTarget { .. })
        ));
    }

    #[test]
    fn finds_model_references() {
        let w = Workflow::from_value(json!({
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
            "5": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "lora_name": "style.SAFETENSORS", "strength": 1.0}}
        }))
        .unwrap();
        let files: Vec<String> = w.referenced_models().into_iter().map(|m| m.file).collect();
        assert_eq!(
            files,
            vec!["sd_xl_base_1.0.safetensors", "style.SAFETENSORS"]
        );
    }

    #[test]
    fn the_shipped_workflows_validate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/workflows");
        let entries = std::fs::read_dir(&dir).unwrap();
        let mut seen = 0;
        for e in entries {
            let path = e.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let result = Workflow::from_json(&text);
            if name == "bad_input.json" {
                assert!(
                    matches!(result, Err(WorkflowError::MissingLinkTarget { .. })),
                    "{name}: {result:?}"
                );
            } else {
                assert!(result.is_ok(), "{name}: {result:?}");
            }
            seen += 1;
        }
        assert!(seen >= 5);
    }

    /// Found by `cargo fuzz run workflow_parse` (fuzz/README.md): a number with more digits than
    /// an f64 holds must parse to the same value before and after a save/load round trip, or the
    /// content hash (and the graph sent to a backend) drifts each time the workflow is stored.
    #[test]
    fn long_numbers_survive_a_round_trip() {
        for text in [
            r#"{"1": {"class_type":"e","ut3":{"": 666666666666666666666666666666666666664}}}"#,
            r#"{"1": {"class_type":"KSampler","inputs":{"cfg": 7.00000000000000000000000000001}}}"#,
        ] {
            let wf = Workflow::from_json(text).unwrap();
            let again = Workflow::from_json(&serde_json::to_string(&wf).unwrap()).unwrap();
            assert_eq!(wf.content_hash(), again.content_hash(), "{text}");
            assert_eq!(wf, again, "{text}");
        }
    }

    proptest::proptest! {
        #[test]
        fn hashing_never_panics_and_is_deterministic(width in 0i64..10_000, text in ".{0,40}", seed in proptest::num::u64::ANY) {
            let mut v = invert();
            v["1"]["inputs"]["width"] = json!(width);
            v["3"]["inputs"]["filename_prefix"] = json!(text);
            v["3"]["inputs"]["seed"] = json!(seed);
            let a = Workflow::from_value(v.clone()).unwrap();
            let b = Workflow::from_value(v).unwrap();
            proptest::prop_assert_eq!(a.content_hash(), b.content_hash());
            let base = Workflow::from_value(invert()).unwrap();
            proptest::prop_assert_eq!(a.structure_hash(), base.structure_hash());
        }

        #[test]
        fn arbitrary_json_never_panics(s in ".{0,200}") {
            let _ = Workflow::from_json(&s);
        }
    }
}
