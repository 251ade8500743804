//! Drives a record layer (rustls' [`RecordPump`] or ringtun's [`KeyPump`] over the keys of
//! the same handshake) and a real rustls peer through a sequence of operations read from
//! arbitrary bytes: the record pump's fuzz target (`fuzz/fuzz_targets/record_pump.rs`
//! includes this file) and a property test beside it.
//!
//! Whatever the bytes, the pump must not panic or spin; and as long as nothing but the
//! peer's own records reached it, what it delivers must be what the peer sent.

use std::io;

use tokio::io::ReadBuf;

use super::pair;
use super::{Flush, KeyPump, Read, RecordPump, Records, Transmit, Write};

/// Bytes read one at a time, then zeros.
struct Ops<'a>(&'a [u8]);

impl Ops<'_> {
    fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }

    fn len(&mut self) -> usize {
        usize::from(self.byte()) << (self.byte() % 10)
    }

    fn bytes(&mut self) -> &[u8] {
        let n = usize::from(self.byte()).min(self.0.len());
        let (now, rest) = self.0.split_at(n);
        self.0 = rest;
        now
    }
}

/// A socket that takes at most `room` bytes per write, or none (`WouldBlock`).
pub struct Socket<'a> {
    /// What the socket has taken.
    pub out: &'a mut Vec<u8>,
    /// The most one write takes.
    pub room: usize,
}

impl io::Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.room);
        self.out.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// ringtun's record layer over `conn`'s keys, as `establish` builds it (without the traffic
/// secrets: KeyUpdates are beyond the script).
pub fn keys_pump(conn: rustls::Connection) -> KeyPump {
    use tls_kernel_offload::{try_extract, Handoff, RecordKeys};
    match try_extract(conn) {
        Ok(Handoff::Ready(x)) => {
            let (tx_seq, tx) = &x.secrets.tx;
            let (rx_seq, rx) = &x.secrets.rx;
            let tx = RecordKeys::from_secrets(*tx_seq, tx).expect("tx keys");
            let rx = RecordKeys::from_secrets(*rx_seq, rx).expect("rx keys");
            KeyPump::new(tx, rx, None, x.plaintext)
        }
        _ => panic!("a finished handshake with nothing left to send gives its keys"),
    }
}

/// Runs the operations `data` spells out.
pub fn run(data: &[u8]) {
    let mut ops = Ops(data);
    let first = ops.byte();
    let (client, server) = pair::handshaken(pair::SUITES[usize::from(first % 3)]);
    let (mine, mut peer) = if first & 4 == 0 {
        (client, server)
    } else {
        (server, client)
    };
    let mut pump: Box<dyn Records> = if first & 8 == 0 {
        Box::new(RecordPump::new(mine))
    } else {
        Box::new(keys_pump(mine))
    };
    // The peer's ciphertext not yet handed to the pump, and what the pump sent the peer.
    let mut wire = Vec::new();
    let mut to_peer = Vec::new();
    let (mut sent, mut delivered) = (Vec::new(), Vec::new());
    // Only the peer's own records reached the pump, unchanged and in order.
    let mut clean = true;
    // close_notify only while every byte the pump got was good, and no bad bytes after it:
    // rustls (0.23) debug-asserts when it has to send a fatal alert after close_notify
    // (release builds just send nothing more), which is not the pump's to fix.
    let mut closed = false;
    let mut next_plain = 0u8;
    let mut read_buf = vec![0u8; 1 << 16];
    while !ops.0.is_empty() {
        match ops.byte() % 12 {
            0 if !closed => {
                pump.receive(ops.bytes());
                clean = false;
            }
            1 => {
                let n = ops.len();
                let piece = ops.len();
                let plain: Vec<u8> = (0..n).map(|i| next_plain.wrapping_add(i as u8)).collect();
                next_plain = next_plain.wrapping_add(n as u8);
                wire.extend(pair::seal(&mut peer, &plain, piece));
                sent.extend(plain);
            }
            2 => {
                // Through the zero-copy path the driver uses.
                let n = ops.len().min(wire.len());
                let room = pump.input_buffer();
                let n = n.min(room.len());
                for (slot, b) in room.iter_mut().zip(wire.drain(..n)) {
                    slot.write(b);
                }
                // SAFETY: the loop above initialised the first `n` bytes of the input buffer.
                unsafe { pump.input_received(n) };
            }
            3 => {
                let n = ops.len().min(wire.len());
                pump.receive(&wire[..n]);
                wire.drain(..n);
            }
            4 => {
                let n = ops.len().min(read_buf.len());
                let mut buf = ReadBuf::new(&mut read_buf[..n]);
                match pump.read(&mut buf) {
                    Ok(Read::Data(k)) => {
                        assert_eq!(k, buf.filled().len());
                        delivered.extend_from_slice(buf.filled());
                    }
                    Ok(Read::Eof | Read::NeedInput) => assert!(buf.filled().is_empty()),
                    Err(_) => {}
                }
            }
            5 => {
                let n = ops.len();
                let data = vec![0x5a; n];
                let bufs = [
                    io::IoSlice::new(&data[..n / 2]),
                    io::IoSlice::new(&data[n / 2..]),
                ];
                match pump.write(&bufs) {
                    Ok(Write::Accepted { n: k, .. }) => assert!(k <= n),
                    Ok(Write::Full) | Err(_) => {}
                }
            }
            6 => {
                let tick = ops.byte();
                let tick = (tick & 1 == 1).then_some(u32::from(tick >> 1));
                if let Flush::Later { .. } = pump.flush(tick) {
                    assert!(tick.is_some(), "only a ticking driver defers");
                }
            }
            7 => {
                let mut socket = Socket {
                    out: &mut to_peer,
                    room: ops.len(),
                };
                for _ in 0..4 {
                    match pump.transmit(&mut socket) {
                        Ok(Transmit::Sent(_)) => {}
                        Ok(Transmit::Done) | Err(_) => break,
                    }
                }
            }
            8 if clean => {
                pump.close();
                closed = true;
            }
            8 => {}
            9 => pump.input_ended(),
            10 => {
                peer.send_close_notify();
                wire.extend(pair::take_output(&mut peer));
            }
            0 => {}
            _ if closed => pump.release_idle_input(),
            _ => {
                if let Some(b) = wire.get_mut(usize::from(ops.byte())) {
                    *b ^= 1 << (ops.byte() % 8);
                    clean = false;
                }
                pump.release_idle_input();
            }
        }
    }
    if clean {
        assert!(
            sent.starts_with(&delivered),
            "the pump delivered bytes the peer never sent"
        );
    }
    // What the pump transmitted is TLS the peer can at least parse without panicking.
    let _ = pair::open(&mut peer, &to_peer);
}
