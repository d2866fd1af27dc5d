//! `wm-host new`: writes a plugin crate that builds and starts at once, as
//! `cargo new` does for a binary. The files come from `templates/`; inside
//! a cargo workspace the crate adds itself to `members`.
//!
//! A leaf: it uses no other module of the host.

use std::fmt::Write as _;
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context as _, Result};

/// The plugin-api sources this binary was built from: generated crates
/// depend on them by path (plugin-api is not on crates.io).
const PLUGIN_API_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugin-api");

const CARGO_TOML: &str = include_str!("templates/Cargo.toml.tmpl");
const WM_TOML: &str = include_str!("templates/wm.toml.tmpl");

/// `wm-host new`'s arguments.
#[derive(clap::Args, Debug, Clone)]
#[command(after_long_help = AFTER_HELP)]
pub struct Args {
    /// The folder to create (it may exist if empty); its last part is the
    /// crate's name unless --name says otherwise.
    pub path: PathBuf,
    /// The listener's protocol: which callbacks the plugin fills in.
    #[arg(long, short = 'p', value_enum, default_value_t = Proto::Text)]
    pub protocol: Proto,
    /// The crate's name (default: the folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// The address to listen on, HOST:PORT (default 127.0.0.1 and a port
    /// per protocol: text 2347, frame 2348, tcp 2349, websocket 2346,
    /// http 8080, custom 2350, udp 2351).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// The plugin-api crate to depend on, a folder (default: the sources
    /// this wm-host was built from).
    #[arg(long, value_name = "DIR")]
    pub plugin_api: Option<PathBuf>,
}

const AFTER_HELP: &str = "\
The crate depends on plugin-api by path, since plugin-api is not on
crates.io: by default on the plugin-api sources this wm-host binary was
built from (their folder is recorded at build time); --plugin-api DIR
points elsewhere, e.g. a checkout of the same wm-host version. A plugin
must be built against the plugin-api of the host that loads it.

Inside a cargo workspace (a Cargo.toml with [workspace] above the folder)
the crate is added to the workspace's `members`, unless a glob there
already covers it. Otherwise it is a workspace of its own. When the
workspace has no Cargo.lock yet, the one of wm-host's sources is copied,
so the plugin builds with the dependency versions wm-host was tested with
(and offline, when those are in cargo's cache).

wm.toml's `plugin` points where `cargo build` puts the library (as
`cargo metadata` reports the target dir, CARGO_TARGET_DIR and
.cargo/config.toml included).

Then: cd into the folder, `cargo build`, `wm-host start`.";

/// The protocols a plugin can be written for.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// One message per line (`\n`).
    Text,
    /// A 4-byte big-endian length, then the payload.
    Frame,
    /// Raw TCP: each read is a message.
    Tcp,
    /// RFC 6455 websockets, with a group every connection joins.
    Websocket,
    /// HTTP/1.1 requests and answers.
    Http,
    /// The plugin's own framing (a `Protocol`: here, `\r\n`-ended lines).
    Custom,
    /// Each datagram is a message.
    Udp,
}

impl Proto {
    fn scheme(self) -> &'static str {
        match self {
            Proto::Text => "text",
            Proto::Frame => "frame",
            Proto::Tcp => "tcp",
            Proto::Websocket => "websocket",
            Proto::Http => "http",
            Proto::Custom => "custom",
            Proto::Udp => "udp",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Proto::Text => 2347,
            Proto::Frame => 2348,
            Proto::Tcp => 2349,
            Proto::Websocket => 2346,
            Proto::Http => 8080,
            Proto::Custom => 2350,
            Proto::Udp => 2351,
        }
    }

    fn lib_template(self) -> String {
        let framing = match self {
            Proto::Text => "one message per line",
            Proto::Frame => "each message has a 4-byte big-endian length in front",
            Proto::Tcp => "each read is a message",
            Proto::Websocket => return include_str!("templates/websocket.rs.tmpl").into(),
            Proto::Http => return include_str!("templates/http.rs.tmpl").into(),
            Proto::Custom => return include_str!("templates/custom.rs.tmpl").into(),
            Proto::Udp => return include_str!("templates/udp.rs.tmpl").into(),
        };
        include_str!("templates/stream.rs.tmpl")
            .replace("__SCHEME__", self.scheme())
            .replace("__FRAMING__", framing)
    }

    /// A line that shows the plugin answering, for the closing message.
    fn try_it(self, addr: &str) -> String {
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr, ""));
        match self {
            Proto::Text | Proto::Custom => format!("printf 'hi\\r\\n' | nc -q1 {host} {port}"),
            Proto::Tcp => format!("printf hi | nc -q1 {host} {port}"),
            Proto::Frame => format!("printf '\\0\\0\\0\\6hi' | nc -q1 {host} {port}"),
            Proto::Udp => format!("printf hi | nc -u -w1 {host} {port}"),
            Proto::Http => format!("curl 'http://{addr}/hello?name=you'"),
            Proto::Websocket => format!("websocat ws://{addr}/   (or a browser's WebSocket)"),
        }
    }
}

/// Names cargo refuses for a package, or that would shadow what the
/// generated code imports.
const RESERVED: &[&str] = &[
    "test",
    "std",
    "core",
    "alloc",
    "proc_macro",
    "proc-macro",
    "self",
    "super",
    "crate",
    "plugin_api",
    "plugin-api",
];

/// Rust keywords: not usable as a crate name.
const KEYWORDS: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "dyn", "else", "enum", "extern", "false",
    "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref",
    "return", "static", "struct", "trait", "true", "type", "unsafe", "use", "where", "while",
    "abstract", "become", "box", "do", "final", "gen", "macro", "override", "priv", "try",
    "typeof", "unsized", "virtual", "yield",
];

/// Names the templates import; a plugin type of that name would clash.
const IMPORTED: &[&str] = &[
    "Plugin",
    "Context",
    "ConnId",
    "Request",
    "Protocol",
    "StartError",
    "HashMap",
    "TestHost",
    "TestRequest",
    "Builder",
    "CrLf",
    "Self",
];

/// Checks a crate name the way cargo does; the error says what is wrong.
pub fn check_name(name: &str) -> Result<(), String> {
    let first = name.chars().next().ok_or("the crate name is empty")?;
    if !first.is_ascii_alphabetic() {
        return Err(format!(
            "crate name {name:?} must start with a letter (a-z, A-Z)"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "crate name {name:?} has {c:?}: use letters, digits, - and _"
        ));
    }
    if KEYWORDS.contains(&name) || RESERVED.contains(&name) {
        return Err(format!("crate name {name:?} is reserved; pick another"));
    }
    Ok(())
}

/// The plugin type's name: the crate name in CamelCase (`my-chat` →
/// `MyChat`), with `Plugin` after it if it would clash with an import.
pub fn type_name(crate_name: &str) -> String {
    let mut out = String::new();
    for part in crate_name.split(['-', '_']).filter(|p| !p.is_empty()) {
        let mut chars = part.chars();
        if let Some(c) = chars.next() {
            out.push(c.to_ascii_uppercase());
            out.extend(chars);
        }
    }
    if IMPORTED.contains(&out.as_str()) {
        out.push_str("Plugin");
    }
    out
}

/// Adds `member` (a path relative to the workspace root, `/`-separated)
/// to `workspace.members` of a root manifest, keeping its formatting.
/// `None` when a member entry (a path or glob) already covers it.
pub fn add_member(manifest: &str, member: &str) -> Result<Option<String>, String> {
    let mut doc: toml_edit::DocumentMut = manifest
        .parse()
        .map_err(|e| format!("cannot parse it: {e}"))?;
    let ws = doc
        .get_mut("workspace")
        .and_then(|w| w.as_table_like_mut())
        .ok_or("it has no [workspace] table")?;
    let covered = |entry: &str| {
        let entry = entry.trim_end_matches('/');
        entry == member || glob::Pattern::new(entry).is_ok_and(|p| p.matches(member))
    };
    if let Some(exclude) = ws.get("exclude").and_then(|e| e.as_array()) {
        if exclude
            .iter()
            .filter_map(|e| e.as_str())
            .any(|e| member == e || member.starts_with(&format!("{}/", e.trim_end_matches('/'))))
        {
            return Err(format!(
                "{member} is in the workspace's `exclude`; create it elsewhere or edit `exclude`"
            ));
        }
    }
    match ws.get_mut("members") {
        None => {
            let mut members = toml_edit::Array::new();
            members.push(member);
            ws.insert("members", toml_edit::value(members));
        }
        Some(item) => {
            let members = item
                .as_array_mut()
                .ok_or("`workspace.members` is not an array")?;
            if members.iter().filter_map(|m| m.as_str()).any(covered) {
                return Ok(None);
            }
            // One entry per line stays one per line.
            let multiline = members.iter().next().is_some_and(|v| {
                v.decor()
                    .prefix()
                    .and_then(|p| p.as_str())
                    .is_some_and(|p| p.contains('\n'))
            });
            // What follows the last comma (a comment on the last entry, the
            // newline before `]`) stays after that entry.
            let trailing = members.trailing().as_str().unwrap_or("").to_string();
            members.push(member);
            if multiline {
                let indent = members_indent(manifest);
                let kept = trailing.trim_end_matches([' ', '\t']);
                let prefix = match kept.strip_suffix('\n') {
                    Some(_) => format!("{kept}{}", &indent[1..]),
                    None => format!("{kept}{indent}"),
                };
                if let Some(last) = members.iter_mut().last() {
                    last.decor_mut().set_prefix(prefix);
                }
                members.set_trailing("\n");
                members.set_trailing_comma(true);
            }
        }
    }
    Ok(Some(doc.to_string()))
}

/// The indentation of the entries of a multi-line `members` array.
fn members_indent(manifest: &str) -> String {
    let after = manifest
        .split_once("members")
        .and_then(|(_, rest)| rest.split_once('['))
        .map_or("", |(_, rest)| rest);
    let line = after.lines().nth(1).unwrap_or("");
    let indent: String = line.chars().take_while(|c| c.is_whitespace()).collect();
    format!("\n{}", if indent.is_empty() { "    " } else { &indent })
}

/// The root of the cargo workspace above `dir` (the nearest `Cargo.toml`
/// with a `[workspace]` table), if any.
fn find_workspace(dir: &Path) -> Result<Option<PathBuf>> {
    for d in dir.ancestors() {
        let manifest = d.join("Cargo.toml");
        let Ok(text) = fs::read_to_string(&manifest) else {
            continue;
        };
        let value: toml::Table = toml::from_str(&text)
            .with_context(|| format!("cannot parse {}", manifest.display()))?;
        if value.contains_key("workspace") {
            return Ok(Some(d.to_path_buf()));
        }
    }
    Ok(None)
}

/// `path` made absolute against the current directory, without touching
/// the file system (the folder may not exist yet).
fn absolute(path: &Path) -> Result<PathBuf> {
    let joined = std::env::current_dir()
        .context("cannot read the current directory")?
        .join(path);
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    Ok(out)
}

/// `to` relative to `from` when `to` is inside `from`.
fn relative_inside(to: &Path, from: &Path) -> Option<String> {
    let rel = to.strip_prefix(from).ok()?;
    Some(
        rel.components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/"),
    )
}

/// The target dir `cargo build` in `crate_dir` will use, as cargo itself
/// says; else the usual one.
fn target_dir(crate_dir: &Path, root: &Path) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .current_dir(crate_dir)
        .output();
    if let Ok(out) = out {
        if out.status.success() {
            if let Some(dir) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v["target_directory"].as_str().map(PathBuf::from))
            {
                return dir;
            }
        }
        tracing::debug!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => absolute(Path::new(&d)).unwrap_or_else(|_| d.into()),
        None => root.join("target"),
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// wm.toml for the new crate. `listen` and `plugin` come from the command
/// line and the file system, so they go in as TOML strings, quoted and
/// escaped (a `"` or `\` in a path must not break the file); `name` has
/// passed [`check_name`].
fn wm_toml(name: &str, listen: &str, plugin: &str) -> String {
    let quote = |s: &str| toml_edit::Value::from(s).to_string();
    WM_TOML
        .replace("__CRATE__", name)
        .replace("__LISTEN__", &quote(listen))
        .replace("__PLUGIN_PATH__", &quote(plugin))
}

/// Runs `wm-host new`: writes the crate, joins the workspace, and prints
/// what to do next.
pub fn run(args: &Args) -> Result<()> {
    let dir = absolute(&args.path)?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| anyhow!("{} has no folder name", args.path.display()))?,
    };
    check_name(&name).map_err(|e| anyhow!("{e} (set it with --name)"))?;
    let listen_addr = args
        .listen
        .clone()
        .unwrap_or_else(|| format!("127.0.0.1:{}", args.protocol.default_port()));
    if listen_addr.contains("://") || !listen_addr.contains(':') {
        bail!("--listen {listen_addr:?}: give HOST:PORT; the scheme comes from --protocol");
    }
    let listen = format!("{}://{listen_addr}", args.protocol.scheme());

    let api = match &args.plugin_api {
        Some(p) => absolute(p)?,
        None => PathBuf::from(PLUGIN_API_SRC),
    };
    let api = api.canonicalize().map_err(|_| {
        anyhow!(
            "plugin-api sources not found at {} ({}); pass --plugin-api DIR, a checkout of wm-host's plugin-api",
            api.display(),
            if args.plugin_api.is_some() { "--plugin-api" } else { "recorded when this wm-host was built" }
        )
    })?;
    if !api.join("Cargo.toml").is_file() {
        bail!("--plugin-api {}: no Cargo.toml there", api.display());
    }

    if dir.exists() {
        let empty = fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_none();
        if !empty {
            bail!("{} already exists and is not empty", dir.display());
        }
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let workspace = find_workspace(parent)?;

    // Everything that can fail on the workspace is checked before writing.
    let mut workspace_edit = None;
    if let Some(root) = &workspace {
        let manifest = root.join("Cargo.toml");
        let text = fs::read_to_string(&manifest)
            .with_context(|| format!("cannot read {}", manifest.display()))?;
        let member = relative_inside(&dir, root).expect("the workspace is an ancestor");
        let edited = add_member(&text, &member)
            .map_err(|e| anyhow!("workspace {}: {e}", manifest.display()))?;
        workspace_edit = Some((manifest, edited, member));
    }
    let root = workspace.clone().unwrap_or_else(|| dir.clone());

    let api_dep = format!(
        "plugin-api = {{ path = {} }}",
        toml_edit::Value::from(api.to_string_lossy().as_ref())
    );
    let api_note = if args.plugin_api.is_some() {
        "the sources given to `wm-host new --plugin-api`.".to_string()
    } else {
        "the sources this wm-host was built from.".to_string()
    };
    let ty = type_name(&name);
    let cargo_toml = CARGO_TOML
        .replace("__CRATE__", &name)
        .replace("__PLUGIN_API_NOTE__", &api_note)
        .replace("__PLUGIN_API__", &api_dep);
    let lib = args
        .protocol
        .lib_template()
        .replace("__CRATE__", &name)
        .replace("__TYPE__", &ty);

    fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    write(&dir.join("Cargo.toml"), &cargo_toml)?;
    write(&dir.join("src/lib.rs"), &lib)?;
    let ignore = if workspace.is_some() {
        "/run\n"
    } else {
        "/target\n/run\n"
    };
    write(&dir.join(".gitignore"), ignore)?;
    let mut joined = None;
    if let Some((manifest, edited, member)) = workspace_edit {
        if let Some(edited) = edited {
            write(&manifest, &edited)?;
            joined = Some(format!(
                "added {member} to the members of {}",
                manifest.display()
            ));
        } else {
            joined = Some(format!(
                "{member} is already a member of {}",
                manifest.display()
            ));
        }
    }
    // A lock with the versions wm-host was tested with, when there is none.
    let lock = root.join("Cargo.lock");
    let seed = api.parent().map(|p| p.join("Cargo.lock"));
    let mut seeded = false;
    if let Some(seed) = seed.filter(|s| s.is_file() && !lock.exists()) {
        fs::copy(&seed, &lock).with_context(|| format!("cannot write {}", lock.display()))?;
        seeded = true;
    }

    // Where cargo will put the library, relative to wm.toml when it can.
    let lib_file = format!("debug/lib{}.so", name.replace('-', "_"));
    let target = target_dir(&dir, &root);
    let plugin = match relative_inside(&target, &dir) {
        Some(rel) if !rel.is_empty() => format!("{rel}/{lib_file}"),
        _ => match relative_inside(&target, &root) {
            Some(rel) if workspace.is_some() => {
                let up = relative_inside(&dir, &root)
                    .expect("the workspace is an ancestor")
                    .split('/')
                    .map(|_| "..")
                    .collect::<Vec<_>>()
                    .join("/");
                format!("{up}/{rel}/{lib_file}")
            }
            _ => target.join(&lib_file).to_string_lossy().into_owned(),
        },
    };
    write(&dir.join("wm.toml"), &wm_toml(&name, &listen, &plugin))?;

    let mut msg = format!(
        "Created plugin `{name}` ({listen}) in {}\n",
        args.path.display()
    );
    if let Some(j) = joined {
        let _ = writeln!(msg, "  {j}");
    }
    if seeded {
        let _ = writeln!(
            msg,
            "  {} copied from wm-host's sources (the versions it was tested with)",
            lock.display()
        );
    }
    msg.push_str("Next:\n");
    if std::env::current_dir().ok().as_deref() != Some(dir.as_path()) {
        let _ = writeln!(msg, "  cd {}", args.path.display());
    }
    let _ = write!(
        msg,
        "  cargo build\n  wm-host start\nthen, from another terminal:\n  {}\n",
        args.protocol.try_it(&listen_addr)
    );
    print!("{msg}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crate_names_are_checked_like_cargo() {
        assert!(check_name("my-chat_2").is_ok());
        for (bad, why) in [
            ("", "empty"),
            ("2fast", "start with a letter"),
            ("a.b", "'.'"),
            ("fn", "reserved"),
            ("test", "reserved"),
        ] {
            let err = check_name(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn type_names_are_camel_case_and_never_clash() {
        assert_eq!(type_name("my-chat_room"), "MyChatRoom");
        assert_eq!(type_name("echo"), "Echo");
        assert_eq!(type_name("plugin"), "PluginPlugin");
        assert_eq!(type_name("conn-id"), "ConnIdPlugin");
    }

    #[test]
    fn members_get_the_new_crate_and_keep_their_layout() {
        let one_line = "[workspace]\nresolver = \"2\" # keep me\nmembers = [\"a\"]\n";
        assert_eq!(
            add_member(one_line, "plugins/x").unwrap().unwrap(),
            "[workspace]\nresolver = \"2\" # keep me\nmembers = [\"a\", \"plugins/x\"]\n"
        );
        let multi = "[workspace]\nmembers = [\n  \"a\",\n  \"b\",\n]\n";
        assert_eq!(
            add_member(multi, "c").unwrap().unwrap(),
            "[workspace]\nmembers = [\n  \"a\",\n  \"b\",\n  \"c\",\n]\n"
        );
        let commented = "[workspace]\nmembers = [\n    \"a\", # first\n]\n";
        assert_eq!(
            add_member(commented, "b").unwrap().unwrap(),
            "[workspace]\nmembers = [\n    \"a\", # first\n    \"b\",\n]\n"
        );
        let none = "[package]\nname = \"root\"\n\n[workspace]\n";
        let out = add_member(none, "p").unwrap().unwrap();
        let v: toml::Table = toml::from_str(&out).unwrap();
        assert_eq!(
            v["workspace"]["members"],
            toml::Value::Array(vec!["p".into()])
        );
        assert!(out.starts_with("[package]\nname = \"root\""), "{out}");
    }

    #[test]
    fn members_already_covered_are_left_alone() {
        let globbed = "[workspace]\nmembers = [\"plugins/*\"]\n";
        assert_eq!(add_member(globbed, "plugins/x").unwrap(), None);
        assert!(add_member(globbed, "other/x").unwrap().is_some());
        assert_eq!(
            add_member("[workspace]\nmembers = [\"x/\"]\n", "x").unwrap(),
            None
        );
    }

    #[test]
    fn bad_workspaces_are_errors_that_say_why() {
        let excluded = "[workspace]\nmembers = []\nexclude = [\"fuzz\"]\n";
        assert!(add_member(excluded, "fuzz/x")
            .unwrap_err()
            .contains("exclude"));
        assert!(add_member("[workspace]\nmembers = \"a\"\n", "b")
            .unwrap_err()
            .contains("not an array"));
        assert!(add_member("[workspace\n", "b")
            .unwrap_err()
            .contains("parse"));
    }

    #[test]
    fn wm_toml_quotes_what_it_is_given() {
        let listen = r#"text://127.0.0.1:2347"#;
        for plugin in [
            "target/debug/libx.so",
            r#"/tmp/a "quoted" dir/target/debug/libx.so"#,
            r"C:\odd\path\libx.so",
            r#"/tmp/both ' " \ \" end/libx.so"#,
            "/tmp/new\nline/libx.so",
        ] {
            let text = wm_toml("x", listen, plugin);
            assert!(!text.contains("__"), "{text}");
            let doc: toml::Table = toml::from_str(&text)
                .unwrap_or_else(|e| panic!("{plugin:?} makes an invalid wm.toml: {e}\n{text}"));
            let worker = &doc["worker"][0];
            assert_eq!(worker["plugin"].as_str(), Some(plugin), "{text}");
            assert_eq!(worker["listen"].as_str(), Some(listen));
            assert_eq!(worker["name"].as_str(), Some("x"));
        }
        let odd_listen = r#"text://"\:1"#;
        let doc: toml::Table = toml::from_str(&wm_toml("x", odd_listen, "p")).unwrap();
        assert_eq!(doc["worker"][0]["listen"].as_str(), Some(odd_listen));
    }

    #[test]
    fn every_template_is_filled_in() {
        for p in [
            Proto::Text,
            Proto::Frame,
            Proto::Tcp,
            Proto::Websocket,
            Proto::Http,
            Proto::Custom,
            Proto::Udp,
        ] {
            let lib = p
                .lib_template()
                .replace("__CRATE__", "x")
                .replace("__TYPE__", "X");
            assert!(!lib.contains("__"), "{p:?}: {lib}");
            assert!(
                lib.contains("export_plugin!(X);") && lib.contains("#[test]"),
                "{p:?}"
            );
        }
    }
}
