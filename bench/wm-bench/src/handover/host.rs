//! The wm-host under test in the handover scenarios: started with a config
//! of its own (`reload_mode`), reloaded through the CLI, its log read back.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::suite::Bins;

/// A running `wm-host start -d`; stopped, and its folder removed, on drop.
pub struct Host {
    bin: PathBuf,
    dir: PathBuf,
    config: PathBuf,
}

/// One `wm-host reload`, as its output tells it.
#[derive(Clone, Debug, Default)]
pub struct Reload {
    pub ok: bool,
    /// Wall time of the command, from spawning it to its exit.
    pub wall: Duration,
    /// `connections: N handed over, R refused, C closed, in X ms`, summed
    /// over the groups (None: the reload drained instead).
    pub moved: u64,
    pub refused: u64,
    pub closed: u64,
    pub host_ms: Option<u64>,
    /// The command's output, for errors.
    pub out: String,
}

impl Host {
    /// `taskset -c CPU wm-host start -d` with `count` workers of
    /// bench-hello-plugin on `scheme://127.0.0.1:port`.
    pub fn start(
        bins: &Bins,
        scheme: &str,
        count: usize,
        port: u16,
        drain: bool,
        cpu: usize,
    ) -> Result<Host, String> {
        let dir = std::env::temp_dir().join(format!("wm-bench-ho-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let config = dir.join("wm.toml");
        let text = format!(
            "[host]\nruntime_dir = \"run\"\nstop_timeout = \"2s\"\n\n\
             [[worker]]\nname = \"bench\"\nlisten = \"{scheme}://127.0.0.1:{port}\"\n\
             count = {count}\nplugin = \"{}\"\nreload_mode = \"{}\"\n",
            bins.hello_plugin.display(),
            if drain { "drain" } else { "handover" }
        );
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        let host = Host {
            bin: bins.host.clone(),
            dir,
            config,
        };
        let out = Command::new("taskset")
            .args(["-c", &cpu.to_string()])
            .arg(&host.bin)
            .args(["start", "-d", "-c"])
            .arg(&host.config)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("taskset: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "wm-host start failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let pids = host.worker_pids();
        if pids.len() != count {
            return Err(format!(
                "wm-host status names {} workers, {count} configured",
                pids.len()
            ));
        }
        Ok(host)
    }

    pub fn status(&self) -> Option<Value> {
        let out = Command::new(&self.bin)
            .args(["status", "--json", "-c"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())?
    }

    /// (pid, connections) of every worker.
    pub fn workers(&self) -> Vec<(u32, u64)> {
        let Some(st) = self.status() else {
            return Vec::new();
        };
        (st["workers"].as_array().cloned().unwrap_or_default().iter())
            .filter_map(|w| {
                Some((
                    w["pid"].as_u64()? as u32,
                    w["stats"]["connections"].as_u64().unwrap_or(0),
                ))
            })
            .collect()
    }

    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers().into_iter().map(|w| w.0).collect()
    }

    /// The daemon's log (`runtime_dir/wm-host.log`) from byte `from` on.
    pub fn log_since(&self, from: usize) -> String {
        let text = std::fs::read(self.dir.join("run/wm-host.log")).unwrap_or_default();
        String::from_utf8_lossy(text.get(from..).unwrap_or_default()).into_owned()
    }

    pub fn log_len(&self) -> usize {
        std::fs::metadata(self.dir.join("run/wm-host.log")).map_or(0, |m| m.len() as usize)
    }

    /// `wm-host reload -c CONFIG`, timed from outside.
    pub fn reload(&self) -> Reload {
        let t0 = Instant::now();
        let out = Command::new(&self.bin)
            .args(["reload", "-c"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .output();
        let wall = t0.elapsed();
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                return Reload {
                    wall,
                    out: format!("wm-host reload: {e}"),
                    ..Reload::default()
                }
            }
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut r = parse_reload(&text);
        r.ok = out.status.success() && r.ok;
        r.wall = wall;
        r.out = text;
        r
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .args(["stop", "-c"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads `wm-host reload`'s report: every group rolled, and its handover
/// lines summed.
pub fn parse_reload(text: &str) -> Reload {
    let mut r = Reload {
        ok: text.contains("workers rolled in") && !text.contains("FAILED"),
        ..Reload::default()
    };
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let ["connections:", m, "handed", "over,", rf, "refused,", c, "closed,", "in", ms, "ms"] =
            w.as_slice()
        {
            let n = |s: &str| s.parse::<u64>().unwrap_or(0);
            r.moved += n(m);
            r.refused += n(rf);
            r.closed += n(c);
            *r.host_ms.get_or_insert(0) += n(ms);
        }
    }
    r
}

/// From the log: the old workers' "handed N connections over to the
/// replacement in D" (D as Rust prints a `Duration`), as (N, ms).
pub fn handed_over(log: &str) -> Vec<(u64, f64)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split("handed ").nth(1)?;
            let (n, rest) = rest.split_once(" connections over to the replacement in ")?;
            Some((n.parse().ok()?, duration_ms(rest.trim())?))
        })
        .collect()
}

/// From the log: the new workers' "took over N connections from … in X ms",
/// as (N, ms).
pub fn took_over(log: &str) -> Vec<(u64, f64)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split("took over ").nth(1)?;
            let (n, rest) = rest.split_once(" connections from ")?;
            let ms = rest.split(" in ").last()?.split(" ms").next()?;
            Some((n.parse().ok()?, ms.trim().parse().ok()?))
        })
        .collect()
}

/// `236.232µs`, `12.5ms`, `1.2s`, `800ns` → milliseconds.
fn duration_ms(s: &str) -> Option<f64> {
    let s = s.split_whitespace().next()?;
    for (unit, mult) in [
        ("ns", 1e-6),
        ("µs", 1e-3),
        ("us", 1e-3),
        ("ms", 1.0),
        ("s", 1e3),
    ] {
        if let Some(v) = s.strip_suffix(unit) {
            return v.parse::<f64>().ok().map(|v| v * mult);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_reload_report() {
        let r = parse_reload(
            "bench: build c4ec8ad69769 -> c4ec8ad69769, 4/4 workers rolled in 0.31s\n  \
             connections: 9990 handed over, 0 refused, 10 closed, in 61 ms\n",
        );
        assert!(r.ok);
        assert_eq!(
            (r.moved, r.refused, r.closed, r.host_ms),
            (9990, 0, 10, Some(61))
        );
        let d = parse_reload(
            "bench: build a -> b, 1/1 workers rolled in 0.01s\n  connections drained \
             (reload_mode = \"drain\", or the new build cannot import)\n",
        );
        assert!(d.ok && d.host_ms.is_none());
        assert!(!parse_reload("bench: FAILED after 0/1 workers: boom\n").ok);
    }

    #[test]
    fn reads_the_workers_log_lines() {
        let log = "2026-11-30T18:19:07.709811Z  INFO worker{name=bench id=0 pid=10480}: \
                   handed 10000 connections over to the replacement in 48.236232ms\n\
                   2026-11-30T18:19:07.709864Z  INFO worker{name=bench id=0 pid=10483}: took \
                   over 10000 connections from bench-hello-plugin 0.1.0 in 31 ms moved=10000 \
                   refused=0\n\
                   x handed 0 connections over to the replacement in 236.2µs\n";
        let h = handed_over(log);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].0, 10000);
        assert!((h[0].1 - 48.236232).abs() < 1e-9 && (h[1].1 - 0.2362).abs() < 1e-9);
        assert_eq!(took_over(log), [(10000, 31.0)]);
        assert_eq!(duration_ms("1.5s"), Some(1500.0));
    }
}
