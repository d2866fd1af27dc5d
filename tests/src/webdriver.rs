//! A small blocking W3C WebDriver client for real-browser tests: starts
//! Debian's `chromedriver`, opens headless `chromium` sessions through it, and
//! cleans everything up on drop, also when a test panics.
//!
//! Needs `apt-get install chromium chromium-driver`.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::{engine::general_purpose::STANDARD, Engine as _};
use serde_json::{json, Value};

use crate::{free_port, pid_alive, wait_for};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The key W3C uses for element references.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A running `chromedriver`. Sessions borrow it, so they are always deleted
/// before it is killed.
pub struct Driver {
    child: Child,
    base: String,
    agent: ureq::Agent,
}

impl Driver {
    /// Starts `chromedriver --port=<free port>` and waits until `/status` says
    /// it is ready.
    pub fn start() -> Driver {
        for (bin, package) in [(CHROMEDRIVER, "chromium-driver"), (CHROMIUM, "chromium")] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: install it with `apt-get install -y chromium chromium-driver` \
                 (package `{package}`)"
            );
        }
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so Drop can take the browsers down with it.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {CHROMEDRIVER}: {e}"));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let mut driver = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            agent,
        };
        wait_for("chromedriver to answer /status with ready", || {
            if let Ok(Some(status)) = driver.child.try_wait() {
                panic!("{CHROMEDRIVER} exited at start: {status}");
            }
            let v = driver.request("GET", "/status", None).ok()?;
            (v["ready"] == true).then_some(())
        });
        driver
    }

    /// One WebDriver command; `Err` carries the WebDriver error or the
    /// transport error as text.
    fn request(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{}", self.base, path);
        let resp = match method {
            "GET" => self.agent.get(&url).call(),
            "DELETE" => self.agent.delete(&url).call(),
            "POST" => self
                .agent
                .post(&url)
                .content_type("application/json; charset=utf-8")
                .send(body.unwrap_or_else(|| json!({})).to_string()),
            _ => unreachable!("{method}"),
        };
        let mut resp = resp.map_err(|e| format!("{method} {path}: {e}"))?;
        let ok = resp.status().is_success();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| format!("{method} {path}: reading the answer: {e}"))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{method} {path}: not JSON ({e}): {text}"))?;
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        if ok {
            Ok(value)
        } else {
            Err(format!(
                "{method} {path}: {}: {}",
                value["error"].as_str().unwrap_or("error"),
                value["message"].as_str().unwrap_or(&text)
            ))
        }
    }

    /// Opens a headless chromium with a fresh profile directory.
    pub fn new_session(&self) -> Session<'_> {
        self.new_session_with(&[])
    }

    /// [`Driver::new_session`] with more command-line switches for this
    /// browser only (e.g. `--ignore-certificate-errors`).
    pub fn new_session_with(&self, extra: &[&str]) -> Session<'_> {
        let profile = tempfile::Builder::new()
            .prefix("wm-e2e-chromium-")
            .tempdir()
            .unwrap();
        let mut args: Vec<String> = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1000,800",
        ]
        .map(String::from)
        .to_vec();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.extend(extra.iter().map(|a| a.to_string()));
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": args,
                    },
                },
            },
        });
        let v = self
            .request("POST", "/session", Some(caps))
            .unwrap_or_else(|e| panic!("cannot start a chromium session: {e}"));
        let id = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {v}"))
            .to_string();
        Session {
            driver: self,
            id,
            profile,
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let pid = self.child.id();
        // SAFETY: kill(2) on the process group we created at spawn.
        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser window. Drop deletes the session, which closes the browser.
pub struct Session<'d> {
    driver: &'d Driver,
    id: String,
    profile: tempfile::TempDir,
}

impl Session<'_> {
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{}", self.id, path);
        self.driver
            .request(method, &path, body)
            .unwrap_or_else(|e| panic!("webdriver: {e}"))
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    /// The element id of the first element matching `css`; panics if none.
    pub fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element reference for {css:?} in {v}"))
            .to_string()
    }

    pub fn click(&self, element: &str) {
        self.cmd("POST", &format!("/element/{element}/click"), None);
    }

    pub fn clear(&self, element: &str) {
        self.cmd("POST", &format!("/element/{element}/clear"), None);
    }

    pub fn send_keys(&self, element: &str, text: &str) {
        self.cmd(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// `textContent` of the first element matching `css`, if there is one.
    pub fn try_text(&self, css: &str) -> Option<String> {
        let v = self.execute_with(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            json!([css]),
        );
        v.as_str().map(str::to_string)
    }

    /// `textContent` of the first element matching `css`; panics if none.
    pub fn text(&self, css: &str) -> String {
        self.try_text(css)
            .unwrap_or_else(|| panic!("no element matches {css:?}"))
    }

    /// `textContent` of every element matching `css`, in document order.
    pub fn texts(&self, css: &str) -> Vec<String> {
        let v = self.execute_with(
            "return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent);",
            json!([css]),
        );
        v.as_array()
            .unwrap_or_else(|| panic!("texts({css:?}): not a list: {v}"))
            .iter()
            .map(|t| t.as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Runs `script` as a function body in the page; returns what it returns.
    pub fn execute(&self, script: &str) -> Value {
        self.execute_with(script, json!([]))
    }

    pub fn execute_with(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Writes a PNG of the viewport to `path`.
    pub fn screenshot(&self, path: &Path) {
        let v = self.cmd("GET", "/screenshot", None);
        let png = STANDARD
            .decode(v.as_str().expect("screenshot is a string"))
            .expect("screenshot is base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = self
            .driver
            .request("DELETE", &format!("/session/{}", self.id), None);
        // If chromium outlived its session (or chromedriver is stuck), end the
        // processes started with this session's own profile directory.
        let marker = format!("--user-data-dir={}", self.profile.path().display());
        for pid in processes_with_arg(&marker) {
            if pid_alive(pid) {
                // SAFETY: a process we started, found by its unique profile dir.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Pids of processes whose command line has exactly the argument `arg`.
fn processes_with_arg(arg: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}
