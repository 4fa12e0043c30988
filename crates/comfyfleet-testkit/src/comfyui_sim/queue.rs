//! `PromptQueue`: the heap array (Python `heapq`, so `/queue` shows the same order), the
//! history dict and the node-output cache.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::image::{Image, Mask};
use super::json::{J, Obj};

/// A queue item `(number, prompt_id, prompt, extra_data, outputs_to_execute)`.
#[derive(Clone, Debug)]
pub(crate) struct QueueItem {
    pub(crate) number: J,
    pub(crate) prompt_id: String,
    pub(crate) prompt: Obj,
    pub(crate) extra_data: J,
    pub(crate) outputs: Vec<String>,
    /// Insertion sequence: breaks the (number, prompt_id) ties Python would crash on.
    pub(crate) seq: u64,
}

impl QueueItem {
    /// The JSON 5-tuple.
    pub(crate) fn to_j(&self) -> J {
        J::Arr(vec![
            self.number.clone(),
            J::from(self.prompt_id.as_str()),
            J::Obj(self.prompt.clone()),
            self.extra_data.clone(),
            J::from(self.outputs.clone()),
        ])
    }
    fn lt(&self, other: &QueueItem) -> bool {
        let a = self.number.as_f64().unwrap_or(0.0);
        let b = other.number.as_f64().unwrap_or(0.0);
        match a.partial_cmp(&b).unwrap_or(Ordering::Equal) {
            Ordering::Less => true,
            Ordering::Greater => false,
            Ordering::Equal => match self.prompt_id.cmp(&other.prompt_id) {
                Ordering::Less => true,
                Ordering::Greater => false,
                Ordering::Equal => self.seq < other.seq,
            },
        }
    }
}

fn sift_down(heap: &mut [QueueItem], start: usize, mut pos: usize) {
    while pos > start {
        let parent = (pos - 1) >> 1;
        if heap[pos].lt(&heap[parent]) {
            heap.swap(pos, parent);
            pos = parent;
        } else {
            break;
        }
    }
}

fn sift_up(heap: &mut [QueueItem], mut pos: usize) {
    // CPython's bottom-up variant: walk the smaller child down to a leaf, then sift down.
    let end = heap.len();
    let start = pos;
    let mut child = 2 * pos + 1;
    while child < end {
        let right = child + 1;
        if right < end && !heap[child].lt(&heap[right]) {
            child = right;
        }
        heap.swap(pos, child);
        pos = child;
        child = 2 * pos + 1;
    }
    sift_down(heap, start, pos);
}

/// `heapq.heappush`.
pub(crate) fn heap_push(heap: &mut Vec<QueueItem>, item: QueueItem) {
    heap.push(item);
    let last = heap.len() - 1;
    sift_down(heap, 0, last);
}

/// `heapq.heappop`.
pub(crate) fn heap_pop(heap: &mut Vec<QueueItem>) -> Option<QueueItem> {
    let last = heap.pop()?;
    if heap.is_empty() {
        return Some(last);
    }
    let top = std::mem::replace(&mut heap[0], last);
    sift_up(heap, 0);
    Some(top)
}

/// `heapq.heapify`.
pub(crate) fn heapify(heap: &mut [QueueItem]) {
    for i in (0..heap.len() / 2).rev() {
        sift_up(heap, i);
    }
}

/// The history dict: insertion ordered, re-insert keeps the position.
#[derive(Debug, Default)]
pub(crate) struct History {
    next: u64,
    by_seq: BTreeMap<u64, (String, J)>,
    by_id: HashMap<String, u64>,
}

impl History {
    pub(crate) fn len(&self) -> usize {
        self.by_seq.len()
    }
    pub(crate) fn get(&self, id: &str) -> Option<&J> {
        self.by_id
            .get(id)
            .and_then(|s| self.by_seq.get(s))
            .map(|(_, e)| e)
    }
    pub(crate) fn insert(&mut self, id: String, entry: J) {
        if let Some(s) = self.by_id.get(&id)
            && let Some(slot) = self.by_seq.get_mut(s)
        {
            slot.1 = entry;
            return;
        }
        let s = self.next;
        self.next += 1;
        self.by_id.insert(id.clone(), s);
        self.by_seq.insert(s, (id, entry));
    }
    pub(crate) fn remove(&mut self, id: &str) -> bool {
        match self.by_id.remove(id) {
            Some(s) => self.by_seq.remove(&s).is_some(),
            None => false,
        }
    }
    pub(crate) fn pop_oldest(&mut self) {
        if let Some((_, (id, _))) = self.by_seq.pop_first() {
            self.by_id.remove(&id);
        }
    }
    pub(crate) fn clear(&mut self) {
        self.by_seq.clear();
        self.by_id.clear();
    }
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &J)> {
        self.by_seq.values().map(|(k, v)| (k, v))
    }
}

/// A value flowing between nodes.
#[derive(Clone, Debug)]
pub(crate) enum Val {
    Image(Arc<Image>),
    Mask(Arc<Mask>),
    Json(J),
}

/// A cache entry: the node's outputs and, if it had any, its UI dict with meta.
#[derive(Clone, Debug)]
pub(crate) struct CacheEntry {
    pub(crate) outputs: Arc<Vec<Val>>,
    /// `{"meta": {...}, "output": {...}}`
    pub(crate) ui: Option<J>,
}

/// The classic cache: keyed by input signature, cleaned to the current prompt's signatures.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    pub(crate) entries: HashMap<String, CacheEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: f64, id: &str, seq: u64) -> QueueItem {
        QueueItem {
            number: J::float(n),
            prompt_id: id.to_owned(),
            prompt: Obj::new(),
            extra_data: J::obj(),
            outputs: vec![],
            seq,
        }
    }

    #[test]
    fn heap_matches_python_heapq() {
        // heapq: push 5,3,4,1,2 → [1, 2, 4, 5, 3]
        let mut h = Vec::new();
        for (i, n) in [5.0, 3.0, 4.0, 1.0, 2.0].into_iter().enumerate() {
            heap_push(&mut h, item(n, &format!("p{n}"), i as u64));
        }
        let order: Vec<f64> = h.iter().map(|i| i.number.as_f64().unwrap()).collect();
        assert_eq!(order, vec![1.0, 2.0, 4.0, 5.0, 3.0]);
        let popped = heap_pop(&mut h).unwrap();
        assert_eq!(popped.number.as_f64(), Some(1.0));
        // heappop on [1,2,4,5,3] → [2,3,4,5]
        let order: Vec<f64> = h.iter().map(|i| i.number.as_f64().unwrap()).collect();
        assert_eq!(order, vec![2.0, 3.0, 4.0, 5.0]);
    }
}
