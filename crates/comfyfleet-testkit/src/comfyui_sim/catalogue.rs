//! The node catalogue (`NODE_CLASS_MAPPINGS`) and `/object_info`.

use std::sync::Arc;

use super::json::{J, Obj, jobj};

/// Built-in node classes, in the order the simulator registers them.
pub const BUILTIN_NODE_CLASSES: &[&str] = &[
    "SaveImage",
    "PreviewImage",
    "LoadImage",
    "ImageScale",
    "ImageInvert",
    "EmptyImage",
    "ImageBlur",
    "TestSleep",
];

/// What a node does when it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    EmptyImage,
    ImageInvert,
    SaveImage,
    PreviewImage,
    LoadImage,
    TestSleep,
    ImageScale,
    ImageBlur,
    Custom,
}

/// An input's type: a type name, a fixed combo list, or the files of `input/` (LoadImage).
#[derive(Clone, Debug)]
pub(crate) enum InType {
    Named(&'static str),
    Combo(Vec<&'static str>),
    InputImages,
}

/// One declared input: `(type, options)`; `opts: None` is a 1-tuple like `("IMAGE",)`.
#[derive(Clone, Debug)]
pub(crate) struct InputDef {
    pub(crate) name: &'static str,
    pub(crate) required: bool,
    pub(crate) ty: InType,
    pub(crate) opts: Option<J>,
}

/// A node class.
#[derive(Clone, Debug)]
pub(crate) struct NodeDef {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) inputs: Vec<InputDef>,
    /// Hidden inputs: name → `"PROMPT"`, `"EXTRA_PNGINFO"`, `"UNIQUE_ID"`.
    pub(crate) hidden: Vec<(&'static str, &'static str)>,
    pub(crate) outputs: Vec<&'static str>,
    pub(crate) output_names: Option<Vec<&'static str>>,
    pub(crate) output_node: bool,
    pub(crate) category: String,
    pub(crate) display_name: String,
    pub(crate) description: String,
    pub(crate) python_module: String,
    /// Arguments of `VALIDATE_INPUTS` (empty: none defined).
    pub(crate) validate_args: Vec<&'static str>,
    /// The node function is a coroutine (`ux_friendly_pick_node` prefers it; it runs as a task).
    pub(crate) is_async: bool,
}

impl NodeDef {
    pub(crate) fn input(&self, name: &str) -> Option<&InputDef> {
        self.inputs.iter().find(|i| i.name == name)
    }
    pub(crate) fn has_unique_id(&self) -> bool {
        self.hidden.iter().any(|(_, t)| *t == "UNIQUE_ID")
    }
}

fn int_opts(default: i64, min: i64, max: i64, step: Option<i64>) -> J {
    let mut o = Obj::new();
    o.insert("default", default);
    o.insert("min", min);
    o.insert("max", max);
    if let Some(s) = step {
        o.insert("step", s);
    }
    J::Obj(o)
}

fn req(name: &'static str, ty: InType, opts: Option<J>) -> InputDef {
    InputDef {
        name,
        required: true,
        ty,
        opts,
    }
}

const MAX_RESOLUTION: i64 = 16384;

fn base(name: &str, kind: Kind) -> NodeDef {
    NodeDef {
        name: name.to_owned(),
        kind,
        inputs: Vec::new(),
        hidden: Vec::new(),
        outputs: Vec::new(),
        output_names: None,
        output_node: false,
        category: "image".to_owned(),
        display_name: name.to_owned(),
        description: String::new(),
        python_module: "nodes".to_owned(),
        validate_args: Vec::new(),
        is_async: false,
    }
}

/// A built-in class by name.
pub(crate) fn builtin(name: &str) -> Option<NodeDef> {
    let save_desc = "Saves the input images to your ComfyUI output directory.";
    let d = match name {
        "SaveImage" => NodeDef {
            inputs: vec![
                req(
                    "images",
                    InType::Named("IMAGE"),
                    Some(jobj! {"tooltip" => "The images to save."}),
                ),
                req(
                    "filename_prefix",
                    InType::Named("STRING"),
                    Some(jobj! {
                        "default" => "ComfyUI",
                        "tooltip" => "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."
                    }),
                ),
            ],
            hidden: vec![("prompt", "PROMPT"), ("extra_pnginfo", "EXTRA_PNGINFO")],
            output_node: true,
            display_name: "Save Image".to_owned(),
            description: save_desc.to_owned(),
            ..base(name, Kind::SaveImage)
        },
        "PreviewImage" => NodeDef {
            inputs: vec![req("images", InType::Named("IMAGE"), None)],
            hidden: vec![("prompt", "PROMPT"), ("extra_pnginfo", "EXTRA_PNGINFO")],
            output_node: true,
            display_name: "Preview Image".to_owned(),
            description: save_desc.to_owned(),
            ..base(name, Kind::PreviewImage)
        },
        "LoadImage" => NodeDef {
            inputs: vec![req(
                "image",
                InType::InputImages,
                Some(jobj! {"image_upload" => true}),
            )],
            outputs: vec!["IMAGE", "MASK"],
            display_name: "Load Image".to_owned(),
            validate_args: vec!["s", "image"],
            ..base(name, Kind::LoadImage)
        },
        "ImageScale" => NodeDef {
            inputs: vec![
                req("image", InType::Named("IMAGE"), None),
                req(
                    "upscale_method",
                    InType::Combo(vec![
                        "nearest-exact",
                        "bilinear",
                        "area",
                        "bicubic",
                        "lanczos",
                    ]),
                    None,
                ),
                req(
                    "width",
                    InType::Named("INT"),
                    Some(int_opts(512, 0, MAX_RESOLUTION, Some(1))),
                ),
                req(
                    "height",
                    InType::Named("INT"),
                    Some(int_opts(512, 0, MAX_RESOLUTION, Some(1))),
                ),
                req("crop", InType::Combo(vec!["disabled", "center"]), None),
            ],
            outputs: vec!["IMAGE"],
            category: "image/upscaling".to_owned(),
            display_name: "Upscale Image".to_owned(),
            ..base(name, Kind::ImageScale)
        },
        "ImageInvert" => NodeDef {
            inputs: vec![req("image", InType::Named("IMAGE"), None)],
            outputs: vec!["IMAGE"],
            display_name: "Invert Image".to_owned(),
            ..base(name, Kind::ImageInvert)
        },
        "EmptyImage" => NodeDef {
            inputs: vec![
                req(
                    "width",
                    InType::Named("INT"),
                    Some(int_opts(512, 1, MAX_RESOLUTION, Some(1))),
                ),
                req(
                    "height",
                    InType::Named("INT"),
                    Some(int_opts(512, 1, MAX_RESOLUTION, Some(1))),
                ),
                req(
                    "batch_size",
                    InType::Named("INT"),
                    Some(int_opts(1, 1, 4096, None)),
                ),
                req(
                    "color",
                    InType::Named("INT"),
                    Some({
                        let mut o = Obj::new();
                        o.insert("default", 0i64);
                        o.insert("min", 0i64);
                        o.insert("max", 0xFF_FFFFi64);
                        o.insert("step", 1i64);
                        o.insert("display", "color");
                        J::Obj(o)
                    }),
                ),
            ],
            outputs: vec!["IMAGE"],
            ..base(name, Kind::EmptyImage)
        },
        "ImageBlur" => NodeDef {
            inputs: vec![
                req("image", InType::Named("IMAGE"), None),
                req(
                    "blur_radius",
                    InType::Named("INT"),
                    Some(int_opts(1, 1, 31, Some(1))),
                ),
                req(
                    "sigma",
                    InType::Named("FLOAT"),
                    Some(jobj! {"default" => 1.0, "min" => 0.1, "max" => 10.0, "step" => 0.1}),
                ),
            ],
            outputs: vec!["IMAGE"],
            category: "image/postprocessing".to_owned(),
            python_module: "comfy_extras.nodes_post_processing".to_owned(),
            ..base(name, Kind::ImageBlur)
        },
        "TestSleep" => NodeDef {
            inputs: vec![
                req("value", InType::Named("*"), Some(jobj! {})),
                req(
                    "seconds",
                    InType::Named("FLOAT"),
                    Some(jobj! {
                        "default" => 1.0, "min" => 0.0, "max" => 9999.0, "step" => 0.01,
                        "tooltip" => "The amount of seconds to sleep."
                    }),
                ),
            ],
            hidden: vec![("unique_id", "UNIQUE_ID")],
            outputs: vec!["*"],
            category: "_for_testing".to_owned(),
            display_name: "Test Sleep".to_owned(),
            python_module: "custom_nodes.testing-pack".to_owned(),
            is_async: true,
            ..base(name, Kind::TestSleep)
        },
        _ => return None,
    };
    Some(d)
}

/// A custom class declared in [`SimConfig::extra_node_classes`](super::SimConfig).
pub(crate) fn custom(name: &str, output_node: bool) -> NodeDef {
    NodeDef {
        outputs: if output_node { Vec::new() } else { vec!["*"] },
        output_node,
        category: "custom".to_owned(),
        python_module: format!("custom_nodes.{name}"),
        ..base(name, Kind::Custom)
    }
}

/// A class of a pack found in the custom nodes directory (module `custom_nodes.<module>`): the
/// generic pass-through shape, with an optional `value` input of any type (other linked inputs
/// are accepted too) and one `*` output.
pub(crate) fn pack_node(name: &str, module: &str) -> NodeDef {
    NodeDef {
        inputs: vec![InputDef {
            name: "value",
            required: false,
            ty: InType::Named("*"),
            opts: Some(jobj! {}),
        }],
        outputs: vec!["*"],
        category: format!("custom/{module}"),
        python_module: format!("custom_nodes.{module}"),
        ..base(name, Kind::Custom)
    }
}

/// `NODE_CLASS_MAPPINGS`, in registration order.
#[derive(Clone, Debug, Default)]
pub(crate) struct Catalogue {
    classes: Vec<Arc<NodeDef>>,
}

impl Catalogue {
    pub(crate) fn get(&self, name: &str) -> Option<Arc<NodeDef>> {
        self.classes.iter().find(|c| c.name == name).cloned()
    }
    pub(crate) fn insert(&mut self, def: NodeDef) {
        let def = Arc::new(def);
        if let Some(slot) = self.classes.iter_mut().find(|c| c.name == def.name) {
            *slot = def;
        } else {
            self.classes.push(def);
        }
    }
    pub(crate) fn remove(&mut self, name: &str) -> bool {
        let before = self.classes.len();
        self.classes.retain(|c| c.name != name);
        before != self.classes.len()
    }
    pub(crate) fn names(&self) -> Vec<String> {
        self.classes.iter().map(|c| c.name.clone()).collect()
    }
    pub(crate) fn all(&self) -> &[Arc<NodeDef>] {
        &self.classes
    }
}

/// The type half of `(input_type, extra_info)`: a name or the combo list.
pub(crate) fn input_type_json(ty: &InType, input_files: &[String]) -> J {
    match ty {
        InType::Named(n) => J::from(*n),
        InType::Combo(l) => J::Arr(l.iter().map(|s| J::from(*s)).collect()),
        InType::InputImages => J::from(input_files.to_vec()),
    }
}

/// `/object_info` entry (the v0.3.64 `node_info` keys).
pub(crate) fn node_info(def: &NodeDef, input_files: &[String]) -> J {
    let mut input = Obj::new();
    let mut order = Obj::new();
    for required in [true, false] {
        let list: Vec<&InputDef> = def
            .inputs
            .iter()
            .filter(|i| i.required == required)
            .collect();
        if list.is_empty() && !required {
            continue;
        }
        let mut m = Obj::new();
        for i in &list {
            let mut spec = vec![input_type_json(&i.ty, input_files)];
            if let Some(o) = &i.opts {
                spec.push(o.clone());
            }
            m.insert(i.name, J::Arr(spec));
        }
        let key = if required { "required" } else { "optional" };
        input.insert(key, m);
        order.insert(
            key,
            J::from(list.iter().map(|i| i.name.to_owned()).collect::<Vec<_>>()),
        );
    }
    if !def.hidden.is_empty() {
        let mut h = Obj::new();
        for (n, t) in &def.hidden {
            h.insert(*n, *t);
        }
        input.insert("hidden", h);
        order.insert(
            "hidden",
            J::from(
                def.hidden
                    .iter()
                    .map(|(n, _)| (*n).to_owned())
                    .collect::<Vec<_>>(),
            ),
        );
    }
    let outputs: Vec<J> = def.outputs.iter().map(|o| J::from(*o)).collect();
    let names: Vec<J> = def.output_names.as_ref().map_or_else(
        || outputs.clone(),
        |n| n.iter().map(|o| J::from(*o)).collect(),
    );
    jobj! {
        "input" => input,
        "input_order" => order,
        "output" => outputs.clone(),
        "output_is_list" => outputs.iter().map(|_| J::Bool(false)).collect::<Vec<_>>(),
        "output_name" => names,
        "name" => def.name.as_str(),
        "display_name" => def.display_name.as_str(),
        "description" => def.description.as_str(),
        "python_module" => def.python_module.as_str(),
        "category" => def.category.as_str(),
        "output_node" => def.output_node,
    }
}
