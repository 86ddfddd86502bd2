//! Task health: what each long-running task last reported, for the watchdog, `/readyz` and STATUS.
//!
//! Tasks report after each unit of work (`ok`, `failed`) and mark long operations with a deadline
//! (`busy_until`). The systemd watchdog is only fed while no task is past its deadline, so a
//! wedged task gets the process restarted instead of looking healthy forever.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// The last word from one task.
#[derive(Debug, Clone, Serialize)]
pub struct TaskHealth {
    /// Whether the last unit of work succeeded.
    pub healthy: bool,
    /// When a unit of work last succeeded.
    pub last_ok: Option<DateTime<Utc>>,
    /// The last error, in words.
    pub last_error: Option<String>,
    /// When the last error happened.
    pub last_error_at: Option<DateTime<Utc>>,
    /// The deadline of the operation in progress, if any.
    #[serde(skip)]
    pub busy_until: Option<Instant>,
}

/// Health of every registered task; shared by reference.
#[derive(Debug, Default)]
pub struct Health {
    tasks: Mutex<BTreeMap<String, TaskHealth>>,
}

impl Health {
    /// Creates an empty registry.
    pub fn new() -> Health {
        Health::default()
    }

    fn update(&self, task: &str, f: impl FnOnce(&mut TaskHealth)) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let entry = tasks.entry(task.to_string()).or_insert(TaskHealth {
            healthy: true,
            last_ok: None,
            last_error: None,
            last_error_at: None,
            busy_until: None,
        });
        f(entry);
    }

    /// Records a successful unit of work.
    pub fn ok(&self, task: &str, now: DateTime<Utc>) {
        self.update(task, |t| {
            t.healthy = true;
            t.last_ok = Some(now);
            t.busy_until = None;
        });
    }

    /// Records a failure; the task stays registered as unhealthy until its next success.
    pub fn failed(&self, task: &str, error: &str, now: DateTime<Utc>) {
        self.update(task, |t| {
            t.healthy = false;
            t.last_error = Some(error.to_string());
            t.last_error_at = Some(now);
            t.busy_until = None;
        });
    }

    /// Marks the start of an operation that must finish before `deadline`.
    pub fn busy_until(&self, task: &str, deadline: Instant) {
        self.update(task, |t| t.busy_until = Some(deadline));
    }

    /// Forgets a task (stopped on reload or shutdown).
    pub fn remove(&self, task: &str) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.remove(task);
    }

    /// Tasks whose operation in progress is past its deadline.
    pub fn stuck(&self, now: Instant) -> Vec<String> {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks
            .iter()
            .filter(|(_, t)| t.busy_until.is_some_and(|d| d < now))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// A copy of every task's health.
    pub fn snapshot(&self) -> BTreeMap<String, TaskHealth> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// (healthy, total) among tasks whose name starts with `prefix`.
    pub fn count(&self, prefix: &str) -> (usize, usize) {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let matching: Vec<&TaskHealth> = tasks
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, t)| t)
            .collect();
        (
            matching.iter().filter(|t| t.healthy).count(),
            matching.len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_task_past_its_deadline_is_stuck_until_it_reports() {
        let h = Health::new();
        let now = Instant::now();
        h.busy_until("imap:a", now + Duration::from_secs(5));
        h.busy_until("imap:b", now - Duration::from_secs(1));
        assert_eq!(h.stuck(now), vec!["imap:b".to_string()]);
        h.ok("imap:b", Utc::now());
        assert!(h.stuck(now).is_empty());
        h.failed("imap:a", "connection refused", Utc::now());
        assert_eq!(h.count("imap:"), (1, 2));
    }
}
