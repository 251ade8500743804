//! Micro-benchmarks of ringtun's hot paths, each alone:
//!
//! - `config_lookup`: what the outbound path asks a config snapshot for every new connection
//!   (service by VIP, its endpoints for a port, the destination workload by IP), on a config
//!   with 2,000 workloads and 500 services;
//! - `tls_records`: the userspace TLS record path with ringtun's own rustls configs (TLS 1.3,
//!   real certificates from the demo CA): encrypt and decrypt 1 MiB in 16 KiB writes;
//! - `hbone_data`: HBONE DATA framing, an h2 CONNECT stream between ringtun's h2 settings on
//!   both ends over an in-memory pipe, 4 MiB through in 16 KiB and 256 KiB chunks;
//! - `copy_loop`: the plaintext copy loop (`proxy::copy::tcp_tcp`) between loopback TCP pairs
//!   on a monoio runtime, 8 MiB per iteration;
//! - `pool`: the per-shard HBONE pool bookkeeping (checkout, release) with 64 keys.
//!
//! `cargo bench -p ringtun-benches --bench micro [-- FILTER]`. Criterion prints time per
//! iteration and throughput; compare runs on the same machine only.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringtun::config::{self, Snapshot};
use ringtun::pki::Ca;
use ringtun::tls::{CertPaths, TlsMaterial};
use ringtun_hbone::identity::Identity;
use ringtun_hbone::pool::{Pool, PoolKey, PoolLimits, Pooled};
use ringtun_hbone::settings::H2Settings;

fn config_text(workloads: usize, services: usize) -> String {
    let mut y = String::from("workloads:\n");
    for w in 0..workloads {
        let svc = w % services;
        let ip = Ipv4Addr::from(0x0a40_0000u32 + w as u32);
        y.push_str(&format!(
            "- uid: c//v1/Pod/ns{ns}/w{w}\n  name: w{w}\n  namespace: ns{ns}\n  serviceAccount: sa{w}\n  \
             workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: n\n  network: \"\"\n  services:\n    \
             \"ns{ns}/s{svc}.ns{ns}.svc.cluster.local\":\n      80: 8080\n",
            ns = svc % 10
        ));
    }
    y.push_str("services:\n");
    for s in 0..services {
        let vip = Ipv4Addr::from(0x0a60_0000u32 + s as u32);
        y.push_str(&format!(
            "- name: s{s}\n  namespace: ns{ns}\n  hostname: s{s}.ns{ns}.svc.cluster.local\n  \
             vips: [\"/{vip}\"]\n  ports:\n    80: 8080\n",
            ns = s % 10
        ));
    }
    y.push_str("policies: []\n");
    y
}

fn config_lookup(c: &mut Criterion) {
    const WORKLOADS: usize = 2000;
    const SERVICES: usize = 500;
    let text = config_text(WORKLOADS, SERVICES);
    let loaded = config::parse(std::path::Path::new("bench.yaml"), &text).expect("bench config");
    let snap = Snapshot::new(loaded.config, 1);
    let mut g = c.benchmark_group("config_lookup");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u32;
    g.bench_function("vip_endpoint_workload", |b| {
        b.iter(|| {
            i = (i + 7) % SERVICES as u32;
            let vip = IpAddr::V4(Ipv4Addr::from(0x0a60_0000u32 + i));
            let svc = snap.service_by_vip(vip).expect("service");
            let eps = snap.endpoints(svc, 80);
            let (w, port) = eps.get(i as usize % eps.len()).expect("endpoint");
            let ip = w.workload_ips[0];
            black_box((snap.workload_by_ip(ip).map(|w| &w.name), port))
        })
    });
    g.bench_function("parse_and_index_2000_workloads", |b| {
        b.iter(|| {
            let loaded = config::parse(std::path::Path::new("bench.yaml"), &text).expect("parse");
            black_box(Snapshot::new(loaded.config, 2))
        })
    });
    g.finish();
}

/// ringtun's client and server TLS configs for two demo identities.
fn tls_pair() -> (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>) {
    let dir = std::env::temp_dir().join(format!("ringtun-micro-{}", std::process::id()));
    let ca = Ca::open_or_create(&dir.join("ca")).expect("demo CA");
    let load = |sa: &str| {
        let issued = ca
            .issue(&Identity::new("cluster.local", "default", sa))
            .expect("issue");
        TlsMaterial::load(
            &CertPaths {
                chain: issued.chain,
                key: issued.key,
                roots: issued.roots,
            },
            "cluster.local",
            ringtun_hbone::verify::CipherPreference::default(),
        )
        .expect("load certificates")
    };
    let (client, server) = (load("client"), load("server"));
    let _ = std::fs::remove_dir_all(&dir);
    (client.client, server.server)
}

/// Moves every pending TLS byte from one side to the other.
fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).expect("write_tls");
    }
    let mut rd = &wire[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("read_tls");
        to.process_new_packets().expect("records decrypt");
    }
}

fn tls_records(c: &mut Criterion) {
    const TOTAL: usize = 1 << 20;
    const WRITE: usize = 16 * 1024;
    let (ccfg, scfg) = tls_pair();
    let name = rustls::pki_types::ServerName::try_from("server").expect("name");
    let mut client: rustls::Connection = rustls::ClientConnection::new(ccfg, name)
        .expect("client")
        .into();
    let mut server: rustls::Connection =
        rustls::ServerConnection::new(scfg).expect("server").into();
    while client.is_handshaking() || server.is_handshaking() {
        pump(&mut client, &mut server);
        pump(&mut server, &mut client);
    }
    let data = vec![0x5au8; WRITE];
    let mut sink = vec![0u8; TOTAL];
    let mut g = c.benchmark_group("tls_records");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    g.bench_function("encrypt_decrypt_1MiB", |b| {
        b.iter(|| {
            let mut got = 0;
            for _ in 0..TOTAL / WRITE {
                client.writer().write_all(&data).expect("write plaintext");
                pump(&mut client, &mut server);
                loop {
                    match server.reader().read(&mut sink[got..]) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("read plaintext: {e}"),
                    }
                }
            }
            assert_eq!(got, TOTAL, "every byte decrypted");
        })
    });
    g.finish();
}

fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .expect("monoio runtime")
}

/// Sends `total` bytes in `chunk`-sized DATA on one HBONE-shaped stream; returns bytes received.
async fn h2_transfer(total: usize, chunk: usize) -> usize {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let settings = H2Settings::default();
    let server = monoio::spawn({
        let builder = settings.server_builder();
        async move {
            let mut conn = builder.handshake::<_, Bytes>(b).await.expect("h2 server");
            let (req, mut respond) = conn.accept().await.expect("a stream").expect("stream ok");
            let mut body = req.into_body();
            let rest = monoio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut reply = respond
                .send_response(http::Response::new(()), false)
                .expect("200");
            let mut got = 0;
            while let Some(data) = body.data().await {
                let data = data.expect("data");
                got += data.len();
                body.flow_control()
                    .release_capacity(data.len())
                    .expect("release");
            }
            // Ending our half after the last byte tells the client it may drop the stream
            // (dropping it earlier would reset the stream under unread data).
            reply.send_data(Bytes::new(), true).expect("end reply");
            rest.await;
            got
        }
    });
    let (mut client, conn) = settings
        .client_builder()
        .handshake::<_, Bytes>(a)
        .await
        .expect("h2 client");
    // Every task ends before the runtime is reused: the connection once both ends are done.
    let driver = monoio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("10.0.0.1:80")
        .body(())
        .expect("request");
    let (resp, mut send) = client.send_request(req, false).expect("CONNECT");
    let payload = Bytes::from(vec![0xa5u8; chunk]);
    let mut sent = 0;
    while sent < total {
        ringtun_hbone::stream::send_all(&mut send, payload.clone())
            .await
            .expect("send");
        sent += chunk;
    }
    send.send_data(Bytes::new(), true).expect("end stream");
    let mut reply = resp.await.expect("200").into_body();
    while let Some(d) = reply.data().await {
        d.expect("reply");
    }
    drop((send, client, reply));
    let got = server.await;
    driver.await;
    got
}

fn hbone_data(c: &mut Criterion) {
    const TOTAL: usize = 4 << 20;
    let rt = std::cell::RefCell::new(runtime());
    let mut g = c.benchmark_group("hbone_data");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    for chunk in [16 * 1024, 256 * 1024] {
        g.bench_with_input(BenchmarkId::new("4MiB", chunk), &chunk, |b, &chunk| {
            b.iter(|| {
                let got = rt.borrow_mut().block_on(h2_transfer(TOTAL, chunk));
                assert_eq!(got, TOTAL, "every DATA byte arrived");
            })
        });
    }
    g.finish();
}

fn copy_loop(c: &mut Criterion) {
    const TOTAL: usize = 8 << 20;
    let rt = std::cell::RefCell::new(runtime());
    let mut g = c.benchmark_group("copy_loop");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    g.bench_function("tcp_tcp_8MiB", |b| {
        b.iter_custom(|iters| {
            rt.borrow_mut().block_on(async move {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    took += copy_once(TOTAL).await;
                }
                took
            })
        })
    });
    g.finish();
}

/// client → [a_in … copy loop … b_out] → sink; the time from first write to last byte read.
async fn copy_once(total: usize) -> Duration {
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let front = monoio::net::TcpListener::bind(loopback).expect("bind");
    let back = monoio::net::TcpListener::bind(loopback).expect("bind");
    let (front_addr, back_addr) = (
        front.local_addr().expect("addr"),
        back.local_addr().expect("addr"),
    );
    let proxy = monoio::spawn(async move {
        let (a, _) = front.accept().await.expect("accept front");
        let b = monoio::net::TcpStream::connect(back_addr)
            .await
            .expect("connect back");
        ringtun::proxy::copy::tcp_tcp(a, b, ringtun::proxy::live::Conn::new(Duration::ZERO, None))
            .await
    });
    let sink = monoio::spawn(async move {
        let (mut s, _) = back.accept().await.expect("accept back");
        let mut got = 0;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let (res, b) = s.read(buf).await;
            buf = b;
            match res.expect("sink read") {
                0 => return got,
                n => got += n,
            }
        }
    });
    let t0 = Instant::now();
    let mut client = monoio::net::TcpStream::connect(front_addr)
        .await
        .expect("connect front");
    let mut chunk = vec![0x3cu8; 256 * 1024];
    let mut sent = 0;
    while sent < total {
        let (res, c) = client.write_all(chunk).await;
        chunk = c;
        sent += res.expect("client write");
    }
    drop(client);
    let got = sink.await;
    let took = t0.elapsed();
    assert_eq!(got, total, "every byte copied");
    let _ = proxy.await;
    took
}

/// Stands in for an h2 connection: the pool only asks whether it is usable.
struct Conn;

impl Pooled for Conn {
    fn is_usable(&self) -> bool {
        true
    }
}

fn pool(c: &mut Criterion) {
    let mut pool: Pool<Conn> = Pool::new(PoolLimits {
        max_streams: 100,
        idle_timeout: Duration::from_secs(60),
    });
    let keys: Vec<PoolKey> = (0..64u8)
        .map(|i| {
            PoolKey::new(
                Identity::new("cluster.local", "default", "client"),
                vec![Identity::new("cluster.local", "ns", &format!("sa{i}"))],
                SocketAddr::from(([10, 0, 0, i], 15008)),
                IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)),
            )
        })
        .collect();
    for k in &keys {
        pool.insert(k.clone(), Conn);
    }
    let mut g = c.benchmark_group("pool");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("checkout_release", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let key = &keys[i];
            let id = pool.checkout(key).map(|(id, _)| id).expect("pooled");
            pool.release(key, id, std::time::Instant::now());
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    config_lookup,
    tls_records,
    hbone_data,
    copy_loop,
    pool
);
criterion_main!(benches);
