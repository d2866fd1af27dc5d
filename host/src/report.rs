//! What `status` and `connections` print, and the start-up table: text for
//! people, made from the reports in `ipc`. Both the CLI and the master (which
//! writes them to the log on SIGIOT/SIGIO) render with it.

use std::time::{Duration, UNIX_EPOCH};

use crate::ipc::{ConnectionsReport, StatusReport, WorkerState, WorkerStats};
use crate::table;

fn mib(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / (1024.0 * 1024.0))
}

/// Workerman's status: a global block, exit statistics per group, then one
/// row per process and a summary.
pub fn render_status(r: &StatusReport) -> String {
    let start = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(r.start_time));
    let up = r.uptime_secs;
    let mut out = format!(
        "---------------------------------------- GLOBAL STATUS ----------------------------------------\n\
         wm-host version: {}    master pid: {}\n\
         start time: {start}    run {} days {} hours {} minutes {} seconds\n\
         load average: {}\n\
         {} worker groups    {} processes\n",
        r.version,
        r.master_pid,
        up / 86400,
        up % 86400 / 3600,
        up % 3600 / 60,
        up % 60,
        r.load_average,
        r.groups.len(),
        r.workers.len(),
    );
    if !r.bus.backend.is_empty() && r.bus.backend != "local" {
        let b = &r.bus;
        let state = match b.error.is_empty() {
            true => b.state.clone(),
            false => format!("{} ({})", b.state, b.error),
        };
        out.push_str(&format!(
            "bus: {}    state: {}    host: {}    peers: {}\n\
             bus messages: sent {}    received {}    dropped {}    disconnects {}\n",
            b.backend, state, b.host_id, b.peers, b.sent, b.received, b.dropped, b.disconnects
        ));
    } else {
        out.push_str("bus: local\n");
    }
    // One row per group and exit status; `-  0` for a group without deaths.
    // Bus drops and restarts by cause go on the group's first row.
    let mut group_rows = Vec::new();
    for g in &r.groups {
        let exits: Vec<_> = r.exits.iter().filter(|e| e.group == g.name).collect();
        let first = vec![
            g.name.clone(),
            g.listen.clone(),
            g.count.to_string(),
            g.processes.to_string(),
        ];
        let restarts = if g.restarts.is_empty() {
            "-".to_string()
        } else {
            let each: Vec<String> = g.restarts.iter().map(|(c, n)| format!("{c}={n}")).collect();
            each.join(",")
        };
        let tail = [g.bus_dropped.to_string(), restarts];
        if exits.is_empty() {
            let mut row = first;
            row.extend(["-".to_string(), "0".to_string()]);
            row.extend(tail);
            group_rows.push(row);
            continue;
        }
        for (i, e) in exits.into_iter().enumerate() {
            let mut row = if i == 0 {
                first.clone()
            } else {
                vec![String::new(); 4]
            };
            row.extend([e.status.clone(), e.count.to_string()]);
            if i == 0 {
                row.extend(tail.clone());
            }
            group_rows.push(row);
        }
    }
    out.push_str(&table::render(
        &[
            "worker",
            "listen",
            "count",
            "processes",
            "exit_status",
            "exit_count",
            "bus_dropped",
            "restarts",
        ],
        &group_rows,
    ));
    for g in &r.groups {
        if let Some(h) = &g.last_handover {
            out.push_str(&format!("{} last reload: {}\n", g.name, handover_line(h)));
        }
    }
    if let Some(x) = r.reloads.last() {
        let at = UNIX_EPOCH + Duration::from_millis(x.started_ms);
        let groups: Vec<String> = (x.groups.iter())
            .map(|g| match (&g.error, g.kept) {
                (Some(e), _) => format!("{}: {e}", g.name),
                (None, true) => format!("{}: kept", g.name),
                (None, false) => format!(
                    "{}: {} -> {} {}/{}",
                    g.name, g.old, g.new, g.rolled, g.count
                ),
            })
            .collect();
        out.push_str(&format!(
            "last reload: {} {} in {} ms ({}); {} remembered\n",
            humantime::format_rfc3339_seconds(at),
            if x.ok { "ok" } else { "failed" },
            x.millis,
            groups.join("; "),
            r.reloads.len()
        ));
    }
    out.push_str(
        "---------------------------------------- PROCESS STATUS ---------------------------------------\n",
    );
    let dash = || "-".to_string();
    let mut rows: Vec<Vec<String>> = r
        .workers
        .iter()
        .map(|w| {
            let stat = |f: fn(&WorkerStats) -> u64| {
                w.stats.as_ref().map_or_else(dash, |s| f(s).to_string())
            };
            vec![
                w.pid.to_string(),
                w.group.clone(),
                w.id.to_string(),
                w.listen.clone(),
                mib(w.rss_bytes),
                stat(|s| s.connections),
                stat(|s| s.send_fail),
                w.bus_dropped.to_string(),
                stat(|s| s.timers),
                stat(|s| s.total_messages),
                w.qps.map_or_else(dash, |q| format!("{q:.1}")),
                format!("[{}]", w.state.name()),
                w.build.clone(),
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(w.loaded_at))
                    .to_string(),
                w.plugin.clone(),
            ]
        })
        .collect();
    let sum = |f: fn(&WorkerStats) -> u64| -> String {
        r.workers
            .iter()
            .filter_map(|w| w.stats.as_ref().map(f))
            .sum::<u64>()
            .to_string()
    };
    let busy = r
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Busy)
        .count();
    rows.push(vec![
        "Summary".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        mib(r.workers.iter().map(|w| w.rss_bytes).sum()),
        sum(|s| s.connections),
        sum(|s| s.send_fail),
        r.workers
            .iter()
            .map(|w| w.bus_dropped)
            .sum::<u64>()
            .to_string(),
        sum(|s| s.timers),
        sum(|s| s.total_messages),
        format!("{:.1}", r.workers.iter().filter_map(|w| w.qps).sum::<f64>()),
        format!("[{busy} busy]"),
    ]);
    out.push_str(&table::render(
        &[
            "pid",
            "group",
            "id",
            "listen",
            "memory",
            "connections",
            "send_fail",
            "bus_dropped",
            "timers",
            "total_request",
            "qps",
            "state",
            "build",
            "loaded",
            "plugin",
        ],
        &rows,
    ));
    out
}

/// Workerman's `connections`: one row per connection across all workers.
pub fn render_connections(r: &ConnectionsReport) -> String {
    let rows: Vec<Vec<String>> = r
        .connections
        .iter()
        .map(|c| {
            vec![
                c.pid.to_string(),
                c.worker.clone(),
                c.id.to_string(),
                c.transport.clone(),
                c.protocol.clone(),
                c.local.clone(),
                c.remote.clone(),
                c.recv_q.to_string(),
                c.send_q.to_string(),
                c.bytes_read.to_string(),
                c.bytes_written.to_string(),
                c.state.clone(),
            ]
        })
        .collect();
    let mut out = table::render(
        &[
            "pid",
            "worker",
            "cid",
            "trans",
            "protocol",
            "local_address",
            "remote_address",
            "recv_q",
            "send_q",
            "bytes_r",
            "bytes_w",
            "state",
        ],
        &rows,
    );
    out.push_str(&format!("{} connections\n", r.connections.len()));
    if !r.busy.is_empty() {
        let pids: Vec<String> = r.busy.iter().map(u32::to_string).collect();
        out.push_str(&format!(
            "busy (no answer within 1s, connections not listed): pid {}\n",
            pids.join(", ")
        ));
    }
    out
}

/// One line about a handover: connections moved, refused, closed, time.
pub fn handover_line(h: &crate::ipc::HandoverReport) -> String {
    format!(
        "connections: {} handed over, {} refused, {} closed, in {} ms",
        h.moved, h.refused, h.closed, h.millis
    )
}
