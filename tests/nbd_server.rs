//! The NBD server against our own NBD client (`NbdBackend`) over TCP and Unix sockets, and
//! against a raw scripted client that misbehaves: bad magic, truncated handshakes, huge
//! options, over-long writes, out-of-range and unknown commands, silent clients (handshake
//! timeout), too many connections, close() while a request is in progress.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockemu_core::block::nbd::proto::*;
use blockemu_core::block::nbd::server::{NbdServer, ServerAddr, ServerOptions, OPT_INFO, OPT_LIST};
use blockemu_core::block::{memory_node, Backend, BlockNode, NbdBackend};

const SIZE: u64 = 4 << 20;

fn node(size: u64) -> Arc<BlockNode> {
    Arc::new(memory_node(size, false, |b| b).unwrap())
}

fn server(opts: ServerOptions) -> NbdServer {
    NbdServer::bind("tcp:127.0.0.1:0", opts).unwrap()
}

fn tcp_addr(s: &NbdServer) -> SocketAddr {
    match s.local_addr() {
        ServerAddr::Tcp(a) => *a,
        ServerAddr::Unix(_) => unreachable!(),
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Runs every command through our client against `uri`; checks the node saw them.
fn exercise(uri: &str, node: &BlockNode) {
    let c = NbdBackend::connect(uri, Some(Duration::from_secs(10))).unwrap();
    assert_eq!(c.len().unwrap(), SIZE);
    assert!(!c.readonly());
    let data = pattern(128 * 1024, 3);
    c.write_at(&data, 4096).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_at(&mut back, 4096).unwrap();
    assert_eq!(back, data);
    let mut direct = vec![0u8; data.len()];
    node.read(4096, &mut direct).unwrap();
    assert_eq!(direct, data);
    c.flush().unwrap();
    c.write_zeroes(4096, 8192).unwrap();
    c.read_at(&mut back[..8192], 4096).unwrap();
    assert!(back[..8192].iter().all(|&b| b == 0));
    c.discard(65536, 65536).unwrap();
    // Out of range: a clean error, the connection stays usable.
    let e = c.read_at(&mut back[..512], SIZE - 256).unwrap_err();
    assert_eq!(e.os_code(), Some(libc::EINVAL), "{e}");
    c.read_at(&mut back[..512], 0).unwrap();
    // Many requests in flight at once (the client pipelines from several threads).
    let c = Arc::new(c);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let c = c.clone();
            s.spawn(move || {
                let d = pattern(65536, t as u8);
                for i in 0..16u64 {
                    let off = (t * 16 + i) * 65536;
                    c.write_at(&d, off).unwrap();
                    let mut b = vec![0u8; d.len()];
                    c.read_at(&mut b, off).unwrap();
                    assert_eq!(b, d);
                }
            });
        }
    });
}

#[test]
fn tcp_round_trip_with_our_client() {
    let srv = server(ServerOptions::default());
    let n = node(SIZE);
    let uri = srv.add_export("disk", n.clone(), true).unwrap();
    assert_eq!(
        uri,
        format!("nbd://127.0.0.1:{}/disk", tcp_addr(&srv).port())
    );
    exercise(&uri, &n);
    let st = srv.stats();
    assert!(st.connections >= 1);
    assert!(st.writes >= 65 && st.reads >= 66, "{st:?}");
    assert_eq!(st.zero_writes, 1);
    assert_eq!(st.trims, 1);
    assert!(st.flushes >= 1);
    assert_eq!(st.errors, 1);
    assert_eq!(srv.exports(), vec!["disk".to_string()]);
    srv.close(None).unwrap();
    srv.close(None).unwrap(); // idempotent
    assert!(srv.add_export("x", node(512), true).is_err());
    // The port is free again.
    std::net::TcpListener::bind(tcp_addr(&srv)).unwrap();
}

#[test]
fn unix_round_trip_and_socket_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let srv = NbdServer::bind(&format!("unix:{}", path.display()), Default::default()).unwrap();
    assert_eq!(srv.address(), format!("unix:{}", path.display()));
    let n = node(SIZE);
    let uri = srv.add_export("a b", n.clone(), true).unwrap();
    assert!(uri.starts_with("nbd+unix:///a%20b?socket="), "{uri}");
    exercise(&uri, &n);
    assert!(path.exists());
    drop(srv);
    assert!(!path.exists());
}

#[test]
fn ipv6_when_available() {
    let Ok(srv) = NbdServer::bind("tcp:[::1]:0", Default::default()) else {
        return; // no IPv6 loopback here
    };
    assert!(srv.address().starts_with("tcp:[::1]:"));
    let n = node(SIZE);
    let uri = srv.add_export("v6", n.clone(), true).unwrap();
    assert!(uri.starts_with("nbd://[::1]:"), "{uri}");
    let c = NbdBackend::connect(&uri, None).unwrap();
    c.write_at(b"hello", 0).unwrap();
    let mut b = [0u8; 5];
    c.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"hello");
}

// --- A raw client ---------------------------------------------------------------------------

struct Raw {
    s: TcpStream,
}

impl Raw {
    fn connect(srv: &NbdServer) -> Raw {
        let s = TcpStream::connect(tcp_addr(srv)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s }
    }
    fn greeting(&mut self) {
        let mut h = [0u8; 18];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&h[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(
            &h[16..],
            &(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()
        );
    }
    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }
    fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }
    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }
    /// (option, type, payload)
    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut p = vec![0u8; len as usize];
        self.s.read_exact(&mut p).unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            p,
        )
    }
    /// Handshake to `name` with NBD_OPT_GO; returns (size, flags).
    fn go(&mut self, name: &str) -> (u64, u16) {
        self.greeting();
        self.send(&3u32.to_be_bytes());
        self.opt(OPT_GO, &Raw::go_data(name, &[INFO_BLOCK_SIZE]));
        let mut size_flags = None;
        loop {
            let (o, t, p) = self.opt_reply();
            assert_eq!(o, OPT_GO);
            match t {
                REP_INFO if p[..2] == INFO_EXPORT.to_be_bytes() => {
                    size_flags = Some((
                        u64::from_be_bytes(p[2..10].try_into().unwrap()),
                        u16::from_be_bytes(p[10..12].try_into().unwrap()),
                    ))
                }
                REP_INFO => {
                    assert_eq!(p.len(), 14);
                    assert_eq!(&p[2..6], &1u32.to_be_bytes());
                    assert_eq!(&p[6..10], &4096u32.to_be_bytes());
                    assert_eq!(&p[10..14], &(32u32 << 20).to_be_bytes());
                }
                REP_ACK => return size_flags.unwrap(),
                t => panic!("reply type {t:#x}"),
            }
        }
    }
    fn request(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32, p: &[u8]) {
        let mut h = request(cmd, cookie, offset, len);
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        self.send(&h);
        self.send(p);
    }
    /// (errno, cookie)
    fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }
    /// The server closed the connection (EOF, or a reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    }
}

#[test]
fn raw_commands_flags_and_errnos() {
    let srv = server(Default::default());
    let n = node(SIZE);
    srv.add_export("", n.clone(), true).unwrap();
    let ro = node(SIZE);
    srv.add_export("ro", ro.clone(), false).unwrap();

    let mut c = Raw::connect(&srv);
    let (size, flags) = c.go("");
    assert_eq!(size, SIZE);
    let want = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES;
    assert_eq!(flags, want);
    // Pipelined: all requests first, then all replies, in order.
    let d = pattern(4096, 9);
    for i in 0..32u64 {
        c.request(CMD_WRITE, 1, i, i * 4096, 4096, &d); // FUA
    }
    c.request(CMD_READ, 0, 100, 0, 4096, &[]);
    c.request(CMD_READ, 0, 101, SIZE - 512, 1024, &[]); // out of range
    c.request(CMD_READ, 0, 102, u64::MAX - 10, 100, &[]); // overflow
    c.request(CMD_READ, 0, 103, 0, (32 << 20) + 1, &[]); // too long for a read
    c.request(42, 0, 104, 0, 0, &[]); // unknown command
    c.request(CMD_READ, 2, 105, 0, 512, &[]); // NO_HOLE on a read
    c.request(CMD_WRITE_ZEROES, 2 | 1, 106, 0, 4096, &[]); // NO_HOLE | FUA
    c.request(CMD_TRIM, 0, 107, SIZE - 4096, 8192, &[]); // out of range
    c.request(CMD_FLUSH, 1, 108, 0, 0, &[]); // FUA is accepted on any command
    for i in 0..32u64 {
        assert_eq!(c.reply(), (0, i));
    }
    assert_eq!(c.reply(), (0, 100));
    let mut got = vec![0u8; 4096];
    c.s.read_exact(&mut got).unwrap();
    assert_eq!(got, d);
    for cookie in 101..=105 {
        assert_eq!(c.reply(), (22, cookie));
    }
    assert_eq!(c.reply(), (0, 106));
    assert_eq!(c.reply(), (22, 107));
    assert_eq!(c.reply(), (0, 108));
    let mut b = vec![1u8; 4096];
    n.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert!(srv.stats().flushes >= 34);
    c.request(CMD_DISC, 0, 0, 0, 0, &[]);
    assert!(c.closed());

    // Read-only export: writes are EPERM (the payload is consumed), reads work.
    let mut c = Raw::connect(&srv);
    let (_, flags) = c.go("ro");
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    c.request(CMD_WRITE, 0, 1, 0, 4096, &d);
    c.request(CMD_WRITE_ZEROES, 0, 2, 0, 4096, &[]);
    c.request(CMD_TRIM, 0, 3, 0, 4096, &[]);
    c.request(CMD_READ, 0, 4, 0, 16, &[]);
    assert_eq!(c.reply(), (1, 1));
    assert_eq!(c.reply(), (1, 2));
    assert_eq!(c.reply(), (1, 3));
    assert_eq!(c.reply(), (0, 4));
    c.s.read_exact(&mut got[..16]).unwrap();

    // Our client on a read-only export: the error is EPERM.
    let uri = srv.uri("ro");
    let cl = NbdBackend::connect(&uri, None).unwrap();
    assert!(cl.readonly());
}

#[test]
fn inactive_node_answers_eperm() {
    let srv = server(Default::default());
    let n = node(SIZE);
    n.inactivate().unwrap();
    srv.add_export("off", n.clone(), true).unwrap();
    let mut c = Raw::connect(&srv);
    assert_eq!(c.go("off").0, SIZE);
    c.request(CMD_READ, 0, 1, 0, 512, &[]);
    c.request(CMD_WRITE, 0, 2, 0, 4, b"abcd");
    c.request(CMD_FLUSH, 0, 3, 0, 0, &[]);
    assert_eq!(c.reply(), (1, 1));
    assert_eq!(c.reply(), (1, 2));
    assert_eq!(c.reply(), (1, 3));
    n.activate().unwrap();
    c.request(CMD_READ, 0, 4, 0, 512, &[]);
    assert_eq!(c.reply(), (0, 4));
}

#[test]
fn options_info_list_unknown_abort() {
    let srv = server(Default::default());
    srv.add_export("e", node(SIZE), true).unwrap();
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&1u32.to_be_bytes()); // fixed newstyle, zeroes wanted
    c.opt(OPT_LIST, &[]);
    assert_eq!(c.opt_reply().1, REP_ERR_POLICY);
    c.opt(8, &[]); // structured replies: not supported
    assert_eq!(c.opt_reply().1, REP_ERR_UNSUP);
    c.opt(99, b"xyz");
    assert_eq!(
        c.opt_reply(),
        (99, REP_ERR_UNSUP, b"option not supported".to_vec())
    );
    c.opt(OPT_GO, &Raw::go_data("nope", &[]));
    assert_eq!(c.opt_reply().1, REP_ERR_UNKNOWN);
    c.opt(OPT_GO, &[0, 0, 0, 9, b'e']); // name longer than the data
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    c.opt(OPT_INFO, &Raw::go_data("e", &[INFO_EXPORT]));
    let (o, t, p) = c.opt_reply();
    assert_eq!((o, t, p.len()), (OPT_INFO, REP_INFO, 12));
    assert_eq!(c.opt_reply().1, REP_INFO);
    assert_eq!(c.opt_reply().1, REP_ACK);
    // Still in option haggling: EXPORT_NAME with the zeroes.
    c.opt(OPT_EXPORT_NAME, b"e");
    let mut r = [0u8; 134];
    c.s.read_exact(&mut r).unwrap();
    assert_eq!(&r[..8], &SIZE.to_be_bytes());
    assert!(r[10..].iter().all(|&b| b == 0));
    c.request(CMD_READ, 0, 1, 0, 8, &[]);
    assert_eq!(c.reply(), (0, 1));

    // EXPORT_NAME of an unknown export: closed. ABORT: acked, then closed.
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&3u32.to_be_bytes());
    c.opt(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&3u32.to_be_bytes());
    c.opt(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply(), (OPT_ABORT, REP_ACK, vec![]));
    assert!(c.closed());
    // Unknown client flags: closed.
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&0x8000_0003u32.to_be_bytes());
    assert!(c.closed());
    // Too many options: closed.
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&3u32.to_be_bytes());
    for _ in 0..100 {
        c.opt(OPT_LIST, &[]);
    }
    let mut replies = 0;
    while !c.closed() {
        replies += 1;
    }
    let _ = replies;
}

#[test]
fn hostile_clients_are_disconnected() {
    let srv = server(Default::default());
    let n = node(SIZE);
    srv.add_export("", n.clone(), true).unwrap();
    // Bad option magic.
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&3u32.to_be_bytes());
    c.send(&[0u8; 16]);
    assert!(c.closed());
    // Huge option length: ERR_TOO_BIG, then closed (the data is never read).
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&3u32.to_be_bytes());
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&m);
    assert_eq!(c.opt_reply().1, REP_ERR_TOO_BIG);
    assert!(c.closed());
    // Truncated handshakes.
    for cut in [0usize, 2, 4, 10] {
        let mut c = Raw::connect(&srv);
        c.greeting();
        let mut m = 3u32.to_be_bytes().to_vec();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        c.send(&m[..cut]);
        c.s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(c.closed());
    }
    // Over-long write: closed. Bad request magic: closed.
    let mut c = Raw::connect(&srv);
    c.go("");
    c.request(CMD_WRITE, 0, 1, 0, (32 << 20) + 1, &[]);
    assert!(c.closed());
    let mut c = Raw::connect(&srv);
    c.go("");
    c.send(&[0xffu8; 28]);
    assert!(c.closed());
    // A request cut in the middle of its payload.
    let mut c = Raw::connect(&srv);
    c.go("");
    c.request(CMD_WRITE, 0, 1, 0, 4096, &[1u8; 100]);
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.closed());
    // The server still serves.
    let c = NbdBackend::connect(&srv.uri(""), None).unwrap();
    let mut b = [0u8; 4];
    c.read_at(&mut b, 0).unwrap();
    // The hostile connections' threads end (they count down just after closing the socket).
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.stats().active_connections != 1 {
        assert!(Instant::now() < deadline, "{:?}", srv.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn silent_client_hits_the_handshake_timeout() {
    let srv = server(ServerOptions {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    });
    srv.add_export("", node(SIZE), true).unwrap();
    let t = Instant::now();
    let mut c = Raw::connect(&srv);
    c.greeting();
    assert!(c.closed());
    assert!(t.elapsed() < Duration::from_secs(5));
    // A client in transmission may idle: no timeout there.
    let mut c = Raw::connect(&srv);
    c.go("");
    std::thread::sleep(Duration::from_millis(600));
    c.request(CMD_FLUSH, 0, 1, 0, 0, &[]);
    assert_eq!(c.reply(), (0, 1));
}

#[test]
fn connection_limit() {
    let srv = server(ServerOptions {
        max_connections: 2,
        ..Default::default()
    });
    srv.add_export("", node(SIZE), true).unwrap();
    let mut a = Raw::connect(&srv);
    a.go("");
    let mut b = Raw::connect(&srv);
    b.go("");
    let mut c = Raw::connect(&srv);
    assert!(c.closed()); // no greeting: closed at once
    assert_eq!(srv.stats().refused, 1);
    drop(a);
    // Once one goes, a new client gets in.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut d = Raw::connect(&srv);
        let mut h = [0u8; 18];
        if d.s.read_exact(&mut h).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was never reused");
        std::thread::sleep(Duration::from_millis(20));
    }
    b.request(CMD_FLUSH, 0, 1, 0, 0, &[]);
    assert_eq!(b.reply(), (0, 1));
}

#[test]
fn close_while_clients_are_mid_request() {
    let srv = server(Default::default());
    srv.add_export("", node(SIZE), true).unwrap();
    // One in the middle of a write payload, one in the handshake, one streaming requests.
    let mut a = Raw::connect(&srv);
    a.go("");
    a.request(CMD_WRITE, 0, 1, 0, 65536, &[7u8; 1000]);
    let mut b = Raw::connect(&srv);
    b.greeting();
    let mut s = Raw::connect(&srv);
    s.go("");
    let streamer = std::thread::spawn(move || {
        for i in 0..10_000u64 {
            let mut h = request(CMD_READ, i, 0, 4096);
            h[4..6].copy_from_slice(&0u16.to_be_bytes());
            if s.s.write_all(&h).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    srv.close(Some(Duration::from_secs(1))).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(a.closed());
    assert!(b.closed());
    streamer.join().unwrap();
    assert_eq!(srv.stats().active_connections, 0);
}

#[test]
fn remove_export_disconnects_its_clients_only() {
    let srv = server(Default::default());
    srv.add_export("a", node(SIZE), true).unwrap();
    srv.add_export("b", node(SIZE), true).unwrap();
    let ca = NbdBackend::connect(&srv.uri("a"), Some(Duration::from_secs(5))).unwrap();
    let cb = NbdBackend::connect(&srv.uri("b"), Some(Duration::from_secs(5))).unwrap();
    ca.write_at(b"x", 0).unwrap();
    srv.remove_export("a", None).unwrap();
    assert_eq!(srv.exports(), vec!["b".to_string()]);
    // Our client reconnects after the drop and finds the export gone.
    let e = ca.write_at(b"y", 0).unwrap_err();
    assert!(e.os_code().is_some(), "{e}");
    cb.write_at(b"z", 0).unwrap();
    assert!(srv.remove_export("a", None).is_err());
    // The name can be reused.
    srv.add_export("a", node(SIZE), true).unwrap();
}

#[test]
fn bad_server_addresses_and_duplicate_exports() {
    for bad in ["tcp:127.0.0.1", "foo:bar", "unix:", "tcp:127.0.0.1:99999"] {
        assert!(NbdServer::bind(bad, Default::default()).is_err(), "{bad}");
    }
    let srv = server(Default::default());
    srv.add_export("x", node(512), true).unwrap();
    assert!(srv.add_export("x", node(512), true).is_err());
    let ro = Arc::new(memory_node(512, true, |b| b).unwrap());
    assert!(srv.add_export("ro", ro, true).is_err());
    let closed = node(512);
    closed.close().unwrap();
    assert!(srv.add_export("c", closed, true).is_err());
}

#[test]
fn a_burst_of_large_pipelined_writes_is_served_in_order() {
    // More payload than a connection queues (64 MiB): the reader waits for the worker.
    let srv = server(Default::default());
    let n = node(32 << 20);
    srv.add_export("", n.clone(), true).unwrap();
    let mut c = Raw::connect(&srv);
    c.go("");
    let mut w = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..24u64 {
            let d = vec![i as u8; 4 << 20];
            let off = (i % 8) * (4 << 20);
            w.write_all(&request(CMD_WRITE, i, off, 4 << 20)).unwrap();
            w.write_all(&d).unwrap();
        }
    });
    for i in 0..24u64 {
        assert_eq!(c.reply(), (0, i));
    }
    sender.join().unwrap();
    let mut b = vec![0u8; 16];
    for k in 0..8u64 {
        n.read(k * (4 << 20), &mut b).unwrap();
        assert!(b.iter().all(|&x| x == (16 + k) as u8), "chunk {k}");
    }
}
