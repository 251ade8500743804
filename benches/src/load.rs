//! The load generators of `ringtun-bench`: one monoio server and monoio clients that speak a
//! tiny protocol, so the same programs drive every contender (direct TCP, ringtun, another
//! tunnel).
//!
//! Every connection starts with a 16-byte header from the client: a command byte, 7 reserved
//! bytes and a little-endian `u64` argument. The server (one monoio runtime on one thread in
//! the server namespace, listening on the service's target port) then does:
//!
//! | command | argument | server |
//! |---|---|---|
//! | `U` upload | byte count `n` | reads `n` bytes, answers 1 byte, waits for EOF |
//! | `D` download | byte count `n` | writes `n` bytes, shuts down its write side, waits for EOF |
//! | `P` ping-pong | message size `m` | reads `m` bytes and writes them back, until EOF |
//! | `R` request/reply | `req | reply << 32` | reads `req` bytes, writes `reply` bytes, closes |
//! | `H` hold | – | counts the connection as held until EOF (idle connections) |
//!
//! Clients create their sockets on the calling thread, so running them inside
//! [`ringtun_testbed::Netns::enter`] puts them in the client namespace. A [`Target`] says where
//! to dial and whether to mark the socket (SO_MARK makes the capture rules skip it: that is the
//! "direct" baseline).

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncReadRentExt, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, Socket, Type};

/// Length of the header every connection starts with.
pub const HDR: usize = 16;
/// Size of the buffers bulk transfers read and write with.
const CHUNK: usize = 256 * 1024;
/// How long a client waits for any single connect before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters the server keeps (shared with the harness thread).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections currently held open by `H` clients.
    pub held: AtomicUsize,
    /// Connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections that ended with an error other than a reset or EOF.
    pub errors: AtomicU64,
}

/// Where a client dials.
#[derive(Clone, Debug)]
pub struct Target {
    /// Destination address (the service VIP for tunnels, the server itself for direct).
    pub addr: SocketAddr,
    /// SO_MARK for the socket (0: none). The capture rules skip marked sockets.
    pub mark: u32,
}

/// Runs `fut` on a fresh single-thread monoio runtime (io_uring when the kernel allows it, else
/// epoll) with timers enabled.
pub fn block_on<F: Future>(fut: F) -> io::Result<F::Output> {
    match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .with_entries(4096)
        .build()
    {
        Ok(mut rt) => Ok(rt.block_on(fut)),
        Err(_) => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(fut)),
    }
}

fn header(cmd: u8, arg: u64) -> Vec<u8> {
    let mut h = vec![0u8; HDR];
    h[0] = cmd;
    h[8..16].copy_from_slice(&arg.to_le_bytes());
    h
}

fn pattern(n: usize) -> Box<[u8]> {
    ringtun_testbed::pattern(n).into_boxed_slice()
}

/// Connects a non-blocking TCP socket to `dst`, optionally marked and bound to `src`, and
/// hands it to the current monoio runtime.
pub async fn connect(dst: SocketAddr, mark: u32, src: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    if mark != 0 {
        socket.set_mark(mark)?;
    }
    if let Some(ip) = src {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let probe = socket.try_clone()?;
    let stream = TcpStream::from_std(socket.into())?;
    match monoio::time::timeout(CONNECT_TIMEOUT, stream.writable(false)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out"),
            ))
        }
    }
    if let Some(e) = probe.take_error()? {
        return Err(e);
    }
    Ok(stream)
}

async fn dial(t: &Target) -> io::Result<TcpStream> {
    connect(t.addr, t.mark, None).await
}

async fn write_all<B: IoBuf + 'static>(s: &mut TcpStream, buf: B) -> io::Result<B> {
    let (r, buf) = s.write_all(buf).await;
    r.map(|_| buf)
}

async fn read_exact<B: IoBufMut + 'static>(s: &mut TcpStream, buf: B) -> io::Result<B> {
    let (r, buf) = s.read_exact(buf).await;
    r.map(|_| buf)
}

/// Reads until EOF (or an error), discarding; returns the byte count.
async fn drain(s: &mut TcpStream, mut buf: Vec<u8>) -> u64 {
    let mut n = 0u64;
    loop {
        buf.clear();
        let (r, b) = s.read(buf).await;
        buf = b;
        match r {
            Ok(0) | Err(_) => return n,
            Ok(k) => n += k as u64,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server

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

// ---------------------------------------------------------------------------------------------
// Clients

/// Direction of a bulk transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// Moves `total` bytes split over `streams` concurrent connections in `dir`; returns the time
/// from the first connect to the last byte (upload: the server's acknowledgement).
pub fn bulk(t: &Target, dir: Dir, streams: usize, total: u64) -> io::Result<Duration> {
    let t = t.clone();
    block_on(async move {
        let start = Instant::now();
        let per = total / streams as u64;
        let mut tasks = Vec::new();
        for i in 0..streams {
            let n = if i == 0 {
                total - per * (streams as u64 - 1)
            } else {
                per
            };
            let t = t.clone();
            tasks.push(monoio::spawn(async move { bulk_one(&t, dir, n).await }));
        }
        for task in tasks {
            task.await?;
        }
        Ok(start.elapsed())
    })?
}

async fn bulk_one(t: &Target, dir: Dir, n: u64) -> io::Result<()> {
    let mut s = dial(t).await?;
    match dir {
        Dir::Up => {
            write_all(&mut s, header(b'U', n)).await?;
            let mut left = n as usize;
            let mut buf = pattern(CHUNK);
            while left > 0 {
                let k = left.min(CHUNK);
                buf = write_all(&mut s, buf.slice(0..k)).await?.into_inner();
                left -= k;
            }
            read_exact(&mut s, vec![0u8; 1].into_boxed_slice()).await?;
        }
        Dir::Down => {
            write_all(&mut s, header(b'D', n)).await?;
            let mut got = 0u64;
            let mut buf = Vec::with_capacity(CHUNK);
            while got < n {
                buf.clear();
                let (r, b) = s.read(buf).await;
                buf = b;
                match r? {
                    0 => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("download ended after {got} of {n} bytes"),
                        ))
                    }
                    k => got += k as u64,
                }
            }
        }
    }
    Ok(())
}

/// Ping-pong on one connection: `warmup` unmeasured round trips, then `n` measured ones of
/// `size` bytes each way; returns the round-trip times in microseconds.
pub fn ping_pong(t: &Target, size: usize, warmup: usize, n: usize) -> io::Result<Vec<f64>> {
    let t = t.clone();
    block_on(async move {
        let mut s = dial(&t).await?;
        write_all(&mut s, header(b'P', size as u64)).await?;
        let mut out = pattern(size.max(1));
        let mut back = vec![0u8; size.max(1)].into_boxed_slice();
        let mut rtts = Vec::with_capacity(n);
        for i in 0..warmup + n {
            let t0 = Instant::now();
            out = write_all(&mut s, out).await?;
            back = read_exact(&mut s, back).await?;
            if i >= warmup {
                rtts.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(rtts)
    })?
}

/// What a multi-connection request/response run measured.
#[derive(Clone, Debug, Default)]
pub struct RrResult {
    /// Requests answered.
    pub completed: u64,
    /// Wall time of the measured period.
    pub elapsed: Duration,
    /// Round-trip times (µs) of the answered requests.
    pub rtts: Vec<f64>,
    /// Requests sent later than scheduled by more than one interval (fixed-rate runs only).
    pub late: u64,
}

/// `conns` kept-alive connections each doing ping-pong of `size` bytes for `duration`:
/// closed loop (as fast as answers come) when `rate` is `None`, else at `rate` requests per
/// second in all, spread evenly over the connections (open loop: each connection sends on its
/// schedule; a send that is due while the previous answer is outstanding waits for it and is
/// counted in `late` if it is more than one interval behind).
pub fn request_response(
    t: &Target,
    conns: usize,
    size: usize,
    duration: Duration,
    rate: Option<f64>,
) -> io::Result<RrResult> {
    let t = t.clone();
    block_on(async move {
        let mut streams = Vec::with_capacity(conns);
        for _ in 0..conns {
            let mut s = dial(&t).await?;
            write_all(&mut s, header(b'P', size as u64)).await?;
            streams.push(s);
        }
        // One unmeasured round trip each, so every tunnel stream is established.
        for s in streams.iter_mut() {
            write_all(s, pattern(size.max(1))).await?;
            read_exact(s, vec![0u8; size.max(1)].into_boxed_slice()).await?;
        }
        let result = Rc::new(RefCell::new(RrResult::default()));
        let start = Instant::now();
        let end = start + duration;
        let interval = rate.map(|r| Duration::from_secs_f64(conns as f64 / r.max(1.0)));
        let mut tasks = Vec::new();
        for (i, mut s) in streams.into_iter().enumerate() {
            let result = result.clone();
            tasks.push(monoio::spawn(async move {
                let mut out = pattern(size.max(1));
                let mut back = vec![0u8; size.max(1)].into_boxed_slice();
                let mut rtts = Vec::new();
                let mut late = 0u64;
                let mut next = interval.map(|iv| start + iv.mul_f64(i as f64 / conns as f64));
                loop {
                    if let (Some(due), Some(iv)) = (next, interval) {
                        let now = Instant::now();
                        if due >= end {
                            break;
                        }
                        if due > now {
                            monoio::time::sleep(due - now).await;
                        } else if now - due > iv {
                            late += 1;
                        }
                        next = Some(due + iv);
                    } else if Instant::now() >= end {
                        break;
                    }
                    let t0 = Instant::now();
                    out = write_all(&mut s, out).await?;
                    back = read_exact(&mut s, back).await?;
                    rtts.push(t0.elapsed().as_secs_f64() * 1e6);
                }
                let mut r = result.borrow_mut();
                r.completed += rtts.len() as u64;
                r.late += late;
                r.rtts.extend(rtts);
                Ok::<_, io::Error>(())
            }));
        }
        for task in tasks {
            task.await?;
        }
        let mut r = result.take();
        r.elapsed = start.elapsed();
        Ok(r)
    })?
}

/// What a connection-rate run measured.
#[derive(Clone, Debug, Default)]
pub struct ConnResult {
    /// Connections that completed their request and reply.
    pub completed: u64,
    /// Connections that failed (connect, reset, short reply).
    pub failed: u64,
    /// Wall time for all of them.
    pub elapsed: Duration,
    /// Time of each completed connection, connect to end of reply (µs).
    pub times: Vec<f64>,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
}

/// Opens `n` new connections, `concurrency` at a time; each sends a `req`-byte request and
/// reads a `reply`-byte reply and the server's close. With `sources`, connection `i` is bound
/// to `sources[i % len]` (a tunnel pools per source address, so rotating enough addresses
/// defeats pooling).
pub fn connection_rate(
    t: &Target,
    n: u64,
    concurrency: usize,
    req: usize,
    reply: usize,
    sources: &[IpAddr],
) -> io::Result<ConnResult> {
    let t = t.clone();
    let sources: Rc<[IpAddr]> = sources.into();
    block_on(async move {
        let next = Rc::new(std::cell::Cell::new(0u64));
        let result = Rc::new(RefCell::new(ConnResult::default()));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (t, next, result, sources) =
                (t.clone(), next.clone(), result.clone(), sources.clone());
            tasks.push(monoio::spawn(async move {
                let mut request = header(b'R', req as u64 | ((reply as u64) << 32));
                request.extend_from_slice(&pattern(req));
                let request = Rc::new(request);
                loop {
                    let i = next.get();
                    if i >= n {
                        break;
                    }
                    next.set(i + 1);
                    let src = if sources.is_empty() {
                        None
                    } else {
                        Some(sources[(i % sources.len() as u64) as usize])
                    };
                    let t0 = Instant::now();
                    match one_request(&t, src, request.clone(), reply).await {
                        Ok(()) => {
                            let mut r = result.borrow_mut();
                            r.completed += 1;
                            r.times.push(t0.elapsed().as_secs_f64() * 1e6);
                        }
                        Err(e) => {
                            let mut r = result.borrow_mut();
                            r.failed += 1;
                            r.first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
            }));
        }
        for task in tasks {
            task.await;
        }
        let mut r = result.take();
        r.elapsed = start.elapsed();
        r
    })
}

async fn one_request(
    t: &Target,
    src: Option<IpAddr>,
    request: Rc<Vec<u8>>,
    reply: usize,
) -> io::Result<()> {
    let mut s = connect(t.addr, t.mark, src).await?;
    write_all(&mut s, request).await?;
    read_exact(&mut s, vec![0u8; reply.max(1)].into_boxed_slice()).await?;
    // The server closes after its reply: wait for that EOF so the whole exchange is counted.
    let (r, _) = s.read(vec![0u8; 64]).await;
    match r? {
        0 => Ok(()),
        _ => Err(io::Error::other("more reply than asked for")),
    }
}

/// Idle connections opened by [`open_idle`]; dropping it closes them.
pub struct IdleConns {
    rt_thread: Option<std::thread::JoinHandle<()>>,
    stop: Option<std::sync::mpsc::Sender<()>>,
}

impl Drop for IdleConns {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.rt_thread.take() {
            let _ = h.join();
        }
    }
}

/// Opens `n` connections that each send the `H` header and then stay idle, from a thread that
/// is started by `spawn` (so the caller puts it in the client namespace), `concurrency` connects
/// at a time. Returns once all are open (or the first error); the connections stay open until
/// the returned value is dropped.
pub fn open_idle<S>(spawn: S, t: &Target, n: usize, concurrency: usize) -> io::Result<IdleConns>
where
    S: FnOnce(Box<dyn FnOnce() + Send>) -> io::Result<std::thread::JoinHandle<()>>,
{
    let t = t.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let handle = spawn(Box::new(move || {
        let r = block_on(async move {
            let held = Rc::new(RefCell::new(Vec::with_capacity(n)));
            let next = Rc::new(std::cell::Cell::new(0usize));
            let mut tasks = Vec::new();
            for _ in 0..concurrency.max(1) {
                let (t, held, next) = (t.clone(), held.clone(), next.clone());
                tasks.push(monoio::spawn(async move {
                    loop {
                        let i = next.get();
                        if i >= n {
                            return Ok::<_, io::Error>(());
                        }
                        next.set(i + 1);
                        let mut s = dial(&t).await?;
                        write_all(&mut s, header(b'H', 0)).await?;
                        held.borrow_mut().push(s);
                    }
                }));
            }
            let mut first_err = None;
            for task in tasks {
                if let Err(e) = task.await {
                    first_err.get_or_insert(e);
                }
            }
            let _ = ready_tx.send(match first_err {
                Some(e) => Err(e),
                None => Ok(()),
            });
            // Keep the sockets until told to stop (or the harness goes away).
            while stop_rx.try_recv() == Err(std::sync::mpsc::TryRecvError::Empty) {
                monoio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(held);
        });
        if let Err(e) = r {
            eprintln!("idle connections: runtime failed: {e}");
        }
    }))?;
    let conns = IdleConns {
        rt_thread: Some(handle),
        stop: Some(stop_tx),
    };
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(conns),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other("idle connection thread died")),
    }
}
