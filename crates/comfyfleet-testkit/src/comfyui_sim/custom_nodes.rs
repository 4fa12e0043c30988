//! The `custom_nodes/` loader (`nodes.init_external_custom_nodes` of ComfyUI 0.3.64), without a
//! Python interpreter: each pack's `NODE_CLASS_MAPPINGS` is read from its source with a small
//! hand parser (string-literal keys of the dict literal, `NODE_CLASS_MAPPINGS["X"] = …`,
//! `NODE_CLASS_MAPPINGS.update({…})`, and `from .mod import NODE_CLASS_MAPPINGS` followed into the
//! pack). What the classes do is not simulated here: the catalogue gives them a generic
//! pass-through definition.

use std::fs;
use std::path::{Path, PathBuf};

/// One loaded pack: the module name (folder, or file stem of a single-file `.py` module) and its
/// class names in source order.
pub(crate) type Pack = (String, Vec<String>);

const MAPPINGS: &str = "NODE_CLASS_MAPPINGS";
/// How many `from .x import NODE_CLASS_MAPPINGS` hops are followed.
const MAX_IMPORT_DEPTH: usize = 4;

/// Scan `dir` like `init_external_custom_nodes`: every sub-directory with an `__init__.py` and
/// every `*.py` file is a module; `__pycache__`, hidden entries and `*.disabled` are skipped.
/// Entries are visited in name order (Python's `os.listdir` order is the file system's; sorted is
/// the deterministic choice). Modules that fail are logged like ComfyUI logs them and skipped.
/// Blocking file I/O: call from `spawn_blocking`.
pub(crate) fn scan(dir: &Path) -> Vec<Pack> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(
                "comfyui_sim: cannot list custom nodes directory {}: {e}",
                dir.display()
            );
            return Vec::new();
        }
    };
    let mut names: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    names.sort();
    let mut packs = Vec::new();
    for (name, path) in names {
        if name == "__pycache__" || name.starts_with('.') || name.ends_with(".disabled") {
            continue;
        }
        let (module, source) = if path.is_dir() {
            (name.clone(), path.join("__init__.py"))
        } else if let Some(stem) = name.strip_suffix(".py") {
            (stem.to_owned(), path.clone())
        } else {
            continue;
        };
        let text = match fs::read_to_string(&source) {
            Ok(t) => t,
            Err(e) => {
                let why = if e.kind() == std::io::ErrorKind::NotFound {
                    format!(
                        "[Errno 2] No such file or directory: '{}'",
                        source.display()
                    )
                } else {
                    e.to_string()
                };
                tracing::warn!(
                    "Cannot import {} module for custom nodes: {why}",
                    path.display()
                );
                continue;
            }
        };
        let base = if path.is_dir() {
            path.clone()
        } else {
            dir.to_path_buf()
        };
        match mappings_in(&text, &base, 0) {
            Some(classes) => packs.push((module, classes)),
            None => tracing::warn!(
                "Skip {} module for custom nodes due to the lack of NODE_CLASS_MAPPINGS.",
                path.display()
            ),
        }
    }
    packs
}

/// The class names `text` puts into `NODE_CLASS_MAPPINGS`, or `None` when it never defines it.
/// `package` is the directory relative imports resolve against.
pub(crate) fn mappings_in(text: &str, package: &Path, depth: usize) -> Option<Vec<String>> {
    let code = strip_comments(text);
    let mut defined = false;
    let mut keys: Vec<String> = Vec::new();
    let push = |k: String, keys: &mut Vec<String>| {
        if !keys.contains(&k) {
            keys.push(k);
        }
    };
    let mut pos = 0;
    while let Some(found) = code[pos..].find(MAPPINGS) {
        let start = pos + found;
        pos = start + MAPPINGS.len();
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
            continue;
        }
        let rest = &code[pos..];
        if rest.starts_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        // A statement must start here (only indentation before it on its line).
        let line_start = code[..start].rfind('\n').map_or(0, |i| i + 1);
        let at_statement = code[line_start..start].trim().is_empty();
        let after = rest.trim_start_matches([' ', '\t']);
        if at_statement {
            if let Some(value) = assignment_value(after) {
                defined = true;
                if value.starts_with('{') {
                    for k in dict_keys(value) {
                        push(k, &mut keys);
                    }
                }
            } else if let Some(sub) = after.strip_prefix('[') {
                if let Some((k, tail)) = string_literal(sub.trim_start())
                    && tail.trim_start().starts_with(']')
                {
                    push(k, &mut keys);
                }
            } else if let Some(arg) = after.strip_prefix(".update(") {
                let arg = arg.trim_start();
                if arg.starts_with('{') {
                    for k in dict_keys(arg) {
                        push(k, &mut keys);
                    }
                }
            }
        }
        if let Some(imported) = imported_from(&code, start, package, depth) {
            defined = true;
            for k in imported {
                push(k, &mut keys);
            }
        }
    }
    // `from .nodes import *` also brings the name in.
    for module in star_imports(&code) {
        if let Some(imported) = follow(&module, package, depth) {
            defined = true;
            for k in imported {
                push(k, &mut keys);
            }
        }
    }
    defined.then_some(keys)
}

/// `= value` / `: Annotation = value` (not `==`): the text after `=`.
fn assignment_value(after: &str) -> Option<&str> {
    let after = match after.strip_prefix(':') {
        Some(ann) => {
            let eq = ann.find('=')?;
            if ann[..eq].contains('\n') {
                return None;
            }
            &ann[eq..]
        }
        None => after,
    };
    let value = after.strip_prefix('=')?;
    if value.starts_with('=') {
        return None;
    }
    Some(value.trim_start())
}

/// When the name at `start` sits in a `from .x import …` statement: the mappings of module
/// `.x`.
fn imported_from(code: &str, start: usize, package: &Path, depth: usize) -> Option<Vec<String>> {
    // The statement may span lines inside parentheses: look back for its `from`.
    let stmt_start = code[..start]
        .rfind("from ")
        .filter(|&i| !code[i..start].contains(')') && code[i..start].contains(" import"))?;
    let stmt_line = code[..stmt_start].rfind('\n').map_or(0, |i| i + 1);
    if !code[stmt_line..stmt_start].trim().is_empty() {
        return None;
    }
    let spans_lines = code[stmt_start..start].contains('\n');
    if spans_lines && !code[stmt_start..start].contains('(') {
        return None;
    }
    let stmt = &code[stmt_start + 5..start];
    let (module, _names) = stmt.split_once(" import")?;
    let module = module.trim();
    // `NODE_CLASS_MAPPINGS as X` binds another name.
    let tail = code[start + MAPPINGS.len()..].trim_start();
    if tail.starts_with("as ") {
        return None;
    }
    follow(module, package, depth)
}

/// Modules of `from .x import *` statements.
fn star_imports(code: &str) -> Vec<String> {
    code.lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix("from ")?;
            let (module, names) = l.split_once(" import ")?;
            (names.trim() == "*").then(|| module.trim().to_owned())
        })
        .collect()
}

/// Resolve a relative module (`.nodes`, `.pkg.mod`, `..x` is not followed) inside `package`
/// and read its mappings.
fn follow(module: &str, package: &Path, depth: usize) -> Option<Vec<String>> {
    if depth >= MAX_IMPORT_DEPTH {
        return None;
    }
    let rel = module.strip_prefix('.')?;
    if rel.is_empty() || rel.starts_with('.') {
        return None;
    }
    let mut path = package.to_path_buf();
    for part in rel.split('.') {
        path.push(part);
    }
    let (file, sub_package) = if path.is_dir() {
        (path.join("__init__.py"), path.clone())
    } else {
        (path.with_extension("py"), path.parent()?.to_path_buf())
    };
    let text = fs::read_to_string(file).ok()?;
    mappings_in(&text, &sub_package, depth + 1)
}

/// Replace `#` comments by spaces (strings are kept intact, so a `#` inside one stays).
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        match c {
            '#' => {
                let end = rest.find('\n').unwrap_or(rest.len());
                out.extend(std::iter::repeat_n(' ', end));
                rest = &rest[end..];
            }
            '"' | '\'' => {
                let len = string_len(rest);
                out.push_str(&rest[..len]);
                rest = &rest[len..];
            }
            _ => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// Byte length of the string literal that `s` starts with (quote included; to the end of `s`
/// when it is unterminated).
fn string_len(s: &str) -> usize {
    let q = s.as_bytes()[0];
    let triple = s.len() >= 3 && s.as_bytes()[1] == q && s.as_bytes()[2] == q;
    let b = s.as_bytes();
    let mut i = if triple { 3 } else { 1 };
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            c if c == q => {
                if !triple {
                    return i + 1;
                }
                if b.len() >= i + 3 && b[i + 1] == q && b[i + 2] == q {
                    return i + 3;
                }
                i += 1;
            }
            b'\n' if !triple => return i,
            _ => i += 1,
        }
    }
    b.len()
}

/// A plain string literal at the start of `s` (optionally `r`/`u` prefixed; f-strings and bytes
/// are not keys we can know): its value and the text after it.
fn string_literal(s: &str) -> Option<(String, &str)> {
    let (prefix_len, raw) = match s.as_bytes() {
        [b'r' | b'R', b'"' | b'\'', ..] => (1, true),
        [b'u' | b'U', b'"' | b'\'', ..] => (1, false),
        [b'"' | b'\'', ..] => (0, false),
        _ => return None,
    };
    let lit = &s[prefix_len..];
    let len = string_len(lit);
    let q = if lit[1..].starts_with(&lit[..1]) && lit[2..].starts_with(&lit[..1]) && len >= 6 {
        3
    } else {
        1
    };
    if len < 2 * q {
        return None;
    }
    let body = &lit[q..len - q];
    let value = if raw { body.to_owned() } else { unescape(body) };
    Some((value, &s[prefix_len + len..]))
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('\n') | None => {}
            Some(other @ ('\\' | '\'' | '"')) => out.push(other),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
        }
    }
    out
}

/// The string-literal keys of the dict literal `s` starts with (`{`): a string directly inside
/// the outer braces followed by `:`. Nested values, `**spread` entries and comprehensions add
/// nothing.
fn dict_keys(s: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut depth = 0usize;
    let mut rest = s;
    // The string just read at depth 1, waiting for its `:`.
    let mut pending: Option<String> = None;
    while let Some(c) = rest.chars().next() {
        match c {
            '{' | '[' | '(' => {
                depth += 1;
                pending = None;
                rest = &rest[1..];
            }
            '}' | ']' | ')' => {
                depth = depth.saturating_sub(1);
                pending = None;
                rest = &rest[1..];
                if depth == 0 {
                    break;
                }
            }
            ':' if depth == 1 => {
                if let Some(k) = pending.take() {
                    keys.push(k);
                }
                rest = &rest[1..];
            }
            c if c.is_whitespace() || c == '\\' => rest = &rest[c.len_utf8()..],
            _ => {
                if let Some((value, tail)) = string_literal(rest) {
                    pending = (depth == 1).then_some(value);
                    rest = tail;
                } else if c == '"' || c == '\'' {
                    // An f-string or bytes literal: skip it whole.
                    let len = string_len(rest);
                    pending = None;
                    rest = &rest[len..];
                } else {
                    let len = rest
                        .find(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
                        .unwrap_or(rest.len())
                        .max(c.len_utf8());
                    // A prefixed literal (`f"…"`, `b'…'`): skip the literal with its prefix.
                    let tail = &rest[len..];
                    rest = if tail.starts_with(['"', '\'']) {
                        &tail[string_len(tail)..]
                    } else {
                        tail
                    };
                    pending = None;
                }
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn keys(src: &str) -> Option<Vec<String>> {
        mappings_in(src, Path::new("/nonexistent"), 0)
    }

    #[test]
    fn dict_literals_multi_line_both_quotes_and_comments() {
        let src = r#"
from .nodes import A, B  # NODE_CLASS_MAPPINGS = {"Fake": x}
NODE_CLASS_MAPPINGS = {
    "ClassA": A,   # "NotAKey": 1
    'ClassB' : make({"nested": 1}, key="kw"),
    # "Commented": C,
    "With # hash": D,
    **OTHER,
    "Lambda": lambda x: x,
    f"Fstr{1}": E,
    r'Raw\d': F,
}
NODE_DISPLAY_NAME_MAPPINGS = {"ClassA": "Class A"}
"#;
        assert_eq!(
            keys(src).unwrap(),
            ["ClassA", "ClassB", "With # hash", "Lambda", "Raw\\d"]
        );
    }

    #[test]
    fn other_forms() {
        assert_eq!(keys("x = 1\n"), None);
        assert_eq!(keys("MY_NODE_CLASS_MAPPINGS = {'A': 1}\n"), None);
        assert_eq!(keys("if NODE_CLASS_MAPPINGS == {}: pass\n"), None);
        assert_eq!(
            keys("NODE_CLASS_MAPPINGS = {}\n").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            keys("NODE_CLASS_MAPPINGS: dict[str, type] = {'A': 1}\nNODE_CLASS_MAPPINGS['B'] = 2\nNODE_CLASS_MAPPINGS.update({\"C\": 3})\n").unwrap(),
            ["A", "B", "C"]
        );
        assert_eq!(
            keys("try:\n    NODE_CLASS_MAPPINGS = {\"A\": 1}\nexcept ImportError:\n    pass\n")
                .unwrap(),
            ["A"]
        );
        assert_eq!(keys("s = 'NODE_CLASS_MAPPINGS = {\"A\": 1}'\n"), None);
    }

    #[test]
    fn relative_imports_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let pack = dir.path().join("Pack");
        fs::create_dir_all(pack.join("sub")).unwrap();
        fs::write(
            pack.join("__init__.py"),
            "from .nodes import (\n    NODE_CLASS_MAPPINGS,\n    NODE_DISPLAY_NAME_MAPPINGS,\n)\n",
        )
        .unwrap();
        fs::write(
            pack.join("nodes.py"),
            "from .sub.more import *\nNODE_CLASS_MAPPINGS = {'N1': 1}\n",
        )
        .unwrap();
        fs::write(
            pack.join("sub").join("more.py"),
            "NODE_CLASS_MAPPINGS = {'N2': 1}\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("single.py"),
            "NODE_CLASS_MAPPINGS = {'S': 1}\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("README.md"),
            "NODE_CLASS_MAPPINGS = {'R': 1}\n",
        )
        .unwrap();
        let packs = scan(dir.path());
        assert_eq!(
            packs,
            vec![
                ("Pack".to_owned(), vec!["N1".to_owned(), "N2".to_owned()]),
                ("single".to_owned(), vec!["S".to_owned()]),
            ]
        );
    }
}
