//! ringtun's own userspace record layer: TLS 1.3 records sealed and opened with the keys
//! rustls derived ([`tls_kernel_offload::RecordKeys`]), the rest of the connection's life
//! after rustls did the handshake. The same decisions as [`super::RecordPump`] (what to
//! read, when to send), with a received byte decrypted from the socket's read buffer into the
//! reader's (h2's) as far as it has room, and opened in place and copied once otherwise,
//! instead of copied three times through rustls' buffers.

use std::io;
use std::mem::MaybeUninit;

use tls_kernel_offload::{
    self as ktls, record_len, HandshakeMsg, HandshakeParseError, KtlsError, OpenError, RecordKeys,
    Rekey, ALERT_CLOSE_NOTIFY, ALERT_LEVEL_FATAL, ALERT_LEVEL_WARNING, ALERT_UNEXPECTED_MESSAGE,
    CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE, MAX_RECORD_PLAINTEXT, OVERHEAD,
};
use tokio::io::ReadBuf;

use crate::stream::early::Early;

use super::records::{
    self, Deferral, Flush, Read, ReadError, Records, Transmit, Write, READ_CHUNK, SEND_LIMIT,
};

/// Records sent under one key before ringtun moves to the next with a KeyUpdate of its own:
/// well inside AES-GCM's limit (2^24.5 records of 2^14 bytes, RFC 8446 section 5.5), where
/// rustls would do the same.
pub const TX_REKEY_AT: u64 = 1 << 23;

/// Handshake bytes (session tickets) held while a message spans records.
const MAX_HANDSHAKE: usize = 64 * 1024;

/// Sealed bytes past which the send buffer is sized for a whole [`SEND_LIMIT`] at once (so
/// that it never grows by copying what it holds), and under which a batch, once sent, lets a
/// buffer that size go: chatty and idle connections keep little, bulk ones keep theirs.
const KEEP_SEND_BUFFER: usize = 32 * 1024;

/// One HBONE connection's record layer after the handshake, without I/O.
pub struct KeyPump {
    tx: RecordKeys,
    rx: RecordKeys,
    /// The traffic secrets, to follow the peer's KeyUpdates and to start ours; `None` when
    /// the handshake's secrets were not captured (a KeyUpdate then ends the connection).
    rekey: Option<Box<Rekey>>,
    /// Ciphertext read from the socket; `rbuf[rpos..]` is not opened yet.
    rbuf: Vec<u8>,
    rpos: usize,
    /// The opened record's content not yet delivered, as a range of `rbuf`.
    plain: std::ops::Range<usize>,
    /// Application data rustls decrypted before the switch; delivered first.
    early: Early,
    /// A handshake message that spans records.
    handshake: Vec<u8>,
    /// The socket reported end of stream.
    eof: bool,
    /// close_notify received: nothing after it counts.
    closed: bool,
    /// Sealed records for the socket; `sbuf[spos..]` not sent yet.
    sbuf: Vec<u8>,
    spos: usize,
    /// close_notify queued.
    closing: bool,
    deferral: Deferral,
    /// Records under one key before ours moves on ([`TX_REKEY_AT`]).
    rekey_at: u64,
    /// Why reading failed, once the plaintext before it was delivered: every read after
    /// that fails the same way (the record that failed is consumed).
    failed: Option<(io::ErrorKind, String, bool)>,
}

impl std::fmt::Debug for KeyPump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPump")
            .field("tx", &self.tx)
            .field("rx", &self.rx)
            .field("buffered_in", &self.buffered_input())
            .field("unsent", &(self.sbuf.len() - self.spos))
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl KeyPump {
    /// Takes over from rustls: its keys and record numbers (`tx`, `rx`), the traffic secrets
    /// if captured, and the plaintext it had already decrypted.
    pub fn new(tx: RecordKeys, rx: RecordKeys, rekey: Option<Rekey>, early: Vec<u8>) -> Self {
        KeyPump {
            tx,
            rx,
            rekey: rekey.map(Box::new),
            rbuf: Vec::new(),
            rpos: 0,
            plain: 0..0,
            early: Early::new(early),
            handshake: Vec::new(),
            eof: false,
            closed: false,
            sbuf: Vec::new(),
            spos: 0,
            closing: false,
            deferral: Deferral::default(),
            rekey_at: TX_REKEY_AT,
            failed: None,
        }
    }

    /// With the traffic secrets, and our key moving on every `rekey_at` records (tests use a
    /// small budget; [`KeyPump::new`] takes [`TX_REKEY_AT`]).
    pub fn with_rekey(mut self, rekey: Rekey, rekey_at: u64) -> Self {
        self.rekey = Some(Box::new(rekey));
        self.rekey_at = rekey_at;
        self
    }

    /// Makes room for `want` more bytes of input without growing the buffer where it can:
    /// an opened buffer starts over, and the start of a record left at its end moves to the
    /// front when the room behind it is short. Opened content not yet delivered lies before
    /// `rpos`, so nothing moves until it is.
    fn compact(&mut self, want: usize) {
        if !self.plain.is_empty() || self.rpos == 0 {
            return;
        }
        if self.rpos == self.rbuf.len() {
            self.rbuf.clear();
        } else if self.rbuf.capacity() - self.rbuf.len() < want {
            self.rbuf.drain(..self.rpos);
        } else {
            return;
        }
        self.rpos = 0;
    }

    /// Records sent and received so far under the current keys.
    #[cfg(test)]
    pub(crate) fn records(&self) -> (u64, u64) {
        (self.tx.seq(), self.rx.seq())
    }

    /// Bytes the send buffer holds, sent ones still in front included, and its capacity.
    #[cfg(test)]
    pub(crate) fn send_buffer(&self) -> (usize, usize) {
        (self.sbuf.len(), self.sbuf.capacity())
    }

    /// Seals one record, moving to our next key first when this one has carried enough.
    fn seal(&mut self, content_type: u8, parts: &[&[u8]]) {
        if self.tx.seq() >= self.rekey_at {
            self.rekey_tx();
        }
        self.tx.seal(content_type, parts, &mut self.sbuf);
    }

    /// Sends a KeyUpdate under the current key and moves to the next. Without the traffic
    /// secrets it cannot; records then go on under the old key (the peer ends the connection
    /// at its limit, long after this one's [`TX_REKEY_AT`]).
    fn rekey_tx(&mut self) {
        let Some(rekey) = self.rekey.as_mut() else {
            return;
        };
        let Ok(keys) = RecordKeys::from_traffic_secret(&rekey.tx().next()) else {
            return;
        };
        self.tx.seal(
            CONTENT_HANDSHAKE,
            &[&ktls::key_update_message(false)],
            &mut self.sbuf,
        );
        rekey.advance_tx();
        self.tx = keys;
    }

    /// A peer KeyUpdate: its next key, and ours too when it asked.
    fn follow_key_update(&mut self, update_requested: bool) -> Result<(), ReadError> {
        let Some(rekey) = self.rekey.as_mut() else {
            return Err(fatal(KtlsError::KeyUpdate { update_requested }));
        };
        let rx = RecordKeys::from_traffic_secret(&rekey.rx().next()).map_err(fatal)?;
        rekey.advance_rx();
        self.rx = rx;
        // Nothing may follow our close_notify (or a fatal alert), our KeyUpdate included.
        if update_requested && !self.closing {
            self.rekey_tx();
        }
        tracing::debug!(update_requested, "TLS: followed the peer's KeyUpdate");
        Ok(())
    }

    /// Queues a fatal alert for the peer (once; nothing is sent after it).
    fn alert(&mut self, description: u8) {
        if !self.closing {
            self.closing = true;
            self.tx.seal(
                CONTENT_ALERT,
                &[&[ALERT_LEVEL_FATAL, description]],
                &mut self.sbuf,
            );
        }
    }

    /// Opens the next whole record in the buffer and acts on it; `Ok(false)` when none is
    /// complete yet. Application data is opened straight into `buf` as far as it fits
    /// ([`RecordKeys::open_into`]: the plaintext is not copied again); the rest waits in
    /// `plain`.
    fn open_next(&mut self, buf: &mut ReadBuf<'_>) -> Result<bool, ReadError> {
        let at = self.rpos;
        let len = match record_len(&self.rbuf[at..]) {
            Ok(Some(len)) if self.rbuf.len() - at >= len => len,
            Ok(_) => return Ok(false),
            Err(e) => return Err(self.refuse(e)),
        };
        self.rpos += len;
        // SAFETY: `open_into` only writes bytes there; it never de-initialises any.
        let out = unsafe { buf.unfilled_mut() };
        let opened = match self.rx.open_into(&mut self.rbuf[at..at + len], out) {
            Ok(r) => r,
            Err(e) => return Err(self.refuse(e)),
        };
        let rest = at + opened.rest.start..at + opened.rest.end;
        let front = opened.front;
        if opened.content_type == CONTENT_APPLICATION_DATA {
            // SAFETY: a successful `open_into` wrote the first `front` unfilled bytes.
            unsafe { buf.assume_init(front) };
            buf.advance(front);
            self.plain = rest;
            return Ok(true);
        }
        // Not for the reader: the content (which a padded record may have put partly into
        // `buf`, unfilled) is gathered here. Alerts and handshake messages are small and rare.
        let mut content = Vec::with_capacity(front + rest.len());
        if front > 0 {
            // SAFETY: as above, `open_into` wrote these bytes; they stay unfilled.
            let written = unsafe { &buf.unfilled_mut()[..front] };
            // SAFETY: initialised (just written), and u8 has no invalid values.
            content.extend_from_slice(unsafe {
                &*(written as *const [MaybeUninit<u8>] as *const [u8])
            });
        }
        content.extend_from_slice(&self.rbuf[rest]);
        match opened.content_type {
            CONTENT_ALERT => match <[u8; 2]>::try_from(&content[..]) {
                Ok([_, ALERT_CLOSE_NOTIFY]) => self.closed = true,
                Ok([level, description]) => {
                    return Err(fatal(KtlsError::PeerAlert { level, description }))
                }
                Err(_) => return Err(self.unexpected(CONTENT_ALERT, content.len(), None)),
            },
            CONTENT_HANDSHAKE => {
                if self.handshake.len() + content.len() > MAX_HANDSHAKE {
                    return Err(self.unexpected(CONTENT_HANDSHAKE, content.len(), None));
                }
                self.handshake.extend_from_slice(&content);
                self.handshake_messages()?;
            }
            other => return Err(self.unexpected(other, content.len(), None)),
        }
        Ok(true)
    }

    /// Acts on the complete handshake messages received: tickets are of no use here,
    /// KeyUpdates are followed, anything else ends the connection.
    fn handshake_messages(&mut self) -> Result<(), ReadError> {
        let msgs = match ktls::parse_handshake(&self.handshake) {
            Ok(msgs) => msgs,
            Err(HandshakeParseError::Incomplete { .. }) => return Ok(()),
            Err(HandshakeParseError::Malformed { msg_type }) => {
                let len = self.handshake.len();
                return Err(self.unexpected(CONTENT_HANDSHAKE, len, Some(msg_type)));
            }
        };
        let len = self.handshake.len();
        self.handshake = Vec::new();
        for msg in msgs {
            match msg {
                HandshakeMsg::NewSessionTicket => {}
                HandshakeMsg::KeyUpdate { update_requested } => {
                    self.follow_key_update(update_requested)?
                }
                HandshakeMsg::Other { msg_type } => {
                    return Err(self.unexpected(CONTENT_HANDSHAKE, len, Some(msg_type)))
                }
            }
        }
        Ok(())
    }

    /// A record that cannot be opened: the peer is told why (RFC 8446 section 6.2).
    fn refuse(&mut self, e: OpenError) -> ReadError {
        self.alert(e.alert());
        ReadError {
            error: io::Error::new(io::ErrorKind::InvalidData, e),
            alert: true,
        }
    }

    fn unexpected(
        &mut self,
        content_type: u8,
        len: usize,
        handshake_type: Option<u8>,
    ) -> ReadError {
        self.alert(ALERT_UNEXPECTED_MESSAGE);
        ReadError {
            error: io::Error::new(
                io::ErrorKind::InvalidData,
                KtlsError::UnexpectedRecord {
                    content_type,
                    handshake_type,
                    len,
                },
            ),
            alert: true,
        }
    }
}

/// An error that ends the connection without an alert of ours (the peer's alert, or a
/// KeyUpdate that cannot be followed).
fn fatal(e: KtlsError) -> ReadError {
    let kind = match e {
        KtlsError::PeerAlert { .. } | KtlsError::KeyUpdate { .. } => {
            io::ErrorKind::ConnectionAborted
        }
        _ => io::ErrorKind::InvalidData,
    };
    ReadError::plain(io::Error::new(kind, e))
}

impl Records for KeyPump {
    fn buffered_input(&self) -> usize {
        self.rbuf.len() - self.rpos + self.plain.len()
    }

    fn unflushed(&self) -> usize {
        self.deferral.unflushed
    }

    fn is_eof(&self) -> bool {
        self.eof
    }

    fn input_buffer(&mut self) -> &mut [MaybeUninit<u8>] {
        if self.rbuf.capacity() == 0 {
            self.rbuf = records::take_read_buffer();
        }
        self.compact(READ_CHUNK);
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK {
            self.rbuf.reserve(READ_CHUNK);
        }
        self.rbuf.spare_capacity_mut()
    }

    unsafe fn input_received(&mut self, n: usize) {
        // SAFETY: the caller initialised them (the trait's contract).
        unsafe { records::filled(&mut self.rbuf, n) };
    }

    fn receive(&mut self, bytes: &[u8]) {
        self.compact(bytes.len());
        self.rbuf.extend_from_slice(bytes);
    }

    fn input_ended(&mut self) {
        self.eof = true;
    }

    fn release_idle_input(&mut self) {
        if self.rpos == self.rbuf.len() && self.plain.is_empty() {
            records::give_back_read_buffer(std::mem::take(&mut self.rbuf));
            self.rpos = 0;
        }
    }

    fn read(&mut self, buf: &mut ReadBuf<'_>) -> Result<Read, ReadError> {
        if let Some((kind, why, alert)) = &self.failed {
            return Err(ReadError {
                error: io::Error::new(*kind, why.clone()),
                alert: *alert,
            });
        }
        let start = buf.filled().len();
        let delivered = |buf: &ReadBuf<'_>| buf.filled().len() > start;
        if let Some(n) = self.early.deliver(buf) {
            return Ok(Read::Data(n));
        }
        loop {
            if !self.plain.is_empty() {
                let n = buf.remaining().min(self.plain.len());
                buf.put_slice(&self.rbuf[self.plain.start..self.plain.start + n]);
                self.plain.start += n;
                if buf.remaining() == 0 {
                    return Ok(Read::Data(buf.filled().len() - start));
                }
            }
            if self.closed {
                return Ok(if delivered(buf) {
                    Read::Data(buf.filled().len() - start)
                } else {
                    Read::Eof
                });
            }
            match self.open_next(buf) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    self.failed = Some((e.error.kind(), e.error.to_string(), e.alert));
                    // What came before the bad record goes first, as over rustls.
                    if delivered(buf) {
                        return Ok(Read::Data(buf.filled().len() - start));
                    }
                    return Err(e);
                }
            }
            if delivered(buf) {
                return Ok(Read::Data(buf.filled().len() - start));
            }
            if self.eof {
                // TCP end of stream without close_notify (or inside a record): as rustls
                // reports it.
                return Err(ReadError::plain(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            return Ok(Read::NeedInput);
        }
    }

    fn write(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<Write> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(Write::Accepted {
                n: 0,
                transmit_now: false,
            });
        }
        if self.closing {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after TLS close_notify",
            ));
        }
        let unsent = self.sbuf.len() - self.spos;
        let room = SEND_LIMIT.saturating_sub(unsent);
        if room == 0 {
            return Ok(Write::Full);
        }
        // A socket that never drains completely (a slow peer) would leave the sent bytes in
        // front of the unsent ones for good: once they are at least as many, the unsent ones
        // move to the front. Each byte moved was preceded by as many sent since the last
        // move, so this costs at most one more copy per byte, and only while congested; the
        // buffer stays under twice the send limit.
        if self.spos > 0 && self.spos >= unsent {
            self.sbuf.drain(..self.spos);
            self.spos = 0;
        }
        // Records span the slices (a frame head and its payload share one), up to the room.
        let mut left = room.min(total);
        let n = left;
        let need = n + (n / MAX_RECORD_PLAINTEXT + 2) * OVERHEAD;
        if self.sbuf.capacity() - self.sbuf.len() < need {
            let mut want = self.sbuf.len() + need;
            if want > KEEP_SEND_BUFFER {
                want =
                    want.max(2 * (SEND_LIMIT + (SEND_LIMIT / MAX_RECORD_PLAINTEXT + 2) * OVERHEAD));
            }
            self.sbuf.reserve_exact(want - self.sbuf.len());
        }
        let mut parts: [&[u8]; 8] = [&[]; 8];
        let (mut count, mut len) = (0, 0);
        for b in bufs {
            let mut b: &[u8] = b;
            while !b.is_empty() && left > 0 {
                let take = b.len().min(MAX_RECORD_PLAINTEXT - len).min(left);
                parts[count] = &b[..take];
                count += 1;
                len += take;
                left -= take;
                b = &b[take..];
                if len == MAX_RECORD_PLAINTEXT || count == parts.len() {
                    self.seal(CONTENT_APPLICATION_DATA, &parts[..count]);
                    (count, len) = (0, 0);
                }
            }
            if left == 0 {
                break;
            }
        }
        if count > 0 {
            self.seal(CONTENT_APPLICATION_DATA, &parts[..count]);
        }
        Ok(Write::Accepted {
            n,
            transmit_now: self.deferral.accepted(n),
        })
    }

    fn flush(&mut self, tick: Option<u32>) -> Flush {
        let wants = self.spos < self.sbuf.len();
        self.deferral.flush(tick, wants)
    }

    fn flush_due(&self, now: u32) -> bool {
        self.deferral.due(now)
    }

    fn transmit(&mut self, out: &mut dyn io::Write) -> io::Result<Transmit> {
        if self.spos == self.sbuf.len() {
            if self.spos < KEEP_SEND_BUFFER && self.sbuf.capacity() > KEEP_SEND_BUFFER {
                self.sbuf = Vec::new();
            } else {
                self.sbuf.clear();
            }
            self.spos = 0;
            self.deferral.sent_all();
            return Ok(Transmit::Done);
        }
        match out.write(&self.sbuf[self.spos..])? {
            0 => Err(io::ErrorKind::WriteZero.into()),
            n => {
                self.spos += n;
                Ok(Transmit::Sent(n))
            }
        }
    }

    fn close(&mut self) {
        if !self.closing {
            self.closing = true;
            self.seal(CONTENT_ALERT, &[&[ALERT_LEVEL_WARNING, ALERT_CLOSE_NOTIFY]]);
        }
    }
}
