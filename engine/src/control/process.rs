//! Process-wide set-up the control thread owns: the signals it waits for and the open-files
//! limit.

use std::time::Duration;

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts afterwards, so
/// the control thread can take them with `sigtimedwait` instead of dying.
pub fn block_signals() {
    // SAFETY: plain signal-mask calls on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits up to `timeout` for SIGTERM or SIGINT; returns the signal's name if one came.
pub(super) fn wait_signal(timeout: Duration) -> Option<&'static str> {
    // SAFETY: sigtimedwait on a local set with a valid timespec; info may stay unread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        match libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) {
            libc::SIGTERM => Some("SIGTERM"),
            libc::SIGINT => Some("SIGINT"),
            _ => None,
        }
    }
}

/// Raises the soft open-files limit to the hard limit. Every tunnelled connection holds one or
/// two sockets, so the usual soft default of 1024 would refuse connections (accept fails with
/// EMFILE) long before memory or CPU run out; the hard limit is what the operator allows.
pub fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid, initialised struct.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0
            && (lim.rlim_cur >= lim.rlim_max || {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
            })
    };
    if raised {
        tracing::debug!(limit = lim.rlim_cur, "open files limit");
    } else {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot raise the open files limit; connections beyond it will be refused"
        );
    }
}
