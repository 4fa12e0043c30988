//! The simulated disk: `output/`, `input/`, `temp/` and `models/` under `base_dir`. Files
//! survive restarts (except `temp/`, which ComfyUI empties at start-up).

use std::collections::BTreeMap;

use bytes::Bytes;

use super::py;

/// An in-memory file tree keyed by normalised absolute path.
#[derive(Debug, Default)]
pub(crate) struct Files {
    base: String,
    map: BTreeMap<String, Bytes>,
}

impl Files {
    pub(crate) fn new(base: &str) -> Files {
        Files {
            base: py::normpath(base),
            map: BTreeMap::new(),
        }
    }
    pub(crate) fn base(&self) -> &str {
        &self.base
    }
    pub(crate) fn output_dir(&self) -> String {
        format!("{}/output", self.base)
    }
    pub(crate) fn input_dir(&self) -> String {
        format!("{}/input", self.base)
    }
    pub(crate) fn temp_dir(&self) -> String {
        format!("{}/temp", self.base)
    }
    /// `folder_paths.get_directory_by_type`.
    pub(crate) fn dir_by_type(&self, t: &str) -> Option<String> {
        match t {
            "output" => Some(self.output_dir()),
            "input" => Some(self.input_dir()),
            "temp" => Some(self.temp_dir()),
            _ => None,
        }
    }
    /// `folder_paths.annotated_filepath`: `"x.png [output]"` → `("x.png", Some(output_dir))`.
    pub(crate) fn annotated(&self, name: &str) -> (String, Option<String>) {
        for (suffix, t) in [
            ("[output]", "output"),
            ("[input]", "input"),
            ("[temp]", "temp"),
        ] {
            if name.ends_with(suffix) {
                let cut = name.len().saturating_sub(suffix.len() + 1);
                return (
                    name.get(..cut).unwrap_or("").to_owned(),
                    self.dir_by_type(t),
                );
            }
        }
        (name.to_owned(), None)
    }
    /// `folder_paths.get_annotated_filepath` (default directory: input).
    pub(crate) fn annotated_path(&self, name: &str) -> String {
        let (n, dir) = self.annotated(name);
        py::join(&dir.unwrap_or_else(|| self.input_dir()), &n)
    }
    fn key(&self, path: &str) -> String {
        py::abspath(path, &self.base)
    }
    pub(crate) fn is_file(&self, path: &str) -> bool {
        self.map.contains_key(&self.key(path))
    }
    /// File or (implicit) directory.
    pub(crate) fn exists(&self, path: &str) -> bool {
        let k = self.key(path);
        self.map.contains_key(&k) || self.is_dir_key(&k)
    }
    fn is_dir_key(&self, k: &str) -> bool {
        let prefix = if k.ends_with('/') {
            k.to_owned()
        } else {
            format!("{k}/")
        };
        self.map
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(p, _)| p.starts_with(&prefix))
    }
    pub(crate) fn is_dir(&self, path: &str) -> bool {
        self.is_dir_key(&self.key(path))
    }
    pub(crate) fn read(&self, path: &str) -> Option<Bytes> {
        self.map.get(&self.key(path)).cloned()
    }
    pub(crate) fn write(&mut self, path: &str, data: Bytes) {
        let k = self.key(path);
        self.map.insert(k, data);
    }
    /// `os.listdir`: names of the files and directories directly inside `dir`.
    pub(crate) fn list_dir(&self, dir: &str) -> Vec<String> {
        self.list_dir_starting(dir, "")
    }
    /// `list_dir` filtered to the names starting with `start`, found without visiting the
    /// others (a save scans its folder for its own prefix on every image, like ComfyUI; this
    /// keeps that O(log n) in a folder of n files instead of O(n)).
    pub(crate) fn list_dir_starting(&self, dir: &str, start: &str) -> Vec<String> {
        let k = self.key(dir);
        let prefix = if k.ends_with('/') { k } else { format!("{k}/") };
        let mut out: Vec<String> = Vec::new();
        for (p, _) in self.map.range(format!("{prefix}{start}")..) {
            let Some(rest) = p.strip_prefix(&prefix).filter(|r| r.starts_with(start)) else {
                break;
            };
            let first = rest.split('/').next().unwrap_or(rest).to_owned();
            if out.last() != Some(&first) {
                out.push(first);
            }
        }
        out
    }
    /// Files (not directories) directly inside `dir`, sorted.
    pub(crate) fn files_in(&self, dir: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .list_dir(dir)
            .into_iter()
            .filter(|n| self.is_file(&py::join(dir, n)))
            .collect();
        v.sort();
        v
    }
    /// Delete everything under `dir`.
    pub(crate) fn clear_dir(&mut self, dir: &str) {
        let k = self.key(dir);
        let prefix = format!("{k}/");
        self.map.retain(|p, _| !p.starts_with(&prefix));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_dir_starting_is_list_dir_filtered() {
        let mut f = Files::new("/srv");
        for p in [
            "/srv/output/a_00001_.png",
            "/srv/output/a_00002_.png",
            "/srv/output/a_dir_/x.png",
            "/srv/output/a_dir_/y.png",
            "/srv/output/ab_00001_.png",
            "/srv/output/b.png",
            "/srv/output2/a_00009_.png",
            "/srv/outputa_/a_00007_.png",
        ] {
            f.write(p, Bytes::new());
        }
        let all = f.list_dir("/srv/output");
        assert_eq!(
            all,
            [
                "a_00001_.png",
                "a_00002_.png",
                "a_dir_",
                "ab_00001_.png",
                "b.png"
            ]
        );
        for start in ["", "a", "a_", "a_dir_", "ab", "b", "c", "é"] {
            let want: Vec<String> = all
                .iter()
                .filter(|n| n.starts_with(start))
                .cloned()
                .collect();
            assert_eq!(
                f.list_dir_starting("/srv/output", start),
                want,
                "start {start:?}"
            );
        }
    }
}
