//! NBD URIs, as QEMU spells them: `nbd://HOST[:PORT][/EXPORT]` and
//! `nbd+unix:///EXPORT?socket=PATH`.

use std::path::PathBuf;

use crate::{Error, Result};

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// The longest export name the protocol allows (NBD_MAX_STRING_SIZE).
pub const MAX_NAME: usize = 4096;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub addr: NbdAddr,
    /// The export name ("" is the server's default export).
    pub export: String,
}

fn bad(uri: &str, why: &str) -> Error {
    Error::invalid(format!("invalid NBD URI {uri:?}: {why}"))
}

/// Decodes `%XX` escapes (an export name may hold any byte but NUL).
fn percent_decode(uri: &str, s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(uri, "bad %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).map_err(|_| bad(uri, "name is not UTF-8"))?;
    if s.contains('\0') {
        return Err(bad(uri, "NUL in a name"));
    }
    Ok(s)
}

impl NbdUri {
    pub fn parse(uri: &str) -> Result<Self> {
        let (unix, rest) = if let Some(r) = uri.strip_prefix("nbd+unix://") {
            (true, r)
        } else if let Some(r) = uri.strip_prefix("nbd+tcp://") {
            (false, r)
        } else if let Some(r) = uri.strip_prefix("nbd://") {
            (false, r)
        } else {
            return Err(bad(
                uri,
                "expected nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH",
            ));
        };
        if rest.contains('#') {
            return Err(bad(uri, "a fragment is not allowed"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(uri, path)?;
        if export.len() > MAX_NAME {
            return Err(bad(uri, "export name longer than 4096 bytes"));
        }
        let mut socket = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("socket", v)) if unix && socket.is_none() => {
                    socket = Some(percent_decode(uri, v)?)
                }
                _ => return Err(bad(uri, &format!("unexpected query parameter {pair:?}"))),
            }
        }
        if unix {
            if !authority.is_empty() {
                return Err(bad(
                    uri,
                    "nbd+unix takes no host (nbd+unix:///EXPORT?socket=PATH)",
                ));
            }
            let socket = socket.filter(|s| !s.is_empty());
            let socket = socket.ok_or_else(|| bad(uri, "nbd+unix needs ?socket=PATH"))?;
            return Ok(NbdUri {
                addr: NbdAddr::Unix(PathBuf::from(socket)),
                export,
            });
        }
        if authority.contains('@') {
            return Err(bad(uri, "user information is not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad(uri, "unterminated [IPv6] host"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| bad(uri, "junk after ]"))?,
                ),
            };
            (h, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad(uri, "no host"));
        }
        let port = match port {
            None | Some("") => DEFAULT_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(uri, "bad port"))?,
        };
        Ok(NbdUri {
            addr: NbdAddr::Tcp {
                host: host.to_string(),
                port,
            },
            export,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            addr: NbdAddr::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn tcp_forms() {
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:10810/exp").unwrap(),
            tcp("127.0.0.1", 10810, "exp")
        );
        assert_eq!(
            NbdUri::parse("nbd://host").unwrap(),
            tcp("host", DEFAULT_PORT, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://host/").unwrap(),
            tcp("host", DEFAULT_PORT, "")
        );
        assert_eq!(
            NbdUri::parse("nbd+tcp://h:1/a/b").unwrap(),
            tcp("h", 1, "a/b")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]:99/x%20y").unwrap(),
            tcp("::1", 99, "x y")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]/").unwrap(),
            tcp("::1", DEFAULT_PORT, "")
        );
    }

    #[test]
    fn unix_forms() {
        let u = NbdUri::parse("nbd+unix:///exp?socket=/tmp/s.sock").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/tmp/s.sock".into()));
        assert_eq!(u.export, "exp");
        let u = NbdUri::parse("nbd+unix://?socket=/a%20b").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/a b".into()));
        assert_eq!(u.export, "");
    }

    #[test]
    fn rejects() {
        for bad in [
            "nbd:/x",
            "nbd://",
            "nbd://:10809/x",
            "nbd://h:0/x",
            "nbd://h:65536/x",
            "nbd://h:port/x",
            "nbd://u@h/x",
            "nbd://h/x?socket=/s",
            "nbd://[::1/x",
            "nbd://[::1]x/",
            "nbd://h/x#frag",
            "nbd://h/%zz",
            "nbd://h/%00",
            "nbd+unix:///x",
            "nbd+unix:///x?socket=",
            "nbd+unix://host/x?socket=/s",
            "nbd+unix:///x?socket=/s&socket=/t",
            "nbd+unix:///x?socket=/s&foo=1",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad} parsed");
        }
        let long = format!("nbd://h/{}", "a".repeat(MAX_NAME + 1));
        assert!(NbdUri::parse(&long).is_err());
    }
}
