//! Introspection: the counters `wm-host status` shows and the rows of
//! `wm-host connections`.

use std::time::Instant;

use super::conn::State;
use super::core::Core;
use crate::ipc::WorkerStats;

/// Introspection for `wm-host status` and `wm-host connections`.
impl Core {
    /// The counters, and the messages per second since the previous call
    /// (0 on the first): qps over the interval between two `status` requests,
    /// as Workerman computes it.
    pub fn stats_and_qps(&mut self) -> (WorkerStats, f64) {
        let stats = self.stats();
        let now = Instant::now();
        let qps = match self.last_sample.replace((stats.total_messages, now)) {
            Some((total, at)) => {
                let secs = now.duration_since(at).as_secs_f64();
                let delta = stats.total_messages.saturating_sub(total);
                if secs > 0.0 {
                    delta as f64 / secs
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        (stats, qps)
    }

    /// One row per connection of this worker.
    pub fn connection_rows(&self) -> Vec<crate::ipc::ConnRow> {
        let addr =
            |a: Option<std::net::SocketAddr>| a.map_or_else(|| "-".into(), |a| a.to_string());
        self.conns
            .iter()
            .map(|(_, c)| crate::ipc::ConnRow {
                pid: self.node,
                worker: self.info.name.as_str().to_string(),
                id: c.id,
                transport: c.sock.transport().into(),
                protocol: c.codec.name().into(),
                local: addr(c.local),
                remote: addr(c.remote),
                recv_q: c.inbuf.len() as u64,
                send_q: c.pending() as u64,
                bytes_read: c.bytes_read,
                bytes_written: c.bytes_written,
                state: if c.state == State::Closing {
                    "CLOSING"
                } else if !c.established() {
                    "HANDSHAKE"
                } else {
                    "ESTABLISHED"
                }
                .into(),
            })
            .collect()
    }
}
