#!/usr/bin/env bash
# Builds imgfs and installs it with everything around it: the binary, the mount helper that
# makes `mount -t fuse.imgfs` and fstab lines work, the man pages, bash/zsh/fish completions
# and the systemd template unit. Safe to run again.
#
#   scripts/install.sh                 # as root: into /usr/local (helper into /usr/sbin)
#   DESTDIR=/tmp/pkg scripts/install.sh   # into a staging directory, for packaging
#
# PREFIX (default /usr/local) and SBINDIR (default /usr/sbin, where mount(8) looks for
# mount.fuse.imgfs) can be set too.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
SBINDIR=${SBINDIR:-/usr/sbin}
DESTDIR=${DESTDIR:-}
if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root, or set DESTDIR to stage the files" >&2
    exit 1
fi
bash scripts/setup.sh
bin="$DESTDIR$PREFIX/bin"
man="$DESTDIR$PREFIX/share/man/man1"
install -d "$bin" "$man" "$DESTDIR$SBINDIR" \
    "$DESTDIR$PREFIX/share/bash-completion/completions" \
    "$DESTDIR$PREFIX/share/zsh/site-functions" \
    "$DESTDIR$PREFIX/share/fish/vendor_completions.d" \
    "$DESTDIR/etc/systemd/system"
install -m 0755 target/release/imgfs "$bin/imgfs"
# mount(8) runs /usr/sbin/mount.fuse.imgfs SRC MNT -o OPTS for type fuse.imgfs.
ln -sf "$PREFIX/bin/imgfs" "$DESTDIR$SBINDIR/mount.fuse.imgfs"
"$bin/imgfs" manual --dir "$man"
"$bin/imgfs" completions bash >"$DESTDIR$PREFIX/share/bash-completion/completions/imgfs"
"$bin/imgfs" completions zsh >"$DESTDIR$PREFIX/share/zsh/site-functions/_imgfs"
"$bin/imgfs" completions fish >"$DESTDIR$PREFIX/share/fish/vendor_completions.d/imgfs.fish"
sed "s|/usr/local/bin/imgfs|$PREFIX/bin/imgfs|" systemd/imgfs@.service \
    >"$DESTDIR/etc/systemd/system/imgfs@.service"
echo "installed imgfs into ${DESTDIR:-}$PREFIX (mount helper in ${DESTDIR:-}$SBINDIR)"
