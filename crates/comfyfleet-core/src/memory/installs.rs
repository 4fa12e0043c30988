//! [`InstallStore`] for [`MemoryStore`]: installs, their events and the recorded packs, kept in
//! the same mutex as the jobs so every call is atomic. The rules here are the reference the
//! durable stores follow (and the install conformance suite checks).

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;

use super::MemoryStore;
use crate::error::StoreError;
use crate::ids::InstallId;
use crate::install::{
    InstallEvent, InstallEventKind, InstallFilter, InstallRecord, InstallState, InstallStore,
    InstalledPack,
};
use crate::time::Timestamp;

/// The install half of the store's state.
#[derive(Debug, Default)]
pub(super) struct Installs {
    records: BTreeMap<InstallId, InstallRecord>,
    events: HashMap<InstallId, Vec<InstallEvent>>,
    /// Keyed by (instance, name), so one instance's packs are a sorted range.
    packs: BTreeMap<(String, String), InstalledPack>,
}

fn is_active(state: InstallState) -> bool {
    !state.is_terminal()
}

impl Installs {
    /// The queued or running install on `instance` other than `except`, if any.
    fn active_on(&self, instance: &str, except: Option<InstallId>) -> Option<InstallId> {
        self.records
            .values()
            .find(|r| Some(r.id) != except && r.spec.instance == instance && is_active(r.state))
            .map(|r| r.id)
    }

    /// Deletes terminal installs that finished before `cutoff`, with their events; how many.
    pub(super) fn prune(&mut self, cutoff: Timestamp) -> u64 {
        let doomed: Vec<InstallId> = self
            .records
            .values()
            .filter(|r| r.state.is_terminal() && finished_at(r) < cutoff)
            .map(|r| r.id)
            .collect();
        for id in &doomed {
            self.records.remove(id);
            self.events.remove(id);
        }
        doomed.len() as u64
    }
}

/// When a terminal record finished: its `finished_at`, else its last change (a terminal record
/// never changes again).
pub fn finished_at(record: &InstallRecord) -> Timestamp {
    record.finished_at.unwrap_or(record.updated_at)
}

fn active_conflict(instance: &str, active: InstallId) -> StoreError {
    StoreError::Conflict(format!(
        "instance {instance} already has an active install: {active}"
    ))
}

#[async_trait]
impl InstallStore for MemoryStore {
    async fn create_install(&self, record: &InstallRecord) -> Result<InstallEvent, StoreError> {
        let mut s = self.lock();
        let i = &mut s.installs;
        if i.records.contains_key(&record.id) {
            return Err(StoreError::Conflict(format!(
                "install {} already exists",
                record.id
            )));
        }
        if let Some(active) = i.active_on(&record.spec.instance, None) {
            return Err(active_conflict(&record.spec.instance, active));
        }
        let ev = InstallEvent {
            install: record.id,
            seq: 1,
            at: record.created_at,
            kind: InstallEventKind::Created,
        };
        i.records.insert(record.id, record.clone());
        i.events.insert(record.id, vec![ev.clone()]);
        Ok(ev)
    }

    async fn get_install(&self, id: InstallId) -> Result<Option<InstallRecord>, StoreError> {
        Ok(self.lock().installs.records.get(&id).cloned())
    }

    async fn list_installs(
        &self,
        filter: &InstallFilter,
    ) -> Result<Vec<InstallRecord>, StoreError> {
        let limit = check_limit(filter.limit)?;
        let s = self.lock();
        let upper = filter
            .before
            .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        Ok(s.installs
            .records
            .range((std::ops::Bound::Unbounded, upper))
            .rev()
            .map(|(_, r)| r)
            .filter(|r| {
                filter
                    .instance
                    .as_ref()
                    .is_none_or(|i| &r.spec.instance == i)
            })
            .filter(|r| filter.states.is_empty() || filter.states.contains(&r.state))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn update_install(
        &self,
        record: &InstallRecord,
        events: &[InstallEventKind],
    ) -> Result<Vec<InstallEvent>, StoreError> {
        let mut s = self.lock();
        let i = &mut s.installs;
        let stored = i
            .records
            .get(&record.id)
            .ok_or(StoreError::InstallNotFound(record.id))?;
        if stored.state.is_terminal() {
            return Err(StoreError::InvalidInput(format!(
                "install {} is finished ({})",
                record.id, stored.state
            )));
        }
        if stored.version != record.version {
            return Err(StoreError::Conflict(format!(
                "install {} was changed by another writer (stored version {}, written over {})",
                record.id, stored.version, record.version
            )));
        }
        let version = record.version.checked_add(1).ok_or_else(|| {
            StoreError::InvalidInput(format!("install {}: version overflow", record.id))
        })?;
        if is_active(record.state)
            && let Some(active) = i.active_on(&record.spec.instance, Some(record.id))
        {
            return Err(active_conflict(&record.spec.instance, active));
        }
        let mut new = record.clone();
        new.version = version;
        i.records.insert(record.id, new);
        let log = i.events.entry(record.id).or_default();
        let first = log.last().map_or(0, |e| e.seq) + 1;
        let out: Vec<InstallEvent> = (first..)
            .zip(events)
            .map(|(seq, kind)| InstallEvent {
                install: record.id,
                seq,
                at: record.updated_at,
                kind: kind.clone(),
            })
            .collect();
        log.extend(out.iter().cloned());
        Ok(out)
    }

    async fn install_events(
        &self,
        id: InstallId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<InstallEvent>, StoreError> {
        let s = self.lock();
        if !s.installs.records.contains_key(&id) {
            return Err(StoreError::InstallNotFound(id));
        }
        Ok(s.installs
            .events
            .get(&id)
            .map(|log| {
                // Seqs are 1, 2, 3, … in order: the events after `after` start at index `after`.
                let start = usize::try_from(after).unwrap_or(usize::MAX).min(log.len());
                log[start..].iter().take(limit).cloned().collect()
            })
            .unwrap_or_default())
    }

    async fn instance_packs(&self, instance: &str) -> Result<Vec<InstalledPack>, StoreError> {
        let s = self.lock();
        Ok(s.installs
            .packs
            .range((instance.to_owned(), String::new())..)
            .take_while(|((i, _), _)| i == instance)
            .map(|(_, p)| p.clone())
            .collect())
    }

    async fn record_packs(&self, packs: &[InstalledPack]) -> Result<(), StoreError> {
        let mut s = self.lock();
        for p in packs {
            s.installs
                .packs
                .insert((p.instance.clone(), p.name.clone()), p.clone());
        }
        Ok(())
    }
}

/// Checks [`InstallFilter::limit`] (1–1000).
pub fn check_limit(limit: usize) -> Result<usize, StoreError> {
    if (1..=1000).contains(&limit) {
        Ok(limit)
    } else {
        Err(StoreError::InvalidInput(format!(
            "limit must be 1 to 1000, got {limit}"
        )))
    }
}
