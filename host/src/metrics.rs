//! `/metrics`: the status report in the Prometheus text format (0.0.4),
//! through `prometheus-client`. A fresh registry per scrape, filled from
//! the report the master gathered from its workers: the master keeps no
//! counters of its own, so the numbers are the ones `status` shows.

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::ipc::{StatusReport, WorkerState};

/// The `Content-Type` of what [`render`] returns.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, String)>;
type FGauge = Gauge<f64, AtomicU64>;

fn counter(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, FGauge> {
    let f = Family::<Labels, FGauge>::default();
    reg.register(name, help, f.clone());
    f
}

/// The report as Prometheus text. Counters are the workers' own since they
/// started (a replaced worker's series ends, its replacement's begins: its
/// `pid` and `build` labels differ), so `rate()` and `increase()` apply.
pub fn render(r: &StatusReport) -> String {
    let mut reg = Registry::default();
    // Per worker.
    let conns = gauge(&mut reg, "wm_worker_connections", "Open connections");
    let messages = counter(
        &mut reg,
        "wm_worker_messages",
        "Messages and requests handed to the plugin",
    );
    let bytes_in = counter(
        &mut reg,
        "wm_worker_received_bytes",
        "Bytes read from connections",
    );
    let bytes_out = counter(
        &mut reg,
        "wm_worker_sent_bytes",
        "Bytes written to connections",
    );
    let send_fail = counter(
        &mut reg,
        "wm_worker_send_failures",
        "Sends dropped: client closed, send buffer full, or not encodable",
    );
    let qps = gauge(
        &mut reg,
        "wm_worker_qps",
        "Messages per second since the previous status request (Workerman's qps)",
    );
    let memory = gauge(&mut reg, "wm_worker_memory_bytes", "Resident memory");
    let timers = gauge(&mut reg, "wm_worker_timers", "Timers pending");
    let responding = gauge(
        &mut reg,
        "wm_worker_responding",
        "1 when the worker answered between callbacks in time, 0 when busy",
    );
    let loaded = gauge(
        &mut reg,
        "wm_worker_loaded_timestamp_seconds",
        "When the worker finished loading its plugin",
    );
    let w_bus_dropped = counter(
        &mut reg,
        "wm_worker_bus_dropped",
        "Bus messages dropped for this worker (it did not read its bus)",
    );
    let w_backlog = gauge(
        &mut reg,
        "wm_worker_bus_backlog_bytes",
        "Bus bytes the master holds for this worker, not yet read",
    );
    for w in &r.workers {
        let l: Labels = vec![
            ("group", w.group.clone()),
            ("id", w.id.to_string()),
            ("pid", w.pid.to_string()),
            ("build", w.build.clone()),
        ];
        memory.get_or_create(&l).set(w.rss_bytes as f64);
        loaded.get_or_create(&l).set(w.loaded_at as f64);
        w_bus_dropped.get_or_create(&l).inc_by(w.bus_dropped);
        w_backlog.get_or_create(&l).set(w.bus_backlog_bytes as f64);
        let up = matches!(w.state, WorkerState::Idle);
        responding.get_or_create(&l).set(if up { 1.0 } else { 0.0 });
        // A worker that did not answer has no counters this time: absent,
        // not zero, so rates do not see a reset.
        if let Some(s) = &w.stats {
            conns.get_or_create(&l).set(s.connections as f64);
            messages.get_or_create(&l).inc_by(s.total_messages);
            bytes_in.get_or_create(&l).inc_by(s.bytes_in);
            bytes_out.get_or_create(&l).inc_by(s.bytes_out);
            send_fail.get_or_create(&l).inc_by(s.send_fail);
            timers.get_or_create(&l).set(s.timers as f64);
            qps.get_or_create(&l).set(w.qps.unwrap_or(0.0));
        }
    }
    // Per group.
    let processes = gauge(
        &mut reg,
        "wm_group_processes",
        "Worker processes alive (more than configured while a reload rolls)",
    );
    let configured = gauge(&mut reg, "wm_group_workers", "`count` in the config");
    let restarts = counter(
        &mut reg,
        "wm_group_restarts",
        "Workers replaced, by cause: died, stuck, max_requests, max_memory",
    );
    let reloads = counter(
        &mut reg,
        "wm_group_reloads",
        "Reloads by outcome: ok, failed, kept (not reloadable)",
    );
    let last_reload = gauge(
        &mut reg,
        "wm_group_last_reload_duration_seconds",
        "How long the group's last remembered reload took to roll",
    );
    let g_bus_dropped = counter(
        &mut reg,
        "wm_group_bus_dropped",
        "Bus messages dropped for the group's workers since start",
    );
    let exits = counter(
        &mut reg,
        "wm_group_exits",
        "Workers that died unexpectedly or were killed, by exit status",
    );
    for g in &r.groups {
        let l: Labels = vec![("group", g.name.clone())];
        processes.get_or_create(&l).set(g.processes as f64);
        configured.get_or_create(&l).set(g.count as f64);
        g_bus_dropped.get_or_create(&l).inc_by(g.bus_dropped);
        for (cause, n) in &g.restarts {
            let l = vec![("group", g.name.clone()), ("cause", cause.clone())];
            restarts.get_or_create(&l).inc_by(*n);
        }
        for (outcome, n) in &g.reloads {
            let l = vec![("group", g.name.clone()), ("outcome", outcome.clone())];
            reloads.get_or_create(&l).inc_by(*n);
        }
        let last = (r.reloads.iter().rev())
            .find_map(|rec| rec.groups.iter().find(|x| x.name == g.name && !x.kept));
        if let Some(x) = last {
            last_reload.get_or_create(&l).set(x.millis as f64 / 1000.0);
        }
    }
    for e in &r.exits {
        let l = vec![("group", e.group.clone()), ("status", e.status.clone())];
        exits.get_or_create(&l).inc_by(e.count);
    }
    // The master and the bus between hosts.
    let info = gauge(&mut reg, "wm_build_info", "wm-host's version; always 1");
    info.get_or_create(&vec![("version", r.version.clone())])
        .set(1.0);
    let uptime = gauge(
        &mut reg,
        "wm_master_uptime_seconds",
        "Since the master started",
    );
    uptime.get_or_create(&Vec::new()).set(r.uptime_secs as f64);
    let b = &r.bus;
    let bl: Labels = vec![(
        "backend",
        if b.backend.is_empty() || b.backend == "local" {
            "local".to_string()
        } else {
            "redis".to_string()
        },
    )];
    let bus_counters = [
        (
            "wm_bus_sent",
            "Bus messages published for other hosts",
            b.sent,
        ),
        (
            "wm_bus_received",
            "Bus messages received from other hosts",
            b.received,
        ),
        (
            "wm_bus_dropped",
            "Bus messages for or from other hosts lost (Redis down or too far behind)",
            b.dropped,
        ),
        (
            "wm_bus_disconnects",
            "Times the connection to Redis was lost",
            b.disconnects,
        ),
    ];
    for (name, help, v) in bus_counters {
        counter(&mut reg, name, help).get_or_create(&bl).inc_by(v);
    }
    let backlog = gauge(
        &mut reg,
        "wm_bus_backlog_bytes",
        "Bytes handed to the Redis writer, not yet written",
    );
    backlog.get_or_create(&bl).set(b.backlog_bytes as f64);
    let peers = gauge(
        &mut reg,
        "wm_bus_peers",
        "Other hosts heard of within host_ttl",
    );
    peers.get_or_create(&bl).set(b.peers as f64);
    let mut out = String::new();
    prometheus_text::encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::{GroupRow, WorkerRow, WorkerStats};

    fn report() -> StatusReport {
        let row = |pid: u32, id: u32, stats: Option<WorkerStats>| WorkerRow {
            pid,
            group: "chat".into(),
            id,
            listen: String::new(),
            rss_bytes: 4096,
            plugin: String::new(),
            build: "abcdef012345".into(),
            loaded_at: 0,
            bus_dropped: 2,
            bus_backlog_bytes: 0,
            state: match stats {
                Some(_) => WorkerState::Idle,
                None => WorkerState::Busy,
            },
            qps: stats.as_ref().map(|_| 1.5),
            stats,
        };
        let stats = WorkerStats {
            connections: 3,
            total_messages: 40,
            send_fail: 1,
            timers: 0,
            bytes_in: 1000,
            bytes_out: 2000,
        };
        StatusReport {
            version: "0.1.0".into(),
            master_pid: 1,
            start_time: 0,
            uptime_secs: 9,
            load_average: String::new(),
            groups: vec![GroupRow {
                name: "chat".into(),
                listen: String::new(),
                count: 2,
                processes: 2,
                bus_dropped: 2,
                restarts: [("died".to_string(), 4)].into(),
                last_handover: None,
                reloads: [("ok".to_string(), 1)].into(),
            }],
            exits: Vec::new(),
            workers: vec![row(7, 0, Some(stats)), row(8, 1, None)],
            bus: Default::default(),
            reloads: Vec::new(),
        }
    }

    #[test]
    fn counters_carry_group_id_pid_and_build_and_a_busy_worker_has_none() {
        let text = render(&report());
        let l = r#"{group="chat",id="0",pid="7",build="abcdef012345"}"#;
        for line in [
            format!("wm_worker_messages_total{l} 40"),
            format!("wm_worker_received_bytes_total{l} 1000"),
            format!("wm_worker_sent_bytes_total{l} 2000"),
            format!("wm_worker_send_failures_total{l} 1"),
            format!("wm_worker_connections{l} 3.0"),
            format!("wm_worker_qps{l} 1.5"),
            format!("wm_worker_responding{l} 1.0"),
            r#"wm_group_restarts_total{group="chat",cause="died"} 4"#.to_string(),
            r#"wm_group_reloads_total{group="chat",outcome="ok"} 1"#.to_string(),
            "# TYPE wm_worker_messages_total counter".to_string(),
        ] {
            assert!(text.lines().any(|x| x == line), "{line} in\n{text}");
        }
        let busy = r#"{group="chat",id="1",pid="8",build="abcdef012345"}"#;
        assert!(text.contains(&format!("wm_worker_responding{busy} 0.0")));
        assert!(!text.contains(&format!("wm_worker_messages_total{busy}")));
    }
}
