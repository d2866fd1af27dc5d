//! The control socket as a raw client sees it: each client gets the answers
//! to its own requests, and only those.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use wm_e2e::*;

/// A control-socket client that speaks the wire protocol itself, so a test
/// can leave in the middle of a request as no `wm-host` command would.
struct RawClient {
    reader: BufReader<UnixStream>,
}

impl RawClient {
    fn connect(s: &Server) -> RawClient {
        let stream = UnixStream::connect(s.runtime_dir().join("wm-host.sock")).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        RawClient {
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, request: &str) {
        self.reader
            .get_mut()
            .write_all(format!("{request}\n").as_bytes())
            .unwrap();
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }
}

/// Group `t` (one worker) on `live.so`, a copy of build "a"; its workers
/// wait in `on_worker_start` while the returned file exists.
fn setup() -> (Server, u16, PathBuf) {
    let port = free_port();
    let s = Server::new(&format!(
        "[[worker]]\nname = \"t\"\nlisten = \"text://127.0.0.1:{port}\"\ncount = 1\nplugin = \"live.so\"\nwatch = false\n"
    ));
    let hold = s.dir.path().join("hold");
    std::fs::write(
        &s.config,
        std::fs::read_to_string(&s.config).unwrap()
            + &format!(
                "[worker.options]\nhold_start_file = \"{}\"\n",
                hold.display()
            ),
    )
    .unwrap();
    std::fs::copy(test_build("a"), s.dir.path().join("live.so")).unwrap();
    (s, port, hold)
}

fn t_workers(status: &Value) -> Vec<Value> {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["group"] == "t")
        .cloned()
        .collect()
}

#[test]
fn a_client_that_leaves_mid_reload_does_not_pass_its_reply_to_the_next() {
    let (s, port, hold) = setup();
    s.start();
    let old_build = t_workers(&s.status())[0]["build"].clone();
    std::fs::copy(test_build("b"), s.dir.path().join("live.so")).unwrap();
    // The replacement will hang in on_worker_start until `hold` goes.
    std::fs::write(&hold, b"").unwrap();
    let mut leaver = RawClient::connect(&s);
    leaver.send(r#"{"cmd":"reload","graceful":false}"#);
    wait_for("the replacement to be starting", || {
        (t_workers(&s.try_status()?).len() == 2).then_some(())
    });
    drop(leaver);
    // Give the master a request to answer after it has seen the leaver go.
    s.status();
    let mut next = RawClient::connect(&s);
    std::fs::remove_file(&hold).unwrap();
    wait_for("the reload to finish", || {
        let w = t_workers(&s.try_status()?);
        (w.len() == 1 && w[0]["build"] != old_build && w[0]["state"] == "idle").then_some(())
    });
    // The first thing the newcomer hears is the answer to its own question.
    next.send(r#"{"cmd":"status"}"#);
    let reply = next.recv();
    assert_eq!(reply["reply"], "status", "{reply:#}");
    assert_eq!(TextClient::connect(port).call("build"), "b");
    // The reload went on without its client, and succeeded.
    assert!(s.log().contains("1/1 rolled"), "{}", s.log());
    s.stop();
}

#[test]
fn an_overlong_request_closes_only_that_client() {
    let (s, port, _hold) = setup();
    s.start();
    let mut flood = RawClient::connect(&s);
    let line = vec![b'x'; 1 << 20];
    // The master closes the connection at its limit: writing may then fail.
    let _ = flood.reader.get_mut().write_all(&line);
    let mut rest = String::new();
    let closed = flood.reader.read_line(&mut rest);
    assert!(
        matches!(closed, Ok(0)) || closed.is_err(),
        "closed without an answer: {closed:?} {rest:?}"
    );
    wait_for("the reason to be logged", || {
        s.log()
            .contains("over 65536 bytes; closing it")
            .then_some(())
    });
    // Everyone else is served as before.
    assert_eq!(s.status()["workers"].as_array().unwrap().len(), 1);
    assert_eq!(TextClient::connect(port).call("build"), "a");
    s.stop();
}
