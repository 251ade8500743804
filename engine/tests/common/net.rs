//! Sockets for the tests: the test bed's echo server and listeners that fail the test instead
//! of returning errors, checked echoes, and connections ended by RST or refusal.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ringtun_testbed::transfer::read_to_end_or_error;
use ringtun_testbed::{connect_in, sha256_hex, transfer, EchoServer, Netns, Pattern, Transfer};

/// Starts the test bed's echo server on `addr` inside `ns`, or fails the test.
pub fn echo_server(ns: &Netns, addr: &str) -> EchoServer {
    EchoServer::start(ns, addr).unwrap_or_else(|e| panic!("echo server on {addr}: {e}"))
}

/// Serves `addr` inside `ns`, every connection handed to `handle` on a thread of its own (see
/// [`ringtun_testbed::echo::serve_in`]), or fails the test.
pub fn serve(ns: &Netns, addr: &str, handle: impl Fn(TcpStream) + Send + Sync + 'static) {
    ringtun_testbed::echo::serve_in(ns, addr, handle).unwrap_or_else(|e| panic!("{e}"));
}

/// Binds a listener inside `ns` (the socket stays in the namespace afterwards), or fails the
/// test.
pub fn bind_in(ns: &Netns, addr: &str) -> TcpListener {
    ringtun_testbed::bind_in(ns, addr).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`transfer`] but fails the test with context, and checks the echo is exact.
pub fn echo_ok(ns: &Netns, dst: &str, n: u64) -> Transfer {
    let t = transfer(ns, dst, n).unwrap_or_else(|e| panic!("transfer of {n} bytes to {dst}: {e}"));
    assert_eq!(t.received, n, "echo from {dst} lost bytes");
    assert_eq!(t.sha_sent, t.sha_received, "echo from {dst} differs");
    t
}

/// Retries a checked echo of `n` bytes to `dst` (each attempt given 2 s) until one succeeds or
/// `within` has passed; returns the successful connection's local address.
pub fn echo_eventually(ns: &Netns, dst: &str, n: usize, within: Duration) -> SocketAddr {
    let deadline = Instant::now() + within;
    loop {
        let attempt = connect_in(ns, dst)
            .map_err(|e| format!("connect: {e}"))
            .and_then(|s| {
                let local = s.local_addr().map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(2)))
                    .map_err(|e| e.to_string())?;
                echo_on(s, n).map(|()| local)
            });
        match attempt {
            Ok(local) => return local,
            Err(e) if Instant::now() > deadline => {
                panic!("no successful echo through {dst} within {within:?}; last: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Sends `n` pattern bytes on an established stream, half-closes and checks the exact echo.
pub fn echo_on(mut s: TcpStream, n: usize) -> Result<(), String> {
    let mut r = s.try_clone().map_err(|e| format!("clone: {e}"))?;
    let reader = std::thread::spawn(move || read_to_end_or_error(&mut r));
    let mut data = vec![0u8; n];
    Pattern::new().fill(&mut data);
    let wrote = s.write_all(&data).and_then(|_| s.shutdown(Shutdown::Write));
    let (back, end) = reader.join().map_err(|_| "reader panicked".to_string())?;
    wrote.map_err(|e| format!("write: {e}"))?;
    end.map_err(|e| format!("read after {} bytes: {e}", back.len()))?;
    if sha256_hex(&back) != sha256_hex(&data) {
        return Err(format!("echo differs ({} of {n} bytes back)", back.len()));
    }
    Ok(())
}

/// Connects to `dst` from inside `ns`, sends a few bytes and expects the connection to be
/// refused or torn down without a byte of answer (an echo server behind it would answer).
/// Returns how it ended, for messages.
pub fn expect_no_answer(ns: &Netns, dst: &str) -> String {
    match connect_in(ns, dst) {
        Err(e) => format!("connect: {e}"),
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("read timeout");
            let _ = s.write_all(b"anybody there?");
            let mut buf = [0u8; 1024];
            match s.read(&mut buf) {
                Ok(0) => "eof".into(),
                Ok(n) => panic!("{dst}: expected a refusal, got {n} bytes back"),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("{dst}: neither answered nor refused within 10 s")
                }
                Err(e) => format!("read: {e}"),
            }
        }
    }
}

/// Sets SO_LINGER {on, 0} so that closing the socket sends RST instead of FIN.
pub fn set_linger_zero(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
}
