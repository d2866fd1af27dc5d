//! Rolling reloads: by command, by signal, on file change; bad builds refused.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use wm_e2e::*;

/// A server whose group `t` (text, 2 workers) loads `live.so`, a copy of
/// build "a". `extra` goes into the worker table.
fn setup(extra: &str) -> (Server, u16, PathBuf) {
    let port = free_port();
    let s = Server::new(&format!(
        "[[worker]]\nname = \"t\"\nlisten = \"text://127.0.0.1:{port}\"\ncount = 2\nplugin = \"live.so\"\n{extra}\n"
    ));
    let live = s.dir.path().join("live.so");
    std::fs::copy(test_build("a"), &live).unwrap();
    (s, port, live)
}

/// The builds that `n` fresh connections report.
fn builds_seen(port: u16, n: usize) -> HashSet<String> {
    (0..n)
        .map(|_| TextClient::connect(port).call("build"))
        .collect()
}

fn all_on(port: u16, tag: &str) -> bool {
    builds_seen(port, 20) == HashSet::from([tag.to_string()])
}

fn reload(s: &Server, args: &[&str]) -> (bool, String) {
    let mut a = vec!["reload"];
    a.extend_from_slice(args);
    let out = s.cli(&a);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn builds_in_status(s: &Server, group: &str) -> HashSet<String> {
    s.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["group"] == group)
        .map(|w| w["build"].as_str().unwrap().to_string())
        .collect()
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[test]
fn reload_command_rolls_every_worker_onto_the_new_build() {
    let (s, port, live) = setup("watch = false");
    s.start();
    assert!(all_on(port, "a"));
    let before = s.worker_pids("t");
    let old_builds = builds_in_status(&s, "t");
    assert_eq!(old_builds.len(), 1);
    // Overwritten in place (same inode): running workers use their own copy.
    std::fs::copy(test_build("b"), &live).unwrap();
    let (ok, out) = reload(&s, &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("t: build") && out.contains("2/2 workers rolled"),
        "{out}"
    );
    assert!(all_on(port, "b"));
    let after = s.worker_pids("t");
    assert_eq!(
        after.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![0, 1],
        "ids kept"
    );
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "new processes: {before:?} {after:?}"
    );
    let new_builds = builds_in_status(&s, "t");
    assert_eq!(new_builds.len(), 1);
    assert_ne!(new_builds, old_builds);
    assert_eq!(new_builds.iter().next().unwrap().len(), 12);
    // Deleting the build output does not disturb running workers.
    std::fs::remove_file(&live).unwrap();
    assert!(all_on(port, "b"));
    // SIGUSR1 reloads too; with the file gone the roll is refused, nothing breaks.
    unsafe { libc::kill(s.master_pid().unwrap() as i32, libc::SIGUSR1) };
    wait_for("the refused reload to be logged", || {
        s.log().contains("reload of t refused").then_some(())
    });
    assert!(all_on(port, "b"));
    s.stop();
}

#[test]
fn watcher_rolls_on_copy_and_rename_but_not_on_touch() {
    let (s, port, live) = setup("");
    s.start();
    assert!(all_on(port, "a"));
    std::fs::copy(test_build("b"), &live).unwrap();
    wait_for("the copy to be rolled out", || {
        all_on(port, "b").then_some(())
    });
    let tmp = s.dir.path().join("new.so.tmp");
    std::fs::copy(test_build("a"), &tmp).unwrap();
    std::fs::rename(&tmp, &live).unwrap();
    wait_for("the rename to be rolled out", || {
        all_on(port, "a").then_some(())
    });
    wait_for("the second roll to finish", || {
        (count(&s.log(), "reload t: ") == 2).then_some(())
    });
    // Same content: noticed, but no roll.
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(&live)
        .unwrap();
    f.set_modified(std::time::SystemTime::now()).unwrap();
    drop(f);
    std::fs::copy(test_build("a"), &live).unwrap();
    wait_for("the unchanged file to be noticed", || {
        s.log().contains("not its content: no reload").then_some(())
    });
    assert_eq!(count(&s.log(), "rolling reload started"), 2, "{}", s.log());
    s.stop();
}

#[test]
fn bad_builds_are_refused_while_the_old_one_keeps_answering() {
    let flag = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let flag_path = flag.to_path_buf();
    std::fs::remove_file(&flag_path).unwrap();
    let (s, port, live) = setup(&format!(
        "watch = false\n[worker.options]\nfail_start_file = \"{}\"",
        flag_path.display()
    ));
    s.start();
    let pids = s.worker_pids("t");
    type MakeBad<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, MakeBad)> = vec![
        (
            "not a wm-host plugin",
            Box::new(|| std::fs::write(&live, b"\x7fELF but not really").unwrap()),
        ),
        (
            "incompatible plugin-api",
            Box::new(|| {
                std::fs::copy(plugin("abi_mismatch_plugin"), &live).unwrap();
            }),
        ),
        (
            "panicked",
            Box::new(|| {
                std::fs::write(&flag_path, b"").unwrap();
                std::fs::copy(test_build("b"), &live).unwrap();
            }),
        ),
    ];
    for (expect, make_bad) in cases {
        make_bad();
        let (ok, out) = reload(&s, &[]);
        assert!(!ok, "a bad build must fail the reload: {out}");
        assert!(
            out.contains("FAILED") && out.contains(expect),
            "{expect}: {out}"
        );
        assert!(all_on(port, "a"), "the old build keeps answering");
        assert_eq!(s.worker_pids("t"), pids, "old workers untouched");
    }
    // A later good build rolls normally.
    std::fs::remove_file(&flag_path).unwrap();
    let (ok, out) = reload(&s, &[]);
    assert!(ok, "{out}");
    assert!(all_on(port, "b"));
    s.stop();
}

#[test]
fn half_written_file_seen_by_the_watcher_never_breaks_service() {
    let (s, port, live) = setup("");
    s.start();
    let full = std::fs::read(test_build("b")).unwrap();
    // Cut inside the loadable segments (a debug build's second half is only
    // debug info, which a loader does not need).
    std::fs::write(&live, &full[..64 * 1024]).unwrap();
    wait_for("the truncated build to be refused", || {
        s.log().contains("keeping the running build").then_some(())
    });
    assert!(all_on(port, "a"));
    std::fs::write(&live, &full).unwrap();
    wait_for("the complete build to be rolled out", || {
        all_on(port, "b").then_some(())
    });
    s.stop();
}

#[test]
fn reloadable_false_keeps_its_workers_and_runs_on_worker_reload() {
    let (s, port, live) = setup("watch = false");
    let keep_port = free_port();
    std::fs::write(
        &s.config,
        std::fs::read_to_string(&s.config).unwrap()
            + &format!(
                "[[worker]]\nname = \"keep\"\nlisten = \"text://127.0.0.1:{keep_port}\"\ncount = 2\nplugin = \"live.so\"\nreloadable = false\nwatch = false\n"
            ),
    )
    .unwrap();
    s.start();
    let kept = s.worker_pids("keep");
    std::fs::copy(test_build("b"), &live).unwrap();
    let (ok, out) = reload(&s, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("keep: not reloadable"), "{out}");
    assert_eq!(s.worker_pids("keep"), kept);
    assert!(all_on(keep_port, "a"), "kept workers keep their code");
    assert!(all_on(port, "b"));
    for _ in 0..10 {
        assert_eq!(TextClient::connect(keep_port).call("reloads"), "1");
    }
    s.stop();
}

#[test]
fn twenty_reloads_under_load_fail_no_request() {
    let (s, port, live) = setup("watch = false");
    s.start();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for t in 0..4 {
        let (stop, ok) = (stop.clone(), ok.clone());
        load.push(thread::spawn(move || {
            let mut failures = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let msg = format!("client {t} request {i}");
                let mut c = match std::net::TcpStream::connect(("127.0.0.1", port)) {
                    Ok(stream) => TextClient::from_stream(stream),
                    Err(e) => {
                        failures.push(format!("{msg}: connect refused: {e}"));
                        continue;
                    }
                };
                c.send(&msg);
                match c.recv() {
                    Some(r) if r == msg => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures.push(format!("{msg}: got {other:?}")),
                }
            }
            failures
        }));
    }
    for i in 0..20 {
        let tag = if i % 2 == 0 { "b" } else { "a" };
        std::fs::copy(test_build(tag), &live).unwrap();
        let (done, out) = reload(&s, &[]);
        assert!(done, "reload {i}: {out}");
    }
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = load.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) > 100,
        "the load really ran: {}",
        ok.load(Ordering::Relaxed)
    );
    assert!(all_on(port, "a"));
    s.stop();
}

#[test]
fn graceful_reload_in_drain_mode_keeps_long_websocket_connections_open() {
    let port = free_port();
    // Drain mode: connections stay with the old build until they end.
    let s = Server::with_host(
        "",
        &format!(
            "[[worker]]\nname = \"ws\"\nlisten = \"websocket://127.0.0.1:{port}\"\ncount = 2\nplugin = \"live.so\"\nwatch = false\nreload_mode = \"drain\"\n"
        ),
    );
    // Long enough that the old workers only leave when their clients do.
    std::fs::write(
        &s.config,
        std::fs::read_to_string(&s.config)
            .unwrap()
            .replace("stop_timeout = \"3s\"", "stop_timeout = \"60s\""),
    )
    .unwrap();
    let live = s.dir.path().join("live.so");
    std::fs::copy(test_build("a"), &live).unwrap();
    s.start();
    let old = s.worker_pids("ws");
    let mut long: Vec<_> = (0..4).map(|_| ws_raw(port, "/")).collect();
    let ask = |c: &mut std::net::TcpStream, m: &str| {
        use std::io::Write;
        c.write_all(&ws_frame(true, 1, m.as_bytes(), true)).unwrap();
        String::from_utf8(ws_read_frame(c).unwrap().2).unwrap()
    };
    for c in long.iter_mut() {
        assert_eq!(ask(c, "build"), "a");
    }
    std::fs::copy(test_build("b"), &live).unwrap();
    let (ok, out) = reload(&s, &["-g"]);
    assert!(ok, "{out}");
    // Old connections are still served by the old build…
    for c in long.iter_mut() {
        assert_eq!(ask(c, "build"), "a");
        assert_eq!(ask(c, "still here"), "still here");
    }
    // …while new ones reach the new build.
    let mut fresh = ws_raw(port, "/");
    assert_eq!(ask(&mut fresh, "build"), "b");
    // When the long connections end, the old workers go.
    drop(long);
    wait_for("old workers to exit", || {
        let now: Vec<u32> = s.worker_pids("ws").iter().map(|p| p.1).collect();
        (now.len() == 2 && old.iter().all(|o| !now.contains(&o.1))).then_some(())
    });
    for (_, pid) in old {
        assert!(!pid_alive(pid));
    }
    s.stop();
}
