//! NBD over TLS: `imgfs nbd --tls-cert/--tls-key` with a test CA made by openssl; qemu-img and
//! qemu-io attach with `tls-creds-x509` and read and write, nbdinfo lists over `nbds://`, and a
//! client that does not start TLS is refused. Loopback only.

mod common;
mod nbd_support;

use std::path::Path;
use std::process::Command;

use common::*;
use nbd_support::*;

fn openssl(args: &[&str], dir: &Path) {
    run(Command::new("openssl").args(args).current_dir(dir));
}

/// A CA (`ca-cert.pem`, as QEMU and libnbd look for it) and a server certificate for
/// 127.0.0.1 signed by it, in `dir`.
fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=imgfs test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca-key.pem", "-out", "ca-cert.pem"]);
    openssl(&ca, dir);
    let mut req = vec!["req", "-subj", "/CN=127.0.0.1"];
    req.extend(ec);
    req.extend(["-keyout", "server-key.pem", "-out", "server.csr"]);
    openssl(&req, dir);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n\
         keyUsage=digitalSignature\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server-cert.pem",
        ],
        dir,
    );
}

#[test]
fn qemu_img_reads_and_writes_over_tls_and_plain_clients_are_refused() {
    if !have_libnbd_tools() {
        return;
    }
    let (dir, src) = empty_source("nbd-tls");
    create_filled(
        &src,
        "qcow2",
        "disk.qcow2",
        &[],
        "8M",
        &["write -P 0x42 1M 1M"],
    );
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    make_certificates(&pki);
    let cert = pki.join("server-cert.pem");
    let key = pki.join("server-key.pem");
    let server = NbdServer::tcp(
        &src,
        &["--tls-cert", path_str(&cert), "--tls-key", path_str(&key)],
    );
    let port = server.port.unwrap();
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.display()
    );
    let opts = |export: &str| {
        format!("driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0")
    };
    let image = src.join("disk.qcow2");

    let out = dir.join("out.raw");
    client(
        "qemu-img",
        &[
            "convert",
            "--object",
            &creds,
            "--image-opts",
            &opts("disk.qcow2"),
            "-O",
            "raw",
        ]
        .into_iter()
        .chain([path_str(&out)])
        .collect::<Vec<_>>(),
    );
    let mut expected = qemu_raw("qcow2", &image, &dir);
    assert!(std::fs::read(&out).unwrap() == expected, "read over TLS");
    client(
        "qemu-io",
        &[
            "--object",
            &creds,
            "--image-opts",
            "-c",
            "write -P 0x24 4M 64k",
            "-c",
            "flush",
        ]
        .into_iter()
        .chain([opts("disk.qcow2").as_str()])
        .collect::<Vec<_>>(),
    );
    expected[4 << 20..(4 << 20) + 65536].fill(0x24);
    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        pki.display()
    );
    let list = String::from_utf8_lossy(&client("nbdinfo", &["--list", &uri]).stdout).into_owned();
    assert!(
        list.contains("export=\"disk.qcow2\"") && list.contains("TLS"),
        "{list}"
    );

    // Without TLS: nothing but a refusal.
    let plain = Command::new("qemu-img")
        .args(["info", &format!("nbd://127.0.0.1:{port}/disk.qcow2")])
        .output()
        .unwrap();
    assert!(!plain.status.success());
    let plain = Command::new("nbdinfo")
        .args(["--list", &format!("nbd://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!plain.status.success());

    let log = server.stop();
    assert!(log.contains("read-write, TLS"), "{log}");
    assert_check_clean("qcow2", &image);
    assert_compare_equal("qcow2", &image, &expected, &dir);
}
