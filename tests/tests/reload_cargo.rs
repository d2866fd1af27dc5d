//! A rebuild with cargo is picked up by the watcher: one build, one roll.
//!
//! Its own test binary: it rebuilds `target/debug/libtest_plugin.so`, which
//! other tests load, and cargo runs test binaries one at a time.

use std::collections::HashSet;
use std::process::Command;

use wm_e2e::*;

fn cargo_build(tag: Option<&str>) {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-p", "test-plugin"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    match tag {
        Some(t) => cmd.env("WM_TEST_BUILD", t),
        None => cmd.env_remove("WM_TEST_BUILD"),
    };
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cargo_build_of_the_plugin_rolls_the_workers_once() {
    let port = free_port();
    let s = Server::new(&worker_table(
        "t",
        &format!("text://127.0.0.1:{port}"),
        "test_plugin",
        2,
        "",
    ));
    s.start();
    let seen = |n: usize| -> HashSet<String> {
        (0..n)
            .map(|_| TextClient::connect(port).call("build"))
            .collect()
    };
    assert_eq!(seen(10), HashSet::from(["default".to_string()]));
    cargo_build(Some("c"));
    wait_for("the cargo build to be rolled out", || {
        (seen(20) == HashSet::from(["c".to_string()])).then_some(())
    });
    // Back to the default build (other tests expect it), rolled out too.
    cargo_build(None);
    wait_for("the default build to be back", || {
        (seen(20) == HashSet::from(["default".to_string()])).then_some(())
    });
    let log = s.log();
    assert_eq!(
        log.matches("rolling reload started").count(),
        2,
        "one roll per build:\n{log}"
    );
    s.stop();
}
