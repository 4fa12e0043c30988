//! `execution.validate_prompt` / `validate_inputs` of ComfyUI 0.3.64, error catalogue included.

use std::collections::HashSet;

use super::catalogue::{Catalogue, input_type_json};
use super::files::Files;
use super::json::{J, Obj, jobj};
use super::py;

/// Why `POST /prompt` failed.
pub(crate) enum Rejected {
    /// 400 `{"error": .., "node_errors": ..}`.
    Invalid { error: J, node_errors: J },
    /// The Python handler would have raised (aiohttp answers 500).
    Crash,
}

/// A Python exception raised while validating.
struct PyExc {
    type_name: &'static str,
    /// `str(exception)`.
    message: String,
    /// The innermost frame, formatted like `traceback.format_tb`.
    frame: String,
}

/// One `traceback.format_tb` entry: `marks` is the caret line (without the 4-space indent of the
/// code line; empty for none).
fn frame(base: &str, line: u32, func: &str, code: &str, marks: &str) -> String {
    let marks = if marks.is_empty() {
        String::new()
    } else {
        format!("    {marks}\n")
    };
    format!("  File \"{base}/execution.py\", line {line}, in {func}\n    {code}\n{marks}")
}

struct Ctx<'a> {
    cat: &'a Catalogue,
    files: &'a Files,
    input_files: Vec<String>,
    base: String,
    validated: Vec<(String, (bool, Vec<J>))>,
    visiting: HashSet<String>,
}

impl Ctx<'_> {
    fn get_validated(&self, id: &str) -> Option<(bool, Vec<J>)> {
        self.validated
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, v)| v.clone())
    }
    fn set_validated(&mut self, id: &str, v: (bool, Vec<J>)) {
        if let Some(slot) = self.validated.iter_mut().find(|(k, _)| k == id) {
            slot.1 = v;
        } else {
            self.validated.push((id.to_owned(), v));
        }
    }
}

fn key_error(key: &J, base: &str, line: u32, code: &str, marks: &str) -> PyExc {
    PyExc {
        type_name: "KeyError",
        message: py::repr(key),
        frame: frame(base, line, "validate_inputs", code, marks),
    }
}

fn validate_node_input(received: &str, input: &J) -> bool {
    let J::Str(input) = input else {
        return received == "*";
    };
    if received == input || received == "*" || input == "*" {
        return true;
    }
    let r: HashSet<&str> = received.split(',').map(str::trim).collect();
    let i: HashSet<&str> = input.split(',').map(str::trim).collect();
    r.intersection(&i).next().is_some()
}

fn validate_inputs(ctx: &mut Ctx<'_>, prompt: &mut Obj, id: &str) -> Result<(bool, Vec<J>), PyExc> {
    if let Some(v) = ctx.get_validated(id) {
        return Ok(v);
    }
    let base = ctx.base.clone();
    if !ctx.visiting.insert(id.to_owned()) {
        return Err(PyExc {
            type_name: "RecursionError",
            message: "maximum recursion depth exceeded".to_owned(),
            frame: frame(
                &base,
                770,
                "validate_inputs",
                "inputs = prompt[unique_id]['inputs']",
                "",
            ),
        });
    }
    let result = validate_inputs_inner(ctx, prompt, id, &base);
    ctx.visiting.remove(id);
    let (valid, errors) = result?;
    let ret = (valid && errors.is_empty(), errors);
    ctx.set_validated(id, ret.clone());
    Ok(ret)
}

fn class_of<'a>(prompt: &'a Obj, id: &str) -> Option<&'a str> {
    prompt.get(id)?.get("class_type")?.as_str()
}

fn validate_inputs_inner(
    ctx: &mut Ctx<'_>,
    prompt: &mut Obj,
    id: &str,
    base: &str,
) -> Result<(bool, Vec<J>), PyExc> {
    let class_type = class_of(prompt, id).unwrap_or_default().to_owned();
    let Some(def) = ctx.cat.get(&class_type) else {
        return Err(key_error(
            &J::from(class_type.as_str()),
            base,
            767,
            "obj_class = nodes.NODE_CLASS_MAPPINGS[class_type]",
            "            ~~~~~~~~~~~~~~~~~~~~~~~~^^^^^^^^^^^^",
        ));
    };
    let Some(J::Obj(inputs)) = prompt.get(id).and_then(|n| n.get("inputs")).cloned() else {
        return Err(key_error(
            &J::from("inputs"),
            base,
            765,
            "inputs = prompt[unique_id]['inputs']",
            "         ~~~~~~~~~~~~~~~~~^^^^^^^^^^",
        ));
    };
    let mut errors: Vec<J> = Vec::new();
    let mut valid = true;
    let mut coerced: Vec<(String, J)> = Vec::new();

    for inp in &def.inputs {
        let x = inp.name;
        let input_type = input_type_json(&inp.ty, &ctx.input_files);
        let extra = inp.opts.clone().unwrap_or_else(J::obj);
        let Some(val) = inputs.get(x).cloned() else {
            if inp.required {
                errors.push(jobj! {
                    "type" => "required_input_missing",
                    "message" => "Required input is missing",
                    "details" => x,
                    "extra_info" => jobj!{"input_name" => x},
                });
            }
            continue;
        };
        let info = J::Arr(vec![input_type.clone(), extra.clone()]);
        if let J::Arr(link) = &val {
            if link.len() != 2 {
                errors.push(jobj! {
                    "type" => "bad_linked_input",
                    "message" => "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    "details" => x,
                    "extra_info" => jobj!{"input_name" => x, "input_config" => info, "received_value" => val.clone()},
                });
                continue;
            }
            let o_id_j = &link[0];
            let o_node = o_id_j.as_str().and_then(|o| prompt.get(o));
            let Some(o_node) = o_node else {
                return Err(key_error(
                    o_id_j,
                    base,
                    788,
                    "o_class_type = prompt[o_id]['class_type']",
                    "               ~~~~~~^^^^^^",
                ));
            };
            let o_id = o_id_j.as_str().unwrap_or_default().to_owned();
            let o_class = o_node
                .get("class_type")
                .and_then(J::as_str)
                .unwrap_or_default()
                .to_owned();
            let Some(o_def) = ctx.cat.get(&o_class) else {
                return Err(key_error(
                    &J::from(o_class.as_str()),
                    base,
                    789,
                    "r = nodes.NODE_CLASS_MAPPINGS[o_class_type].RETURN_TYPES",
                    "    ~~~~~~~~~~~~~~~~~~~~~~~~^^^^^^^^^^^^^^",
                ));
            };
            let idx_frame = |msg: String, t: &'static str| PyExc {
                type_name: t,
                message: msg,
                frame: frame(
                    base,
                    790,
                    "validate_inputs",
                    "received_type = r[val[1]]",
                    "                ~^^^^^^^^",
                ),
            };
            let n = o_def.outputs.len() as i64;
            let idx = match &link[1] {
                J::Num(num) if !num.is_f64() => num.as_i64().unwrap_or(i64::MAX),
                J::Bool(b) => i64::from(*b),
                other => {
                    return Err(idx_frame(
                        format!(
                            "tuple indices must be integers or slices, not {}",
                            py::type_name(other)
                        ),
                        "TypeError",
                    ));
                }
            };
            let real = if idx < 0 { idx + n } else { idx };
            if real < 0 || real >= n {
                return Err(idx_frame(
                    "tuple index out of range".to_owned(),
                    "IndexError",
                ));
            }
            let received = o_def.outputs[real as usize];
            if !validate_node_input(received, &input_type) {
                errors.push(jobj! {
                    "type" => "return_type_mismatch",
                    "message" => "Return type mismatch between linked nodes",
                    "details" => format!("{x}, received_type({received}) mismatch input_type({})", py::py_str(&input_type)),
                    "extra_info" => jobj!{
                        "input_name" => x, "input_config" => info, "received_type" => received, "linked_node" => val.clone()
                    },
                });
                continue;
            }
            match validate_inputs(ctx, prompt, &o_id) {
                Ok((false, _)) => {
                    valid = false;
                    continue;
                }
                Ok(_) => {}
                Err(ex) => {
                    valid = false;
                    let tb = vec![
                        J::from(frame(
                            base,
                            808,
                            "validate_inputs",
                            "r = await validate_inputs(prompt_id, prompt, o_id, validated)",
                            &format!("    {}", "^".repeat(57)),
                        )),
                        J::from(ex.frame),
                    ];
                    let reasons = vec![jobj! {
                        "type" => "exception_during_inner_validation",
                        "message" => "Exception when validating inner node",
                        "details" => ex.message.as_str(),
                        "extra_info" => jobj!{
                            "input_name" => x,
                            "input_config" => info,
                            "exception_message" => ex.message.as_str(),
                            "exception_type" => ex.type_name,
                            "traceback" => tb,
                            "linked_node" => val.clone(),
                        },
                    }];
                    ctx.set_validated(&o_id, (false, reasons));
                    continue;
                }
            }
        } else {
            let mut v = val.clone();
            if let J::Obj(o) = &v
                && let Some(inner) = o.get("__value__")
            {
                v = inner.clone();
                coerced.push((x.to_owned(), v.clone()));
            }
            let ty_name = input_type.as_str().unwrap_or("");
            let conv = match ty_name {
                "INT" => Some(py::py_int(&v)),
                "FLOAT" => Some(py::py_float(&v)),
                "STRING" => Some(Ok(J::from(py::py_str(&v)))),
                "BOOLEAN" => Some(Ok(J::Bool(py::truthy(&v)))),
                _ => None,
            };
            match conv {
                Some(Ok(nv)) => {
                    v = nv;
                    coerced.push((x.to_owned(), v.clone()));
                }
                Some(Err(msg)) => {
                    errors.push(jobj! {
                        "type" => "invalid_input_type",
                        "message" => format!("Failed to convert an input value to a {ty_name} value"),
                        "details" => format!("{x}, {}, {msg}", py::py_str(&v)),
                        "extra_info" => jobj!{
                            "input_name" => x, "input_config" => info, "received_value" => v.clone(), "exception_message" => msg
                        },
                    });
                    continue;
                }
                None => {}
            }
            if !def.validate_args.contains(&x) {
                let num = v.as_f64().or(match v {
                    J::Bool(b) => Some(if b { 1.0 } else { 0.0 }),
                    _ => None,
                });
                if let (Some(min), Some(n)) = (extra.get("min"), num)
                    && n < min.as_f64().unwrap_or(f64::NEG_INFINITY)
                {
                    errors.push(jobj! {
                            "type" => "value_smaller_than_min",
                            "message" => format!("Value {} smaller than min of {}", py::py_str(&v), py::py_str(min)),
                            "details" => x,
                            "extra_info" => jobj!{"input_name" => x, "input_config" => info, "received_value" => v.clone()},
                        });
                    continue;
                }
                if let (Some(max), Some(n)) = (extra.get("max"), num)
                    && n > max.as_f64().unwrap_or(f64::INFINITY)
                {
                    errors.push(jobj! {
                            "type" => "value_bigger_than_max",
                            "message" => format!("Value {} bigger than max of {}", py::py_str(&v), py::py_str(max)),
                            "details" => x,
                            "extra_info" => jobj!{"input_name" => x, "input_config" => info, "received_value" => v.clone()},
                        });
                    continue;
                }
                if let J::Arr(options) = &input_type
                    && !options.iter().any(|o| py::py_eq(o, &v))
                {
                    let (list_info, config) = if options.len() > 20 {
                        (format!("(list of length {})", options.len()), J::Null)
                    } else {
                        (py::repr(&input_type), info.clone())
                    };
                    errors.push(jobj! {
                            "type" => "value_not_in_list",
                            "message" => "Value not in list",
                            "details" => format!("{x}: '{}' not in {list_info}", py::py_str(&v)),
                            "extra_info" => jobj!{"input_name" => x, "input_config" => config, "received_value" => v.clone()},
                        });
                    continue;
                }
            }
        }
    }
    // Coerced widget values are written back into the prompt (what /queue and history show).
    if let Some(J::Obj(inp)) = prompt
        .get_mut(id)
        .and_then(|n| n.as_obj_mut())
        .and_then(|n| n.get_mut("inputs"))
    {
        for (k, v) in coerced {
            inp.insert(k, v);
        }
    }
    // VALIDATE_INPUTS (LoadImage): the file must exist.
    if !def.validate_args.is_empty()
        && let Some(image) = inputs.get("image")
        && !matches!(image, J::Arr(_))
    {
        let name = py::py_str(image);
        let (n, dir) = ctx.files.annotated(&name);
        let path = py::join(&dir.unwrap_or_else(|| ctx.files.input_dir()), &n);
        if !ctx.files.exists(&path) {
            errors.push(jobj! {
                "type" => "custom_validation_failed",
                "message" => "Custom validation failed for node",
                "details" => format!("image - Invalid image file: {name}"),
                "extra_info" => jobj!{"input_name" => "image"},
            });
        }
    }
    Ok((valid, errors))
}

/// Which outputs run: `partial_execution_targets` membership with Python's `in`.
fn partial_contains(p: &J, x: &str) -> Result<bool, ()> {
    match p {
        J::Arr(a) => Ok(a.iter().any(|v| v.as_str() == Some(x))),
        J::Str(s) => Ok(s.contains(x)),
        J::Obj(o) => Ok(o.contains(x)),
        _ => Err(()),
    }
}

/// Validate (and coerce in place) a prompt. `Ok((outputs_to_execute, node_errors))`.
pub(crate) fn validate_prompt(
    cat: &Catalogue,
    files: &Files,
    prompt: &mut Obj,
    partial: Option<&J>,
) -> Result<(Vec<String>, J), Rejected> {
    let invalid = |error: J| Rejected::Invalid {
        error,
        node_errors: J::obj(),
    };
    let mut outputs: Vec<String> = Vec::new();
    for (x, node) in prompt.iter() {
        let J::Obj(node) = node else {
            return Err(Rejected::Crash);
        };
        let Some(class_type) = node.get("class_type") else {
            return Err(invalid(jobj! {
                "type" => "invalid_prompt",
                "message" => "Cannot execute because a node is missing the class_type property.",
                "details" => format!("Node ID '#{x}'"),
                "extra_info" => jobj!{},
            }));
        };
        if matches!(class_type, J::Arr(_) | J::Obj(_)) {
            return Err(Rejected::Crash);
        }
        let Some(def) = class_type.as_str().and_then(|c| cat.get(c)) else {
            return Err(invalid(jobj! {
                "type" => "invalid_prompt",
                "message" => format!("Cannot execute because node {} does not exist.", py::py_str(class_type)),
                "details" => format!("Node ID '#{x}'"),
                "extra_info" => jobj!{},
            }));
        };
        if def.output_node {
            let take = match partial {
                None | Some(J::Null) => true,
                Some(p) => partial_contains(p, x).map_err(|()| Rejected::Crash)?,
            };
            if take {
                outputs.push(x.to_owned());
            }
        }
    }
    if outputs.is_empty() {
        return Err(invalid(jobj! {
            "type" => "prompt_no_outputs",
            "message" => "Prompt has no outputs",
            "details" => "",
            "extra_info" => jobj!{},
        }));
    }
    let input_files = files.files_in(&files.input_dir());
    let mut ctx = Ctx {
        cat,
        files,
        input_files,
        base: files.base().to_owned(),
        validated: Vec::new(),
        visiting: HashSet::new(),
    };
    let mut good: Vec<String> = Vec::new();
    let mut errors: Vec<(String, Vec<J>)> = Vec::new();
    let mut node_errors = Obj::new();
    for o in &outputs {
        let (ok, reasons) = match validate_inputs(&mut ctx, prompt, o) {
            Ok(r) => r,
            Err(ex) => {
                let reasons = vec![jobj! {
                    "type" => "exception_during_validation",
                    "message" => "Exception when validating node",
                    "details" => ex.message.as_str(),
                    "extra_info" => jobj!{
                        "exception_type" => ex.type_name,
                        "traceback" => vec![
                            J::from(frame(&ctx.base, 1029, "validate_prompt",
                                "m = await validate_inputs(prompt_id, prompt, o, validated)",
                                "    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^")),
                            J::from(ex.frame),
                        ],
                    },
                }];
                ctx.set_validated(o, (false, reasons.clone()));
                (false, reasons)
            }
        };
        if ok {
            good.push(o.clone());
            continue;
        }
        errors.push((o.clone(), reasons));
        for (node_id, (v, reasons)) in &ctx.validated {
            if *v || reasons.is_empty() {
                continue;
            }
            if !node_errors.contains(node_id) {
                let class_type = class_of(prompt, node_id).unwrap_or_default().to_owned();
                node_errors.insert(
                    node_id.clone(),
                    jobj! {"errors" => reasons.clone(), "dependent_outputs" => Vec::<J>::new(), "class_type" => class_type},
                );
            }
            if let Some(J::Arr(deps)) = node_errors
                .get_mut(node_id)
                .and_then(J::as_obj_mut)
                .and_then(|e| e.get_mut("dependent_outputs"))
            {
                deps.push(J::from(o.as_str()));
            }
        }
    }
    if good.is_empty() {
        let mut lines = Vec::new();
        for (_, reasons) in &errors {
            for r in reasons {
                let m = r.get("message").map(py::py_str).unwrap_or_default();
                let d = r.get("details").map(py::py_str).unwrap_or_default();
                lines.push(format!("{m}: {d}"));
            }
        }
        return Err(Rejected::Invalid {
            error: jobj! {
                "type" => "prompt_outputs_failed_validation",
                "message" => "Prompt outputs failed validation",
                "details" => lines.join("\n"),
                "extra_info" => jobj!{},
            },
            node_errors: J::Obj(node_errors),
        });
    }
    Ok((good, J::Obj(node_errors)))
}

/// Python `is_link`.
pub(crate) fn is_link(v: &J) -> Option<(&str, &J)> {
    match v {
        J::Arr(a) if a.len() == 2 && matches!(a[1], J::Num(_)) => Some((a[0].as_str()?, &a[1])),
        _ => None,
    }
}
