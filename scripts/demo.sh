#!/usr/bin/env bash
# Sets up imgfs, generates a demo directory of images (VDI dynamic, static, nested, one with an
# ext4 file system; a qcow2 chain with an internal snapshot; a compressed qcow; a dynamic VHDX;
# a dynamic VHD; a split VMDK over a parent) and mounts it. Usage: scripts/demo.sh [IMAGES_DIR [MOUNT_DIR]]
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
if [ ! -e "$images/chain/overlay.qcow2" ]; then
    mkdir -p "$images/chain"
    # base.qcow2 with an internal snapshot, and an overlay on top of it: the base is served
    # read-only (it is a backing file), its snapshot as base.qcow2.snapshots/before.raw.
    qemu-img create -q -f qcow2 "$images/chain/base.qcow2" 32M
    qemu-io -f qcow2 -c "write -P 0x11 0 4M" "$images/chain/base.qcow2" >/dev/null
    qemu-img snapshot -c before "$images/chain/base.qcow2"
    qemu-io -f qcow2 -c "write -P 0x22 0 1M" "$images/chain/base.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$images/chain/overlay.qcow2"
    qemu-io -f qcow2 -c "write -P 0x33 2M 1M" "$images/chain/overlay.qcow2" >/dev/null
    qemu-img convert -c -f qcow2 -O qcow "$images/chain/overlay.qcow2" "$images/chain/flat.qcow" || true
fi
if [ ! -e "$images/vmware/child.vmdk" ]; then
    mkdir -p "$images/hyperv" "$images/vmware"
    qemu-img create -q -f vhdx -o subformat=dynamic "$images/hyperv/disk.vhdx" 64M
    qemu-io -f vhdx -c "write -P 0x44 1M 2M" "$images/hyperv/disk.vhdx" >/dev/null
    # A disk split into 2 GiB extent files (only the descriptor appears), and a child of it.
    qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse "$images/vmware/base.vmdk" 3G
    qemu-io -f vmdk -c "write -P 0x55 2047M 2M" "$images/vmware/base.vmdk" >/dev/null
    qemu-img create -q -f vmdk -b base.vmdk -F vmdk "$images/vmware/child.vmdk"
    qemu-io -f vmdk -c "write -P 0x66 0 1M" "$images/vmware/child.vmdk" >/dev/null
fi
if [ ! -e "$images/hyperv/old.vhd" ]; then
    mkdir -p "$images/hyperv"
    qemu-img create -q -f vpc -o subformat=dynamic,force_size=on "$images/hyperv/old.vhd" 64M
    qemu-io -f vpc -c "write -P 0x77 4M 4M" "$images/hyperv/old.vhd" >/dev/null
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
  $imgfs info $images/chain/overlay.qcow2
  $imgfs info $mnt/chain/base.qcow2.raw            # what the mount serves, and why read-only
  qemu-img convert -U -O raw $images/chain/overlay.qcow2 /tmp/overlay.raw && cmp /tmp/overlay.raw $mnt/chain/overlay.qcow2.raw && echo same
  qemu-img convert -U -O raw $images/disk.vdi /tmp/disk.raw && cmp /tmp/disk.raw $mnt/disk.vdi.raw && echo same
  losetup -P --show -f $mnt/guest.vdi.raw      # then mount /dev/loopNp1 somewhere, or:
  mkdir -p /tmp/guest && mount -o loop,offset=1048576 $mnt/guest.vdi.raw /tmp/guest
  fallocate -p -o 4M -l 4M $mnt/hyperv/old.vhd.raw && du -h $images/hyperv/old.vhd   # space given back
  truncate -s 128M $mnt/hyperv/disk.vhdx.raw && qemu-img info -U $images/hyperv/disk.vhdx
  $imgfs check $images/disk.vdi
  $imgfs umount $mnt
MSG
