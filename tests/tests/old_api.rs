//! A plugin built before live handover existed (fixtures/old-api: plugin-api
//! as of bcd7363) still runs in this host, and reloads to and from a build of
//! the current API.

use std::collections::HashSet;

use wm_e2e::*;

fn builds_seen(port: u16, n: usize) -> HashSet<String> {
    (0..n)
        .map(|_| TextClient::connect(port).call("build"))
        .collect()
}

fn reload(s: &Server) {
    let out = s.cli(&["reload"]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("2/2 workers rolled"), "{text}");
}

#[test]
fn an_old_api_plugin_loads_and_reloads_to_the_new_api_and_back() {
    let old = old_api_plugin();
    let port = free_port();
    let s = Server::new(&format!(
        "[[worker]]\nname = \"t\"\nlisten = \"text://127.0.0.1:{port}\"\ncount = 2\nplugin = \"live.so\"\nwatch = false\n"
    ));
    let live = s.dir.path().join("live.so");
    std::fs::copy(&old, &live).unwrap();
    s.start();
    let mut c = TextClient::connect(port);
    assert_eq!(c.call("hello"), "hello");
    assert_eq!(c.call("build"), "old-api");
    assert_eq!(
        builds_seen(port, 10),
        HashSet::from(["old-api".to_string()])
    );

    // Onto the current API (the test plugin, which opts in to handover)…
    std::fs::copy(test_build("a"), &live).unwrap();
    reload(&s);
    assert_eq!(builds_seen(port, 10), HashSet::from(["a".to_string()]));
    let mut c = TextClient::connect(port);
    assert_eq!(c.call("note hi"), "ok");
    assert!(c.call("state").ends_with("note=hi msgs=2"));

    // …and back to the old one.
    std::fs::copy(&old, &live).unwrap();
    reload(&s);
    assert_eq!(
        builds_seen(port, 10),
        HashSet::from(["old-api".to_string()])
    );
    let mut c = TextClient::connect(port);
    assert_eq!(c.call("hello again"), "hello again");
    s.stop();
}
