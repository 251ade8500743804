//! The shards' threads and runtimes: which I/O driver, which io_uring flags, which core.

use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::config::Snapshot;
use crate::options::{IoDriver, RunOptions, UringTaskrun};
use crate::shard::{ShardEvent, ShardRx};
use crate::tls::TlsMaterial;
use crate::EngineError;

/// The driver the shards will run on: `auto` resolved (announced when it falls back), an
/// io_uring demand refused where the kernel has none.
pub(super) fn announce_driver(choice: IoDriver) -> Result<IoDriver, EngineError> {
    let uring = monoio::utils::detect_uring();
    match (choice, uring) {
        (IoDriver::IoUring, false) => Err(EngineError::NoIoUring),
        (IoDriver::Auto, false) => {
            tracing::warn!("io_uring is not available here (kernel, seccomp or io_uring_disabled sysctl); running on the legacy epoll driver");
            Ok(IoDriver::Legacy)
        }
        (IoDriver::Auto, true) => Ok(IoDriver::IoUring),
        (c, _) => Ok(c),
    }
}

/// The body of shard thread `id`: pins it, builds its runtime and runs the shard until the
/// control thread goes away; a runtime that cannot start is reported as a failed listen.
#[allow(clippy::too_many_arguments)]
pub(super) fn shard_thread(
    id: usize,
    core: Option<core_affinity::CoreId>,
    driver: IoDriver,
    opts: Arc<RunOptions>,
    tls: Arc<TlsMaterial>,
    rx: ShardRx,
    events: Sender<ShardEvent>,
    snapshot: Snapshot,
) {
    if let Some(core) = core {
        if !core_affinity::set_for_current(core) {
            tracing::warn!(
                shard = id,
                core = core.id,
                "could not pin shard to its core"
            );
        }
    }
    let taskrun = opts.uring_taskrun;
    let batch_ticks = opts.write_batch_ticks;
    let batch_bytes = opts.write_batch_bytes;
    // The copy loops' multishot receives (vendor/monoio patch 6) take the shard's provided
    // buffers, sized to one TLS record's DATA frame; the ring is registered on first use.
    monoio::set_recv_buffers(opts.uring_recv_buffers, crate::proxy::copy::MIN_BUF as u32);
    let fut = crate::proxy::serve::run(
        id,
        driver != IoDriver::Legacy,
        opts,
        tls,
        rx,
        events.clone(),
        snapshot,
    );
    // The flush tick's deferred writes wait for the runtime's quiet point (vendor/monoio
    // patch 5); how long a busy shard may put it off is the operator's.
    let fut = async move {
        monoio::set_quiet_busy_ticks(batch_ticks);
        crate::stream::set_write_batch_bytes(batch_bytes);
        fut.await
    };
    let built = match driver {
        IoDriver::Legacy => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(fut)),
        _ => uring_runtime(id, taskrun).map(|mut rt| rt.block_on(fut)),
    };
    if let Err(e) = built {
        let _ = events.send(ShardEvent::ListenFailed {
            shard: id,
            error: format!("runtime ({driver:?}) could not start: {e}"),
        });
    }
}

/// An io_uring runtime with the setup flags asked for, or the next variant down where the
/// kernel refuses them (EINVAL: flags it does not know).
fn uring_runtime(
    shard: usize,
    want: UringTaskrun,
) -> std::io::Result<monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>> {
    let mut taskrun = want;
    loop {
        let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .with_entries(1024)
            .uring_builder(taskrun.builder())
            .build();
        match (built, taskrun.fallback()) {
            (Err(e), Some(next)) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(shard, refused = ?taskrun, trying = ?next, "io_uring setup flags not supported by this kernel");
                taskrun = next;
            }
            (built, _) => {
                if built.is_ok() && taskrun != want && shard == 0 {
                    tracing::warn!(wanted = ?want, using = ?taskrun, "io_uring task work: the kernel lacks the flags asked for (--uring-taskrun)");
                }
                return built;
            }
        }
    }
}
