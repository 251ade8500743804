//! Records on an offloaded socket: the `TLS_GET_RECORD_TYPE` / `TLS_SET_RECORD_TYPE`
//! control messages, and what to do with each record type.
//!
//! After `TLS_RX` is set, the kernel decrypts records and hands their payload to
//! `recvmsg`, with a `SOL_TLS`/`TLS_GET_RECORD_TYPE` control message carrying the TLS
//! content type. One `recvmsg` never mixes records of different types. Without a control
//! buffer, a non-data record makes `read`/`recv` fail with `EIO`, which is why offloaded
//! sockets are read through [`recv_record`] / [`recv_data`] (or the caller's own
//! `recvmsg`, e.g. an io_uring `RecvMsg`, plus [`parse_record_type_cmsg`]).

use std::io;
use std::mem;
use std::os::fd::RawFd;

use crate::crypto_info::{SOL_TLS, TLS_GET_RECORD_TYPE, TLS_SET_RECORD_TYPE};
use crate::KtlsError;

/// TLS content type `change_cipher_spec`.
pub const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
/// TLS content type `alert`.
pub const CONTENT_ALERT: u8 = 21;
/// TLS content type `handshake`.
pub const CONTENT_HANDSHAKE: u8 = 22;
/// TLS content type `application_data`.
pub const CONTENT_APPLICATION_DATA: u8 = 23;

/// Alert level `warning`.
pub const ALERT_LEVEL_WARNING: u8 = 1;
/// Alert level `fatal`.
pub const ALERT_LEVEL_FATAL: u8 = 2;
/// Alert description `close_notify`.
pub const ALERT_CLOSE_NOTIFY: u8 = 0;
/// Alert description `unexpected_message`.
pub const ALERT_UNEXPECTED_MESSAGE: u8 = 10;
/// Alert description `bad_record_mac` (a record failed authentication).
pub const ALERT_BAD_RECORD_MAC: u8 = 20;
/// Alert description `record_overflow`.
pub const ALERT_RECORD_OVERFLOW: u8 = 22;
/// Alert description `user_canceled` (a warning that precedes close_notify).
pub const ALERT_USER_CANCELED: u8 = 90;

/// Handshake message type `new_session_ticket`.
pub const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
/// Handshake message type `key_update`.
pub const HANDSHAKE_KEY_UPDATE: u8 = 24;

/// Largest TLS 1.3 record plaintext (2^14). A buffer this big always receives a whole
/// record in one [`recv_record`].
pub const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;

/// `cmsghdr` as Linux lays it out: `size_t cmsg_len; int cmsg_level; int cmsg_type;`.
const CMSG_HDR_LEN: usize = mem::size_of::<libc::cmsghdr>();
const CMSG_ALIGN_TO: usize = mem::size_of::<usize>();

const fn cmsg_align(len: usize) -> usize {
    (len + CMSG_ALIGN_TO - 1) & !(CMSG_ALIGN_TO - 1)
}

/// Bytes of control buffer one record-type control message needs (`CMSG_SPACE(1)`).
pub const RECORD_TYPE_CMSG_SPACE: usize = cmsg_align(CMSG_HDR_LEN) + cmsg_align(1);

/// Finds the `SOL_TLS`/`TLS_GET_RECORD_TYPE` control message in a control buffer as
/// `recvmsg` filled it (`msg_control`, first `msg_controllen` bytes) and returns the TLS
/// content type it carries.
///
/// Pure and total: walks the `cmsghdr` chain with checked arithmetic and returns `None`
/// for a buffer without that message or with a malformed header, never panics.
pub fn parse_record_type_cmsg(control: &[u8]) -> Option<u8> {
    let mut off = 0usize;
    while control.len().checked_sub(off)? >= CMSG_HDR_LEN {
        let hdr = &control[off..off + CMSG_HDR_LEN];
        let (len_bytes, rest) = hdr.split_at(mem::size_of::<usize>());
        let cmsg_len = usize::from_ne_bytes(len_bytes.try_into().ok()?);
        let level = i32::from_ne_bytes(rest[0..4].try_into().ok()?);
        let ty = i32::from_ne_bytes(rest[4..8].try_into().ok()?);
        if cmsg_len < CMSG_HDR_LEN || cmsg_len > control.len() - off {
            return None;
        }
        if level == SOL_TLS && ty == TLS_GET_RECORD_TYPE && cmsg_len > CMSG_HDR_LEN {
            return Some(control[off + CMSG_HDR_LEN]);
        }
        off = off.checked_add(cmsg_align(cmsg_len))?;
    }
    None
}

/// Builds the control buffer that makes `sendmsg` send its payload as one record of
/// `content_type` (`SOL_TLS`/`TLS_SET_RECORD_TYPE`); for callers with their own
/// `sendmsg` (io_uring `SendMsg`). The kernel copies control data, so the buffer needs no
/// particular alignment.
pub fn record_type_cmsg(content_type: u8) -> [u8; RECORD_TYPE_CMSG_SPACE] {
    let mut buf = [0u8; RECORD_TYPE_CMSG_SPACE];
    let len = CMSG_HDR_LEN + 1; // CMSG_LEN(1)
    buf[..mem::size_of::<usize>()].copy_from_slice(&len.to_ne_bytes());
    let o = mem::size_of::<usize>();
    buf[o..o + 4].copy_from_slice(&SOL_TLS.to_ne_bytes());
    buf[o + 4..o + 8].copy_from_slice(&TLS_SET_RECORD_TYPE.to_ne_bytes());
    buf[CMSG_HDR_LEN] = content_type;
    buf
}

/// One record (or the part of one that fit the buffer) received from an offloaded socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// `n` bytes of application data are in the buffer.
    Data(usize),
    /// An alert.
    Alert {
        /// 1 warning, 2 fatal.
        level: u8,
        /// RFC 8446 section 6 description; 0 is close_notify.
        description: u8,
    },
    /// A post-handshake handshake record (session tickets, KeyUpdate, ...): its
    /// plaintext, see [`parse_handshake`]. With a buffer smaller than
    /// [`MAX_RECORD_PLAINTEXT`] this may be only the first part of the record; the rest
    /// comes with the next receive.
    Handshake(Vec<u8>),
    /// Orderly TCP shutdown by the peer (no more records).
    Eof,
    /// Any other record: change_cipher_spec, an alert that is not 2 bytes long, an
    /// unknown content type. Never legitimate after a TLS 1.3 handshake.
    Other {
        /// The TLS content type.
        content_type: u8,
        /// Payload length.
        len: usize,
    },
}

/// Classifies a received record from its content type and (decrypted) payload. Pure; the
/// fuzzing entry point together with [`parse_record_type_cmsg`] and [`parse_handshake`].
pub fn classify(content_type: u8, payload: &[u8]) -> Record {
    match (content_type, payload) {
        (CONTENT_APPLICATION_DATA, p) => Record::Data(p.len()),
        (CONTENT_ALERT, &[level, description]) => Record::Alert { level, description },
        (CONTENT_HANDSHAKE, p) => Record::Handshake(p.to_vec()),
        (content_type, p) => Record::Other {
            content_type,
            len: p.len(),
        },
    }
}

/// A post-handshake handshake message, as far as an offloaded connection cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeMsg {
    /// `new_session_ticket`: only useful for resumption, which offloaded connections do
    /// not feed back to rustls; ignore it.
    NewSessionTicket,
    /// `key_update`: the peer now encrypts with new keys.
    KeyUpdate {
        /// The peer asks us to update our sending keys as well.
        update_requested: bool,
    },
    /// Anything else (`certificate_request` for post-handshake auth, ...).
    Other {
        /// The handshake message type.
        msg_type: u8,
    },
}

/// Why [`parse_handshake`] could not return messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeParseError {
    /// The bytes end inside a message: at least this many more are needed.
    Incomplete {
        /// Bytes still missing.
        needed: usize,
    },
    /// A message that cannot be valid (e.g. a KeyUpdate body that is not one byte of 0
    /// or 1).
    Malformed {
        /// The message type.
        msg_type: u8,
    },
}

/// Splits handshake-record plaintext into messages (`type(1) length(3) body`). A record
/// may carry several messages (e.g. two tickets) and a message may span records.
pub fn parse_handshake(mut bytes: &[u8]) -> Result<Vec<HandshakeMsg>, HandshakeParseError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 4 {
            return Err(HandshakeParseError::Incomplete {
                needed: 4 - bytes.len(),
            });
        }
        let msg_type = bytes[0];
        let len = usize::from(bytes[1]) << 16 | usize::from(bytes[2]) << 8 | usize::from(bytes[3]);
        let body = &bytes[4..];
        if body.len() < len {
            return Err(HandshakeParseError::Incomplete {
                needed: len - body.len(),
            });
        }
        let (body, rest) = body.split_at(len);
        out.push(match msg_type {
            HANDSHAKE_NEW_SESSION_TICKET => HandshakeMsg::NewSessionTicket,
            HANDSHAKE_KEY_UPDATE => match body {
                [0] => HandshakeMsg::KeyUpdate {
                    update_requested: false,
                },
                [1] => HandshakeMsg::KeyUpdate {
                    update_requested: true,
                },
                _ => return Err(HandshakeParseError::Malformed { msg_type }),
            },
            msg_type => HandshakeMsg::Other { msg_type },
        });
        bytes = rest;
    }
    Ok(out)
}

/// `recvmsg` with room for the record-type control message. Returns the content type
/// (`None` if the kernel attached none, i.e. the socket has no `TLS_RX`) and the number of
/// payload bytes placed in `buf`.
fn recv_raw(fd: RawFd, buf: &mut [u8]) -> io::Result<(Option<u8>, usize)> {
    // u64 storage keeps the control buffer aligned like a cmsghdr.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    loop {
        // SAFETY: all-zero is a valid msghdr (null pointers, zero lengths).
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&control) as _;
        // SAFETY: `msg` points at `iov` (describing `buf`) and `control`, all live and
        // writable for the duration of the call.
        let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other("recvmsg: TLS control message truncated"));
        }
        let clen = (msg.msg_controllen as usize).min(mem::size_of_val(&control));
        // SAFETY: `control` is `size_of_val(&control)` initialised bytes; `clen` is
        // clamped to that.
        let cbytes = unsafe { std::slice::from_raw_parts(control.as_ptr().cast::<u8>(), clen) };
        return Ok((parse_record_type_cmsg(cbytes), n as usize));
    }
}

/// Receives one record (or part of one) from an offloaded socket into `buf`.
///
/// Application data lands in `buf` ([`Record::Data`]); other record types are returned
/// by value. Use a buffer of at least [`MAX_RECORD_PLAINTEXT`] bytes to get control
/// records whole. Errors are the socket's: `EBADMSG` for a record that fails
/// authentication (see [`KtlsError::BadRecord`]), `EKEYEXPIRED` on Linux >= 6.14 after a
/// KeyUpdate until new keys are installed, `EAGAIN` on a non-blocking socket.
pub fn recv_record(fd: RawFd, buf: &mut [u8]) -> io::Result<Record> {
    let (ty, n) = recv_raw(fd, buf)?;
    Ok(match ty {
        // No control message: a plain socket, or the kernel returned no record (EOF).
        None if n == 0 => Record::Eof,
        None => Record::Data(n),
        Some(t) => classify(t, &buf[..n]),
    })
}

/// Reads application data from an offloaded socket, handling everything else the peer
/// may send after the handshake:
///
/// - returns `Ok(n > 0)` with data, `Ok(0)` on close_notify or TCP EOF;
/// - skips session tickets (and a `user_canceled` warning);
/// - fails with [`KtlsError::KeyUpdate`] on a KeyUpdate, [`KtlsError::PeerAlert`] on any
///   other alert, [`KtlsError::BadRecord`] on `EBADMSG`, and
///   [`KtlsError::UnexpectedRecord`] on other records.
///
/// Any buffer size works: control records cut short by a small `buf` are completed with
/// an internal buffer.
pub fn recv_data(fd: RawFd, buf: &mut [u8]) -> Result<usize, KtlsError> {
    if buf.is_empty() {
        return Ok(0);
    }
    loop {
        let (ty, n) = recv_raw(fd, buf).map_err(recv_error)?;
        match ty {
            None if n == 0 => return Ok(0),
            None | Some(CONTENT_APPLICATION_DATA) => return Ok(n),
            Some(CONTENT_ALERT) => {
                let mut alert = buf[..n].to_vec();
                complete_control(fd, CONTENT_ALERT, &mut alert, |a| {
                    2usize.saturating_sub(a.len())
                })?;
                match alert[..] {
                    [_, ALERT_CLOSE_NOTIFY] => return Ok(0),
                    [ALERT_LEVEL_WARNING, ALERT_USER_CANCELED] => continue,
                    [level, description] => {
                        return Err(KtlsError::PeerAlert { level, description })
                    }
                    _ => {
                        return Err(KtlsError::UnexpectedRecord {
                            content_type: CONTENT_ALERT,
                            handshake_type: None,
                            len: alert.len(),
                        })
                    }
                }
            }
            Some(CONTENT_HANDSHAKE) => {
                let mut hs = buf[..n].to_vec();
                complete_control(fd, CONTENT_HANDSHAKE, &mut hs, |h| {
                    match parse_handshake(h) {
                        Err(HandshakeParseError::Incomplete { needed }) => needed,
                        _ => 0,
                    }
                })?;
                let msgs = parse_handshake(&hs).map_err(|e| KtlsError::UnexpectedRecord {
                    content_type: CONTENT_HANDSHAKE,
                    handshake_type: match e {
                        HandshakeParseError::Malformed { msg_type } => Some(msg_type),
                        HandshakeParseError::Incomplete { .. } => hs.first().copied(),
                    },
                    len: hs.len(),
                })?;
                for m in msgs {
                    match m {
                        HandshakeMsg::NewSessionTicket => {
                            tracing::trace!(fd, "kTLS: ignoring NewSessionTicket");
                        }
                        HandshakeMsg::KeyUpdate { update_requested } => {
                            return Err(KtlsError::KeyUpdate { update_requested })
                        }
                        HandshakeMsg::Other { msg_type } => {
                            return Err(KtlsError::UnexpectedRecord {
                                content_type: CONTENT_HANDSHAKE,
                                handshake_type: Some(msg_type),
                                len: hs.len(),
                            })
                        }
                    }
                }
            }
            Some(content_type) => {
                return Err(KtlsError::UnexpectedRecord {
                    content_type,
                    handshake_type: None,
                    len: n,
                })
            }
        }
    }
}

/// Keeps receiving records of `content_type` into `acc` while `missing(acc) > 0`: the
/// kernel hands out the rest of a record that did not fit the caller's buffer on the next
/// `recvmsg`, with the same content type.
fn complete_control(
    fd: RawFd,
    content_type: u8,
    acc: &mut Vec<u8>,
    missing: impl Fn(&[u8]) -> usize,
) -> Result<(), KtlsError> {
    let mut scratch = [0u8; 1024];
    // Bound the work a hostile peer can cause; a handshake message this long after the
    // handshake is not legitimate for an offloaded connection.
    const MAX_CONTROL: usize = 64 * 1024;
    while missing(acc) > 0 {
        if acc.len() > MAX_CONTROL {
            break;
        }
        let (ty, n) = recv_raw(fd, &mut scratch).map_err(recv_error)?;
        if n == 0 || ty != Some(content_type) {
            return Err(KtlsError::UnexpectedRecord {
                content_type: ty.unwrap_or(0),
                handshake_type: None,
                len: n,
            });
        }
        acc.extend_from_slice(&scratch[..n]);
    }
    Ok(())
}

fn recv_error(e: io::Error) -> KtlsError {
    if e.raw_os_error() == Some(libc::EBADMSG) {
        KtlsError::BadRecord(e)
    } else {
        KtlsError::io("recvmsg on kTLS socket", e)
    }
}

/// Sends `payload` as one TLS record of `content_type` through the kernel's TX path
/// (`sendmsg` with `TLS_SET_RECORD_TYPE`). Returns the bytes accepted.
pub fn send_record(fd: RawFd, content_type: u8, payload: &[u8]) -> io::Result<usize> {
    let mut control = [0u64; RECORD_TYPE_CMSG_SPACE.div_ceil(8)];
    let cmsg = record_type_cmsg(content_type);
    // SAFETY: `control` has at least RECORD_TYPE_CMSG_SPACE bytes; u8 has no alignment.
    unsafe {
        std::ptr::copy_nonoverlapping(cmsg.as_ptr(), control.as_mut_ptr().cast::<u8>(), cmsg.len());
    }
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    loop {
        // SAFETY: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = RECORD_TYPE_CMSG_SPACE as _;
        // SAFETY: `msg` describes live buffers; the kernel only reads them for sendmsg.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(n as usize);
    }
}

/// Sends an alert record through the kernel.
pub fn send_alert(fd: RawFd, level: u8, description: u8) -> io::Result<()> {
    match send_record(fd, CONTENT_ALERT, &[level, description])? {
        2 => Ok(()),
        n => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("alert record: kernel took {n} of 2 bytes"),
        )),
    }
}

/// Sends `close_notify` (warning level) through the kernel: the TLS-level end of our
/// sending side. Follow it with `shutdown(SHUT_WR)` or `close`.
pub fn send_close_notify(fd: RawFd) -> io::Result<()> {
    send_alert(fd, ALERT_LEVEL_WARNING, ALERT_CLOSE_NOTIFY)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Handcrafts one cmsghdr + data as Linux/x86_64 lays it out.
    fn cmsg(level: i32, ty: i32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(CMSG_HDR_LEN + data.len()).to_ne_bytes());
        v.extend_from_slice(&level.to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(data);
        v.resize(cmsg_align(v.len()), 0);
        v
    }

    #[test]
    fn cmsg_space_matches_libc() {
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
        unsafe {
            assert_eq!(RECORD_TYPE_CMSG_SPACE, libc::CMSG_SPACE(1) as usize);
            assert_eq!(CMSG_HDR_LEN + 1, libc::CMSG_LEN(1) as usize);
        }
    }

    #[test]
    fn parses_record_type() {
        let buf = cmsg(SOL_TLS, TLS_GET_RECORD_TYPE, &[22]);
        assert_eq!(buf.len(), RECORD_TYPE_CMSG_SPACE);
        assert_eq!(parse_record_type_cmsg(&buf), Some(22));
        // Exactly CMSG_LEN bytes (no trailing padding) still parses.
        assert_eq!(parse_record_type_cmsg(&buf[..CMSG_HDR_LEN + 1]), Some(22));
    }

    #[test]
    fn skips_other_cmsgs() {
        let mut buf = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &[1, 2, 3, 4]);
        buf.extend(cmsg(SOL_TLS, 99, &[7]));
        buf.extend(cmsg(SOL_TLS, TLS_GET_RECORD_TYPE, &[21]));
        assert_eq!(parse_record_type_cmsg(&buf), Some(21));
    }

    #[test]
    fn rejects_malformed_control() {
        assert_eq!(parse_record_type_cmsg(&[]), None);
        assert_eq!(parse_record_type_cmsg(&[0; 7]), None);
        // No data byte.
        assert_eq!(
            parse_record_type_cmsg(&cmsg(SOL_TLS, TLS_GET_RECORD_TYPE, &[])),
            None
        );
        // cmsg_len larger than the buffer.
        let mut bad = cmsg(SOL_TLS, TLS_GET_RECORD_TYPE, &[23]);
        bad[..8].copy_from_slice(&1000usize.to_ne_bytes());
        assert_eq!(parse_record_type_cmsg(&bad), None);
        // cmsg_len smaller than a header (would loop forever if trusted).
        let mut bad = cmsg(SOL_TLS, TLS_GET_RECORD_TYPE, &[23]);
        bad[..8].copy_from_slice(&0usize.to_ne_bytes());
        assert_eq!(parse_record_type_cmsg(&bad), None);
        // Overflowing cmsg_len.
        let mut bad = cmsg(SOL_TLS, TLS_GET_RECORD_TYPE, &[23]);
        bad[..8].copy_from_slice(&usize::MAX.to_ne_bytes());
        assert_eq!(parse_record_type_cmsg(&bad), None);
    }

    #[test]
    fn set_record_type_cmsg_round_trips() {
        let c = record_type_cmsg(CONTENT_ALERT);
        let mut as_get = c;
        as_get[12..16].copy_from_slice(&TLS_GET_RECORD_TYPE.to_ne_bytes());
        assert_eq!(parse_record_type_cmsg(&as_get), Some(CONTENT_ALERT));
        assert_eq!(&c[8..12], &282i32.to_ne_bytes());
        assert_eq!(&c[12..16], &1i32.to_ne_bytes());
        assert_eq!(&c[..8], &17usize.to_ne_bytes());
    }

    #[test]
    fn classifies_records() {
        assert_eq!(classify(23, &[1, 2, 3]), Record::Data(3));
        assert_eq!(
            classify(21, &[1, 0]),
            Record::Alert {
                level: 1,
                description: 0
            }
        );
        assert_eq!(
            classify(21, &[2]),
            Record::Other {
                content_type: 21,
                len: 1
            }
        );
        assert_eq!(
            classify(22, &[4, 0, 0, 0]),
            Record::Handshake(vec![4, 0, 0, 0])
        );
        assert_eq!(
            classify(20, &[1]),
            Record::Other {
                content_type: 20,
                len: 1
            }
        );
        assert_eq!(
            classify(0, &[]),
            Record::Other {
                content_type: 0,
                len: 0
            }
        );
    }

    #[test]
    fn parses_handshake_messages() {
        // Two tickets (bodies shortened) and a KeyUpdate in one record.
        let rec = [
            4, 0, 0, 2, 0xaa, 0xbb, //
            4, 0, 0, 0, //
            24, 0, 0, 1, 1,
        ];
        assert_eq!(
            parse_handshake(&rec),
            Ok(vec![
                HandshakeMsg::NewSessionTicket,
                HandshakeMsg::NewSessionTicket,
                HandshakeMsg::KeyUpdate {
                    update_requested: true
                },
            ])
        );
        assert_eq!(
            parse_handshake(&[24, 0, 0, 1, 0]),
            Ok(vec![HandshakeMsg::KeyUpdate {
                update_requested: false
            }])
        );
        assert_eq!(
            parse_handshake(&[13, 0, 0, 0]),
            Ok(vec![HandshakeMsg::Other { msg_type: 13 }])
        );
        assert_eq!(parse_handshake(&[]), Ok(vec![]));
    }

    #[test]
    fn handshake_incomplete_and_malformed() {
        assert_eq!(
            parse_handshake(&[4, 0]),
            Err(HandshakeParseError::Incomplete { needed: 2 })
        );
        assert_eq!(
            parse_handshake(&[4, 0, 1, 0, 9]),
            Err(HandshakeParseError::Incomplete { needed: 255 })
        );
        assert_eq!(
            parse_handshake(&[24, 0, 0, 1, 2]),
            Err(HandshakeParseError::Malformed { msg_type: 24 })
        );
        assert_eq!(
            parse_handshake(&[24, 0, 0, 2, 0, 0]),
            Err(HandshakeParseError::Malformed { msg_type: 24 })
        );
    }

    #[test]
    fn parsers_never_panic_on_arbitrary_bytes() {
        // Cheap stand-in for the fuzz target: every prefix of a pseudo-random buffer.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let data: Vec<u8> = (0..512)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for end in 0..data.len() {
            let d = &data[..end];
            let _ = parse_record_type_cmsg(d);
            let _ = parse_handshake(d);
            let _ = classify(d.first().copied().unwrap_or(0), d);
        }
    }
}
