#!/usr/bin/env bash
# Sets up imgfs, generates a demo directory of VDI images (dynamic, static, nested, one with an
# ext4 file system) and mounts it. Usage: scripts/demo.sh [IMAGES_DIR [MOUNT_DIR]]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
images=${1:-demo/images}
mnt=${2:-demo/mnt}
imgfs=target/release/imgfs

if [ ! -e "$images/disk.vdi" ]; then
    mkdir -p "$images/sub"
    qemu-img create -q -f vdi "$images/disk.vdi" 64M
    qemu-io -f vdi -c "write -P 0xab 0 1M" -c "write -P 0xcd 10M 3M" "$images/disk.vdi" >/dev/null
    qemu-img create -q -f vdi -o static=on "$images/fixed.vdi" 16M
    qemu-img create -q -f vdi "$images/sub/other.vdi" 32M
    # A guest disk with a partition table and an ext4 file system, built without a VM.
    raw=$(mktemp)
    truncate -s 64M "$raw"
    printf 'label: dos\nstart=2048, type=83\n' | sfdisk -q "$raw"
    mkfs.ext4 -q -F -E offset=1048576 "$raw" 63M
    qemu-img convert -f raw -O vdi "$raw" "$images/guest.vdi"
    rm -f "$raw"
fi
mkdir -p "$mnt"
if mountpoint -q "$mnt"; then
    echo "$mnt is already mounted"
else
    "$imgfs" mount "$images" "$mnt"
fi
ls -lR "$mnt"
cat <<MSG

imgfs serves $images on $mnt. Try:
  $imgfs info $images/disk.vdi
  qemu-img convert -U -O raw $images/disk.vdi /tmp/disk.raw && cmp /tmp/disk.raw $mnt/disk.vdi.raw && echo same
  losetup -P --show -f $mnt/guest.vdi.raw      # then mount /dev/loopNp1 somewhere, or:
  mkdir -p /tmp/guest && mount -o loop,offset=1048576 $mnt/guest.vdi.raw /tmp/guest
  $imgfs umount $mnt
MSG
