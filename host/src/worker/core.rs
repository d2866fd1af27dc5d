//! The part of a worker that plugin calls reach: connections, timers and
//! counters. Host functions called from inside a plugin callback only change
//! this state and queue follow-up callbacks (`deferred`, `closing`); the loop
//! runs those after the current callback returns, so the plugin is never
//! re-entered.

use std::collections::VecDeque;

use plugin_api::abi::{RawSendStatus, RawWorkerInfo};
use plugin_api::error_code;
use slab::Slab;

use super::conn::{Conn, State};
use super::timers::Timers;
use crate::ipc::WorkerStats;

/// A plugin callback owed once the current one returns.
#[derive(Debug)]
pub enum Deferred {
    BufferFull(u64),
    BufferDrain(u64),
    Error(u64, u32, &'static str),
}

pub struct Core {
    pub conns: Slab<Conn>,
    generation: u32,
    pub timers: Timers,
    pub deferred: VecDeque<Deferred>,
    /// Connections to tear down now (flushed, failed or destroyed).
    pub closing: Vec<u64>,
    pub info: &'static RawWorkerInfo,
    pub max_package_size: usize,
    pub max_send_buffer_size: usize,
    pub total_messages: u64,
    pub send_fail: u64,
}

/// Slab index of a connection id: the low 32 bits. The high 32 bits are a
/// generation, so a stale id never reaches a newer connection in the same slot.
pub fn slot(id: u64) -> usize {
    (id & 0xffff_ffff) as usize
}

fn lookup(conns: &mut Slab<Conn>, id: u64) -> Option<&mut Conn> {
    conns.get_mut(slot(id)).filter(|c| c.id == id)
}

impl Core {
    pub fn new(
        info: &'static RawWorkerInfo,
        max_package_size: usize,
        max_send_buffer_size: usize,
    ) -> Core {
        Core {
            conns: Slab::new(),
            generation: 0,
            timers: Timers::default(),
            deferred: VecDeque::new(),
            closing: Vec::new(),
            info,
            max_package_size,
            max_send_buffer_size,
            total_messages: 0,
            send_fail: 0,
        }
    }

    pub fn next_id(&mut self, slot: usize) -> u64 {
        self.generation = self.generation.wrapping_add(1);
        (u64::from(self.generation) << 32) | slot as u64
    }

    pub fn get(&mut self, id: u64) -> Option<&mut Conn> {
        lookup(&mut self.conns, id)
    }

    pub fn stats(&self) -> WorkerStats {
        WorkerStats {
            connections: self.conns.len() as u64,
            total_messages: self.total_messages,
            send_fail: self.send_fail,
            timers: self.timers.len() as u64,
        }
    }

    fn send_failed(&mut self, id: u64, why: &'static str) {
        self.send_fail += 1;
        self.deferred
            .push_back(Deferred::Error(id, error_code::SEND_FAILED, why));
    }

    /// Frames and sends one message (Workerman's `$connection->send`).
    pub fn send(&mut self, id: u64, data: &[u8]) -> RawSendStatus {
        let max = self.max_send_buffer_size;
        let Some(conn) = lookup(&mut self.conns, id) else {
            self.send_failed(id, "client closed");
            return RawSendStatus::Closed;
        };
        if conn.state != State::Open {
            self.send_failed(id, "client closed");
            return RawSendStatus::Closed;
        }
        if conn.pending() >= max {
            self.send_failed(id, "send buffer full and drop package");
            return RawSendStatus::Dropped;
        }
        let env = match conn.codec.envelope(data.len()) {
            Ok(env) => env,
            Err(_) => {
                self.send_failed(id, "message too large for the protocol");
                return RawSendStatus::Dropped;
            }
        };
        match conn.write_parts(&[env.header(), data, env.trailer]) {
            Ok(true) => RawSendStatus::Sent,
            Ok(false) => {
                if conn.pending() >= max && !conn.full {
                    conn.full = true;
                    self.deferred.push_back(Deferred::BufferFull(id));
                }
                RawSendStatus::Queued
            }
            Err(e) => {
                tracing::debug!(conn = id, "send failed: {e}");
                self.destroy(id);
                RawSendStatus::Closed
            }
        }
    }

    /// Closes after flushing, optionally sending a last message first.
    pub fn close(&mut self, id: u64, last: Option<&[u8]>) -> bool {
        match self.get(id) {
            Some(c) if c.state == State::Open => {}
            _ => return false,
        }
        if let Some(last) = last {
            self.send(id, last);
        }
        let Some(conn) = self.get(id) else {
            return true;
        };
        if conn.state == State::Open {
            conn.state = State::Closing;
            if conn.pending() == 0 {
                self.closing.push(id);
            }
        }
        true
    }

    /// Closes at once, dropping whatever is queued.
    pub fn destroy(&mut self, id: u64) {
        if let Some(conn) = self.get(id) {
            let first = conn.state == State::Open || conn.pending() > 0;
            conn.state = State::Closing;
            conn.discard_output();
            if first {
                self.closing.push(id);
            }
        }
    }

    /// Flushes a connection's send buffer after a writable event.
    pub fn flush(&mut self, id: u64) {
        let Some(conn) = lookup(&mut self.conns, id) else {
            return;
        };
        match conn.flush() {
            Ok(true) => {
                if conn.full {
                    conn.full = false;
                    self.deferred.push_back(Deferred::BufferDrain(id));
                }
                if conn.state == State::Closing {
                    self.closing.push(id);
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(conn = id, "write failed: {e}");
                self.destroy(id);
            }
        }
    }
}
