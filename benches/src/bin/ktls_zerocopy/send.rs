//! The senders (one per variant, buffer or socket shaped) and the receiver that checks every
//! byte against the stream.

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use tls_kernel_offload::KtlsStream;

use crate::sys::*;
use crate::variants::{Pattern, Variant};
use crate::{PERIOD, RECV_BUF};

/// What the sending (or relaying) thread reports.
pub struct SendReport {
    pub cpu: Duration,
    /// Zero-copy completions the kernel reported as copied after all (MSG_ZEROCOPY).
    pub copied: u64,
    pub zc_done: u64,
}

pub fn send_buf(variant: Variant, fd: RawFd, total: usize, size: usize) -> io::Result<SendReport> {
    let pat = Pattern::get();
    let cpu0 = thread_cpu();
    let mut copied = 0;
    let mut zc_done = 0;
    match variant {
        Variant::Write => {
            let mut off = 0;
            while off < total {
                off += send_nosig(fd, pat.at(off, size.min(total - off)), 0)?;
            }
        }
        Variant::UringSend | Variant::UringSendZc => {
            let mut ring = IoUring::new(8)?;
            let mut off = 0;
            while off < total {
                let buf = pat.at(off, size.min(total - off));
                let sqe = if variant == Variant::UringSendZc {
                    opcode::SendZc::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                } else {
                    opcode::Send::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                };
                off += uring_one(&mut ring, sqe)? as usize;
            }
        }
        Variant::MsgZerocopy => {
            let one: libc::c_int = 1;
            // SAFETY: valid pointer and length for an int option.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_ZEROCOPY,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("setsockopt SO_ZEROCOPY: {e}"),
                ));
            }
            let mut off = 0;
            let mut sent_calls: u64 = 0;
            while off < total {
                match send_nosig(fd, pat.at(off, size.min(total - off)), libc::MSG_ZEROCOPY) {
                    Ok(n) => {
                        off += n;
                        sent_calls += 1;
                    }
                    // Too many sends in flight for optmem_max: wait for completions.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && zc_done < sent_calls => {
                        reap_zerocopy(fd, true, &mut zc_done, &mut copied)?;
                    }
                    Err(e) => return Err(e),
                }
                reap_zerocopy(fd, false, &mut zc_done, &mut copied)?;
            }
            // The pattern is never modified, so waiting here is only for accounting: the
            // completions must all arrive, or the kernel would still hold the pages.
            let deadline = Instant::now() + Duration::from_secs(30);
            while zc_done < sent_calls && Instant::now() < deadline {
                reap_zerocopy(fd, true, &mut zc_done, &mut copied)?;
            }
        }
        Variant::Sendfile | Variant::SendfileRo => {
            if variant == Variant::SendfileRo {
                let one: libc::c_int = 1;
                // SAFETY: valid pointer and length for an int option.
                let r = unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_TLS,
                        TLS_TX_ZEROCOPY_RO,
                        (&one as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if r != 0 {
                    let e = io::Error::last_os_error();
                    return Err(io::Error::new(
                        e.kind(),
                        format!("setsockopt TLS_TX_ZEROCOPY_RO: {e}"),
                    ));
                }
            }
            let file = pattern_memfd()?;
            let mut off = 0;
            while off < total {
                let mut foff = (off % PERIOD) as libc::off_t;
                // SAFETY: both descriptors are open; foff is a valid in/out offset.
                let r = unsafe {
                    libc::sendfile(fd, file.as_raw_fd(), &mut foff, size.min(total - off))
                };
                match cvt(r) {
                    Ok(0) => return Err(io::Error::other("sendfile returned 0")),
                    Ok(n) => off += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        _ => {
            return Err(io::Error::other(format!(
                "{variant} is not a buffer variant"
            )))
        }
    }
    Ok(SendReport {
        cpu: thread_cpu() - cpu0,
        copied,
        zc_done,
    })
}

/// Reads MSG_ZEROCOPY completions from the error queue; `wait` polls for one first.
pub fn reap_zerocopy(fd: RawFd, wait: bool, done: &mut u64, copied: &mut u64) -> io::Result<()> {
    if wait {
        let mut pfd = libc::pollfd {
            fd,
            events: 0, // POLLERR is always reported
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
    }
    loop {
        let mut control = [0u64; 16];
        // SAFETY: zeroed msghdr is valid; we fill in the control buffer.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: msg points at live buffers.
        let r = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(());
            }
            return Err(e);
        }
        // SAFETY: the kernel filled msg's control buffer; CMSG_* walk it within its length.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let ee = libc::CMSG_DATA(c) as *const libc::sock_extended_err;
                let ee = std::ptr::read_unaligned(ee);
                if ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY && ee.ee_errno == 0 {
                    // [ee_info, ee_data] is an inclusive range of send calls.
                    let n = u64::from(ee.ee_data.wrapping_sub(ee.ee_info)) + 1;
                    *done += n;
                    if ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0 {
                        *copied += n;
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
    }
}

pub fn relay(variant: Variant, src: RawFd, dst: RawFd, size: usize) -> io::Result<SendReport> {
    let cpu0 = thread_cpu();
    match variant {
        Variant::ReadWrite => {
            let mut buf = vec![0u8; size];
            loop {
                // SAFETY: buf is valid for its length.
                let r = unsafe { libc::recv(src, buf.as_mut_ptr().cast(), buf.len(), 0) };
                match cvt(r) {
                    Ok(0) => break,
                    Ok(n) => send_all(dst, &buf[..n])?,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Variant::UringRecvSend => {
            let mut ring = IoUring::new(8)?;
            let mut buf = vec![0u8; size];
            loop {
                let sqe =
                    opcode::Recv::new(types::Fd(src), buf.as_mut_ptr(), buf.len() as u32).build();
                let n = uring_one(&mut ring, sqe)? as usize;
                if n == 0 {
                    break;
                }
                let mut done = 0;
                while done < n {
                    let part = &buf[done..n];
                    let sqe = opcode::Send::new(types::Fd(dst), part.as_ptr(), part.len() as u32)
                        .flags(libc::MSG_NOSIGNAL)
                        .build();
                    done += uring_one(&mut ring, sqe)? as usize;
                }
            }
        }
        Variant::Splice | Variant::UringSplice => {
            let (pr, pw) = pipe(size)?;
            let mut ring = if variant == Variant::UringSplice {
                Some(IoUring::new(8)?)
            } else {
                None
            };
            let mut move_bytes = |from: RawFd, to: RawFd, len: usize| -> io::Result<usize> {
                match ring.as_mut() {
                    Some(ring) => {
                        let sqe =
                            opcode::Splice::new(types::Fd(from), -1, types::Fd(to), -1, len as u32)
                                .flags(libc::SPLICE_F_MOVE)
                                .build();
                        Ok(uring_one(ring, sqe)? as usize)
                    }
                    None => splice(from, to, len),
                }
            };
            loop {
                let n = move_bytes(src, pw.as_raw_fd(), size)?;
                if n == 0 {
                    break;
                }
                let mut left = n;
                while left > 0 {
                    let m = move_bytes(pr.as_raw_fd(), dst, left)?;
                    if m == 0 {
                        return Err(io::Error::other("splice into the socket moved 0 bytes"));
                    }
                    left -= m;
                }
            }
        }
        _ => {
            return Err(io::Error::other(format!(
                "{variant} is not a relay variant"
            )))
        }
    }
    Ok(SendReport {
        cpu: thread_cpu() - cpu0,
        copied: 0,
        zc_done: 0,
    })
}

// ------------------------------------------------------------------ receiver

/// Reads until end of stream and checks every byte against the pattern. Returns the byte
/// count and the offset of the first mismatch, if any.
pub fn receive(sock: TcpStream, early: Vec<u8>, plain: bool) -> io::Result<(usize, Option<usize>)> {
    let pat = Pattern::get();
    let mut buf = vec![0u8; RECV_BUF];
    let mut got = 0usize;
    let mut bad = None;
    let mut check = |data: &[u8], got: &mut usize| {
        if bad.is_none() && data != pat.at(*got, data.len()) {
            let first = data
                .iter()
                .zip(pat.at(*got, data.len()))
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            bad = Some(*got + first);
        }
        *got += data.len();
    };
    if plain {
        let mut sock = sock;
        loop {
            let n = sock.read(&mut buf)?;
            if n == 0 {
                break;
            }
            check(&buf[..n], &mut got);
        }
    } else {
        let mut s = KtlsStream::new(sock, early);
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            check(&buf[..n], &mut got);
        }
    }
    Ok((got, bad))
}
