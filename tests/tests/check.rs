//! `wm-host check` (issue 15), like `nginx -t`: the config parsed, the
//! listeners bind-tested, each plugin loaded in a throwaway process.

use std::net::{TcpListener, UdpSocket};
use std::process::Output;

use wm_e2e::*;

fn check(s: &Server) -> (bool, String, Vec<String>) {
    let out: Output = s.cli(&["check"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let problems = stderr.lines().map(str::to_string).collect();
    (out.status.success(), stdout, problems)
}

/// The line of `out` that mentions `what`.
fn line_with<'a>(out: &'a str, what: &str) -> &'a str {
    out.lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no line with {what:?} in:\n{out}"))
}

#[test]
fn a_good_config_passes_and_lists_each_plugin_build() {
    let (port, uport) = (free_port(), free_port());
    let s = Server::new(&format!(
        "{}{}",
        worker_table(
            "t",
            &format!("text://127.0.0.1:{port}"),
            "test_plugin",
            2,
            ""
        ),
        worker_table(
            "e",
            &format!("udp://127.0.0.1:{uport}"),
            "echo_plugin",
            1,
            ""
        ),
    ));
    let (ok, out, problems) = check(&s);
    assert!(ok, "{out}{problems:?}");
    assert!(problems.is_empty(), "{problems:?}");
    let t = line_with(&out, "libtest_plugin.so");
    assert!(t.contains("test-plugin 0.1.0"), "{t}");
    assert!(t.contains("plugin-api 0.1.0"), "{t}");
    assert!(t.contains("handover yes"), "{t}");
    let e = line_with(&out, "libecho_plugin.so");
    assert!(e.contains("echo-plugin 0.1.0"), "{e}");
    assert!(
        line_with(&out, &format!(":{port}")).ends_with(": free"),
        "{out}"
    );
    assert!(out.contains("test is successful"), "{out}");
    // Checking runs nothing: no master, no pid file.
    assert_eq!(s.master_pid(), None);

    // With the host running: its own listeners are not a problem, and the
    // build hash is the one the workers run.
    s.start();
    let (ok, out, problems) = check(&s);
    assert!(ok, "{out}{problems:?}");
    let pid = s.master_pid().unwrap();
    for p in [port, uport] {
        let l = line_with(&out, &format!(":{p}"));
        assert!(
            l.ends_with(&format!("held by the running wm-host (master pid {pid})")),
            "{l}"
        );
    }
    let hash = line_with(&out, "libtest_plugin.so")
        .rsplit("build ")
        .next()
        .unwrap()
        .to_string();
    assert_eq!(hash.len(), 64, "{hash}");
    let status = s.status();
    let running = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["group"] == "t")
        .unwrap()["build"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(hash.starts_with(&running), "{hash} vs {running}");
    s.stop();
}

#[test]
fn a_bad_key_is_one_line_naming_the_key_and_its_line() {
    let s = Server::new(&format!(
        "{}cuont = 2\n",
        worker_table("t", "text://127.0.0.1:1", "test_plugin", 1, "")
    ));
    let (ok, out, problems) = check(&s);
    assert!(!ok);
    assert_eq!(problems.len(), 1, "{problems:?}");
    let text = std::fs::read_to_string(&s.config).unwrap();
    let line = text.lines().position(|l| l.starts_with("cuont")).unwrap() + 1;
    assert!(
        problems[0].contains(&format!("wm.toml:{line}: cuont")),
        "{problems:?}"
    );
    assert!(!out.contains("successful"), "{out}");
}

#[test]
fn plugins_that_do_not_load_are_one_line_each() {
    let s = Server::new(&format!(
        "{}{}{}[[worker]]\nname = \"gone\"\nplugin = \"libmissing.so\"\n",
        worker_table("good", "text://127.0.0.1:0", "test_plugin", 1, ""),
        worker_table("abi", "text://127.0.0.1:0", "abi_mismatch_plugin", 1, ""),
        worker_table("abi2", "text://127.0.0.1:0", "abi_mismatch_plugin", 1, ""),
    ));
    std::fs::write(s.dir.path().join("junk.so"), "not a shared library").unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        format!("{text}[[worker]]\nname = \"junk\"\nplugin = \"junk.so\"\n"),
    )
    .unwrap();
    let (ok, out, problems) = check(&s);
    assert!(!ok);
    assert_eq!(problems.len(), 3, "{problems:?}");
    let missing = line_with(&problems.join("\n"), "libmissing.so").to_string();
    assert!(
        missing.contains("(worker gone): file not found"),
        "{missing}"
    );
    // One line for a file two groups run, naming both.
    let abi = line_with(&problems.join("\n"), "libabi_mismatch_plugin.so").to_string();
    assert!(abi.contains("(worker abi, abi2)"), "{abi}");
    assert!(abi.contains("incompatible plugin-api"), "{abi}");
    let junk = line_with(&problems.join("\n"), "junk.so").to_string();
    assert!(junk.contains("not a wm-host plugin"), "{junk}");
    // What is fine is still reported.
    assert!(line_with(&out, "libtest_plugin.so").contains("test-plugin"));
}

#[test]
fn a_port_held_by_another_process_is_reported() {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (tp, up) = (
        tcp.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port(),
    );
    let s = Server::new(&format!(
        "{}{}",
        worker_table("t", &format!("text://127.0.0.1:{tp}"), "test_plugin", 1, ""),
        worker_table("u", &format!("udp://127.0.0.1:{up}"), "echo_plugin", 1, ""),
    ));
    let (ok, _, problems) = check(&s);
    assert!(!ok);
    assert_eq!(problems.len(), 2, "{problems:?}");
    let all = problems.join("\n");
    for (p, w) in [(tp, "t"), (up, "u")] {
        let l = line_with(&all, &format!(":{p}"));
        assert!(
            l.contains(&format!(
                "(worker \"{w}\"): address in use by another process"
            )),
            "{l}"
        );
    }
    // Freed, it passes.
    drop((tcp, udp));
    let (ok, out, problems) = check(&s);
    assert!(ok, "{out}{problems:?}");
}

#[test]
fn unreadable_certificates_are_reported_with_their_key() {
    let s = Server::with_host(
        "[bus]\nbackend = \"rediss://127.0.0.1:1/0\"\nca = \"no-redis-ca.pem\"\n",
        &worker_table(
            "s",
            "text://127.0.0.1:0",
            "test_plugin",
            1,
            "transport = \"ssl\"\n[worker.tls]\ncert = \"no-cert.pem\"\nkey = \"no-key.pem\"\n",
        ),
    );
    let (ok, _, problems) = check(&s);
    assert!(!ok);
    assert_eq!(problems.len(), 2, "{problems:?}");
    let all = problems.join("\n");
    assert!(line_with(&all, "no-cert.pem").contains("tls.cert"), "{all}");
    assert!(
        line_with(&all, "no-redis-ca.pem").contains("[bus] ca"),
        "{all}"
    );
}

/// `[host] admin` is bind-tested too, like `start` binds it.
#[test]
fn an_admin_port_held_by_another_process_is_reported() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = held.local_addr().unwrap().port();
    let s = Server::with_host(
        &format!("admin = \"127.0.0.1:{admin}\"\n"),
        &worker_table("t", "text://127.0.0.1:0", "test_plugin", 1, ""),
    );
    let (ok, out, problems) = check(&s);
    assert!(!ok, "{out}");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains(&format!(
            "admin 127.0.0.1:{admin}: address in use by another process"
        )),
        "{problems:?}"
    );
    drop(held);
    let (ok, out, problems) = check(&s);
    assert!(ok, "{out}{problems:?}");
    assert!(
        line_with(&out, &format!("admin 127.0.0.1:{admin}")).ends_with(": free"),
        "{out}"
    );
    // The running wm-host's own admin listener is not a problem.
    s.start();
    let (ok, out, problems) = check(&s);
    assert!(ok, "{out}{problems:?}");
    let pid = s.master_pid().unwrap();
    assert!(
        line_with(&out, &format!("admin 127.0.0.1:{admin}"))
            .ends_with(&format!("held by the running wm-host (master pid {pid})")),
        "{out}"
    );
    s.stop();
}

/// Run as root, a plugin is loaded as the `user` its group's workers run
/// as, from a copy: the user need not be able to read the file's folder
/// (the test's own 0700 directory), as workers load the master's copy.
#[test]
fn plugins_are_loaded_as_their_groups_user() {
    if !nix_is_root() {
        panic!("this test needs root (it checks a plugin as user nobody)");
    }
    let s = Server::new("");
    let copy = s.dir.path().join("libprivate.so");
    std::fs::copy(plugin("test_plugin"), &copy).unwrap();
    let table = |name: &str, extra: &str| {
        format!(
            "[[worker]]\nname = \"{name}\"\nlisten = \"text://127.0.0.1:0\"\n\
             plugin = \"{}\"\n{extra}\n",
            copy.display()
        )
    };
    std::fs::write(
        &s.config,
        format!(
            "[host]\nruntime_dir = \"run\"\n{}{}",
            table("n", "user = \"nobody\""),
            worker_table("r", "text://127.0.0.1:0", "test_plugin", 1, "")
        ),
    )
    .unwrap();
    let (ok, out, problems) = check(&s);
    assert!(ok, "{out}{problems:?}");
    assert!(
        line_with(&out, "libprivate.so").contains("loaded as uid 65534"),
        "{out}"
    );
    assert!(
        line_with(&out, "libtest_plugin.so").contains("loaded as uid 0"),
        "{out}"
    );
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() == 0 }
}
