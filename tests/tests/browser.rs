//! The chat example in a real browser: headless chromium, driven through
//! chromedriver, loads the page from the `http://` listener and chats over the
//! `websocket://` listener; and the same over `https://` and `wss://`.
//!
//! Needs `apt-get install chromium chromium-driver`, and
//! `cargo build -p wm-host -p chat-plugin`.

mod common;

use std::path::PathBuf;

use wm_e2e::webdriver::{Driver, Session};
use wm_e2e::*;

fn static_dir() -> PathBuf {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../plugins/chat-plugin/static"
    ));
    p.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Joins `room` as `name` from a page that is already connected.
fn join(page: &Session<'_>, name: &str, room: &str) {
    let n = page.find("#name");
    page.clear(&n);
    page.send_keys(&n, name);
    let r = page.find("#room");
    page.clear(&r);
    page.send_keys(&r, room);
    page.click(&page.find("#join"));
}

fn wait_online(page: &Session<'_>, who: &str, names: &[&str]) {
    wait_for(&format!("{who}'s #online list to show {names:?}"), || {
        let online = page.texts("#online li");
        names
            .iter()
            .all(|n| online.iter().any(|o| o.trim() == *n))
            .then_some(())
    });
}

fn say(page: &Session<'_>, text: &str) {
    let t = page.find("#text");
    page.send_keys(&t, text);
    page.click(&page.find("#send"));
}

fn wait_message(page: &Session<'_>, who: &str, from: &str, text: &str) {
    wait_for(
        &format!("{who} to show a .message from {from:?} saying {text:?}"),
        || {
            page.texts("#messages .message")
                .iter()
                .any(|m| m.contains(from) && m.contains(text))
                .then_some(())
        },
    );
}

#[test]
fn two_browsers_chat_in_one_room() {
    let (ws_port, http_port) = (free_port(), free_port());
    let chat = plugin("chat_plugin");
    let server = Server::new(&format!(
        "[[worker]]\nname = \"chat\"\nlisten = \"websocket://127.0.0.1:{ws_port}\"\ncount = 4\nplugin = \"{chat}\"\n\n\
         [[worker]]\nname = \"web\"\nlisten = \"http://127.0.0.1:{http_port}\"\ncount = 1\nplugin = \"{chat}\"\n\
         static_dir = \"{static_dir}\"\n\n[worker.options]\nws_port = \"{ws_port}\"\n",
        chat = chat.display(),
        static_dir = static_dir().display(),
    ));
    server.start();

    let driver = Driver::start();
    let alice = driver.new_session();
    let bob = driver.new_session();
    let url = format!("http://127.0.0.1:{http_port}/");
    for (who, page) in [("alice", &alice), ("bob", &bob)] {
        page.goto(&url);
        wait_for(&format!("{who}'s page to say #status connected"), || {
            (page.try_text("#status")?.trim() == "connected").then_some(())
        });
    }

    let room = "e2e-room";
    join(&alice, "alice", room);
    join(&bob, "bob", room);
    wait_online(&alice, "alice", &["alice", "bob"]);
    wait_online(&bob, "bob", &["alice", "bob"]);

    say(&alice, "hello from alice");
    wait_message(&bob, "bob", "alice", "hello from alice");
    say(&bob, "hi alice, bob here");
    wait_message(&alice, "alice", "bob", "hi alice, bob here");
    // Each side also sees its own message once the server echoes it.
    wait_message(&alice, "alice", "alice", "hello from alice");

    // A reload in the middle of the conversation: the pages stay connected
    // (their #status never changes), and history goes on in the same DOM.
    let watch = "window.__statusChanges = [];\n\
        const s = document.getElementById('status');\n\
        new MutationObserver(() => window.__statusChanges.push(s.textContent))\n\
          .observe(s, {childList: true, characterData: true, subtree: true, attributes: true});\n\
        return true;";
    for page in [&alice, &bob] {
        assert_eq!(page.execute(watch), Value::Bool(true));
    }
    let out = server.cli(&["reload"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("handed over"), "{said}");
    say(&alice, "after the reload");
    wait_message(&bob, "bob", "alice", "after the reload");
    say(&bob, "still here");
    wait_message(&alice, "alice", "bob", "still here");
    let texts = bob.texts("#messages .message");
    for before in ["hello from alice", "hi alice, bob here"] {
        assert!(texts.iter().any(|m| m.contains(before)), "{texts:?}");
    }
    wait_online(&bob, "bob", &["alice", "bob"]);
    for (who, page) in [("alice", &alice), ("bob", &bob)] {
        let changes = page.execute("return window.__statusChanges;");
        assert_eq!(changes, Value::Array(vec![]), "{who}'s #status changed");
        assert_eq!(page.text("#status").trim(), "connected");
    }

    // For humans: target/browser-chat.png.
    bob.screenshot(&target_dir().parent().unwrap().join("browser-chat.png"));

    drop((alice, bob));
    drop(driver);
    server.stop();
}

/// The chat page over `https://` and the chat over `wss://`, with a
/// certificate of the test's own CA (this browser alone ignores certificate
/// errors).
#[test]
fn two_browsers_chat_over_https_and_wss() {
    let (ws_port, https_port) = (free_port(), free_port());
    let chat = plugin("chat_plugin");
    let tls = "[worker.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n";
    let server = Server::new(&format!(
        "[[worker]]\nname = \"chat\"\nlisten = \"wss://127.0.0.1:{ws_port}\"\ncount = 2\nplugin = \"{chat}\"\n{tls}\n\
         [[worker]]\nname = \"web\"\nlisten = \"https://127.0.0.1:{https_port}\"\ncount = 1\nplugin = \"{chat}\"\n\
         static_dir = \"{static_dir}\"\n\n[worker.options]\nws_port = \"{ws_port}\"\n{tls}",
        chat = chat.display(),
        static_dir = static_dir().display(),
    ));
    let ca = common::certs::Ca::new("browser test CA");
    let leaf = ca.server("chat");
    std::fs::write(server.dir.path().join("cert.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(server.dir.path().join("key.pem"), &leaf.key_pem).unwrap();
    server.start();

    let driver = Driver::start();
    let alice = driver.new_session_with(&["--ignore-certificate-errors"]);
    let bob = driver.new_session_with(&["--ignore-certificate-errors"]);
    let url = format!("https://127.0.0.1:{https_port}/");
    for (who, page) in [("alice", &alice), ("bob", &bob)] {
        page.goto(&url);
        wait_for(&format!("{who}'s page to say #status connected"), || {
            (page.try_text("#status")?.trim() == "connected").then_some(())
        });
        assert_eq!(
            page.execute("return location.protocol;"),
            Value::String("https:".into())
        );
    }
    let room = "tls-room";
    join(&alice, "alice", room);
    join(&bob, "bob", room);
    wait_online(&alice, "alice", &["alice", "bob"]);
    wait_online(&bob, "bob", &["alice", "bob"]);
    say(&alice, "hello over wss");
    wait_message(&bob, "bob", "alice", "hello over wss");
    say(&bob, "encrypted hi");
    wait_message(&alice, "alice", "bob", "encrypted hi");

    // The websockets are TLS connections of the chat group.
    let out = server.cli(&["connections", "--json"]);
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let wss = rows
        .as_array()
        .or_else(|| rows["connections"].as_array())
        .unwrap_or_else(|| panic!("{rows}"))
        .iter()
        .filter(|r| {
            r["worker"] == "chat" && r["transport"] == "ssl" && r["protocol"] == "websocket"
        })
        .count();
    assert!(wss >= 2, "{rows}");

    // For humans: target/browser-chat-tls.png.
    bob.screenshot(&target_dir().parent().unwrap().join("browser-chat-tls.png"));
    drop((alice, bob));
    drop(driver);
    server.stop();
}
