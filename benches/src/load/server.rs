//! The load server: one monoio runtime on one thread, one task per connection, serving the
//! commands of the header every connection starts with.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use monoio::buf::IoBuf;
use monoio::io::{AsyncReadRent, AsyncReadRentExt, AsyncWriteRent};
use monoio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, Socket, Type};

use super::{block_on, drain, pattern, read_exact, write_all, ServerStats, CHUNK, HDR};

/// Binds `addr` (SO_REUSEADDR, backlog 4096) on the calling thread (so in its namespace) and
/// serves connections on a monoio runtime until the process exits. Call it on a thread that
/// has joined the server namespace; it returns only on error.
pub fn serve(addr: SocketAddr, stats: Arc<ServerStats>) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    let std_listener: std::net::TcpListener = socket.into();
    block_on(accept_loop(std_listener, stats))?
}

async fn accept_loop(
    std_listener: std::net::TcpListener,
    stats: Arc<ServerStats>,
) -> io::Result<()> {
    let listener = TcpListener::from_std(std_listener)?;
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                monoio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Err(_) => continue,
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let stats = stats.clone();
        monoio::spawn(async move {
            if let Err(e) = serve_one(conn, &stats).await {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::BrokenPipe
                ) {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

async fn serve_one(mut s: TcpStream, stats: &ServerStats) -> io::Result<()> {
    let _ = s.set_nodelay(true);
    let hdr = read_exact(&mut s, vec![0u8; HDR].into_boxed_slice()).await?;
    let mut arg = [0u8; 8];
    arg.copy_from_slice(&hdr[8..16]);
    let arg = u64::from_le_bytes(arg);
    match hdr[0] {
        b'U' => {
            let mut left = arg;
            let mut buf = Vec::with_capacity(CHUNK);
            while left > 0 {
                buf.clear();
                let (r, b) = s.read(buf).await;
                buf = b;
                match r? {
                    0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                    k => left = left.saturating_sub(k as u64),
                }
            }
            write_all(&mut s, vec![1u8]).await?;
            drain(&mut s, buf).await;
        }
        b'D' => {
            let mut left = arg as usize;
            let mut buf = pattern(CHUNK);
            while left > 0 {
                let k = left.min(CHUNK);
                buf = write_all(&mut s, buf.slice(0..k)).await?.into_inner();
                left -= k;
            }
            s.shutdown().await?;
            drain(&mut s, Vec::with_capacity(4096)).await;
        }
        b'P' => {
            let mut buf = vec![0u8; arg.clamp(1, 1 << 20) as usize].into_boxed_slice();
            loop {
                let (r, b) = s.read_exact(buf).await;
                match r {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
                buf = write_all(&mut s, b).await?;
            }
        }
        b'R' => {
            let req = (arg & 0xffff_ffff) as usize;
            let reply = (arg >> 32) as usize;
            if req > 0 {
                read_exact(&mut s, vec![0u8; req].into_boxed_slice()).await?;
            }
            write_all(&mut s, pattern(reply.max(1))).await?;
            // Closing first keeps TIME_WAIT on this (listening) side, not on client ports.
        }
        b'H' => {
            stats.held.fetch_add(1, Ordering::Relaxed);
            drain(&mut s, Vec::with_capacity(64)).await;
            stats.held.fetch_sub(1, Ordering::Relaxed);
        }
        _ => return Err(io::Error::other("unknown command")),
    }
    Ok(())
}
