//! A small multipart/form-data parser shared by the simulators (they parse uploads the way the
//! real servers' frameworks would, including the malformed bodies clients send them).

use bytes::Bytes;

/// A multipart/form-data part.
pub(crate) struct Part {
    pub(crate) name: String,
    pub(crate) filename: Option<String>,
    pub(crate) data: Bytes,
}

fn header_param(h: &str, key: &str) -> Option<String> {
    for piece in h.split(';').map(str::trim) {
        if let Some(v) = piece.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
            let v = v.trim();
            return Some(if let Some(q) = v.strip_prefix('"') {
                q.strip_suffix('"').unwrap_or(q).replace("\\\"", "\"")
            } else {
                v.to_owned()
            });
        }
    }
    None
}

pub(crate) fn parse_multipart(content_type: &str, body: &Bytes) -> Option<Vec<Part>> {
    if !content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        return None;
    }
    let boundary = header_param(content_type, "boundary")?;
    let delim = format!("--{boundary}");
    let find = |hay: &[u8], needle: &[u8], from: usize| -> Option<usize> {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    let mut parts = Vec::new();
    let mut pos = find(body, delim.as_bytes(), 0)? + delim.len();
    loop {
        if body.get(pos..pos + 2) == Some(b"--") {
            break;
        }
        pos += 2; // CRLF after the delimiter
        let head_end = find(body, b"\r\n\r\n", pos)?;
        let head = String::from_utf8_lossy(&body[pos..head_end]).into_owned();
        let data_start = head_end + 4;
        let next = find(body, format!("\r\n{delim}").as_bytes(), data_start)?;
        let mut name = String::new();
        let mut filename = None;
        for line in head.split("\r\n") {
            if line
                .to_ascii_lowercase()
                .starts_with("content-disposition:")
            {
                name = header_param(line, "name").unwrap_or_default();
                filename = header_param(line, "filename");
            }
        }
        parts.push(Part {
            name,
            filename,
            data: body.slice(data_start..next),
        });
        pos = next + 2 + delim.len();
    }
    Some(parts)
}
