//! The scheduling loop's state, apart from the tasks themselves: the due-time heaps (credential
//! wake-ups, age deadlines, cron fires), each credential's generation and busy flag, the queue of
//! runs ready to start, the count of runs in flight, and the cron cursors.
//!
//! Every method that looks at time takes `now` from the caller, so the whole state machine runs
//! on a fake clock in tests; the async loop in `mod.rs` only adds tasks, sleeping and the state
//! store.
//!
//! Invariants: a credential is queued or running at most once (its busy flag); at most
//! `max_concurrent` runs are started and not yet finished; a heap entry whose generation is not
//! the credential's current one is stale and dropped (a run's result or another process's change
//! replaced it); a cron fire queues each idle member of its group once, never one that is failed
//! or waiting for a retry; a run queued by a cron fire starts inside the schedule's window or not
//! at all.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use chrono::{DateTime, Utc};
use tracing::{debug, info};

use crate::protocol::Trigger;
use crate::schedule::CronCursor;
use crate::state::Status;

use super::table::{lock, Table};

/// A queued run: which slot, why, and for cron runs the fire time its window counts from.
type Queued = (usize, Trigger, Option<DateTime<Utc>>);

/// What the scheduling loop knows besides the table: what is due when, and what is queued or
/// running.
pub(super) struct Queue {
    max_concurrent: usize,
    /// Per-credential wake-ups (interval, retry, revocation, overdue): (at, slot, generation).
    wakes: BinaryHeap<Reverse<(i64, usize, u64)>>,
    /// Per slot: bumped whenever its wake-up is replaced, which makes older entries stale.
    generation: Vec<u64>,
    /// Per slot: queued or running.
    busy: Vec<bool>,
    /// Runs started and not finished.
    running: usize,
    /// Runs waiting for a free place, in the order they became due.
    ready: VecDeque<Queued>,
    /// Age-condition deadlines: (at, slot).
    ages: BinaryHeap<Reverse<(i64, usize)>>,
    /// One cursor per cron group.
    crons: Vec<CronCursor>,
    /// Each cron group's next fire: (at, group).
    cron_fires: BinaryHeap<Reverse<(i64, usize)>>,
    /// When this queue was built (Unix seconds): a wake-up due by then was overdue.
    started: i64,
}

impl Queue {
    /// The state at start-up, at wall-clock `now`: each slot's wake-up from its live view, each
    /// cron group waiting for its first fire after `now`, nothing queued or running.
    pub(super) fn new(table: &Table, max_concurrent: usize, now: DateTime<Utc>) -> Self {
        let n = table.len();
        let mut wakes = BinaryHeap::with_capacity(n);
        for (i, slot) in table.slots().enumerate() {
            if let Some(at) = lock(slot.live).wake {
                wakes.push(Reverse((at, i, 0)));
            }
        }
        let crons: Vec<CronCursor> = table
            .groups
            .iter()
            .map(|g| CronCursor::new(g.schedule.clone(), now))
            .collect();
        let cron_fires = crons
            .iter()
            .enumerate()
            .filter_map(|(g, c)| Some(Reverse((c.next()?.timestamp(), g))))
            .collect();
        Self {
            max_concurrent,
            wakes,
            generation: vec![0; n],
            busy: vec![false; n],
            running: 0,
            ready: VecDeque::new(),
            ages: BinaryHeap::new(),
            crons,
            cron_fires,
            started: now.timestamp(),
        }
    }

    /// How many credential wake-ups are pending.
    pub(super) fn pending(&self) -> usize {
        self.wakes.len()
    }

    /// How many runs are in flight.
    #[cfg(test)]
    pub(super) fn running(&self) -> usize {
        self.running
    }

    /// Per slot: whether it is queued or running.
    pub(super) fn busy(&self) -> &[bool] {
        &self.busy
    }

    /// The earliest instant (Unix seconds) any heap waits for.
    pub(super) fn next_wake(&self) -> Option<i64> {
        [
            self.wakes.peek().map(|Reverse((at, _, _))| *at),
            self.ages.peek().map(|Reverse((at, _))| *at),
            self.cron_fires.peek().map(|Reverse((at, _))| *at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Watches slot `i`'s next age deadline, if it has one.
    pub(super) fn watch_age(&mut self, i: usize, at: Option<i64>) {
        if let Some(at) = at {
            self.ages.push(Reverse((at, i)));
        }
    }

    /// Takes the age deadlines that have passed at `now`: the slots whose age conditions to
    /// check (a slot may appear more than once; checking is idempotent).
    pub(super) fn due_ages(&mut self, now: i64) -> Vec<usize> {
        let mut due = Vec::new();
        while let Some(Reverse((at, i))) = self.ages.peek().copied() {
            if at > now {
                break;
            }
            self.ages.pop();
            due.push(i);
        }
        due
    }

    /// Queues what is due at wall-clock `now`: the slots whose wake-up has come (unless stale or
    /// busy), then the idle members of every cron group that fires.
    pub(super) fn enqueue_due(&mut self, table: &Table, now: DateTime<Utc>) {
        let seconds = now.timestamp();
        while let Some(Reverse((at, i, g))) = self.wakes.peek().copied() {
            if at > seconds {
                break;
            }
            self.wakes.pop();
            if g != self.generation[i] || self.busy[i] {
                continue;
            }
            self.busy[i] = true;
            let trigger = match lock(table.slot(i).live).status {
                Status::Retrying => Trigger::Retry,
                _ if at <= self.started => Trigger::Overdue,
                Status::Grace | Status::RevokeDelayed => Trigger::Schedule,
                _ if table.slot(i).spec.schedule.every.is_some() => Trigger::Interval,
                _ => Trigger::Schedule,
            };
            self.ready.push_back((i, trigger, None));
        }
        while let Some(Reverse((at, g))) = self.cron_fires.peek().copied() {
            if at > seconds {
                break;
            }
            self.cron_fires.pop();
            if let Some(fire) = self.crons[g].poll(now) {
                debug!(group = g, fire = %fire, "cron fired");
                for &i in &table.groups[g].members {
                    let live = *lock(table.slot(i).live);
                    // A retrying credential waits for its backoff (a heap entry), not the cron.
                    if !self.busy[i] && !matches!(live.status, Status::Failed | Status::Retrying) {
                        self.busy[i] = true;
                        self.ready.push_back((i, Trigger::Schedule, Some(fire)));
                    }
                }
            }
            if let Some(next) = self.crons[g].next() {
                self.cron_fires.push(Reverse((next.timestamp(), g)));
            }
        }
    }

    /// The next queued run to start at wall-clock `now`, if a place is free: counted as running
    /// from here. A cron run whose window has closed is dropped (the slot is idle again and
    /// waits for the next fire).
    pub(super) fn next_run(
        &mut self,
        table: &Table,
        now: DateTime<Utc>,
    ) -> Option<(usize, Trigger)> {
        while self.running < self.max_concurrent {
            let (i, trigger, fire) = self.ready.pop_front()?;
            let spec = table.slot(i).spec;
            if let Some(fire) = fire.filter(|f| !spec.schedule.in_window(*f, now)) {
                info!(credential = %spec.id, fire = %fire, "rotation window missed; waiting for the next fire time");
                self.busy[i] = false;
                continue;
            }
            self.running += 1;
            return Some((i, trigger));
        }
        None
    }

    /// Slot `i`'s run is over: the slot is idle again and wakes at `wake`.
    pub(super) fn finished(&mut self, i: usize, wake: Option<i64>) {
        self.running = self.running.saturating_sub(1);
        self.busy[i] = false;
        self.reschedule(i, wake);
    }

    /// Replaces idle slot `i`'s wake-up (another process changed its record): any earlier
    /// entry becomes stale.
    pub(super) fn reschedule(&mut self, i: usize, wake: Option<i64>) {
        self.generation[i] += 1;
        if let Some(at) = wake {
            self.wakes.push(Reverse((at, i, self.generation[i])));
        }
    }

    /// Shutdown: forgets the runs not started yet (their slots are idle again).
    pub(super) fn drop_queued(&mut self) {
        for (i, _, _) in self.ready.drain(..) {
            self.busy[i] = false;
        }
    }
}
