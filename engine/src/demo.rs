//! `ringtun demo`: a working tunnel on this machine with nothing else installed.
//!
//! Two network namespaces stand for two nodes, joined by a veth pair. Each runs a ringtun (this
//! same binary, `ringtun run`) with certificates from a fresh demo CA and the built-in config
//! (the ztunnel local config in `engine/demo/config.yaml`). nftables in the client namespace
//! sends outbound TCP to 15001, as istio-cni would. An echo server listens in the server
//! namespace; a client in the client namespace sends data to the service VIP and checks that
//! what comes back is what it sent.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ringtun_hbone::Identity;
use ringtun_topology::{Netns, TwoNodes};
use sha2::{Digest, Sha256};

use crate::{pki, EngineError};

/// The demo's ztunnel-format config: client 10.77.0.1, server 10.77.0.2, VIP 10.96.0.10:80→5201.
pub const DEMO_CONFIG: &str = include_str!("../demo/config.yaml");

/// Options of `ringtun demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Run one checked transfer and exit instead of keeping the tunnel up.
    #[arg(long)]
    pub once: bool,
    /// Bytes the demo client sends (and expects echoed).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub bytes: usize,
    /// Where to put certificates, config and logs (default: a new directory under /tmp).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

fn demo_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Demo(e.to_string())
}

struct Proxy {
    child: Child,
    log: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(ns: &Netns, dir: &Path, who: &str) -> Result<Proxy, EngineError> {
    let exe = std::env::current_exe().map_err(demo_err)?;
    let log = dir.join(format!("ringtun-{who}.log"));
    let file = std::fs::File::create(&log).map_err(demo_err)?;
    let child = ns
        .exec(&exe)
        .args(["run", "--config"])
        .arg(dir.join("config.yaml"))
        .arg("--cert-chain")
        .arg(dir.join(format!("default.{who}.pem")))
        .arg("--key")
        .arg(dir.join(format!("default.{who}.key")))
        .arg("--roots")
        .arg(dir.join("ca.pem"))
        .args(["--workload", &format!("default/{who}"), "--workers", "1"])
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .map_err(demo_err)?;
    let proxy = Proxy { child, log };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(&proxy.log).unwrap_or_default();
        if text.contains("ringtun ready") {
            return Ok(proxy);
        }
        if Instant::now() > deadline || text.contains("ringtun: ") {
            return Err(demo_err(format!(
                "ringtun ({who}) did not start; its log:\n{text}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn echo_server(ns: &Netns) -> Result<SocketAddr, EngineError> {
    let listener = ns
        .enter(|| TcpListener::bind("0.0.0.0:5201"))
        .map_err(demo_err)?
        .map_err(demo_err)?;
    let addr = listener.local_addr().map_err(demo_err)?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut rd = conn;
                let Ok(mut wr) = rd.try_clone() else { return };
                let _ = std::io::copy(&mut rd, &mut wr);
                let _ = wr.shutdown(Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

/// Sends `n` pseudo-random bytes to `dst` from inside `ns` and returns (sent, received) hashes.
fn transfer(ns: &Netns, dst: &str, n: usize) -> Result<(String, String, Duration), EngineError> {
    let dst = dst.to_owned();
    ns.enter(move || -> std::io::Result<(String, String, Duration)> {
        let start = Instant::now();
        let mut s = TcpStream::connect(&dst)?;
        let mut r = s.try_clone()?;
        let reader = std::thread::spawn(move || {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => return Ok(hex::encode(h.finalize())),
                    Ok(k) => h.update(&buf[..k]),
                    Err(e) => return Err(e),
                }
            }
        });
        let mut h = Sha256::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut left = n;
        while left > 0 {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let k = left.min(chunk.len());
            s.write_all(&chunk[..k])?;
            h.update(&chunk[..k]);
            left -= k;
        }
        s.shutdown(Shutdown::Write)?;
        let got = reader
            .join()
            .map_err(|_| std::io::Error::other("reader panicked"))??;
        Ok((hex::encode(h.finalize()), got, start.elapsed()))
    })
    .map_err(demo_err)?
    .map_err(demo_err)
}

fn access_lines(log: &Path) -> Vec<String> {
    std::fs::File::open(log)
        .map(|f| {
            BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .filter(|l| l.contains("access"))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for_signal() {
    // SAFETY: plain signal-mask calls on a local set; SIGINT/SIGTERM are then taken by sigwait
    // so the namespaces are torn down instead of leaking when the user presses Ctrl-C.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<(), EngineError> {
    ringtun_topology::require_root().map_err(demo_err)?;
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("ringtun-demo-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).map_err(demo_err)?;
    std::fs::write(dir.join("config.yaml"), DEMO_CONFIG).map_err(demo_err)?;
    let ca = pki::Ca::open_or_create(&dir)?;
    for sa in ["client", "server"] {
        ca.issue(&Identity::new("cluster.local", "default", sa))?;
    }
    let nodes = TwoNodes::new("rtd").map_err(demo_err)?;
    nodes
        .client
        .capture_outbound(15001, 0x539)
        .map_err(demo_err)?;
    let server = start_proxy(&nodes.server, &dir, "server")?;
    let client = start_proxy(&nodes.client, &dir, "client")?;
    let echo = echo_server(&nodes.server)?;
    println!(
        "ringtun demo: namespaces {} (client, 10.77.0.1) and {} (server, 10.77.0.2)",
        nodes.client.name(),
        nodes.server.name()
    );
    println!("  echo server on {echo} in the server namespace; service VIP 10.96.0.10:80 -> 5201");
    let (sent, got, took) = transfer(&nodes.client, "10.96.0.10:80", args.bytes)?;
    let ok = sent == got;
    let mib = args.bytes as f64 / (1024.0 * 1024.0);
    println!(
        "  sent {mib:.1} MiB through outbound capture -> HBONE (mTLS, HTTP/2 CONNECT) -> inbound -> echo and back in {:.2} s",
        took.as_secs_f64()
    );
    println!(
        "  sha256 sent     {sent}\n  sha256 received {got}  {}",
        if ok { "MATCH" } else { "MISMATCH" }
    );
    for (who, p) in [("client", &client), ("server", &server)] {
        for line in access_lines(&p.log) {
            println!("  [{who}] {}", line.trim());
        }
    }
    if !ok {
        return Err(demo_err("echoed bytes differ from what was sent"));
    }
    if args.once {
        return Ok(());
    }
    println!(
        "\nThe tunnel is up. Try it from the client namespace, e.g.\n  ip netns exec {} python3 -c \"import socket; s=socket.create_connection(('10.96.0.10', 80)); s.sendall(b'hello'); print(s.recv(5))\"\nLogs: {}\nPress Ctrl-C to stop and remove the namespaces.",
        nodes.client.name(),
        dir.display()
    );
    wait_for_signal();
    println!("ringtun demo: stopping");
    drop(client);
    drop(server);
    drop(nodes);
    Ok(())
}
