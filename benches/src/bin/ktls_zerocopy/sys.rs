//! CPU accounting, the raw syscalls the variants use, and io_uring one op at a time.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use io_uring::{cqueue, IoUring};

use crate::variants::Pattern;

/// `IORING_CQE_F_NOTIF`: the CQE that says a SEND_ZC buffer may be reused (io-uring 0.6 has
/// the constant but no public helper for it).
pub const CQE_F_NOTIF: u32 = 8;
/// `TLS_TX_ZEROCOPY_RO` (linux/tls.h, since 5.19): "the pages given to sendfile are not
/// modified while in flight", which lets the kernel skip a copy. Missing from libc 0.2.
pub const TLS_TX_ZEROCOPY_RO: libc::c_int = 3;
/// `SO_EE_ORIGIN_ZEROCOPY` and `SO_EE_CODE_ZEROCOPY_COPIED` (linux/errqueue.h).
pub const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// See [`SO_EE_ORIGIN_ZEROCOPY`].
pub const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

pub fn thread_cpu() -> Duration {
    rusage(libc::RUSAGE_THREAD)
}

pub fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the struct it is given; zeroed is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a live rusage.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Busy time of all CPUs so far (user, nice, system, irq, softirq, steal of `/proc/stat`).
pub fn machine_busy() -> io::Result<Duration> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let line = text
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .ok_or_else(|| io::Error::other("/proc/stat: no cpu line"))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let ticks = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

// ------------------------------------------------------------------ syscall helpers

pub fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

pub fn send_nosig(fd: RawFd, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for its length.
        let r = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                flags | libc::MSG_NOSIGNAL,
            )
        };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

pub fn send_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = send_nosig(fd, buf, 0)?;
        buf = &buf[n..];
    }
    Ok(())
}

pub fn pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are fresh descriptors we own.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The pipe holds what one splice moves; the kernel rounds up to a power of two of pages.
    // SAFETY: plain fcntl on a descriptor we own.
    if unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r, w))
}

pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: no offsets (both ends are sockets or pipes).
        let r = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// A memfd holding the pattern, for sendfile.
pub fn pattern_memfd() -> io::Result<OwnedFd> {
    // SAFETY: the name is a NUL-terminated literal.
    let fd = unsafe { libc::memfd_create(c"ktls-zerocopy".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd);
    f.write_all(&Pattern::get().bytes)?;
    Ok(f.into())
}

// ------------------------------------------------------------------ io_uring helpers

/// Runs one op to completion and returns its result; for SEND_ZC also waits for the
/// notification that the kernel is done with the buffer (the next send reuses the memory
/// region, and an honest comparison pays that wait).
pub fn uring_one(ring: &mut IoUring, sqe: io_uring::squeue::Entry) -> io::Result<i32> {
    // SAFETY: the buffers the SQE points at outlive this call, which waits for the
    // completion (and for SEND_ZC the buffer notification) before returning.
    unsafe {
        ring.submission()
            .push(&sqe)
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    let mut result = None;
    let mut notif_due = false;
    loop {
        ring.submit_and_wait(1)?;
        for cqe in ring.completion() {
            if cqe.flags() & CQE_F_NOTIF != 0 {
                notif_due = false;
                continue;
            }
            result = Some(cqe.result());
            notif_due = cqueue::more(cqe.flags());
        }
        if let Some(r) = result {
            if !notif_due {
                return if r < 0 {
                    Err(io::Error::from_raw_os_error(-r))
                } else {
                    Ok(r)
                };
            }
        }
    }
}
