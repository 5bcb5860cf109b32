//! Encrypted qcow and qcow2 images and LUKS containers made by qemu-img and written by qemu-io, and what qemu-img
//! decrypts from them: the oracle of the encrypted-image tests.

use std::ffi::OsString;
use std::path::Path;

use super::qemu;

thread_local! {
    /// The passphrase `qemu_raw_of` and `qemu_check` give QEMU on this thread
    /// (`qemu_uses_passphrase`): the fault walks read and check encrypted images through them.
    static QEMU_PASSPHRASE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// From now on `qemu_raw_of` and `qemu_check` on this thread open images with `passphrase`.
pub fn qemu_uses_passphrase(passphrase: &str) {
    QEMU_PASSPHRASE.with(|p| *p.borrow_mut() = Some(passphrase.to_string()));
}

/// The arguments that open `path` with the thread's passphrase, if it has one, for the format
/// that `extra` (`-f FORMAT`) names.
pub(super) fn opened_with_secret(extra: &str, path: &Path) -> Option<[OsString; 4]> {
    let passphrase = QEMU_PASSPHRASE.with(|p| p.borrow().clone())?;
    let format = extra.strip_prefix("-f ")?.trim();
    Some(secret_args(format, &passphrase, path))
}

/// How QEMU's options name the encryption's own: `encrypt.` in qcow and qcow2, bare in a
/// LUKS container.
fn prefix(format: &str) -> &'static str {
    match format {
        "luks" => "",
        _ => "encrypt.",
    }
}

/// `--object secret,...` and the `--image-opts` string QEMU needs for `path` as `format`.
fn secret_args(format: &str, passphrase: &str, path: &Path) -> [OsString; 4] {
    let p = prefix(format);
    let mut opts = OsString::from(format!("driver={format},{p}key-secret=sec0,file.filename="));
    opts.push(path);
    [
        "--object".into(),
        format!("secret,id=sec0,data={passphrase}").into(),
        "--image-opts".into(),
        opts,
    ]
}

/// Creates `path` as an encrypted `format` image (`method`: luks or aes; a `luks` container
/// is always luks) of `size` with
/// `passphrase`, and writes `writes` (qemu-io commands) into it; `None` when QEMU is missing.
pub fn create_encrypted(
    format: &str,
    path: &Path,
    method: &str,
    passphrase: &str,
    size: &str,
    writes: &[&str],
) -> Option<()> {
    let p = prefix(format);
    let mut options = match format {
        "luks" => "key-secret=sec0".to_string(),
        _ => format!("encrypt.format={method},encrypt.key-secret=sec0"),
    };
    if method == "luks" {
        // Fast key derivation: debug builds run it in the tests.
        options.push_str(&format!(",{p}iter-time=10"));
    }
    let secret = secret_args(format, passphrase, path);
    let mut create: Vec<OsString> = ["create", "-q", "-f", format].map(OsString::from).to_vec();
    create.extend(secret[..2].iter().cloned());
    create.extend([
        OsString::from("-o"),
        options.into(),
        path.into(),
        size.into(),
    ]);
    let out = qemu("qemu-img", &create)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut io = secret.to_vec();
    for w in writes {
        io.extend([OsString::from("-c"), OsString::from(*w)]);
    }
    let out = qemu("qemu-io", &io)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

/// What qemu-img reads from the encrypted `format` image at `path`, converted into `raw`.
pub fn qemu_plain(format: &str, path: &Path, passphrase: &str, raw: &Path) -> Option<Vec<u8>> {
    let mut args: Vec<OsString> = vec!["convert".into()];
    args.extend(secret_args(format, passphrase, path));
    args.extend(["-O".into(), "raw".into(), raw.into()]);
    let out = qemu("qemu-img", &args)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(raw).ok()
}

/// Asserts that `qemu-img check` finds the encrypted `format` image at `path` clean.
pub fn assert_qemu_check_clean(format: &str, path: &Path, passphrase: &str) {
    let mut args: Vec<OsString> = vec!["check".into()];
    args.extend(secret_args(format, passphrase, path));
    let Some(out) = qemu("qemu-img", &args) else {
        return;
    };
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
