//! The URLs [`crate::Context::connect`] takes, parsed one way for wm-host
//! (`host/src/worker/outbound.rs`, which then resolves the address) and for
//! the [`crate::testing`] harness (which opens nothing), so both accept the
//! same ones.

/// The schemes an outbound connection can use, for error messages.
pub const SUPPORTED: &str = "tcp, text, frame, ws";

/// An outbound URL, split: `scheme://host:port[/path]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbound<'a> {
    /// `"tcp"`, `"text"`, `"frame"` or `"ws"` (`websocket://` is `"ws"`).
    pub scheme: &'static str,
    /// `host:port`, as given: a name still to resolve, or an address.
    pub hostport: &'a str,
    /// The rest, from its `/` (`"/"` when there is none): the websocket
    /// handshake's path.
    pub path: &'a str,
}

/// Splits `url` and checks its scheme and that it names a `host:port` with a
/// port number; resolving the host is left to the caller.
pub fn parse(url: &str) -> Result<Outbound<'_>, String> {
    let bad = || format!("bad url {url:?}: expected scheme://host:port");
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let scheme = match scheme {
        "tcp" => "tcp",
        "text" => "text",
        "frame" => "frame",
        "ws" | "websocket" => "ws",
        other => {
            return Err(format!(
                "cannot connect to {other}:// (supported: {SUPPORTED})"
            ))
        }
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    // What `ToSocketAddrs for str` needs: a host, then `:port` (an IPv6
    // address in brackets ends with `]:port`).
    match hostport.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => return Err(bad()),
    }
    Ok(Outbound {
        scheme,
        hostport,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_and_addresses() {
        let ws = parse("websocket://example.com:80/chat?x=1").unwrap();
        assert_eq!(
            ws,
            Outbound {
                scheme: "ws",
                hostport: "example.com:80",
                path: "/chat?x=1"
            }
        );
        assert_eq!(parse("ws://h:1").unwrap().path, "/");
        for ok in [
            "tcp://127.0.0.1:9",
            "text://localhost:65535",
            "frame://[::1]:80/",
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "127.0.0.1:80",
            "tcp://",
            "tcp://host",
            "tcp://:80",
            "tcp://host:",
            "tcp://host:http",
            "tcp://host:65536",
            "text://anything at all",
        ] {
            assert!(
                parse(bad)
                    .unwrap_err()
                    .contains("expected scheme://host:port"),
                "{bad}"
            );
        }
        assert_eq!(
            parse("nope://x").unwrap_err(),
            "cannot connect to nope:// (supported: tcp, text, frame, ws)"
        );
        assert!(parse("wss://h:443").is_err());
    }
}
