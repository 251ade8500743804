//! The load clients: bulk transfers, ping-pong, request/response, connection rate and idle
//! connections, each on monoio runtimes of the calling thread (so in its namespace).

use std::cell::RefCell;
use std::io;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::buf::IoBuf;
use monoio::io::AsyncReadRent;

use super::{block_on, connect, dial, header, pattern, read_exact, write_all, Target, CHUNK};

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
        let schedule = rate.map(|r| Schedule {
            start,
            end,
            conns,
            iv: Duration::from_secs_f64(conns as f64 / r.max(1.0)),
        });
        let mut turns = match schedule {
            Some(schedule) => Pacer::start(schedule)?,
            None => Vec::new(),
        }
        .into_iter();
        let mut tasks = Vec::new();
        for (i, mut s) in streams.into_iter().enumerate() {
            let result = result.clone();
            let mut paced = schedule.zip(turns.next());
            tasks.push(monoio::spawn(async move {
                let mut out = pattern(size.max(1));
                let mut back = vec![0u8; size.max(1)].into_boxed_slice();
                let mut tick = vec![0u8; 1];
                let mut rtts = Vec::new();
                let mut late = 0u64;
                let mut k = 0;
                loop {
                    if let Some((schedule, turn)) = paced.as_mut() {
                        let Some(due) = schedule.due(i, k) else {
                            break;
                        };
                        if Instant::now().saturating_duration_since(due) > schedule.iv {
                            late += 1;
                        }
                        // One byte per turn, written at `due` to the µs: there at once when
                        // this connection is behind, so no turn is ever taken early.
                        let (n, b) = turn.read(tick).await;
                        tick = b;
                        if n? == 0 {
                            return Err(io::Error::other("the pacer stopped early"));
                        }
                        k += 1;
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

/// When each connection of a fixed-rate run takes its turns: spread evenly over `iv`.
#[derive(Clone, Copy)]
struct Schedule {
    start: Instant,
    end: Instant,
    conns: usize,
    /// One connection's interval between turns.
    iv: Duration,
}

impl Schedule {
    /// Connection `i`'s `k`-th turn, `None` from the first one at or past the end.
    fn due(&self, i: usize, k: u32) -> Option<Instant> {
        let at = self.start + self.iv.mul_f64(i as f64 / self.conns as f64) + self.iv * k;
        (at < self.end).then_some(at)
    }
}

/// Sends each connection of a fixed-rate run its turns on time.
///
/// monoio's timer wheel has 1 ms steps: a connection that slept until its turn woke at the
/// next whole millisecond, so at 2,000 req/s over 16 connections, spread 0.5 ms apart, the
/// requests left in pairs a few µs apart (round 25 of `benches/`), and a tunnel that writes
/// what is ready in one segment carried two. This thread sleeps to each turn with 1 ns of
/// timer slack and writes one byte to that connection's end of a socket pair; the connection
/// reads it before it sends, so the runtime wakes at the turn instead of the millisecond.
struct Pacer;

impl Pacer {
    /// One socket per connection to read its turns from; the thread ends after the last turn
    /// before the schedule's end (it writes none for a turn whose connection has stopped).
    fn start(schedule: Schedule) -> io::Result<Vec<monoio::net::UnixStream>> {
        let mut ours = Vec::with_capacity(schedule.conns);
        let mut theirs = Vec::with_capacity(schedule.conns);
        for _ in 0..schedule.conns {
            let (a, b) = std::os::unix::net::UnixStream::pair()?;
            a.set_nonblocking(true)?;
            theirs.push(monoio::net::UnixStream::from_std(a)?);
            ours.push(b);
        }
        std::thread::Builder::new()
            .name("load-pacer".into())
            .spawn(move || {
                use std::io::Write;
                // SAFETY: prctl with integer arguments only, on this thread.
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
                // Turns in time order: every connection's k-th turn comes before any
                // (k+1)-th, and within a round in connection order.
                for k in 0.. {
                    for (i, sock) in ours.iter_mut().enumerate() {
                        let Some(at) = schedule.due(i, k) else {
                            return;
                        };
                        let now = Instant::now();
                        if at > now {
                            std::thread::sleep(at - now);
                        }
                        // A connection that failed has dropped its end: the rest go on.
                        let _ = sock.write_all(&[1]);
                    }
                }
            })?;
        Ok(theirs)
    }
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

impl ConnResult {
    /// Fails the test named `who: test` when not one connection completed, with the first error
    /// seen: a rate over nothing would be a figure of zero, not a measurement.
    pub fn any_completed(&self, who: &str, test: &str) -> Result<(), String> {
        if self.completed > 0 {
            return Ok(());
        }
        Err(format!(
            "{who}: {test}: no connection completed ({})",
            self.first_error.as_deref().unwrap_or_default()
        ))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection reads each of its turns before the run's end, one byte each, none
    /// before its time, and then the end of its socket.
    #[test]
    fn the_pacer_gives_every_turn_and_none_early() {
        let start = Instant::now();
        let schedule = Schedule {
            start,
            end: start + Duration::from_millis(100),
            conns: 4,
            iv: Duration::from_millis(8),
        };
        let read = block_on(async move {
            let mut tasks = Vec::new();
            for (i, mut s) in Pacer::start(schedule)?.into_iter().enumerate() {
                tasks.push(monoio::spawn(async move {
                    let (mut turns, mut early, mut buf) = (0u32, 0u32, vec![0u8; 1]);
                    loop {
                        let (n, b) = s.read(buf).await;
                        buf = b;
                        if n? == 0 {
                            return Ok::<_, io::Error>((turns, early));
                        }
                        let due = schedule.due(i, turns).expect("no turn past the end");
                        early += u32::from(Instant::now() < due);
                        turns += 1;
                    }
                }));
            }
            let mut read = Vec::new();
            for t in tasks {
                read.push(t.await?);
            }
            Ok::<_, io::Error>(read)
        })
        .expect("a runtime")
        .expect("the turns are read");
        for (i, (turns, early)) in read.into_iter().enumerate() {
            let want = (0..).take_while(|&k| schedule.due(i, k).is_some()).count() as u32;
            assert_eq!(
                turns, want,
                "connection {i}: one byte per turn before the end"
            );
            assert_eq!(early, 0, "connection {i}: no turn before its time");
        }
    }
}
