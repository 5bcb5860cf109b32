//! `imgfs umount MNT`: asks the daemon to flush every image (an extended attribute on the mount
//! root), unmounts, and waits until the daemon has exited, so that when it returns the images are
//! complete, closed and unlocked for qemu-img. It fails, after unmounting, when the write-back
//! of an image failed at any time while it was mounted.

use std::path::Path;

use super::daemon::{self, ProcessWatch};
use crate::fs::core::{XATTR_FLUSH, XATTR_LOST_WRITE_BACKS, XATTR_PID};

/// How long to wait for the daemon to finish after the unmount.
const EXIT_TIMEOUT_MS: i32 = 120_000;

pub fn run(mnt: &Path) -> Result<(), String> {
    let shown = mnt.display();
    let answer = daemon::getxattr(mnt, XATTR_PID);
    if let Err(e) = &answer {
        // The daemon is gone and left a stale mount ("Transport endpoint is not connected";
        // just after its death, over io_uring, a request the kernel had queued for its rings
        // ends with ECONNABORTED when the connection is torn down): there is nothing left to
        // flush, so just remove the mount.
        if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)) {
            daemon::unmount(mnt, true).map_err(|e| format!("unmount {shown}: {e}"))?;
            log::warn!("{shown}: its daemon had died; removed the stale mount");
            return Ok(());
        }
    }
    let why = match &answer {
        Err(e) => format!(": {e}"),
        Ok(_) => String::new(),
    };
    let pid = answer
        .ok()
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
        .ok_or_else(|| {
            format!("{shown} is not an imgfs mount (or its daemon does not answer{why})")
        })?;
    let watch = ProcessWatch::new(pid).map_err(|e| format!("cannot watch daemon {pid}: {e}"))?;
    // A failed write-back stops its image for good (no later flush can make what it held
    // durable), so staying mounted would not help: unmount, and say what may be lost.
    let mut lost = Vec::new();
    match daemon::setxattr(mnt, XATTR_FLUSH, b"1") {
        Ok(()) => {}
        // The kernel refuses xattr changes on a read-only mount: there is nothing to flush.
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        Err(e) if e.raw_os_error() == Some(libc::EIO) => {
            let listed = daemon::getxattr(mnt, XATTR_LOST_WRITE_BACKS).unwrap_or_default();
            lost = String::from_utf8_lossy(&listed)
                .lines()
                .map(str::to_string)
                .collect();
            if lost.is_empty() {
                lost.push(format!("flushing failed ({e}); see the daemon's log"));
            }
        }
        Err(e) => {
            return Err(format!(
                "flushing the images of {shown} failed ({e}); they stay mounted, \
                 see the daemon's log"
            ))
        }
    }
    match daemon::unmount(mnt, false) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(format!(
                "{shown} is busy: close files and detach loop devices (losetup -d) first; images are flushed"
            ))
        }
        Err(e) => return Err(format!("unmount {shown}: {e}")),
    }
    if !watch.wait(EXIT_TIMEOUT_MS) {
        return Err(format!(
            "{shown} is unmounted but daemon {pid} has not exited yet"
        ));
    }
    if !lost.is_empty() {
        return Err(format!(
            "{shown} is unmounted, but the write-back of these images failed, so what was \
             written to them since their last successful flush may be lost (they are as \
             after a crash: check them with `imgfs check`):\n  {}",
            lost.join("\n  ")
        ));
    }
    Ok(())
}
