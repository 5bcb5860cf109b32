//! Process plumbing for the mount daemon, all at the libc boundary: forking into the background
//! with a readiness pipe, blocking and waiting for termination signals, unmounting, xattrs on
//! the mount point and waiting for a process to exit.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What `fork_daemon` returns in each process.
pub enum Forked {
    /// The parent: what the child reported through the pipe (`Ok` once the mount is live).
    Parent(Result<(), String>),
    /// The child: report readiness or failure through this.
    Child(ReadyPipe),
}

/// The child's end of the readiness pipe.
pub struct ReadyPipe(File);

impl ReadyPipe {
    pub fn ready(mut self) {
        let _ = self.0.write_all(b"OK\n");
    }

    pub fn failed(mut self, message: &str) {
        let _ = self.0.write_all(format!("ERR {message}\n").as_bytes());
    }
}

fn last_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{}: path contains NUL", path.display()))
}

/// Forks; the child starts a new session with stdin on /dev/null and stdout/stderr on `log`.
/// Must be called before any thread exists.
pub fn fork_daemon(log: File) -> Result<Forked, String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(last_error("pipe"));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here (documented precondition), so the child may
    // run arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_error("fork"));
    }
    if pid > 0 {
        drop(write_end);
        let mut text = String::new();
        let _ = File::from(read_end).read_to_string(&mut text);
        let result = match text.lines().next() {
            Some("OK") => Ok(()),
            Some(line) => Err(line.strip_prefix("ERR ").unwrap_or(line).to_string()),
            None => Err("the daemon exited before the mount was live; see its log".to_string()),
        };
        return Ok(Forked::Parent(result));
    }
    drop(read_end);
    // SAFETY: setsid, open and dup2 on descriptors this process owns; errors are non-fatal for
    // logging and are reported through the pipe by the caller's later steps.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::close(null);
        }
        libc::dup2(log.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
    }
    drop(log);
    // Like every daemon: hold on to none of the caller's descriptors (a lock the caller holds
    // through one would stay held) and to no directory (it would keep its file system busy).
    close_inherited_fds(write_end.as_raw_fd());
    // SAFETY: chdir with a valid NUL-terminated path.
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(last_error("chdir /"));
    }
    Ok(Forked::Child(ReadyPipe(File::from(write_end))))
}

/// Reports `message` to the parent waiting on `pipe` (when the daemon forked) and returns it
/// as the error the daemon ends with.
pub fn fail(pipe: Option<ReadyPipe>, message: String) -> Result<(), String> {
    if let Some(pipe) = pipe {
        pipe.failed(&message);
    }
    Err(message)
}

/// `path` made absolute against the current directory: paths the daemon uses after
/// `fork_daemon` (overlay directory, sockets, pid file) must not change meaning when it
/// changes to /. `what` names the argument in the error.
pub fn absolute(path: &Path, what: &str) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// `absolute` for an optional argument.
pub fn absolute_if(path: Option<PathBuf>, what: &str) -> Result<Option<PathBuf>, String> {
    path.map(|p| absolute(&p, what)).transpose()
}

/// Closes every descriptor above stderr except `keep`.
fn close_inherited_fds(keep: libc::c_int) {
    let fds: Vec<libc::c_int> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        if fd > 2 && fd != keep {
            // SAFETY: closing a descriptor of this single-threaded process that nothing else
            // owns (the caller's, inherited); the one `read_dir` used is closed already.
            unsafe { libc::close(fd) };
        }
    }
}

/// Raises the soft limit on open descriptors to the hard limit; returns the new limit.
pub fn raise_fd_limit() -> Result<u64, String> {
    // SAFETY: rlimit is plain old data; getrlimit and setrlimit get valid pointers.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(last_error("getrlimit"));
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(last_error("setrlimit"));
            }
        }
        Ok(limit.rlim_cur)
    }
}

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn stop_sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in STOP_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread and every thread it starts later, so that
/// only `wait_for_signal` receives them.
pub fn block_stop_signals() {
    let set = stop_sigset();
    // SAFETY: set is a valid, initialised signal set.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits for SIGTERM, SIGINT or SIGHUP and returns it.
pub fn wait_for_signal() -> libc::c_int {
    let set = stop_sigset();
    let mut sig: libc::c_int = 0;
    // SAFETY: set is valid and sig a valid out-pointer.
    unsafe {
        libc::sigwait(&set, &mut sig);
    }
    sig
}

/// Unmounts `mnt`; `lazy` detaches it even while files are open. Users who may not call
/// umount(2) go through fusermount3.
pub fn unmount(mnt: &Path, lazy: bool) -> Result<(), std::io::Error> {
    let path = c_path(mnt).map_err(std::io::Error::other)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: path is a valid NUL-terminated string.
    if unsafe { libc::umount2(path.as_ptr(), flags) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            return fusermount_unmount(mnt, lazy);
        }
        return Err(e);
    }
    Ok(())
}

/// `fusermount3 -u` (`-uz` when `lazy`): the setuid helper unmounts for users who may not.
fn fusermount_unmount(mnt: &Path, lazy: bool) -> Result<(), std::io::Error> {
    let output = std::process::Command::new("fusermount3")
        .arg(if lazy { "-uz" } else { "-u" })
        .arg("--")
        .arg(mnt)
        .output()?;
    if output.status.success() {
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "fusermount3 -u: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

pub fn getxattr(path: &Path, name: &str) -> Result<Vec<u8>, std::io::Error> {
    let path = c_path(path).map_err(std::io::Error::other)?;
    let name = CString::new(name).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: valid strings and a buffer of the size we pass.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let e = std::io::Error::last_os_error();
        // The value outgrew the buffer: ask its size, then try again with that much room.
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
        // SAFETY: valid strings; a null buffer of size 0 asks for the value's size.
        let size = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(std::io::Error::last_os_error());
        }
        buf = vec![0u8; size as usize];
    }
}

pub fn setxattr(path: &Path, name: &str, value: &[u8]) -> Result<(), std::io::Error> {
    let path = c_path(path).map_err(std::io::Error::other)?;
    let name = CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: valid strings and a value buffer of the length we pass.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A handle on a process that becomes readable when it exits (pidfd).
pub struct ProcessWatch(OwnedFd);

impl ProcessWatch {
    pub fn new(pid: libc::pid_t) -> Result<Self, std::io::Error> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just returned to us and is owned by nobody else.
        Ok(ProcessWatch(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Waits until the process exits; false if it is still running after `timeout_ms`.
    pub fn wait(&self, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return rc > 0;
        }
    }
}

/// Whether `path` is the root of a FUSE mount.
pub fn is_fuse_mount(path: &Path) -> bool {
    const FUSE_SUPER_MAGIC: libc::c_long = 0x6573_5546;
    let Ok(path) = c_path(path) else { return false };
    // SAFETY: statfs is plain old data; zeroed is valid, and path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut st) };
    rc == 0 && st.f_type as libc::c_long == FUSE_SUPER_MAGIC
}
