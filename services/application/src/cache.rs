//! The command path's memory of aggregates: for each aggregate this process
//! last loaded or committed, its state and the sequence of its last event, so
//! that the next command on it decides without reading its events again.
//!
//! Only ever a guess, and sound as one also when several processes append:
//!
//! - A command decided on a remembered state appends at the remembered
//!   sequence + 1. If anybody appended to the aggregate since (another process,
//!   or this one on a path that went around the memory), that sequence is taken:
//!   the append breaks the log's unique `(aggregate, sequence)` key, nothing is
//!   written, the entry is forgotten, and the one [`RacePolicy`] runs the
//!   command again on the events as stored, like any lost race.
//! - A decision that appends nothing (a refusal, a change to what already is)
//!   cannot be checked that way, so [`Commands`] takes it again on the stored
//!   events before it answers.
//! - Only a commit that succeeded is remembered; any failure of the append
//!   (a conflict, an unknown outcome) forgets the aggregate.
//!
//! Bounded: at most `capacity` aggregates; a new one beyond that makes room by
//! dropping an arbitrary other (a hash map's first entry: no bookkeeping per
//! hit). `capacity` 0 remembers nothing.
//!
//! [`RacePolicy`]: crate::RacePolicy
//! [`Commands`]: crate::Commands

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use cqrs_es::Aggregate;

/// How many aggregates a process remembers by default: a few MiB of state (a
/// file's is a few hundred bytes), and more than the files a busy tenant's
/// staff work on at once.
pub const DEFAULT_AGGREGATE_CACHE: usize = 16_384;

/// The remembered aggregates of one process (see the module docs).
pub struct AggregateCache {
    capacity: usize,
    entries: Mutex<HashMap<Key, Entry>>,
}

/// Aggregate type and id: ids are unique per type only.
type Key = (&'static str, String);

struct Entry {
    /// The sequence of the aggregate's last event the state includes.
    sequence: usize,
    /// An `A` of the key's aggregate type.
    state: Box<dyn Any + Send + Sync>,
}

impl AggregateCache {
    /// Remembers at most `capacity` aggregates.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The remembered state of `A` `id` and the sequence it stands at.
    pub fn get<A: Aggregate + Clone + 'static>(&self, id: &str) -> Option<(A, usize)> {
        let entries = self.entries();
        let entry = entries.get(&(A::TYPE, id.to_owned()))?;
        let state = entry.state.downcast_ref::<A>()?;
        Some((state.clone(), entry.sequence))
    }

    /// Remembers `state` of `A` `id` at `sequence`, unless a later one is
    /// remembered already (a load that read the events before another command
    /// of this process committed must not take the entry back).
    pub fn put<A: Aggregate + Send + Sync + 'static>(&self, id: &str, state: A, sequence: usize) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries();
        let key = (A::TYPE, id.to_owned());
        if entries
            .get(&key)
            .is_some_and(|entry| entry.sequence > sequence)
        {
            return;
        }
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            let victim = entries.keys().next().cloned();
            if let Some(victim) = victim {
                entries.remove(&victim);
            }
        }
        let state = Box::new(state);
        entries.insert(key, Entry { sequence, state });
    }

    /// Forgets `A` `id`: the next command on it loads its events.
    pub fn forget<A: Aggregate>(&self, id: &str) {
        self.entries().remove(&(A::TYPE, id.to_owned()));
    }

    /// How many aggregates are remembered.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The map; a panic elsewhere while it was held leaves nothing half
    /// changed that matters (every entry is a guess), so poisoning is ignored.
    fn entries(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for AggregateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateCache")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use dossier_domain::{File, Task};

    use super::*;

    #[test]
    fn it_answers_what_was_remembered_of_that_type_only() {
        let cache = AggregateCache::new(8);
        cache.put("a", File::default(), 3);
        assert_eq!(cache.get::<File>("a"), Some((File::default(), 3)));
        // Ids are unique per aggregate type only.
        assert_eq!(cache.get::<Task>("a"), None);
        assert_eq!(cache.get::<File>("b"), None);
        cache.forget::<File>("a");
        assert_eq!(cache.get::<File>("a"), None);
    }

    #[test]
    fn a_later_state_is_never_taken_back_by_an_earlier_one() {
        let cache = AggregateCache::new(8);
        cache.put("a", File::default(), 5);
        cache.put("a", File::default(), 4);
        assert_eq!(
            cache.get::<File>("a").map(|(_, sequence)| sequence),
            Some(5)
        );
        cache.put("a", File::default(), 6);
        assert_eq!(
            cache.get::<File>("a").map(|(_, sequence)| sequence),
            Some(6)
        );
    }

    #[test]
    fn it_stays_within_its_capacity() {
        let cache = AggregateCache::new(3);
        for i in 0..10 {
            cache.put(&i.to_string(), File::default(), 1);
            assert!(cache.len() <= 3);
        }
        // The newest is always kept.
        assert!(cache.get::<File>("9").is_some());
        // Replacing a remembered one makes no room.
        cache.put("9", File::default(), 2);
        assert_eq!(cache.len(), 3);

        let none = AggregateCache::new(0);
        none.put("a", File::default(), 1);
        assert!(none.is_empty());
    }
}
