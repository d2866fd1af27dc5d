//! Watching plugin files (and extra paths) for changes.
//!
//! `cargo build` replaces the `.so` by deleting it and linking a new file
//! (a new inode): a watch on the file itself is lost after the first build,
//! and write events never reach that path. So the folder is watched and
//! events are filtered by name; any event (but reads, which our own hashing
//! causes) starts a quiet period, and only when nothing happened for that long
//! is the file looked at. A file that is missing is "not ready yet"; whether
//! its content really changed is decided by hash, by the caller.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Waker;
use notify::{RecursiveMode, Watcher};

use crate::config::WorkerConfig;

/// How long the files must stay quiet before we look.
pub const QUIET: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Trigger {
    /// The group's plugin file changed (roll only if its hash did).
    Plugin(usize),
    /// One of the group's `watch_paths` changed (always roll).
    Extra(usize),
}

struct Target {
    trigger: Trigger,
    path: PathBuf,
    /// A folder: any path under it matches.
    tree: bool,
}

pub struct Watch {
    _watcher: notify::RecommendedWatcher,
    rx: Receiver<PathBuf>,
    targets: Vec<Target>,
    dirty: BTreeSet<Trigger>,
    due: Option<Instant>,
}

impl Watch {
    /// Starts watching; `None` when no group asks for it.
    pub fn new(groups: &[WorkerConfig], waker: Arc<Waker>) -> notify::Result<Option<Watch>> {
        let mut targets = Vec::new();
        for (g, w) in groups.iter().enumerate() {
            if !w.watch {
                continue;
            }
            targets.push(Target {
                trigger: Trigger::Plugin(g),
                path: w.plugin.clone(),
                tree: false,
            });
            for p in &w.watch_paths {
                targets.push(Target {
                    trigger: Trigger::Extra(g),
                    path: p.clone(),
                    tree: p.is_dir(),
                });
            }
        }
        if targets.is_empty() {
            return Ok(None);
        }
        let (tx, rx) = channel();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                let Ok(ev) = res else { return };
                if ev.kind.is_access() {
                    return;
                }
                for p in ev.paths {
                    let _ = tx.send(p);
                }
                let _ = waker.wake();
            })?;
        let mut dirs = HashSet::new();
        for t in &targets {
            let dir = if t.tree {
                t.path.clone()
            } else {
                parent(&t.path)
            };
            if dirs.insert(dir.clone()) {
                let mode = if t.tree {
                    RecursiveMode::Recursive
                } else {
                    RecursiveMode::NonRecursive
                };
                if let Err(e) = watcher.watch(&dir, mode) {
                    tracing::warn!("cannot watch {}: {e}", dir.display());
                }
            }
        }
        Ok(Some(Watch {
            _watcher: watcher,
            rx,
            targets,
            dirty: BTreeSet::new(),
            due: None,
        }))
    }

    /// Takes the events the watcher thread sent.
    pub fn drain(&mut self, now: Instant) {
        while let Ok(path) = self.rx.try_recv() {
            for t in &self.targets {
                let hit = if t.tree {
                    path.starts_with(&t.path)
                } else {
                    path == t.path
                };
                if hit {
                    self.dirty.insert(t.trigger.clone());
                    self.due = Some(now + QUIET);
                }
            }
        }
    }

    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// The triggers whose quiet period has passed.
    pub fn take(&mut self, now: Instant) -> Vec<Trigger> {
        match self.due {
            Some(d) if d <= now => {
                self.due = None;
                std::mem::take(&mut self.dirty).into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    /// Looks again a little later (a reload was already running).
    pub fn retry(&mut self, triggers: Vec<Trigger>, now: Instant) {
        self.dirty.extend(triggers);
        self.due = Some(now + QUIET);
    }
}

fn parent(p: &Path) -> PathBuf {
    p.parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}
