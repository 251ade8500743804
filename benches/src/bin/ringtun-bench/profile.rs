//! `--profile`: where each tunnel's CPU went during a measurement, taken in the same run as
//! the figures, so that a ratio can be read as "which part differs".
//!
//! `perf record` samples both tunnel processes (kernel call chains included) while the load
//! runs. A sample belongs to one category, decided by the function it landed in. Kernel
//! samples that landed in a function saying nothing about the work (a lock released with
//! interrupts re-enabled, the softirq loop, the allocator) are decided by the first caller that
//! does: on a VM without a PMU, perf's timer cannot interrupt code that runs with interrupts
//! masked, and the time spent there is charged to the point where they are enabled again. The
//! bench multiplies the pair's CPU per unit by each category's share of the samples.
//!
//! A binary without symbols (ztunnel's release build) has all of its userspace in
//! "user: rest"; only its calls into libc's `memcpy` are told apart.

use std::path::{Path, PathBuf};

use crate::perf::{self, PerfRecord};

/// What a sample's CPU was spent on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    UserCrypto,
    UserCopy,
    UserRest,
    KernelCopy,
    KernelNet,
    KernelSched,
    KernelIo,
    KernelRest,
}

/// The categories' names, in the order of [`Shares::samples`] (a `Category` is its index).
pub const CATEGORIES: [&str; 8] = [
    "user: crypto",
    "user: memory copies",
    "user: rest",
    "kernel: copies to and from user",
    "kernel: network stack",
    "kernel: scheduler and wake-ups",
    "kernel: syscalls, io_uring, epoll",
    "kernel: rest",
];

use Category::*;

/// Samples per second per CPU: enough for a one-second measurement to have thousands.
const FREQ: &str = "999";

/// Checks that perf is there and makes the recordings' directory under `work`.
pub fn prepare(work: &Path) -> Result<PathBuf, String> {
    perf::check("--profile")?;
    let dir = work.join("profile");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// A `perf record` attached to one measurement's tunnel processes.
pub struct Recording {
    perf: PerfRecord,
    file: PathBuf,
    client: Vec<u32>,
    server: Vec<u32>,
}

impl Recording {
    /// Starts sampling the client side's and the server side's processes into `file`; returns
    /// once perf has attached.
    pub fn start(file: PathBuf, client: Vec<u32>, server: Vec<u32>) -> Result<Recording, String> {
        let list = client
            .iter()
            .chain(&server)
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let perf = PerfRecord::start(&["-g", "-F", FREQ, "-p", &list], file.clone())
            .map_err(|e| format!("--profile: {e}"))?;
        Ok(Recording {
            perf,
            file,
            client,
            server,
        })
    }

    /// Stops sampling and sorts the samples; an error if perf failed or saw nothing of a side.
    pub fn finish(self) -> Result<Profile, String> {
        let text = self.perf.finish("pid,ip,sym,dso")?;
        let profile = Profile::from_script(&text, &self.client, &self.server);
        // Every profiled measurement runs through both sides: a side without samples would
        // drop out of the split, and the pair's rows would no longer add up to its CPU.
        for (side, shares) in [("client", &profile.client), ("server", &profile.server)] {
            if shares.total() == 0 {
                return Err(format!(
                    "{}: no samples of the {side} side",
                    self.file.display()
                ));
            }
        }
        Ok(profile)
    }
}

/// Where one measurement's CPU went, each side's samples apart.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Profile {
    /// The client side's processes.
    pub client: Shares,
    /// The server side's processes.
    pub server: Shares,
}

impl Profile {
    /// Sorts the samples of `perf script -F pid,ip,sym,dso` output by side (the sample's pid
    /// among `client`'s or `server`'s; any other pid is left out) and category. A sample is a
    /// header line (the pid, right-aligned), then its call chain, one tab-indented frame per
    /// line with the leaf first, then a blank line. A sample without a chain has its one frame
    /// on the header.
    pub fn from_script(text: &str, client: &[u32], server: &[u32]) -> Profile {
        // [client, server]; `side` indexes it for the sample being read.
        let mut sides = [Shares::default(); 2];
        let mut side: Option<usize> = None;
        let mut chain: Vec<Frame<'_>> = Vec::new();
        let mut flush = |side: Option<usize>, chain: &mut Vec<Frame<'_>>| {
            if let (Some(i), false) = (side, chain.is_empty()) {
                sides[i].samples[category(chain) as usize] += 1;
            }
            chain.clear();
        };
        for line in text.lines() {
            if line.starts_with('\t') {
                chain.extend(Frame::parse(line));
                continue;
            }
            // A blank line or the next sample's header ends a sample.
            flush(side.take(), &mut chain);
            let header = line.trim();
            let (pid, inline) = header.split_once(' ').unwrap_or((header, ""));
            side = match pid.parse::<u32>() {
                Ok(pid) if client.contains(&pid) => Some(0),
                Ok(pid) if server.contains(&pid) => Some(1),
                _ => None,
            };
            if side.is_some() {
                chain.extend(Frame::parse(inline));
            }
        }
        flush(side, &mut chain);
        let [client, server] = sides;
        Profile { client, server }
    }
}

/// Sample counts per category (see [`CATEGORIES`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Shares {
    /// Samples in each category.
    pub samples: [u64; CATEGORIES.len()],
}

impl Shares {
    /// All samples.
    pub fn total(&self) -> u64 {
        self.samples.iter().sum()
    }

    /// Each category's share of all samples (all zero when there were none).
    pub fn fractions(&self) -> [f64; CATEGORIES.len()] {
        let total = self.total();
        let mut f = [0.0; CATEGORIES.len()];
        if total > 0 {
            for (f, &n) in f.iter_mut().zip(&self.samples) {
                *f = n as f64 / total as f64;
            }
        }
        f
    }
}

/// One call-chain line: `<ip hex> <symbol> (<dso>)`.
struct Frame<'a> {
    kernel: bool,
    sym: &'a str,
}

impl<'a> Frame<'a> {
    fn parse(line: &'a str) -> Option<Frame<'a>> {
        let (ip, rest) = line.trim().split_once(' ')?;
        let ip = u64::from_str_radix(ip, 16).ok()?;
        // The symbol may itself hold " (": the dso is the last parenthesised part.
        let sym = rest.rsplit_once(" (").map_or(rest, |(s, _)| s);
        Some(Frame {
            kernel: ip >= 0xffff_8000_0000_0000,
            sym,
        })
    }
}

fn category(chain: &[Frame<'_>]) -> Category {
    let leaf = &chain[0];
    if !leaf.kernel {
        let s = leaf.sym.to_ascii_lowercase();
        // Ciphers and hashes, and the handshake's public-key work (aws-lc's P-256, X25519 and
        // bignum routines), which would otherwise land in "rest".
        return if [
            "aes",
            "gcm",
            "ghash",
            "chacha",
            "poly1305",
            "sha256",
            "sha512",
            "nistz256",
            "x25519",
            "curve25519",
            "p256",
            "bignum",
            "ecdsa",
            "mod_inverse",
            "mlkem",
        ]
        .iter()
        .any(|k| s.contains(k))
        {
            UserCrypto
        } else if ["memcpy", "memmove"].iter().any(|k| s.contains(k)) {
            UserCopy
        } else {
            UserRest
        };
    }
    if is_copy(leaf.sym) {
        return KernelCopy;
    }
    chain
        .iter()
        .take_while(|f| f.kernel)
        .find_map(|f| kernel_work(f.sym))
        .unwrap_or(KernelRest)
}

/// Copies between the kernel and a process's memory (not the kernel's copies within itself,
/// which go by what they are part of).
fn is_copy(sym: &str) -> bool {
    [
        "copy_user",
        "copy_to_iter",
        "copy_from_iter",
        "copy_to_user",
        "copy_from_user",
        "rep_movs_alternative",
        "csum_and_copy",
    ]
    .iter()
    .any(|k| sym.contains(k))
}

/// What a kernel function says about the work it is part of, if anything. Prefixes where a
/// word would also match elsewhere (`tcp_schedule_loss_probe` is TCP's).
fn kernel_work(sym: &str) -> Option<Category> {
    const SCHED: [&str; 13] = [
        "io_schedule",
        "schedule",
        "__schedule",
        "finish_task_switch",
        "pick_next",
        "enqueue_task",
        "dequeue_task",
        "try_to_wake_up",
        "ttwu",
        "sched_",
        "select_task_rq",
        "update_curr",
        "__wake_up",
    ];
    const IO: [&str; 5] = ["io_", "__io_", "ep_", "__ep_", "do_epoll"];
    const NET: [&str; 18] = [
        "tcp",
        "ip_",
        "ipv4",
        "ipv6",
        "inet",
        "sock",
        "skb",
        "veth",
        "netif",
        "napi",
        "net_rx",
        "dev_queue",
        "__dev_",
        "nf_",
        "nft_",
        "conntrack",
        "neigh",
        "raw_local_deliver",
    ];
    if SCHED.iter().any(|k| sym.starts_with(k)) {
        Some(KernelSched)
    } else if IO.iter().any(|k| sym.starts_with(k)) {
        Some(KernelIo)
    } else if NET.iter().any(|k| sym.contains(k)) {
        Some(KernelNet)
    } else if sym.contains("syscall") || sym.contains("entry_SYSCALL") {
        // The entry and exit of any syscall, reached only when nothing below said more.
        Some(KernelIo)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as `perf script -F pid,ip,sym,dso` prints them for a recording with `-g` (the
    /// last three samples without the blank line between them, one without a chain).
    const SCRIPT: &str = "\
   1234 
\tffffffff81a0b0c1 _raw_spin_unlock_irqrestore ([kernel.kallsyms])
\tffffffff8112aa10 try_to_wake_up ([kernel.kallsyms])
\tffffffff81cc0101 tcp_data_queue ([kernel.kallsyms])
\tffffffff8223c951 do_syscall_64 ([kernel.kallsyms])
\t           f82ad sendmsg (/usr/lib/x86_64-linux-gnu/libc.so.6)

   1234 
\tffffffff81d73cd7 _copy_to_iter ([kernel.kallsyms])
\tffffffff81cc0202 tcp_recvmsg ([kernel.kallsyms])

   1234 
\tffffffff81a0b0c1 handle_softirqs ([kernel.kallsyms])
\tffffffff81cc0303 __dev_queue_xmit ([kernel.kallsyms])

   1234 
\tffffffff81a0b0c1 kmem_cache_alloc_noprof ([kernel.kallsyms])
\tffffffff81cc0404 io_issue_sqe ([kernel.kallsyms])

   1234 
\tffffffff81a0b0c1 read_tsc ([kernel.kallsyms])

   1235 
\t    5599aa001122 aws_lc_0_47_0_aes_gcm_encrypt_avx512 (/bin/ringtun)

   1235 
\t    7f00aa001122 __memmove_avx512_unaligned_erms (/usr/lib/x86_64-linux-gnu/libc.so.6)

   1235 
\t    5599aa003344 <h2::proto::streams::Streams<B, P> as core::ops::Drop>::drop (/bin/ringtun)
\t    5599aa003355 [unknown] (/bin/ringtun)

   1235 
\t    5599aa003366 [unknown] (/bin/ztunnel)

   1236 ffffffff81d73cd8 _copy_from_iter ([kernel.kallsyms])
   1234 
\tffffffff81d70000 memcpy_orig ([kernel.kallsyms])
\tffffffff81cc0505 tcp_sendmsg_locked ([kernel.kallsyms])
   1235 
\t    7f00aa001133 __memset_avx512_unaligned_erms (/usr/lib/x86_64-linux-gnu/libc.so.6)

   1235 
\t    5599aa004411 Lcurve25519_x25519_scalarloop (/bin/ringtun)

   1235 
\t    5599aa004422 __ecp_nistz256_mul_montx (/bin/ringtun)
";

    #[test]
    fn samples_land_in_the_category_of_their_work_and_side() {
        let script = format!("{SCRIPT}\n    999 \n\t    5599aa001122 aes_gcm_other (/bin/other)\n");
        let p = Profile::from_script(&script, &[1234], &[1235, 1236]);
        assert_eq!(
            p.client.samples,
            [
                0, 0, 0, 1, // _copy_to_iter
                2, // softirq under __dev_queue_xmit, the kernel's memcpy under TCP
                1, // irqrestore under try_to_wake_up
                1, // allocation under io_issue_sqe
                1, // read_tsc
            ]
        );
        assert_eq!(
            p.server.samples,
            [
                3, // aes, and a handshake's X25519 and P-256
                1, // memmove
                3, // h2's drop, a stripped binary, memset
                1, // _copy_from_iter on a sample without a chain
                0, 0, 0, 0,
            ],
            "another process's samples (pid 999) are left out"
        );
        let f = p.server.fractions();
        assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!((f[UserRest as usize] - 3.0 / 8.0).abs() < 1e-9);
        assert_eq!(CATEGORIES[KernelRest as usize], "kernel: rest");
    }

    #[test]
    fn no_samples_no_shares() {
        let p = Profile::from_script("", &[1], &[2]);
        assert_eq!(p.client.fractions(), [0.0; 8]);
        let p = Profile::from_script("garbage\n\tnot a frame\n   1 \n\tnot a frame\n", &[1], &[2]);
        assert_eq!((p.client.total(), p.server.total()), (0, 0));
    }
}
