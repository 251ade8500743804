//! In-pod mode at a node's scale: 100 pods on one ringtun (PROXY_MODE=shared, 2 shards), each a
//! network namespace made here and handed over by the fake node agent
//! (`tests/peers/node_agent.py`). What a pod costs is bounded: the sockets ringtun holds for it
//! are its listeners times the shards (counted from `/proc/PID/fd`) and its DNS proxy's four
//! (on the DNS thread, not per shard), plus the pod's netns fd;
//! removing the pods gives every one of them back.
//!
//! It also prints what a measurement needs (docs/measurements/inpod-pods.md): the agent's
//! add → ack times and ringtun's RSS at 0, 100 and 0 pods again. Nothing timed is asserted.

mod common;
mod inpod_common;

use std::time::{Duration, Instant};

use common::*;
use inpod_common::node::*;
use inpod_common::*;
use ringtun_testbed::Netns;

const PODS: usize = 100;
/// `spawn_shared_with` runs two shards.
const SHARDS: usize = 2;
/// 15001, 15006, 15008.
const LISTENERS: usize = 3;
/// The DNS proxy in each pod (ztunnel's 15053): UDP and TCP on 127.0.0.1 and ::1, once.
const DNS_SOCKETS: usize = 4;

/// What ringtun holds open, by kind of fd; the other fds' link targets are kept so that a
/// failure says which one differs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fds {
    sockets: usize,
    netns: usize,
    other: usize,
    others: Vec<String>,
}

impl Fds {
    fn counts(&self) -> (usize, usize, usize) {
        (self.sockets, self.netns, self.other)
    }
}

fn fds_of(pid: u32) -> Fds {
    let dir = format!("/proc/{pid}/fd");
    let mut fds = Fds {
        sockets: 0,
        netns: 0,
        other: 0,
        others: Vec::new(),
    };
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
    for entry in entries.flatten() {
        // An fd closed between the listing and the readlink is simply not counted.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if t.starts_with("socket:") {
            fds.sockets += 1;
        } else if t.starts_with("net:") || t.starts_with("/run/netns/") {
            // A netns fd reads as the path it was opened by (the agent's /run/netns/NAME).
            fds.netns += 1;
        } else {
            fds.other += 1;
            fds.others.push(t.into_owned());
        }
    }
    fds.others.sort();
    fds
}

/// ringtun's fds once they stop moving: the same counts on three reads 100 ms apart. A shard
/// thread makes its runtime's fd (epoll or io_uring) as it starts, and may do so after ringtun
/// already speaks to the agent; a snapshot taken in between counts one fd too few.
fn settled_fds(pid: u32) -> Fds {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = fds_of(pid);
    let mut same = 1;
    while same < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = fds_of(pid);
        same = if now.counts() == last.counts() {
            same + 1
        } else {
            1
        };
        last = now;
    }
    last
}

/// Resident memory of `pid` in KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Waits until ringtun's fds are `want`; fails with what it holds.
fn wait_fds(pid: u32, want: &Fds, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = fds_of(pid);
        if now.counts() == want.counts() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: holds {now:?}, expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[test]
fn a_hundred_pods_cost_listeners_times_shards_and_give_every_fd_back() {
    // io_uring where the kernel has it (this machine does), else the epoll driver.
    hundred_pods("auto");
}

/// The same on the epoll driver, whose shards are woken for each pod the same way.
#[test]
fn a_hundred_pods_on_the_legacy_driver_give_every_fd_back() {
    hundred_pods("legacy");
}

/// Adds 100 pods to one ringtun running `driver` (`--io-driver`), checks what it holds for
/// them, removes them and checks that it holds what it held before.
fn hundred_pods(driver: &str) {
    let dir = TempDir::new(&format!("inpod-scale-{driver}"));
    let node = netns("isn");
    let pods: Vec<Netns> = (0..PODS).map(|_| netns("isp")).collect();
    let config = dir.join("config.yaml");
    std::fs::write(&config, mesh_config(&["/10.96.0.10"], false)).expect("write config");
    let ca = NodeCa::generate(&dir.join("ca"));
    let mut agent = NodeAgent::start(&dir.join("zds.sock"), dir.path());
    // A short removal deadline: a removed pod's sockets go once its connections (none) are cut.
    let env = [("CONNECTION_TERMINATION_DEADLINE", "1s")];
    let args = ["--io-driver", driver];
    let mut ringtun = spawn_shared_with(
        &node,
        "scale",
        dir.path(),
        &config,
        &agent.socket,
        &ca,
        &env,
        &args,
    );
    assert_eq!(agent.accept(), 1, "ringtun announces ZDS V1");
    let pid = ringtun.pid();
    // Once connected to the agent, ringtun holds everything it needs but the pods': a scrape
    // goes through every shard, so their runtimes are up, and the fds have settled.
    Scrape::take(&node, false);
    let before = settled_fds(pid);
    // Round 1 issues each pod's certificate (a service account per pod); round 2 adds the
    // same pods again, their identities' certificates already cached.
    for round in 1..=2 {
        let rss_before = rss_kib(pid);
        let started = Instant::now();
        let mut acks = Vec::with_capacity(PODS);
        for (i, pod) in pods.iter().enumerate() {
            let who = format!("app-{i}");
            let e = agent.cmd(&add_pod(&format!("uid-{i}"), pod, &who));
            assert_eq!(NodeAgent::ack_error(&e, "add"), "", "pod {i}: {e}");
            acks.push(e["ms"].as_f64().expect("the agent times each ack"));
        }
        let took = started.elapsed();
        if round == 1 {
            assert_eq!(agent.ack("snapshot"), "");
            wait_ready(&mut ringtun, &node);
        }

        let loaded = settled_fds(pid);
        assert_eq!(
            loaded.sockets - before.sockets,
            PODS * (LISTENERS * SHARDS + DNS_SOCKETS),
            "round {round}: sockets per pod are its listeners times the shards \
             ({before:?} → {loaded:?})"
        );
        assert_eq!(
            loaded.netns - before.netns,
            PODS,
            "round {round}: one netns fd per pod ({before:?} → {loaded:?})"
        );
        assert_eq!(
            loaded.other, before.other,
            "round {round}: nothing else per pod (before: {:?}, loaded: {:?})",
            before.others, loaded.others
        );
        for pod in [&pods[0], &pods[PODS / 2], &pods[PODS - 1]] {
            assert_eq!(
                listening_ports(pod),
                vec![15001, 15006, 15008, 15053],
                "{}",
                pod.name()
            );
        }
        let rss_loaded = rss_kib(pid);

        for i in 0..PODS {
            assert_eq!(agent.ack(&format!("del uid-{i}")), "", "del {i}");
        }
        wait_fds(pid, &before, &format!("round {round}: every pod removed"));
        for pod in [&pods[0], &pods[PODS - 1]] {
            assert_eq!(listening_ports(pod), Vec::<u16>::new(), "{}", pod.name());
        }
        let rss_after = rss_kib(pid);

        acks.sort_by(f64::total_cmp);
        let sum: f64 = acks.iter().sum();
        println!(
            "inpod-scale: driver={driver} round={round} pods={PODS} shards={SHARDS} \
             sockets_per_pod={} add_ack_ms median={:.2} p90={:.2} max={:.2} mean={:.2} \
             all_adds_s={:.2} rss_kib 0={rss_before} {PODS}={rss_loaded} \
             back_to_0={rss_after} per_pod_kib={:.1}",
            (loaded.sockets - before.sockets) / PODS,
            percentile(&acks, 0.5),
            percentile(&acks, 0.9),
            percentile(&acks, 1.0),
            sum / PODS as f64,
            took.as_secs_f64(),
            (rss_loaded as f64 - rss_before as f64) / PODS as f64,
        );
    }
    ringtun.stop(Duration::from_secs(5));
}
