//! xds_apply: what applying istiod's updates costs the control thread, at 1k / 10k / 50k
//! workloads (and a tenth as many services).
//!
//! For each size it feeds an xDS session the whole mesh in one response (the first push), then
//! one-workload changes (a workload moves to another address), and times each from the decoded
//! response to the new snapshot the shards would get; the heap the session and snapshot hold is
//! counted by a wrapping allocator. Run it in release:
//!
//! ```text
//! cargo run --release -p ringtun-benches --bin xds_apply            # 1000 10000 50000
//! cargo run --release -p ringtun-benches --bin xds_apply -- 200000  # other sizes
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use ringtun::config::{LocalConfig, Snapshot};
use ringtun::xds::proto::{
    Address, AddressType, Any, DeltaDiscoveryResponse, Port, PortList, Resource, XdsNetworkAddress,
    XdsService, XdsWorkload,
};
use ringtun::xds::session::{Session, ADDRESS_TYPE, AUTHORIZATION_TYPE};

/// The system allocator, counting the bytes currently held.
struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HELD.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HELD.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        HELD.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn held() -> isize {
    HELD.load(Ordering::Relaxed)
}

/// How many one-workload deltas are timed per size (the median is reported).
const DELTAS: usize = 41;

fn service_host(s: usize) -> (String, String) {
    let ns = format!("ns-{}", s % 50);
    let host = format!("svc-{s}.{ns}.svc.cluster.local");
    (ns, host)
}

fn workload(i: usize, services: usize, generation: usize) -> Resource {
    let s = i % services;
    let (sns, host) = service_host(s);
    let ns = format!("ns-{}", i % 50);
    let uid = format!("Kubernetes//Pod/{ns}/w-{i}");
    // A later generation moves the workload to another address, as a rescheduled pod does.
    let ip = (10u32 << 24) + (generation as u32) * 65536 * 8 + i as u32 + 1;
    let w = XdsWorkload {
        uid: uid.clone(),
        name: format!("w-{i}"),
        namespace: ns.clone(),
        addresses: vec![ip.to_be_bytes().to_vec()],
        tunnel_protocol: 1,
        service_account: format!("sa-{s}"),
        node: format!("node-{}", i % 100),
        canonical_name: format!("svc-{s}"),
        canonical_revision: "v1".into(),
        workload_name: format!("svc-{s}"),
        cluster_id: "Kubernetes".into(),
        trust_domain: "cluster.local".into(),
        services: [(
            format!("{sns}/{host}"),
            PortList {
                ports: vec![Port {
                    service_port: 80,
                    target_port: 8080,
                }],
            },
        )]
        .into(),
        ..Default::default()
    };
    resource(uid, generation, AddressType::Workload(w))
}

fn service(s: usize) -> Resource {
    let (ns, host) = service_host(s);
    let vip = (100u32 << 24) + s as u32 + 1;
    let svc = XdsService {
        name: format!("svc-{s}"),
        namespace: ns.clone(),
        hostname: host.clone(),
        addresses: vec![XdsNetworkAddress {
            network: String::new(),
            address: vip.to_be_bytes().to_vec(),
        }],
        ports: vec![Port {
            service_port: 80,
            target_port: 8080,
        }],
        ..Default::default()
    };
    resource(format!("{ns}/{host}"), 0, AddressType::Service(svc))
}

fn resource(name: String, generation: usize, a: AddressType) -> Resource {
    Resource {
        name,
        version: format!("v{generation}"),
        resource: Some(Any {
            type_url: ADDRESS_TYPE.into(),
            value: Address { r#type: Some(a) }.encode_to_vec(),
        }),
        ..Default::default()
    }
}

fn response(type_url: &str, nonce: usize, resources: Vec<Resource>) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.to_string(),
        resources,
        ..Default::default()
    }
}

/// The control side of one response: the session applies it (decode, convert), and the
/// snapshot the shards get follows from the one in force; the time of each.
fn apply(
    session: &mut Session,
    current: &Snapshot,
    resp: DeltaDiscoveryResponse,
    generation: u64,
) -> (Snapshot, Duration, Duration) {
    let t = Instant::now();
    let handled = session.handle(resp);
    assert!(handled.nack().is_none(), "{:?}", handled.nack());
    let converted = t.elapsed();
    let t = Instant::now();
    let next = current.apply(handled.delta, generation);
    (next, converted, t.elapsed())
}

struct Figures {
    workloads: usize,
    services: usize,
    full_session: Duration,
    full_index: Duration,
    delta_median: Duration,
    delta_max: Duration,
    held_per_workload: f64,
    lookup: Duration,
    flat_lookup: Duration,
}

/// CPU time of this thread (the machine may be shared: wall time would count waiting).
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

const ROUNDS: usize = 1_000_000;

fn vip_of(i: usize, services: usize) -> IpAddr {
    IpAddr::from(((100u32 << 24) + ((i * 7919) % services) as u32 + 1).to_be_bytes())
}

/// What a new outbound connection to a VIP costs in lookups: the service, an endpoint, and
/// the workload by the endpoint's IP (as `decide::route` and the inbound side do); CPU time.
fn lookup_time(snap: &Snapshot, services: usize) -> Duration {
    let t = cpu_now();
    let mut found = 0usize;
    for i in 0..ROUNDS {
        let Some(svc) = snap.service_by_vip(vip_of(i, services)) else {
            continue;
        };
        let eps = snap.endpoints(svc, 80);
        if let Some((w, _)) = eps.get(i % eps.len().max(1)) {
            found += usize::from(snap.workload_by_ip(w.workload_ips[0]).is_some());
        }
    }
    let took = cpu_now() - t;
    assert_eq!(found, ROUNDS, "every VIP has endpoints");
    took / ROUNDS as u32
}

/// The same lookups over flat tables of positions into vectors (the first cut's layout), as
/// the reference for [`lookup_time`] under the same conditions.
fn flat_lookup_time(config: &LocalConfig, services: usize) -> Duration {
    let by_vip: HashMap<IpAddr, usize> = config
        .services
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.vips.iter().map(move |v| (v.address, i)))
        .collect();
    let by_ip: HashMap<IpAddr, usize> = config
        .workloads
        .iter()
        .enumerate()
        .flat_map(|(i, w)| w.workload_ips.iter().map(move |ip| (*ip, i)))
        .collect();
    let index: HashMap<String, usize> = config
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| (s.key(), i))
        .collect();
    let mut endpoints: Vec<HashMap<u16, Vec<(usize, u16)>>> =
        vec![HashMap::new(); config.services.len()];
    for (wi, w) in config.workloads.iter().enumerate() {
        for (key, ports) in &w.services {
            if let Some(&si) = index.get(key) {
                for (&p, &t) in ports {
                    endpoints[si].entry(p).or_default().push((wi, t));
                }
            }
        }
    }
    let t = cpu_now();
    let mut found = 0usize;
    for i in 0..ROUNDS {
        let Some(&si) = by_vip.get(&vip_of(i, services)) else {
            continue;
        };
        let eps = endpoints[si].get(&80).map_or(&[][..], |v| &v[..]);
        if let Some(&(wi, _)) = eps.get(i % eps.len().max(1)) {
            let ip = config.workloads[wi].workload_ips[0];
            found += usize::from(by_ip.get(&ip).is_some_and(|&j| j < config.workloads.len()));
        }
    }
    let took = cpu_now() - t;
    assert_eq!(found, ROUNDS, "every VIP has endpoints");
    took / ROUNDS as u32
}

fn measure(n: usize) -> Figures {
    let services = (n / 10).max(1);
    let mut resources: Vec<Resource> = (0..services).map(service).collect();
    resources.extend((0..n).map(|i| workload(i, services, 0)));
    let first = response(ADDRESS_TYPE, 1, resources);

    let before = held();
    let mut session = Session::new(Default::default());
    session.handle(response(AUTHORIZATION_TYPE, 0, Vec::new()));
    let empty = Snapshot::new(Default::default(), 1);
    let (mut snap, full_session, full_index) = apply(&mut session, &empty, first, 2);
    let held_bytes = held() - before;

    let mut times = Vec::with_capacity(DELTAS);
    for d in 0..DELTAS {
        let i = (d * 7919) % n;
        let resp = response(ADDRESS_TYPE, d + 2, vec![workload(i, services, d + 1)]);
        let (next, converted, indexed) = apply(&mut session, &snap, resp, d as u64 + 3);
        times.push(converted + indexed);
        snap = next;
    }
    assert!(snap.generation > 2);
    let lookup = lookup_time(&snap, services);
    let flat_lookup = flat_lookup_time(&session.config(), services);
    times.sort();
    drop(snap);
    drop(session);
    Figures {
        workloads: n,
        services,
        full_session,
        full_index,
        delta_median: times[times.len() / 2],
        delta_max: times[times.len() - 1],
        held_per_workload: held_bytes as f64 / n as f64,
        lookup,
        flat_lookup,
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000, 50_000]
    } else {
        sizes
    };
    println!(
        "| workloads | services | first push: decode + convert / index | one-workload delta (median / max of {DELTAS}) | heap per workload | VIP → endpoint → workload lookup, CPU (flat tables) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for n in sizes {
        let f = measure(n);
        println!(
            "| {} | {} | {:.1} ms / {:.1} ms | {:.3} ms / {:.3} ms | {:.0} B | {} ns ({} ns) |",
            f.workloads,
            f.services,
            f.full_session.as_secs_f64() * 1e3,
            f.full_index.as_secs_f64() * 1e3,
            f.delta_median.as_secs_f64() * 1e3,
            f.delta_max.as_secs_f64() * 1e3,
            f.held_per_workload,
            f.lookup.as_nanos(),
            f.flat_lookup.as_nanos()
        );
    }
}
