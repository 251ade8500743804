//! bare_relay: the least a userspace relay can do per message, to run as ringtun-bench's other
//! tunnel and measure what a relay hop costs on the benchmark topology in time, not CPU.
//!
//! Nothing of ringtun's: std's blocking sockets and two threads per connection, each blocked
//! in `read` on one socket and writing what it got to the other. A message wakes the thread
//! that waits for it, which writes it on at once: no event loop, no readiness step, no TLS, no
//! HTTP/2, no buffering across messages. A tunnel hop does this and more, so the latency this
//! pair adds bounds from below what any two-relay tunnel adds on the same machine
//! (benches/README.md, round 19). Same plan as `relay`:
//!
//! ```text
//! bare_relay client   # 0.0.0.0:15001 -> 10.77.0.2:15008, marked 0x539
//! bare_relay server   # 0.0.0.0:15008 -> 10.77.0.2:5201
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use ringtun_benches::relay_plan::plan;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// The read size: the largest message the benchmark's request/response tests send fits.
const BUF: usize = 64 * 1024;

fn main() -> ExitCode {
    let side = std::env::args().nth(1).unwrap_or_default();
    let Some((listen, to, mark)) = plan(&side) else {
        eprintln!("usage: bare_relay client|server");
        return ExitCode::from(2);
    };
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bare_relay: bind {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("bare_relay {side}: {listen} -> {to}");
    loop {
        let a = match listener.accept() {
            Ok((a, _)) => a,
            Err(e) => {
                eprintln!("bare_relay: accept: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let spawned =
            thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || match connect(to, mark) {
                    Ok(b) => relay(a, b),
                    Err(e) => eprintln!("bare_relay: connect {to}: {e}"),
                });
        if let Err(e) = spawned {
            eprintln!("bare_relay: thread: {e}");
        }
    }
}

/// A blocking connection to `to` whose packets carry `mark` (0: none).
fn connect(to: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    s.connect_timeout(&SockAddr::from(to), Duration::from_secs(5))?;
    let s = TcpStream::from(s);
    s.set_nodelay(true)?;
    Ok(s)
}

/// Copies both ways until both have ended, one thread per direction.
fn relay(a: TcpStream, b: TcpStream) {
    let _ = a.set_nodelay(true);
    let (a2, b2) = match (a.try_clone(), b.try_clone()) {
        (Ok(a2), Ok(b2)) => (a2, b2),
        _ => return,
    };
    let back = thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(move || copy(b2, a2));
    copy(a, b);
    if let Ok(h) = back {
        let _ = h.join();
    }
}

/// Reads `from` and writes each read to `to` until `from` ends; then ends `to`'s sending half.
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; BUF];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
