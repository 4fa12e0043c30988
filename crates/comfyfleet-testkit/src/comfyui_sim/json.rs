//! An insertion-ordered JSON value.
//!
//! ComfyUI is Python: every dict keeps insertion order, and that order leaks into what the server
//! sends (`str(prompt)` inside `execution_error.current_inputs`, `json.dumps(prompt)` in PNG
//! metadata, the oldest→newest order of `GET /history`). `serde_json::Map` sorts keys unless
//! `preserve_order` is enabled somewhere in the build, so the simulator keeps its own ordered type.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Number;

/// A JSON value whose objects keep insertion order (Python `dict` semantics).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum J {
    Null,
    Bool(bool),
    Num(Number),
    Str(String),
    Arr(Vec<J>),
    Obj(Obj),
}

/// An insertion-ordered JSON object. Re-inserting a key keeps its position (like `dict`).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Obj(pub(crate) Vec<(String, J)>);

impl Obj {
    pub(crate) fn new() -> Self {
        Obj(Vec::new())
    }
    pub(crate) fn get(&self, key: &str) -> Option<&J> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut J> {
        self.0.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
    /// `d[key] = value`.
    pub(crate) fn insert(&mut self, key: impl Into<String>, value: impl Into<J>) {
        let key = key.into();
        let value = value.into();
        if let Some(slot) = self.get_mut(&key) {
            *slot = value;
        } else {
            self.0.push((key, value));
        }
    }
    pub(crate) fn remove(&mut self, key: &str) -> Option<J> {
        let pos = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(pos).1)
    }
    pub(crate) fn keys(&self) -> impl DoubleEndedIterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &J)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl J {
    pub(crate) fn obj() -> J {
        J::Obj(Obj::new())
    }
    pub(crate) fn get(&self, key: &str) -> Option<&J> {
        match self {
            J::Obj(o) => o.get(key),
            _ => None,
        }
    }
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            J::Str(s) => Some(s),
            _ => None,
        }
    }
    pub(crate) fn as_obj(&self) -> Option<&Obj> {
        match self {
            J::Obj(o) => Some(o),
            _ => None,
        }
    }
    pub(crate) fn as_obj_mut(&mut self) -> Option<&mut Obj> {
        match self {
            J::Obj(o) => Some(o),
            _ => None,
        }
    }
    pub(crate) fn as_f64(&self) -> Option<f64> {
        match self {
            J::Num(n) => n.as_f64(),
            _ => None,
        }
    }
    pub(crate) fn as_i64(&self) -> Option<i64> {
        match self {
            J::Num(n) => n.as_i64(),
            _ => None,
        }
    }
    /// Serialized compact JSON text.
    pub(crate) fn to_json(&self) -> String {
        // Serializing an in-memory tree of strings/numbers cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| "null".to_owned())
    }
    pub(crate) fn float(f: f64) -> J {
        Number::from_f64(f).map_or(J::Null, J::Num)
    }
}

impl From<&str> for J {
    fn from(s: &str) -> J {
        J::Str(s.to_owned())
    }
}
impl From<String> for J {
    fn from(s: String) -> J {
        J::Str(s)
    }
}
impl From<&String> for J {
    fn from(s: &String) -> J {
        J::Str(s.clone())
    }
}
impl From<bool> for J {
    fn from(b: bool) -> J {
        J::Bool(b)
    }
}
impl From<i64> for J {
    fn from(n: i64) -> J {
        J::Num(n.into())
    }
}
impl From<u64> for J {
    fn from(n: u64) -> J {
        J::Num(n.into())
    }
}
impl From<usize> for J {
    fn from(n: usize) -> J {
        J::Num((n as u64).into())
    }
}
impl From<f64> for J {
    fn from(f: f64) -> J {
        J::float(f)
    }
}
impl From<Obj> for J {
    fn from(o: Obj) -> J {
        J::Obj(o)
    }
}
impl From<Vec<J>> for J {
    fn from(a: Vec<J>) -> J {
        J::Arr(a)
    }
}
impl From<Vec<String>> for J {
    fn from(a: Vec<String>) -> J {
        J::Arr(a.into_iter().map(J::Str).collect())
    }
}
impl<T: Into<J>> From<Option<T>> for J {
    fn from(o: Option<T>) -> J {
        o.map_or(J::Null, Into::into)
    }
}

/// `jobj!{"a" => 1, "b" => "x"}` builds an ordered object.
macro_rules! jobj {
    () => { $crate::comfyui_sim::json::J::obj() };
    ($($k:expr => $v:expr),+ $(,)?) => {
        $crate::comfyui_sim::json::J::Obj($crate::comfyui_sim::json::Obj(vec![
            $(($k.to_string(), $crate::comfyui_sim::json::J::from($v))),+
        ]))
    };
}
pub(crate) use jobj;

impl Serialize for J {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            J::Null => s.serialize_unit(),
            J::Bool(b) => s.serialize_bool(*b),
            J::Num(n) => n.serialize(s),
            J::Str(v) => s.serialize_str(v),
            J::Arr(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            J::Obj(o) => o.serialize(s),
        }
    }
}

impl Serialize for Obj {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

struct JVisitor;

impl<'de> Visitor<'de> for JVisitor {
    type Value = J;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<J, E> {
        Ok(J::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<J, E> {
        Ok(J::Num(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<J, E> {
        Ok(J::Num(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<J, E> {
        Ok(J::float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<J, E> {
        Ok(J::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<J, E> {
        Ok(J::Str(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<J, E> {
        Ok(J::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<J, E> {
        Ok(J::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<J, D::Error> {
        J::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<J, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<J>()? {
            out.push(v);
        }
        Ok(J::Arr(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<J, A::Error> {
        let mut out = Obj::new();
        while let Some((k, v)) = map.next_entry::<String, J>()? {
            out.insert(k, v);
        }
        Ok(J::Obj(out))
    }
}

impl<'de> Deserialize<'de> for J {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<J, D::Error> {
        d.deserialize_any(JVisitor)
    }
}

/// Parse JSON text keeping object key order.
pub(crate) fn parse(bytes: &[u8]) -> Result<J, serde_json::Error> {
    serde_json::from_slice(bytes)
}
