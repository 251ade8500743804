//! The `ringtun` command.

#[global_allocator]
static GLOBAL: ringtun::alloc::Mimalloc = ringtun::alloc::Mimalloc;

fn main() -> std::process::ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]
    rep_movsb::avoid();
    ringtun::cli::main()
}

/// glibc's `memcpy` switches to `rep movsb` from a few KiB up, and on AMD Zen CPUs `rep movsb`
/// runs at 1–2 GB/s instead of 20–40 whenever the destination sits 1 to 31 bytes past the
/// source modulo 64 (measured on this project's EPYC VMs with glibc 2.36; see benches/README,
/// "Round 2"). Every userspace TLS record hits that: rustls copies the plaintext in behind a
/// 5-byte record header, so half the records' copies take the slow path and the copy costs as
/// much CPU as AES-GCM itself. glibc reads its tuning only at process start, so on AMD the
/// process re-executes itself once with `glibc.cpu.x86_rep_movsb_threshold` raised above any
/// copy ringtun makes: copies then use glibc's vector loop, which is as fast at any alignment.
#[cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]
mod rep_movsb {
    use std::ffi::OsString;
    use std::os::unix::process::CommandExt as _;

    const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";
    /// Above every buffer ringtun copies in one go (256 KiB reads, 512 KiB TLS send buffer).
    const THRESHOLD: usize = 4 << 20;
    /// Set (to anything) to keep glibc's own choice.
    const OPT_OUT: &str = "RINGTUN_KEEP_REP_MOVSB";

    fn is_amd() -> bool {
        // SAFETY: CPUID leaf 0 exists on every x86_64 CPU.
        #[allow(unused_unsafe)]
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&id.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&id.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&id.ecx.to_le_bytes());
        &vendor == b"AuthenticAMD"
    }

    /// Re-executes the process with the tunable set, unless it is set already (which is also
    /// what stops the second run from doing it again), the user opted out, or the CPU is not
    /// AMD. Must run before any thread starts. If the exec fails, ringtun carries on as is.
    pub fn avoid() {
        let current = std::env::var_os("GLIBC_TUNABLES").unwrap_or_default();
        if current.to_string_lossy().contains(TUNABLE)
            || std::env::var_os(OPT_OUT).is_some()
            || !is_amd()
        {
            return;
        }
        let mut tunables = current;
        if !tunables.is_empty() {
            tunables.push(":");
        }
        tunables.push(format!("{TUNABLE}={THRESHOLD}"));
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_else(|| OsString::from("ringtun"));
        // The resolved path rather than /proc/self/exe itself, so the process keeps its name
        // ("ringtun", not "exe") for ps, pgrep and monitoring.
        let exe = std::env::current_exe()
            .ok()
            .filter(|p| p.exists())
            .unwrap_or_else(|| "/proc/self/exe".into());
        let err = std::process::Command::new(exe)
            .arg0(argv0)
            .args(args)
            .env("GLIBC_TUNABLES", tunables)
            .exec();
        // exec only returns on failure; logging is not set up yet.
        eprintln!("ringtun: re-executing with {TUNABLE} failed ({err}); continuing with glibc's default memcpy");
    }
}
