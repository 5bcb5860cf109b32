//! Mount options in the `-o a,b=c` form that mount(8), fstab and mount.fuse3 use, merged with
//! the long flags of `imgfs mount`. Standard mount options that mean nothing here (or that the
//! kernel or mount.fuse3 handles) are accepted; anything else is refused by name.

use std::path::PathBuf;

pub use super::mount::Transport;

/// What `-o` may set, on top of the long flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub read_only: bool,
    pub allow_other: bool,
    pub no_passthrough: bool,
    pub threads: Option<u16>,
    pub transport: Option<Transport>,
    pub log_file: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub overlay: Option<PathBuf>,
    pub snapshot: bool,
    /// Passphrase files for encrypted images.
    pub key_files: Vec<PathBuf>,
    /// Owner, group and umask shown for the raw files and directories (the image files'
    /// own by default).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub umask: Option<u16>,
}

/// Options mount(8) or mount.fuse3 may pass that imgfs has nothing to do with (the kernel
/// applies nodev, nosuid and noexec to the mount itself; imgfs always sets nodev, nosuid,
/// noatime and default_permissions).
const ACCEPTED: &[&str] = &[
    "rw",
    "defaults",
    "default_permissions",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "async",
    "auto",
    "noauto",
    "nofail",
    "_netdev",
    "user",
    "nouser",
    "users",
];

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("mount option {key}={value}: not a number"))
}

/// Parses `-o` option lists (each comma-separated) into `MountOptions`.
pub fn parse(lists: &[String]) -> Result<MountOptions, String> {
    let mut out = MountOptions::default();
    for option in lists.iter().flat_map(|l| l.split(',')) {
        let (key, value) = match option.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (option, None),
        };
        match (key, value) {
            ("", None) => {}
            ("ro", None) => out.read_only = true,
            ("allow_other", None) => out.allow_other = true,
            ("no_passthrough", None) => out.no_passthrough = true,
            ("snapshot", None) => out.snapshot = true,
            ("threads", Some(v)) => {
                let n: u16 = number(key, v)?;
                if !(1..=64).contains(&n) {
                    return Err(format!("mount option threads={v}: must be 1 to 64"));
                }
                out.threads = Some(n);
            }
            ("transport", Some(v)) => {
                out.transport = Some(match v {
                    "auto" => Transport::Auto,
                    "uring" => Transport::Uring,
                    "dev" => Transport::Dev,
                    _ => return Err(format!("mount option transport={v}: auto, uring or dev")),
                });
            }
            ("log_file", Some(v)) if !v.is_empty() => out.log_file = Some(PathBuf::from(v)),
            ("overlay", Some(v)) if !v.is_empty() => out.overlay = Some(PathBuf::from(v)),
            ("pid_file", Some(v)) if !v.is_empty() => out.pid_file = Some(PathBuf::from(v)),
            ("key_file", Some(v)) if !v.is_empty() => out.key_files.push(PathBuf::from(v)),
            ("uid", Some(v)) => out.uid = Some(number(key, v)?),
            ("gid", Some(v)) => out.gid = Some(number(key, v)?),
            ("umask", Some(v)) => {
                let mask = u16::from_str_radix(v, 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| format!("mount option umask={v}: not an octal mask"))?;
                out.umask = Some(mask);
            }
            (k, None) if ACCEPTED.contains(&k) => {}
            // systemd's and mount(8)'s own (x-systemd.automount, comment=...).
            (k, _) if k.starts_with("x-") || k == "comment" => {}
            (k, Some(_))
                if [
                    "threads", "log_file", "pid_file", "overlay", "key_file", "uid", "gid", "umask",
                ]
                .contains(&k) =>
            {
                return Err(format!("mount option {option}: bad value"))
            }
            _ => return Err(format!("unknown mount option {option:?}")),
        }
    }
    Ok(out)
}

/// Rewrites the command line of `imgfs SRC MNT -o OPTS` (how mount.fuse3 runs a FUSE file
/// system) into `imgfs mount SRC MNT -o OPTS`.
pub fn mount_helper_form(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    const COMMANDS: &[&str] = &[
        "mount",
        "umount",
        "nbd",
        "info",
        "check",
        "map",
        "overlay",
        "completions",
        "manual",
        "help",
    ];
    let first = args.get(1).and_then(|a| a.to_str());
    let is_command = first.is_some_and(|a| COMMANDS.contains(&a) || a.starts_with('-'));
    if args.len() > 1 && !is_command {
        args.insert(1, "mount".into());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(s: &str) -> Result<MountOptions, String> {
        parse(&[s.to_string()])
    }

    #[test]
    fn mount_options_set_what_the_flags_set() {
        let o = parsed("ro,allow_other,threads=8,uid=1000,gid=100,umask=027,log_file=/x").unwrap();
        assert!(o.read_only && o.allow_other && !o.no_passthrough);
        assert!(parsed("no_passthrough").unwrap().no_passthrough);
        assert!(parsed("snapshot").unwrap().snapshot && !o.snapshot);
        assert_eq!(
            (o.threads, o.uid, o.gid, o.umask),
            (Some(8), Some(1000), Some(100), Some(0o27))
        );
        assert_eq!(o.log_file, Some(PathBuf::from("/x")));
        let pid = parsed("pid_file=/run/imgfs.pid").unwrap().pid_file;
        assert_eq!(pid, Some(PathBuf::from("/run/imgfs.pid")));
        assert!(parsed("pid_file=").unwrap_err().contains("pid_file="));
        let standard =
            parsed("rw,nosuid,nodev,noatime,default_permissions,nofail,_netdev").unwrap();
        assert_eq!(standard, MountOptions::default());
        assert!(parsed("x-systemd.automount,comment=vms").is_ok());
        let transport = |v: &str| parsed(&format!("transport={v}")).unwrap().transport;
        assert_eq!(transport("uring"), Some(Transport::Uring));
        assert_eq!(transport("dev"), Some(Transport::Dev));
        assert_eq!(transport("auto"), Some(Transport::Auto));
        assert_eq!(parsed("ro").unwrap().transport, None);
    }

    #[test]
    fn unknown_options_and_bad_values_are_refused_by_name() {
        assert!(parsed("bogus").unwrap_err().contains("\"bogus\""));
        assert!(parsed("threads=0").unwrap_err().contains("threads=0"));
        assert!(parsed("threads=x").unwrap_err().contains("threads=x"));
        assert!(parsed("umask=9").unwrap_err().contains("umask=9"));
        assert!(parsed("ro=1").unwrap_err().contains("ro=1"));
        assert!(parsed("snapshot=1").unwrap_err().contains("snapshot=1"));
        assert!(parsed("transport=ring")
            .unwrap_err()
            .contains("transport=ring"));
    }

    #[test]
    fn the_mount_helper_form_becomes_a_mount_command() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(
            mount_helper_form(args(&["imgfs", "/src", "/mnt", "-o", "ro"])),
            args(&["imgfs", "mount", "/src", "/mnt", "-o", "ro"])
        );
        for kept in [
            &["imgfs", "info", "x"][..],
            &["imgfs", "--help"],
            &["imgfs"],
        ] {
            assert_eq!(mount_helper_form(args(kept)), args(kept));
        }
    }
}
