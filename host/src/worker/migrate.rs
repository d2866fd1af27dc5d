//! The worker's side of a live handover (the protocol is described in
//! `handover.rs`): the old worker exports and freezes its connections, then
//! forgets them or resumes them; the new worker imports them into its
//! plugin and adopts them.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Token};
use plugin_api::abi::Outcome;

use super::conn::{Conn, State};
use super::core::{slot, FIRST_CONN};
use super::handover::{Channel, Msg, Record, RecordRef, BATCH};
use super::runner::Call;
use super::sock::Sock;
use super::Worker;
use crate::bus::{self, BusMsg};
use crate::ipc::{FromWorker, HandoverReport};
use crate::plugin::BuildInfo;
use wm_proto::{websocket, Codec};

/// The handover socket's poll token (either side).
pub(super) const HANDOVER: Token = Token(3);
/// Bus bytes a replacement holds while it waits for the export; past it the
/// handover fails (as the master bounds what waits for any worker).
const MAX_HELD: usize = bus::MAX_FRAME;

/// The old worker's side, from its export until the new one answers.
pub(super) struct Outgoing {
    chan: Channel,
    /// The connections exported and frozen.
    frozen: Vec<u64>,
    started: Instant,
}

/// The new worker's side, from `Ready` until the import is done.
pub(super) struct Incoming {
    chan: Channel,
    /// Bus frames held until the import: before the cut, then after it.
    held: Vec<Vec<u8>>,
    /// Their bytes, bounded by [`MAX_HELD`].
    held_bytes: usize,
    /// Where the frames after the cut begin in `held`.
    cut: Option<usize>,
    /// The old build, whether it exported, and its state.
    header: Option<(BuildInfo, bool, Vec<u8>)>,
    records: Vec<(Vec<u8>, Vec<u8>, OwnedFd)>,
    /// Connections the old worker keeps, once its export is complete.
    end: Option<u64>,
    started: Option<Instant>,
}

impl Incoming {
    pub(super) fn new(sock: StdUnixStream) -> io::Result<Incoming> {
        Ok(Incoming {
            chan: Channel::new(sock)?,
            held: Vec::new(),
            held_bytes: 0,
            cut: None,
            header: None,
            records: Vec::new(),
            end: None,
            started: None,
        })
    }

    pub(super) fn raw_fd(&self) -> RawFd {
        self.chan.raw_fd()
    }
}

/// Whether a connection can move to another process as it is. Outbound
/// connections and pipes stay (their peers are the old build's business),
/// and so does an HTTP connection whose request is still owed an answer by
/// the old build, and a websocket that holds its client's compression
/// context (permessage-deflate with the client's context takeover, once a
/// compressed message came; or a compressed message half read): that
/// context is not serialized, so the old worker keeps the connection and
/// closes it with 1001 when it stops. Without context takeover a deflate
/// websocket moves like any other between messages.
/// TLS connections stay too, and are drained: rustls' session
/// (keys, sequence numbers) cannot be exported to another process.
fn movable(c: &Conn) -> bool {
    c.state == State::Open
        && !c.frozen
        && !c.sock.is_udp()
        && !c.sock.is_tls()
        && !c.ending
        && c.outbound.is_none()
        && c.pipe_to.is_none()
        && c.pipe_from.is_none()
        && match &c.codec {
            Codec::Http(h) => h.pending.is_empty(),
            Codec::Websocket(ws) => ws.role() == websocket::Role::Server && ws.movable(),
            _ => true,
        }
}

impl Worker {
    /// What this worker's build is, for the new build's import.
    fn build_info(&self) -> BuildInfo {
        // The master names each copy by its content's SHA-256.
        let hash = (self.runner.plugin.path.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.runner.plugin.build_info(&hash)
    }

    fn watch_handover(&mut self, fd: RawFd) -> io::Result<()> {
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), HANDOVER, Interest::READABLE)
    }

    fn unwatch_handover(&mut self, fd: RawFd) {
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
    }

    /// `ToWorker::Handover` came, with the socket to the replacement.
    pub(super) fn handover_asked(&mut self) {
        let Some(fd) = self.ctl_fds.pop_front() else {
            tracing::warn!("handover asked without a socket; ignored");
            return;
        };
        self.handover_fd = Some(fd);
        if let Some(frames) = self.cut_pending.take() {
            self.export();
            for f in frames {
                self.bus_frame(&f);
            }
        }
    }

    /// The `Cut` marker on the bus: export here, or, when the socket has not
    /// come yet, hold what follows until it does.
    pub(super) fn at_cut(&mut self) {
        if self.handover_fd.is_none() {
            self.cut_pending = Some(Vec::new());
            return;
        }
        self.export();
    }

    /// Old worker: stops accepting, freezes and exports every connection
    /// that can move, and sends it all to the replacement.
    fn export(&mut self) {
        let Some(fd) = self.handover_fd.take() else {
            return;
        };
        let started = Instant::now();
        let mut chan = match Channel::new(StdUnixStream::from(fd)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("handover socket unusable: {e}; keeping every connection");
                return;
            }
        };
        // New connections wait in the listen queue for the replacement.
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
            self.parked_listener = Some(l);
        }
        // A build that did not opt in keeps (and drains) them all: its
        // connections' state would not reach the new build.
        let opted_in = self.runner.plugin.handover();
        let ids: Vec<u64> = (self.core.conns.iter())
            .filter(|(_, c)| opted_in && movable(c))
            .map(|(_, c)| c.id)
            .collect();
        let kept = (self.core.conns.iter())
            .filter(|(_, c)| c.state != State::Dead && c.outbound.is_none() && !c.sock.is_udp())
            .count() as u64
            - ids.len() as u64;
        // Captured before any plugin code runs: what the plugin sends
        // from here on is delivered by the new worker (group sends) or not
        // at all (direct sends to exported connections).
        let mut records = Vec::with_capacity(ids.len());
        for &id in &ids {
            let gid = self.core.gid(id);
            let Some(c) = self.core.get(id) else { continue };
            c.frozen = true;
            c.corked = true;
            let rec = RecordRef {
                gid,
                codec: &c.codec,
                inbuf: &c.inbuf,
                out: c.output(),
                bytes_read: c.bytes_read,
                bytes_written: c.bytes_written,
                paused: c.paused,
                max_send: c.max_send as u64,
                full: c.full,
                unix: c.sock.is_unix(),
            };
            match postcard::to_allocvec(&rec) {
                Ok(bytes) => records.push((id, bytes, c.sock.as_raw_fd())),
                Err(e) => {
                    tracing::warn!(conn = id, "cannot export connection: {e}");
                    c.frozen = false;
                    c.corked = false;
                }
            }
        }
        // The end of what this worker delivered itself: the master relays
        // our later sends to the replacement, which delivers them.
        bus::encode(&BusMsg::Exported, &mut self.core.bus_buf.outbuf);
        self.core.flush_bus();
        let mut state = Vec::new();
        let mut failed = None;
        if opted_in {
            let o = self.runner.invoke(&mut self.core, Call::Export(&mut state));
            if o != Outcome::Ok {
                failed = Some(format!("on_export failed: {}", self.runner.failure(o)));
            }
        }
        let mut batch = Vec::with_capacity(records.len());
        for (id, rec, fd) in records {
            if failed.is_some() {
                break;
            }
            let mut bytes = Vec::new();
            let o = self
                .runner
                .invoke(&mut self.core, Call::ExportConn(id, &mut bytes));
            if o != Outcome::Ok {
                failed = Some(format!("on_export_conn failed: {}", self.runner.failure(o)));
            }
            batch.push((id, rec, bytes, fd));
        }
        if let Some(why) = failed {
            // The replacement fails the reload; everything stays here.
            tracing::error!("handover aborted: {why}");
            let _ = chan.send(&Msg::Abort { why }, &[]);
            self.resume(ids);
            return;
        }
        // The plugin may have closed some meanwhile: those stay here.
        batch.retain(|(id, ..)| self.core.get(*id).is_some_and(|c| c.frozen));
        let frozen: Vec<u64> = batch.iter().map(|b| b.0).collect();
        let header = Msg::Header {
            from: self.build_info(),
            exported: opted_in,
            state,
            conns: batch.len() as u64,
        };
        let sent = (|| -> io::Result<()> {
            chan.send(&header, &[])?;
            for part in batch.chunks_mut(BATCH) {
                let fds: Vec<RawFd> = part.iter().map(|b| b.3).collect();
                let recs = part
                    .iter_mut()
                    .map(|b| (std::mem::take(&mut b.1), std::mem::take(&mut b.2)))
                    .collect();
                chan.send(&Msg::Conns(recs), &fds)?;
            }
            chan.send(&Msg::End { kept }, &[])
        })();
        if let Err(e) = sent.and_then(|()| self.watch_handover(chan.raw_fd())) {
            tracing::warn!("handover failed: {e}; keeping every connection");
            self.resume(frozen);
            return;
        }
        tracing::debug!(
            exported = frozen.len(),
            kept,
            "exported connections to the replacement in {:?}",
            started.elapsed()
        );
        self.outgoing = Some(Outgoing {
            chan,
            frozen,
            started,
        });
    }

    /// The handover socket is readable (either side).
    pub(super) fn handover_io(&mut self) {
        if self.incoming.is_some() {
            return self.incoming_io();
        }
        let Some(out) = self.outgoing.as_mut() else {
            return;
        };
        let (msgs, closed) = match out.chan.recv() {
            Ok(v) => v,
            Err(e) => (Vec::new(), {
                tracing::warn!("handover socket: {e}");
                true
            }),
        };
        for (msg, _) in msgs {
            match msg {
                Msg::Taken => return self.commit(),
                Msg::Abort { why } => return self.abort_outgoing(&why),
                _ => {}
            }
        }
        if closed {
            self.abort_outgoing("the replacement went away");
        }
    }

    /// The replacement took every exported connection: they are its now.
    fn commit(&mut self) {
        let Some(out) = self.outgoing.take() else {
            return;
        };
        self.unwatch_handover(out.chan.raw_fd());
        let n = out.frozen.len();
        for id in out.frozen {
            if !self.core.get(id).is_some_and(|c| c.frozen) {
                continue;
            }
            let mut conn = self.core.remove(id);
            // Explicitly: the socket lives on in the other process, so
            // closing our descriptor would not take it out of our epoll.
            let _ = self.poll.registry().deregister(&mut conn.sock);
            self.core.buffered = self.core.buffered.saturating_sub(conn.held);
            if let Some(g) = self.core.adopted.remove(&id) {
                self.core.adopted_gids.remove(&g);
            }
        }
        // Whatever stays is closed cleanly when the master says stop.
        self.core.retiring = true;
        self.parked_listener = None;
        tracing::info!(
            "handed {n} connections over to the replacement in {:?}",
            out.started.elapsed()
        );
    }

    fn abort_outgoing(&mut self, why: &str) {
        let Some(out) = self.outgoing.take() else {
            return;
        };
        self.unwatch_handover(out.chan.raw_fd());
        tracing::warn!(
            "handover aborted ({why}); serving all {} connections on",
            out.frozen.len()
        );
        self.resume(out.frozen);
    }

    /// Frozen connections carry on here, with what was sent to them meanwhile.
    fn resume(&mut self, frozen: Vec<u64>) {
        for id in frozen {
            let Some(c) = self.core.get(id) else { continue };
            c.frozen = false;
            c.corked = false;
            self.core.flush(id);
            // Edge-triggered: input that arrived meanwhile brings no event.
            self.core.resumed.push(id);
        }
        if let Some(mut l) = self.parked_listener.take() {
            match self
                .poll
                .registry()
                .register(&mut l, super::LISTENER, Interest::READABLE)
            {
                Ok(()) => {
                    self.listener = Some(l);
                    self.accept();
                }
                Err(e) => tracing::error!("cannot accept again: {e}"),
            }
        }
        self.runner.settle(&mut self.core);
    }

    /// New worker: reads the export as it comes.
    fn incoming_io(&mut self) {
        let Some(inc) = self.incoming.as_mut() else {
            return;
        };
        let (msgs, closed) = match inc.chan.recv() {
            Ok(v) => v,
            Err(e) => return self.handover_failed(format!("handover socket: {e}")),
        };
        for (msg, fds) in msgs {
            match msg {
                Msg::Header {
                    from,
                    exported,
                    state,
                    ..
                } => {
                    inc.started.get_or_insert_with(Instant::now);
                    inc.header = Some((from, exported, state));
                }
                Msg::Conns(recs) => {
                    for ((rec, plugin), fd) in recs.into_iter().zip(fds) {
                        inc.records.push((rec, plugin, fd));
                    }
                }
                Msg::End { kept } => inc.end = Some(kept),
                Msg::Abort { why } => {
                    return self.handover_failed(format!("the old worker aborted: {why}"));
                }
                Msg::Taken => {}
            }
        }
        if closed && inc.end.is_none() {
            if inc.header.is_none() {
                // Nothing comes: the master had no old worker to ask.
                return self.finish_incoming(Some(HandoverReport::default()));
            }
            return self.handover_failed("the old worker broke the handover off".into());
        }
        self.try_import();
    }

    /// New worker: a bus frame while waiting for the import.
    pub(super) fn hold_bus_frame(&mut self, frame: Vec<u8>) {
        let Some(inc) = self.incoming.as_mut() else {
            return;
        };
        if bus::is_cut(&frame) {
            inc.cut = Some(inc.held.len());
            return;
        }
        inc.held_bytes += frame.len();
        inc.held.push(frame);
        if inc.held_bytes > MAX_HELD {
            self.handover_failed(format!(
                "over {MAX_HELD} bytes of bus messages came while waiting for the old worker"
            ));
        }
    }

    /// New worker: imports once the whole export and the cut are here.
    pub(super) fn try_import(&mut self) {
        let ready = self
            .incoming
            .as_ref()
            .is_some_and(|i| i.end.is_some() && i.cut.is_some());
        if !ready {
            return;
        }
        let inc = self.incoming.take().expect("checked");
        let Incoming {
            mut chan,
            held,
            cut,
            header,
            records,
            end,
            started,
            ..
        } = inc;
        self.unwatch_handover(chan.raw_fd());
        let (from, exported, state) = header.unwrap_or_else(|| {
            let none = BuildInfo {
                name: String::new(),
                version: String::new(),
                hash: String::new(),
            };
            (none, false, Vec::new())
        });
        let outcome = match exported {
            true => self
                .runner
                .invoke(&mut self.core, Call::Import(&from, &state)),
            false => Outcome::Ok,
        };
        if outcome != Outcome::Ok {
            let why = format!("on_import failed: {}", self.runner.failure(outcome));
            let _ = chan.send(&Msg::Abort { why: why.clone() }, &[]);
            return self.give_up(why);
        }
        let mut accepted = Vec::new();
        let mut refused = Vec::new();
        let mut failure = None;
        for (rec, plugin, fd) in records {
            let rec: Record = match postcard::from_bytes(&rec) {
                Ok(r) => r,
                Err(e) => {
                    failure = Some(format!("bad connection record: {e}"));
                    break;
                }
            };
            let id = self.adopt(rec, fd);
            match self
                .runner
                .invoke(&mut self.core, Call::ImportConn(id, &from, &plugin))
            {
                Outcome::Ok => accepted.push(id),
                // A panic there refuses only that connection (logged).
                Outcome::Refused(_) | Outcome::Panicked | Outcome::Failed => refused.push(id),
            }
        }
        if let Some(why) = failure {
            let _ = chan.send(&Msg::Abort { why: why.clone() }, &[]);
            // Ours were copies: the old worker resumes the originals.
            for id in accepted.into_iter().chain(refused) {
                self.disown(id);
            }
            return self.give_up(why);
        }
        if let Err(e) = chan.send(&Msg::Taken, &[]) {
            // The old worker is gone: the connections are ours anyway.
            tracing::warn!("could not confirm the handover: {e}");
        }
        // The connections are ours from here: the master must know at once
        // (it would kill a replacement that is late, and them with it).
        let report = HandoverReport {
            moved: accepted.len() as u64,
            refused: refused.len() as u64,
            closed: end.unwrap_or(0),
            millis: started.map_or(0, |s| s.elapsed().as_millis() as u64),
        };
        self.ctl_buf.queue(&FromWorker::HandedOver(report));
        let _ = self.ctl_buf.flush(&mut self.ctl);
        for &id in &accepted {
            self.activate(id);
        }
        for &id in &refused {
            self.activate(id);
            if let Some(c) = self.core.get(id) {
                c.unknown = true;
            }
            self.core.close(id, None);
        }
        // Frames from before the cut reached the adopted connections
        // through the old worker; those after, from us. Publishes before
        // it are in the state the plugin imported already.
        let cut = cut.unwrap_or(held.len()).min(held.len());
        self.core.skip_adopted = true;
        for f in &held[..cut] {
            if exported && bus::is_publish(f) {
                continue;
            }
            self.bus_frame(f);
        }
        self.core.skip_adopted = false;
        for f in &held[cut..] {
            self.bus_frame(f);
        }
        tracing::info!(
            moved = report.moved,
            refused = report.refused,
            "took over {} connections from {} {} in {} ms",
            report.moved,
            from.name,
            from.version,
            report.millis
        );
        self.runner.settle(&mut self.core);
        self.finish_incoming(None);
    }

    /// A connection from the export, in this worker's table but not yet
    /// polled: nothing is read or written before the handover is confirmed.
    fn adopt(&mut self, rec: Record, fd: OwnedFd) -> u64 {
        let sock = Sock::from_fd(fd, rec.unix);
        let idx = self.core.conns.vacant_entry().key();
        let id = self.core.next_id(idx);
        let mut conn = Conn::new(id, sock, rec.codec, rec.max_send as usize);
        conn.bytes_read = rec.bytes_read;
        conn.bytes_written = rec.bytes_written;
        self.core.adopted_bytes(rec.bytes_read, rec.bytes_written);
        conn.paused = rec.paused;
        conn.full = rec.full;
        conn.held = rec.inbuf.capacity();
        if !rec.inbuf.is_empty() {
            conn.msg_since = Some(conn.last_active);
        }
        conn.inbuf = rec.inbuf;
        conn.set_output(rec.out);
        conn.head_since = self
            .guard
            .header_clock(&conn.codec, false, conn.last_active);
        conn.corked = true;
        self.core.buffered += conn.held;
        self.core.conns.insert(conn);
        self.core.adopted.insert(id, rec.gid);
        self.core.adopted_gids.insert(rec.gid, id);
        id
    }

    /// Undoes `adopt` without a trace on the bus: the old worker still has it.
    fn disown(&mut self, id: u64) {
        if self.core.get(id).is_none() {
            return;
        }
        let conn = self.core.remove(id);
        self.core.buffered = self.core.buffered.saturating_sub(conn.held);
        if let Some(g) = self.core.adopted.remove(&id) {
            self.core.adopted_gids.remove(&g);
        }
    }

    /// An adopted connection goes live: polled, written, read.
    fn activate(&mut self, id: u64) {
        let Some(conn) = self.core.get(id) else {
            return;
        };
        conn.corked = false;
        let token = Token(slot(id) + FIRST_CONN);
        if let Err(e) = self.poll.registry().register(
            &mut conn.sock,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(conn = id, "cannot poll a connection taken over: {e}");
            self.core.destroy(id);
            return;
        }
        self.core.flush(id);
        // What was kept (and what waits in the kernel) is read now.
        self.core.resumed.push(id);
    }

    /// The handover cannot go on: the old worker keeps everything, and this
    /// worker reports the failure and stops (the roll stops with it).
    fn handover_failed(&mut self, why: String) {
        if let Some(mut inc) = self.incoming.take() {
            let _ = inc.chan.send(&Msg::Abort { why: why.clone() }, &[]);
        }
        self.give_up(why);
    }

    fn give_up(&mut self, why: String) {
        tracing::error!("handover failed: {why}");
        self.ctl_buf.queue(&FromWorker::Failed { error: why });
        let _ = self.ctl_buf.flush(&mut self.ctl);
        self.begin_stop(super::Stop::Now);
    }

    /// The handover is over (or never came): accept, fire timers, and say so.
    /// `report`: what to tell the master, unless it was told already.
    fn finish_incoming(&mut self, report: Option<HandoverReport>) {
        if let Some(inc) = self.incoming.take() {
            self.unwatch_handover(inc.raw_fd());
            for f in inc.held {
                self.bus_frame(&f);
            }
        }
        if let Some(mut l) = self.parked_listener.take() {
            match self
                .poll
                .registry()
                .register(&mut l, super::LISTENER, Interest::READABLE)
            {
                Ok(()) => self.listener = Some(l),
                Err(e) => return self.give_up(format!("cannot accept: {e}")),
            }
        }
        if let Some(report) = report {
            self.ctl_buf.queue(&FromWorker::HandedOver(report));
            let _ = self.ctl_buf.flush(&mut self.ctl);
        }
        self.accept();
    }

    /// New worker, at start: waits for the export instead of accepting.
    pub(super) fn await_handover(&mut self, sock: StdUnixStream) -> io::Result<()> {
        let inc = Incoming::new(sock)?;
        self.watch_handover(inc.raw_fd())?;
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
            self.parked_listener = Some(l);
        }
        self.incoming = Some(inc);
        Ok(())
    }
}

/// Descriptors that came with control messages, oldest first.
pub(super) type CtlFds = VecDeque<OwnedFd>;
