//! Both userspace record layers against a real rustls peer, in memory: every test runs on
//! rustls' ([`RecordPump`]) and on ringtun's ([`KeyPump`]).

use std::io;

use proptest::prelude::*;
use tokio::io::ReadBuf;

use super::pair::{self, handshaken, open, seal, take_output, SUITES};
use super::script::Socket;
use super::*;

/// The two layers: rustls' own and ringtun's over the same handshake's keys.
const LAYERS: [bool; 2] = [false, true];

/// A layer for `mine`: ringtun's (`own`) or rustls'.
fn layer(mine: rustls::Connection, own: bool) -> Box<dyn Records> {
    if own {
        Box::new(super::script::keys_pump(mine))
    } else {
        Box::new(RecordPump::new(mine))
    }
}

/// A layer on the server end of a fresh connection, and its peer (the client).
fn server_pump(suite: usize, own: bool) -> (Box<dyn Records>, rustls::Connection) {
    let (client, server) = handshaken(SUITES[suite]);
    (layer(server, own), client)
}

/// Reads everything the pump can deliver now, `cap` bytes at a time; the last step says why
/// it stopped.
fn read_all(pump: &mut dyn Records, cap: usize) -> (Vec<u8>, Result<Read, ReadError>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; cap];
    loop {
        let mut rb = ReadBuf::new(&mut buf);
        match pump.read(&mut rb) {
            Ok(Read::Data(n)) if n > 0 => out.extend_from_slice(rb.filled()),
            other => return (out, other),
        }
    }
}

/// Everything the pump has to send, through a socket that takes `room` bytes per write and
/// refuses every other write (`WouldBlock`), as a kernel socket under pressure does.
fn transmit_all(pump: &mut dyn Records, room: usize) -> Vec<u8> {
    let mut wire = Vec::new();
    let mut full = false;
    loop {
        full = !full;
        let mut socket = Socket {
            out: &mut wire,
            room: if full { 0 } else { room },
        };
        match pump.transmit(&mut socket) {
            Ok(Transmit::Done) => return wire,
            Ok(Transmit::Sent(n)) => assert!(n > 0 && n <= room),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
        }
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn records_split_at_every_boundary_arrive_whole() {
    for own in LAYERS {
        // Three records, cut once at every byte: inside a header, at a boundary, in a tag.
        let data = pattern(80);
        let three = |peer: &mut rustls::Connection| {
            let mut wire = seal(peer, &data[..10], usize::MAX);
            wire.extend(seal(peer, &data[10..60], usize::MAX));
            wire.extend(seal(peer, &data[60..], usize::MAX));
            wire
        };
        for suite in 0..SUITES.len() {
            let len = three(&mut server_pump(suite, own).1).len();
            for cut in 0..=len {
                // Keys differ per connection: one fresh pair per cut.
                let (mut pump, mut peer) = server_pump(suite, own);
                let wire = three(&mut peer);
                pump.receive(&wire[..cut]);
                let (mut got, stop) = read_all(&mut *pump, 7);
                assert_eq!(stop.expect("first part"), Read::NeedInput, "cut at {cut}");
                assert!(data.starts_with(&got), "cut at {cut}");
                pump.receive(&wire[cut..]);
                let (rest, stop) = read_all(&mut *pump, 7);
                got.extend(rest);
                assert_eq!(stop.expect("second part"), Read::NeedInput);
                assert_eq!(got, data, "cut at {cut}");
            }
        }
    }
}

#[test]
fn bytes_one_at_a_time_through_the_drivers_buffer() {
    for own in LAYERS {
        let (mut pump, mut peer) = server_pump(2, own);
        let data = pattern(5000);
        let wire = seal(&mut peer, &data, 1000);
        let mut got = Vec::new();
        for &b in &wire {
            let room = pump.input_buffer();
            assert!(!room.is_empty());
            room[0].write(b);
            // SAFETY: the byte was just written.
            unsafe { pump.input_received(1) };
            got.extend(read_all(&mut *pump, 333).0);
        }
        assert_eq!(got, data);
        assert_eq!(pump.buffered_input(), 0);
    }
}

#[test]
fn close_notify_ends_the_stream_after_the_data_before_it() {
    for own in LAYERS {
        let (mut pump, mut peer) = server_pump(0, own);
        let mut wire = seal(&mut peer, b"last words", 4);
        peer.send_close_notify();
        wire.extend(take_output(&mut peer));
        pump.receive(&wire);
        let (got, stop) = read_all(&mut *pump, 3);
        assert_eq!(got, b"last words");
        assert_eq!(stop.expect("clean end"), Read::Eof);
        let (_, again) = read_all(&mut *pump, 3);
        assert_eq!(again.expect("still the end"), Read::Eof);
    }
}

#[test]
fn tcp_eof_without_close_notify_is_an_error_after_the_data() {
    for own in LAYERS {
        let (mut pump, mut peer) = server_pump(1, own);
        pump.receive(&seal(&mut peer, b"cut short", 100));
        pump.input_ended();
        assert!(pump.is_eof());
        let (got, stop) = read_all(&mut *pump, 64);
        assert_eq!(got, b"cut short");
        let e = stop.expect_err("truncation");
        assert_eq!(e.error.kind(), io::ErrorKind::UnexpectedEof);
        assert!(!e.alert);
    }
}

#[test]
fn a_corrupt_record_fails_and_tells_the_peer() {
    for own in LAYERS {
        let (mut pump, mut peer) = server_pump(0, own);
        let mut wire = seal(&mut peer, b"tampered with", 100);
        let last = wire.len() - 1;
        wire[last] ^= 0x80;
        pump.receive(&wire);
        let e = read_all(&mut *pump, 64).1.expect_err("bad record");
        assert_eq!(e.error.kind(), io::ErrorKind::InvalidData);
        assert!(e.alert, "the layer queued an alert");
        let alert = transmit_all(&mut *pump, 7);
        assert!(
            matches!(
                open(&mut peer, &alert),
                Err(rustls::Error::AlertReceived(_))
            ),
            "the peer hears why"
        );
    }
}

/// A forged record big enough to be opened straight into the reader's buffer delivers none
/// of its bytes, then the error, and the peer hears why.
#[test]
fn a_corrupt_large_record_delivers_nothing_of_itself() {
    for own in LAYERS {
        for suite in 0..SUITES.len() {
            let (mut pump, mut peer) = server_pump(suite, own);
            let mut wire = seal(&mut peer, b"before", usize::MAX);
            let first = wire.len();
            wire.extend(seal(&mut peer, &pattern(12_000), usize::MAX));
            wire[first + 6_000] ^= 1;
            pump.receive(&wire);
            let (got, stop) = read_all(&mut *pump, 20_000);
            // rustls may drop what came before the bad record; ours delivers it.
            assert!(b"before".starts_with(&got), "suite {suite}, own {own}");
            if own {
                assert_eq!(got, b"before", "suite {suite}");
            }
            let e = stop.expect_err("forged record");
            assert_eq!(e.error.kind(), io::ErrorKind::InvalidData);
            assert!(e.alert, "the layer queued an alert");
            assert!(matches!(
                open(&mut peer, &transmit_all(&mut *pump, 100)),
                Err(rustls::Error::AlertReceived(_))
            ));
        }
    }
}

#[test]
fn garbage_instead_of_a_record_is_an_error() {
    for own in LAYERS {
        let (mut pump, _) = server_pump(0, own);
        pump.receive(&[0xff; 64]);
        let e = read_all(&mut *pump, 64).1.expect_err("not TLS");
        assert_eq!(e.error.kind(), io::ErrorKind::InvalidData);
    }
}

#[test]
fn a_full_reader_gets_nothing_and_no_input_is_taken() {
    for own in LAYERS {
        let (mut pump, mut peer) = server_pump(0, own);
        pump.receive(&seal(&mut peer, b"abc", 100));
        let mut empty = [0u8; 0];
        let mut rb = ReadBuf::new(&mut empty);
        assert_eq!(pump.read(&mut rb).expect("no room"), Read::Data(0));
        assert_eq!(read_all(&mut *pump, 2).0, b"abc");
    }
}

#[test]
fn idle_release_keeps_a_partial_record() {
    for own in LAYERS {
        let (mut pump, mut peer) = server_pump(0, own);
        let wire = seal(&mut peer, b"split", 100);
        pump.receive(&wire[..3]);
        assert_eq!(read_all(&mut *pump, 8).1.expect("partial"), Read::NeedInput);
        pump.release_idle_input();
        pump.receive(&wire[3..]);
        assert_eq!(read_all(&mut *pump, 8).0, b"split");
    }
}

#[test]
fn a_drained_read_buffer_is_kept_for_the_shards_next_read() {
    for own in LAYERS {
        records::drop_spare_read_buffers();
        let (mut first, mut peer) = server_pump(0, own);
        let wire = seal(&mut peer, b"hello", 100);
        let room = first.input_buffer();
        let at = room.as_ptr() as usize;
        for (to, from) in room.iter_mut().zip(&wire) {
            to.write(*from);
        }
        // SAFETY: the bytes were written just above.
        unsafe { first.input_received(wire.len()) };
        assert_eq!(read_all(&mut *first, 64).0, b"hello");
        first.release_idle_input();
        assert_eq!(records::spare_read_buffers(), 1, "drained: given back");
        let (mut second, _peer) = server_pump(0, own);
        assert_eq!(
            second.input_buffer().as_ptr() as usize,
            at,
            "another connection on the shard reads into it"
        );
        assert_eq!(records::spare_read_buffers(), 0);
    }
}

#[test]
fn a_shard_keeps_two_spare_read_buffers_at_most_and_the_sweep_frees_them() {
    records::drop_spare_read_buffers();
    for _ in 0..3 {
        records::give_back_read_buffer(Vec::with_capacity(READ_CHUNK));
    }
    assert_eq!(records::spare_read_buffers(), 2);
    records::drop_spare_read_buffers();
    assert_eq!(records::spare_read_buffers(), 0);
    records::give_back_read_buffer(Vec::with_capacity(4 * READ_CHUNK));
    records::give_back_read_buffer(Vec::new());
    assert_eq!(
        records::spare_read_buffers(),
        0,
        "a buffer a bulk transfer grew, or none at all, is not kept"
    );
    assert!(records::take_read_buffer().capacity() >= READ_CHUNK);
}

#[test]
fn writes_wait_for_the_flush_until_the_eager_threshold() {
    for own in LAYERS {
        let (mut pump, mut peer) = server_pump(0, own);
        let small = pattern(1000);
        let w = pump.write(&[io::IoSlice::new(&small)]).expect("write");
        assert_eq!(
            w,
            Write::Accepted {
                n: 1000,
                transmit_now: false
            }
        );
        assert_eq!(pump.unflushed(), 1000);
        let big = pattern(EAGER_WRITE);
        let (a, b) = big.split_at(EAGER_WRITE / 3);
        match pump.write(&[io::IoSlice::new(a), io::IoSlice::new(b)]) {
            Ok(Write::Accepted { n, transmit_now }) => {
                assert_eq!(n, EAGER_WRITE, "slices are taken together");
                assert!(transmit_now, "past the eager threshold");
            }
            other => panic!("{other:?}"),
        }
        let wire = transmit_all(&mut *pump, 1500);
        assert_eq!(pump.unflushed(), 0);
        let mut expected = small;
        expected.extend(big);
        assert_eq!(open(&mut peer, &wire).expect("decrypts"), expected);
    }
}

#[test]
fn a_full_send_buffer_asks_for_a_transmit() {
    for own in LAYERS {
        let (mut pump, mut peer) = server_pump(1, own);
        let chunk = pattern(64 * 1024);
        let mut accepted = 0;
        while let Write::Accepted { n, .. } =
            pump.write(&[io::IoSlice::new(&chunk)]).expect("write")
        {
            accepted += n;
            assert!(accepted <= 2 * SEND_LIMIT, "the send buffer is bounded");
        }
        assert!(accepted >= SEND_LIMIT / 2);
        let wire = transmit_all(&mut *pump, 100_000);
        assert!(matches!(
            pump.write(&[io::IoSlice::new(&chunk)]),
            Ok(Write::Accepted { .. })
        ));
        assert_eq!(open(&mut peer, &wire).expect("decrypts").len(), accepted);
    }
}

#[test]
fn empty_writes_take_nothing() {
    for own in LAYERS {
        let (mut pump, _) = server_pump(0, own);
        let w = pump.write(&[io::IoSlice::new(&[]), io::IoSlice::new(&[])]);
        assert_eq!(
            w.expect("empty"),
            Write::Accepted {
                n: 0,
                transmit_now: false
            }
        );
        assert_eq!(pump.flush(Some(1)), Flush::Now, "nothing to defer");
    }
}

#[test]
fn flushes_defer_to_the_next_tick() {
    for own in LAYERS {
        let (mut pump, mut peer) = server_pump(0, own);
        pump.write(&[io::IoSlice::new(b"frame")]).expect("write");
        assert_eq!(pump.flush(None), Flush::Now, "no driver tick: at once");
        assert_eq!(pump.flush(Some(7)), Flush::Later { repoll: true });
        assert_eq!(pump.flush(Some(7)), Flush::Later { repoll: false });
        assert!(!pump.flush_due(7), "not in the poll that deferred it");
        assert!(pump.flush_due(8));
        assert_eq!(pump.flush(Some(8)), Flush::Now);
        let wire = transmit_all(&mut *pump, 64);
        assert!(!pump.flush_due(9), "sent: nothing due");
        assert_eq!(open(&mut peer, &wire).expect("decrypts"), b"frame");
    }
}

#[test]
fn close_sends_one_close_notify() {
    for own in LAYERS {
        let (mut pump, mut peer) = server_pump(2, own);
        pump.write(&[io::IoSlice::new(b"bye")]).expect("write");
        pump.close();
        pump.close();
        let wire = transmit_all(&mut *pump, 10);
        assert_eq!(open(&mut peer, &wire).expect("decrypts"), b"bye");
        use std::io::Read as _;
        assert_eq!(peer.reader().read(&mut [0u8; 8]).expect("clean end"), 0);
        let wire = transmit_all(&mut *pump, 10);
        assert!(wire.is_empty(), "one close_notify only");
    }
}

#[test]
fn the_client_end_works_the_same() {
    for own in LAYERS {
        let (client, mut server) = handshaken(SUITES[0]);
        let mut pump = layer(client, own);
        pump.receive(&seal(&mut server, b"from the server", 5));
        assert_eq!(read_all(&mut *pump, 100).0, b"from the server");
        pump.write(&[io::IoSlice::new(b"from the client")])
            .expect("write");
        let wire = transmit_all(&mut *pump, 1000);
        assert_eq!(
            open(&mut server, &wire).expect("decrypts"),
            b"from the client"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the record sizes, the socket's read sizes and the reader's buffer sizes, the
    /// bytes arrive in order and whole.
    #[test]
    fn any_split_any_reader(
        own in any::<bool>(),
        suite in 0..SUITES.len(),
        len in 0usize..70_000,
        piece in 1usize..20_000,
        cuts in proptest::collection::vec(1usize..9_000, 1..40),
        cap in 1usize..20_000,
    ) {
        let (mut pump, mut peer) = server_pump(suite, own);
        let data = pattern(len);
        let wire = seal(&mut peer, &data, piece);
        let mut got = Vec::new();
        let mut at = 0;
        for cut in cuts.iter().cycle() {
            if at == wire.len() {
                break;
            }
            let end = (at + cut).min(wire.len());
            pump.receive(&wire[at..end]);
            at = end;
            let (more, stop) = read_all(&mut *pump, cap);
            prop_assert!(matches!(stop, Ok(Read::NeedInput)));
            got.extend(more);
        }
        prop_assert_eq!(got, data);
    }

    /// Whatever the write sizes and however little the socket takes per call, the peer
    /// decrypts exactly what was written.
    #[test]
    fn any_writes_any_socket(
        own in any::<bool>(),
        suite in 0..SUITES.len(),
        writes in proptest::collection::vec(0usize..100_000, 1..12),
        room in 1usize..70_000,
    ) {
        let (mut pump, mut peer) = server_pump(suite, own);
        let mut expected = Vec::new();
        let mut wire = Vec::new();
        for (i, n) in writes.into_iter().enumerate() {
            let data = pattern(n + i);
            let mut rest = &data[..];
            while !rest.is_empty() {
                match pump.write(&[io::IoSlice::new(rest)]).expect("write") {
                    Write::Accepted { n, transmit_now } => {
                        expected.extend_from_slice(&rest[..n]);
                        rest = &rest[n..];
                        if transmit_now {
                            wire.extend(transmit_all(&mut *pump, room));
                        }
                    }
                    Write::Full => wire.extend(transmit_all(&mut *pump, room)),
                }
            }
        }
        wire.extend(transmit_all(&mut *pump, room));
        prop_assert_eq!(open(&mut peer, &wire).expect("decrypts"), expected);
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The fuzz target's operations, from random bytes: no panic, no hang.
    #[test]
    fn scripted_operations_never_panic(ops in proptest::collection::vec(any::<u8>(), 0..400)) {
        super::script::run(&ops);
    }
}

#[test]
fn the_pair_helper_delivers_tickets() {
    let (mut c, mut s) = handshaken(SUITES[0]);
    assert!(!c.wants_write() && !s.wants_write());
    assert_eq!(pair::take_output(&mut c), Vec::<u8>::new());
    assert_eq!(pair::take_output(&mut s), Vec::<u8>::new());
}

#[test]
fn the_fuzz_targets_seeds_run() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/record_pump");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).expect("seed corpus") {
        let path = entry.expect("seed").path();
        super::script::run(&std::fs::read(&path).expect("seed file"));
        seeds += 1;
    }
    assert!(seeds > 0, "no seeds in {}", dir.display());
}

/// The first application traffic secrets of a handshake, as rustls logs them.
#[derive(Debug, Default)]
struct Logged(std::sync::Mutex<Vec<(String, Vec<u8>)>>);

impl rustls::KeyLog for Logged {
    fn log(&self, label: &str, _random: &[u8], secret: &[u8]) {
        if let Ok(mut l) = self.0.lock() {
            l.push((label.to_string(), secret.to_vec()));
        }
    }
}

impl Logged {
    fn secret(
        &self,
        cipher: tls_kernel_offload::Cipher,
        label: &str,
    ) -> tls_kernel_offload::TrafficSecret {
        let l = self.0.lock().expect("log");
        let (_, s) = l.iter().find(|(n, _)| n == label).expect("logged");
        tls_kernel_offload::TrafficSecret::new(cipher, s).expect("secret")
    }
}

/// ringtun's layer on the server end with the traffic secrets (so it can follow and start
/// KeyUpdates), sending a KeyUpdate of its own every `rekey_at` records; and its peer.
fn server_keys_with_secrets(suite: usize, rekey_at: u64) -> (KeyPump, rustls::Connection) {
    let log = std::sync::Arc::new(Logged::default());
    let (client, server) = pair::handshaken_logged(SUITES[suite], log.clone());
    let cipher = tls_kernel_offload::Cipher::from_suite(SUITES[suite].suite()).expect("cipher");
    let rekey = tls_kernel_offload::Rekey::new(
        log.secret(cipher, "CLIENT_TRAFFIC_SECRET_0"),
        log.secret(cipher, "SERVER_TRAFFIC_SECRET_0"),
    );
    let pump = super::script::keys_pump(server).with_rekey(rekey, rekey_at);
    (pump, client)
}

#[test]
fn a_peer_key_update_is_followed_both_ways() {
    for suite in 0..SUITES.len() {
        let (mut pump, mut peer) = server_keys_with_secrets(suite, TX_REKEY_AT);
        let mut wire = seal(&mut peer, b"before", 100);
        // rustls asks us to update ours too.
        peer.refresh_traffic_keys().expect("key update");
        wire.extend(seal(&mut peer, b" and after", 100));
        pump.receive(&wire);
        assert_eq!(
            read_all(&mut pump, 64).0,
            b"before and after",
            "suite {suite}"
        );
        pump.write(&[io::IoSlice::new(b"answered under our next key")])
            .expect("write");
        let wire = transmit_all(&mut pump, 1000);
        assert_eq!(
            open(&mut peer, &wire).expect("the peer follows our KeyUpdate"),
            b"answered under our next key"
        );
    }
}

#[test]
fn a_peer_key_update_without_the_secrets_ends_the_connection() {
    let (mut pump, mut peer) = server_pump(0, true);
    let mut wire = seal(&mut peer, b"before", 100);
    peer.refresh_traffic_keys().expect("key update");
    wire.extend(seal(&mut peer, b"after", 100));
    pump.receive(&wire);
    let (got, stop) = read_all(&mut *pump, 64);
    assert_eq!(got, b"before");
    let e = stop.expect_err("cannot follow");
    assert_eq!(e.error.kind(), io::ErrorKind::ConnectionAborted);
    assert!(e.error.to_string().contains("KeyUpdate"), "{}", e.error);
}

#[test]
fn our_key_moves_on_after_its_record_budget() {
    let (mut pump, mut peer) = server_keys_with_secrets(0, 3);
    let mut expected = Vec::new();
    let mut wire = Vec::new();
    for i in 0..10u8 {
        let data = pattern(100 + usize::from(i));
        pump.write(&[io::IoSlice::new(&data)]).expect("write");
        wire.extend(transmit_all(&mut pump, 4096));
        expected.extend(data);
    }
    assert!(
        pump.records().0 <= 3,
        "a fresh key after every 3 records: {:?}",
        pump.records()
    );
    assert_eq!(open(&mut peer, &wire).expect("the peer follows"), expected);
}

#[test]
fn a_socket_that_never_drains_does_not_grow_the_send_buffer() {
    // A slow peer: every transmit takes a little and then the socket is full, and h2 keeps
    // writing as room frees up. What was sent must not pile up in front of what was not.
    let (client, mut peer) = handshaken(SUITES[0]);
    let mut pump = super::script::keys_pump(client);
    let chunk = pattern(48 * 1024);
    let (mut expected, mut wire) = (Vec::new(), Vec::new());
    let mut most = 0;
    for _ in 0..200 {
        if let Write::Accepted { n, .. } = pump.write(&[io::IoSlice::new(&chunk)]).expect("write") {
            expected.extend_from_slice(&chunk[..n]);
        }
        // One write of 40 KiB, then WouldBlock: never everything.
        let mut socket = Socket {
            out: &mut wire,
            room: 40 * 1024,
        };
        let _ = pump.transmit(&mut socket);
        let (held, capacity) = pump.send_buffer();
        most = most.max(held.max(capacity));
    }
    assert!(
        most <= 2 * SEND_LIMIT + 64 * 1024,
        "send buffer grew to {most}"
    );
    wire.extend(transmit_all(&mut pump, 1 << 20));
    assert_eq!(open(&mut peer, &wire).expect("decrypts"), expected);
}
