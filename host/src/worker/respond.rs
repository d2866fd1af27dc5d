//! HTTP answers: `respond` encodes the head of the answer owed to the
//! oldest pending request and writes it with the body, in request order.

use plugin_api::abi::RawSendStatus;
use wm_proto::{http, Codec};

use super::core::{lookup, Core};

/// HTTP answers, matched in order to the requests still pending.
impl Core {
    /// Answers the oldest request waiting on `id`. The head is encoded into
    /// a buffer kept for that, so an answer allocates nothing in steady state,
    /// and reused as it is when the answer is shaped like the last one.
    pub fn respond<'h, F>(&mut self, id: u64, status: u16, fields: F, body: &[u8]) -> RawSendStatus
    where
        F: IntoIterator<Item = (&'h str, &'h str)>,
        F::IntoIter: Clone,
    {
        let Some(conn) = lookup(&mut self.conns, id) else {
            self.send_failed(id, "client closed");
            return RawSendStatus::Closed;
        };
        let Codec::Http(h) = &mut conn.codec else {
            self.send_failed(id, "respond on a connection that is not http://");
            return RawSendStatus::Dropped;
        };
        let Some(req) = h.pending.pop_front() else {
            self.send_failed(id, "no request waiting for an answer");
            return RawSendStatus::Dropped;
        };
        let head = http::ResponseHead {
            status,
            body_len: body.len(),
            keep_alive: req.keep_alive && !self.retiring,
            head_only: req.head,
        };
        let (head, with_body, keep_alive) = self.heads.encode(&head, fields, self.date.current());
        let body = if with_body { body } else { &[] };
        let status = match conn.write_parts(&[head, body]) {
            Ok(true) => RawSendStatus::Sent,
            Ok(false) => RawSendStatus::Queued,
            Err(e) => {
                tracing::debug!(conn = id, "send failed: {e}");
                self.destroy(id);
                return RawSendStatus::Closed;
            }
        };
        if !keep_alive {
            self.close(id, None);
        }
        status
    }

    pub fn respond_with(&mut self, id: u64, resp: &http::Response) -> RawSendStatus {
        self.respond(id, resp.status, resp.fields(), &resp.body)
    }
}
