//! Python-isms the server leaks: `repr`, `str`, `float.__repr__`, `json.dumps`, `int()`/`float()`
//! conversions, truthiness and `posixpath`.

use super::json::J;

/// `repr(x)` of a JSON-decoded Python value.
pub(crate) fn repr(v: &J) -> String {
    let mut out = String::new();
    write_repr(v, &mut out);
    out
}

fn write_repr(v: &J, out: &mut String) {
    match v {
        J::Null => out.push_str("None"),
        J::Bool(true) => out.push_str("True"),
        J::Bool(false) => out.push_str("False"),
        J::Num(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                out.push_str(&float_repr(f));
            } else {
                out.push_str(&n.to_string());
            }
        }
        J::Str(s) => out.push_str(&str_repr(s)),
        J::Arr(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(x, out);
            }
            out.push(']');
        }
        J::Obj(o) => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&str_repr(k));
                out.push_str(": ");
                write_repr(x, out);
            }
            out.push('}');
        }
    }
}

/// `str(x)`: strings are themselves, everything else is `repr`.
pub(crate) fn py_str(v: &J) -> String {
    match v {
        J::Str(s) => s.clone(),
        other => repr(other),
    }
}

/// `repr(str)`.
pub(crate) fn str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if (0x80..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `float.__repr__`: shortest round-trip digits, Python's switch to exponent notation.
pub(crate) fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "inf".to_owned()
        } else {
            "-inf".to_owned()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".to_owned()
        } else {
            "0.0".to_owned()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-5".
    let e = format!("{f:e}");
    let (mant, exp) = e.split_once('e').unwrap_or((e.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let digits: String = mant.chars().filter(char::is_ascii_digit).collect();
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = (exp + 1) as usize;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.push_str(&"0".repeat(int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.push_str(&"0".repeat((-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.abs()));
    }
    out
}

/// `json.dumps(x)` with Python's defaults (`", "`, `": "`, `ensure_ascii=True`).
pub(crate) fn json_dumps(v: &J) -> String {
    let mut out = String::new();
    write_dumps(v, &mut out);
    out
}

fn write_dumps(v: &J, out: &mut String) {
    match v {
        J::Null => out.push_str("null"),
        J::Bool(true) => out.push_str("true"),
        J::Bool(false) => out.push_str("false"),
        J::Num(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    out.push_str(&float_repr(f));
                }
            } else {
                out.push_str(&n.to_string());
            }
        }
        J::Str(s) => write_json_str(s, out),
        J::Arr(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_dumps(x, out);
            }
            out.push(']');
        }
        J::Obj(o) => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json_str(k, out);
                out.push_str(": ");
                write_dumps(x, out);
            }
            out.push('}');
        }
    }
}

fn write_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's type name, for error messages.
pub(crate) fn type_name(v: &J) -> &'static str {
    match v {
        J::Null => "NoneType",
        J::Bool(_) => "bool",
        J::Num(n) if n.is_f64() => "float",
        J::Num(_) => "int",
        J::Str(_) => "str",
        J::Arr(_) => "list",
        J::Obj(_) => "dict",
    }
}

/// `bool(x)`.
pub(crate) fn truthy(v: &J) -> bool {
    match v {
        J::Null => false,
        J::Bool(b) => *b,
        J::Num(n) => n.as_f64().is_some_and(|f| f != 0.0),
        J::Str(s) => !s.is_empty(),
        J::Arr(a) => !a.is_empty(),
        J::Obj(o) => !o.is_empty(),
    }
}

fn strip_underscores(s: &str) -> Option<String> {
    // Python allows single underscores between digits.
    let b = s.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b'_' {
            let ok =
                i > 0 && i + 1 < b.len() && b[i - 1].is_ascii_digit() && b[i + 1].is_ascii_digit();
            if !ok {
                return None;
            }
        }
    }
    Some(s.replace('_', ""))
}

/// `int(x)`; `Err` holds `str(exception)`.
pub(crate) fn py_int(v: &J) -> Result<J, String> {
    match v {
        J::Bool(b) => Ok(J::from(i64::from(*b))),
        J::Num(n) if !n.is_f64() => Ok(v.clone()),
        J::Num(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if f.is_nan() {
                Err("cannot convert float NaN to integer".to_owned())
            } else if f.is_infinite() {
                Err("cannot convert float infinity to integer".to_owned())
            } else {
                Ok(int_from_i128(f.trunc() as i128))
            }
        }
        J::Str(s) => {
            let err = || format!("invalid literal for int() with base 10: {}", str_repr(s));
            let t = s.trim();
            let (sign, digits) = match t.as_bytes().first() {
                Some(b'+') => (1, &t[1..]),
                Some(b'-') => (-1, &t[1..]),
                _ => (1, t),
            };
            let digits = strip_underscores(digits).ok_or_else(err)?;
            if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
                return Err(err());
            }
            let n: i128 = digits.parse().map_err(|_| err())?;
            Ok(int_from_i128(sign * n))
        }
        other => Err(format!(
            "int() argument must be a string, a bytes-like object or a real number, not '{}'",
            type_name(other)
        )),
    }
}

fn int_from_i128(n: i128) -> J {
    if let Ok(i) = i64::try_from(n) {
        J::from(i)
    } else if let Ok(u) = u64::try_from(n) {
        J::from(u)
    } else {
        J::float(n as f64)
    }
}

/// `float(x)`; `Err` holds `str(exception)`.
pub(crate) fn py_float(v: &J) -> Result<J, String> {
    match v {
        J::Bool(b) => Ok(J::float(if *b { 1.0 } else { 0.0 })),
        J::Num(n) => Ok(J::float(n.as_f64().unwrap_or(0.0))),
        J::Str(s) => {
            let err = || format!("could not convert string to float: {}", str_repr(s));
            let t = strip_underscores(s.trim()).ok_or_else(err)?;
            let lower = t.to_ascii_lowercase();
            let ok_word = [
                "inf",
                "+inf",
                "-inf",
                "infinity",
                "+infinity",
                "-infinity",
                "nan",
                "+nan",
                "-nan",
            ];
            if !ok_word.contains(&lower.as_str()) && !t.bytes().any(|c| c.is_ascii_digit()) {
                return Err(err());
            }
            t.parse::<f64>().map(J::float).map_err(|_| err())
        }
        other => Err(format!(
            "float() argument must be a string or a real number, not '{}'",
            type_name(other)
        )),
    }
}

/// Python `==` between two JSON-decoded values (numbers compare numerically, `True == 1`).
pub(crate) fn py_eq(a: &J, b: &J) -> bool {
    fn num(v: &J) -> Option<f64> {
        match v {
            J::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            J::Num(n) => n.as_f64(),
            _ => None,
        }
    }
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

// ---- posixpath -------------------------------------------------------------------------------

/// `os.path.normpath`.
pub(crate) fn normpath(p: &str) -> String {
    if p.is_empty() {
        return ".".to_owned();
    }
    let initial = if p.starts_with("//") && !p.starts_with("///") {
        2
    } else if p.starts_with('/') {
        1
    } else {
        0
    };
    let mut comps: Vec<&str> = Vec::new();
    for c in p.split('/') {
        if c.is_empty() || c == "." {
            continue;
        }
        if c != ".." || (initial == 0 && comps.is_empty()) || comps.last() == Some(&"..") {
            comps.push(c);
        } else if !comps.is_empty() {
            comps.pop();
        }
    }
    let joined = comps.join("/");
    let out = format!("{}{}", "/".repeat(initial), joined);
    if out.is_empty() { ".".to_owned() } else { out }
}

/// `os.path.join(a, b)`.
pub(crate) fn join(a: &str, b: &str) -> String {
    if b.starts_with('/') {
        b.to_owned()
    } else if a.is_empty() || a.ends_with('/') {
        format!("{a}{b}")
    } else {
        format!("{a}/{b}")
    }
}

/// `os.path.abspath` with `cwd` as the working directory.
pub(crate) fn abspath(p: &str, cwd: &str) -> String {
    if p.starts_with('/') {
        normpath(p)
    } else {
        normpath(&join(cwd, p))
    }
}

/// `os.path.basename`.
pub(crate) fn basename(p: &str) -> &str {
    p.rsplit_once('/').map_or(p, |(_, b)| b)
}

/// `os.path.dirname`.
pub(crate) fn dirname(p: &str) -> String {
    match p.rfind('/') {
        None => String::new(),
        Some(i) => {
            let head = &p[..=i];
            let trimmed = head.trim_end_matches('/');
            if trimmed.is_empty() {
                head.to_owned()
            } else {
                trimmed.to_owned()
            }
        }
    }
}

/// `os.path.splitext`.
pub(crate) fn splitext(p: &str) -> (String, String) {
    let base_start = p.rfind('/').map_or(0, |i| i + 1);
    let base = &p[base_start..];
    let leading = base.len() - base.trim_start_matches('.').len();
    match base[leading..].rfind('.') {
        Some(i) => {
            let dot = base_start + leading + i;
            (p[..dot].to_owned(), p[dot..].to_owned())
        }
        None => (p.to_owned(), String::new()),
    }
}

/// `os.path.commonpath((a, b))` for absolute paths.
pub(crate) fn commonpath(a: &str, b: &str) -> String {
    let split = |p: &str| -> Vec<String> {
        p.split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(str::to_owned)
            .collect()
    };
    let (ca, cb) = (split(a), split(b));
    let common: Vec<String> = ca
        .iter()
        .zip(cb.iter())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x.clone())
        .collect();
    let prefix = if a.starts_with('/') { "/" } else { "" };
    format!("{prefix}{}", common.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        assert_eq!(float_repr(5.0), "5.0");
        assert_eq!(float_repr(0.31), "0.31");
        assert_eq!(float_repr(1e-5), "1e-05");
        assert_eq!(float_repr(1e16), "1e+16");
        assert_eq!(float_repr(123456.5), "123456.5");
        assert_eq!(float_repr(2.384185791015625e-07), "2.384185791015625e-07");
        assert_eq!(float_repr(0.0001), "0.0001");
    }

    #[test]
    fn paths() {
        assert_eq!(
            normpath("/opt/ComfyUI/output/../escape"),
            "/opt/ComfyUI/escape"
        );
        assert_eq!(normpath("../escape"), "../escape");
        assert_eq!(dirname("../escape"), "..");
        assert_eq!(basename("../escape"), "escape");
        assert_eq!(
            commonpath("/opt/ComfyUI/output", "/opt/ComfyUI"),
            "/opt/ComfyUI"
        );
        assert_eq!(splitext("a.b.png"), ("a.b".to_owned(), ".png".to_owned()));
        assert_eq!(splitext(".png"), (".png".to_owned(), String::new()));
        assert_eq!(dirname("fleet"), "");
    }

    #[test]
    fn reprs() {
        assert_eq!(str_repr("it's"), "\"it's\"");
        assert_eq!(str_repr("a'b\"c"), "'a\\'b\"c'");
        assert_eq!(
            py_int(&J::from("5.0")).unwrap_err(),
            "invalid literal for int() with base 10: '5.0'"
        );
        assert_eq!(py_int(&J::float(5.7)).unwrap(), J::from(5i64));
    }
}
