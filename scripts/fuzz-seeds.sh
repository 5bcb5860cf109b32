#!/usr/bin/env bash
# Regenerates the seed corpora under fuzz/seeds/<target>/ from small images made with qemu-img
# and qemu-io (every sub-format they write), plus the hand-built ones QEMU cannot make (a VHDX
# with a dirty log, VMDK COWD and seSparse extents), written by an ignored unit test, and disks
# partitioned with sfdisk (util-linux) for the status target.
# Virtual sizes are tiny and files stored sparse, so the whole corpus stays in the tens of KiB.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cargo build --quiet --example fuzz-seed
seed_tool="$root/target/debug/examples/fuzz-seed"
rm -rf fuzz/seeds
mkdir -p fuzz/seeds/{vdi,qcow,qcow2,vhdx,vhd,vmdk,luks,status}

# seed TARGET NAME IMAGE [FILE...]: one input from the image (and the files it names b and c).
seed() {
    local target=$1 name=$2
    shift 2
    "$seed_tool" "$root/fuzz/seeds/$target/$name" "$@"
}

create() { qemu-img create -q "$@"; }
# io FORMAT IMAGE COMMAND...: runs qemu-io commands on an image.
io() {
    local fmt=$1 img=$2
    shift 2
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f "$fmt" "${args[@]}" "$img" >/dev/null
}
# patch FILE OFFSET HEXBYTES: overwrites bytes in place.
patch() { printf "$(echo "$3" | sed 's/../\\x&/g')" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none; }
# fresh: an empty directory to build one seed's files in (names as the seed will use them).
fresh() { rm -rf "$work/s" && mkdir "$work/s" && cd "$work/s"; }
# rawfile NAME SIZE: a raw file with a few patterns, as backing file or data.
rawfile() {
    truncate -s "$2" "$1"
    printf 'backing data 0123456789' | dd of="$1" bs=1 seek=0 conv=notrunc status=none
    printf 'more backing data' | dd of="$1" bs=1 seek=5000 conv=notrunc status=none
}

# --- VDI ---
fresh; create -f vdi a 3M; io vdi a "write -P 0x11 0 4k" "write -P 0x22 1049088 512"
seed vdi dynamic a
fresh; create -f vdi a 1M; seed vdi empty a
fresh; create -f vdi -o static=on a 2M; io vdi a "write -P 0x33 512 1k"
seed vdi static a

# --- VHD ---
fresh; create -f vpc -o subformat=dynamic a 3M; io vpc a "write -P 0x11 0 4k" "write -P 0x22 2M 1k"
seed vhd dynamic a
fresh; create -f vpc -o subformat=fixed a 1M; io vpc a "write -P 0x33 512 1k"
seed vhd fixed a

# --- QCOW (version 1) ---
fresh; create -f qcow a 1M; io qcow a "write -P 0x11 0 4k" "write -P 0x22 600000 3000"
seed qcow plain a
fresh; create -f qcow a 256K; io qcow a "write -c -P 0x11 0 4k" "write -c -P 0x22 8192 4k"
seed qcow compressed a
fresh; rawfile b 256K; create -f qcow -b b -F raw a; io qcow a "write -P 0x44 4096 512"
seed qcow backing a b

# --- QCOW2 ---
fresh; create -f qcow2 -o compat=0.10,cluster_size=512 a 256K
io qcow2 a "write -P 0x11 0 4k" "write -P 0x22 100000 1000"
seed qcow2 v2-512 a
fresh; create -f qcow2 -o compat=1.1,cluster_size=512,refcount_bits=1 a 256K
io qcow2 a "write -P 0x11 0 4k" "write -z 8192 4k" "write -P 0x22 200000 1000"
seed qcow2 v3-refcount1 a
fresh; create -f qcow2 -o compat=1.1,cluster_size=4K,refcount_bits=64 a 1M
io qcow2 a "write -P 0x11 4096 8k" "discard 4096 4k"
seed qcow2 v3-refcount64 a
fresh; create -f qcow2 -o extended_l2=on,cluster_size=16K a 256K
io qcow2 a "write -P 0x11 1024 1k" "write -P 0x22 20000 3000" "write -z 40960 2k"
seed qcow2 extended-l2 a
fresh; rawfile r 128K; qemu-img convert -f raw -c -O qcow2 -o cluster_size=4K r a
seed qcow2 compressed-zlib a
fresh; rawfile r 128K
qemu-img convert -f raw -c -O qcow2 -o cluster_size=4K,compression_type=zstd r a
seed qcow2 compressed-zstd a
fresh; create -f qcow2 -o cluster_size=512 a 128K; io qcow2 a "write -P 0x11 0 2k"
qemu-img snapshot -c first a; io qcow2 a "write -P 0x22 1024 2k"
qemu-img snapshot -c second a; io qcow2 a "write -P 0x33 65536 512"
seed qcow2 snapshots a
fresh; create -f qcow2 -o cluster_size=512 b 128K; io qcow2 b "write -P 0x55 0 8k"
create -f qcow2 -o cluster_size=512 -b b -F qcow2 a; io qcow2 a "write -P 0x66 1000 100"
seed qcow2 backing-qcow2 a b
fresh; rawfile b 64K; create -f qcow2 -o cluster_size=1K -b b -F raw a
io qcow2 a "write -P 0x66 5100 100"
seed qcow2 backing-raw a b
fresh; create -f qcow2 -o cluster_size=1K,data_file=b a 64K
io qcow2 a "write -P 0x77 0 3k"
seed qcow2 data-file a b
fresh; create -f qcow2 -o cluster_size=1K,data_file=b,data_file_raw=on a 64K
io qcow2 a "write -P 0x77 2048 3k"
seed qcow2 data-file-raw a b
# Lazy refcounts left dirty (incompatible bit 0): opening for writing rebuilds the refcounts.
fresh; create -f qcow2 -o cluster_size=512,lazy_refcounts=on a 64K
io qcow2 a "write -P 0x11 0 2k"; patch a 79 01
seed qcow2 lazy-dirty a
# Marked corrupt (incompatible bit 1): served read-only.
fresh; create -f qcow2 -o cluster_size=512 a 64K; io qcow2 a "write -P 0x11 0 2k"
patch a 79 02
seed qcow2 corrupt-bit a

# --- VHDX ---
fresh; create -f vhdx -o block_size=1M a 3M
io vhdx a "write -P 0x11 0 4k" "write -P 0x22 1049088 512"
seed vhdx dynamic a
fresh; create -f vhdx -o subformat=fixed,block_size=1M a 1M; io vhdx a "write -P 0x33 512 1k"
seed vhdx fixed a
fresh; create -f vhdx -o block_size=1M a 2M; seed vhdx empty a

# --- VMDK ---
fresh; create -f vmdk -o subformat=monolithicSparse a 1M; io vmdk a "write -P 0x11 0 4k"
seed vmdk monolithic-sparse a
fresh; rawfile r 256K; qemu-img convert -f raw -O vmdk -o subformat=streamOptimized r a
seed vmdk stream-optimized a
# Descriptor files: the extents qemu-img names after the disk are renamed to b.
fresh; create -f vmdk -o subformat=monolithicFlat m.vmdk 64K; io vmdk m.vmdk "write -P 0x22 0 1k"
sed 's/"m-flat.vmdk"/"b"/' m.vmdk >a; mv m-flat.vmdk b
seed vmdk monolithic-flat a b
fresh; create -f vmdk -o subformat=twoGbMaxExtentSparse m.vmdk 1M
io vmdk m.vmdk "write -P 0x22 4096 1k"
sed 's/"m-s001.vmdk"/"b"/' m.vmdk >a; mv m-s001.vmdk b
seed vmdk two-gb-sparse a b
fresh; create -f vmdk -o subformat=twoGbMaxExtentFlat m.vmdk 64K
sed 's/"m-f001.vmdk"/"b"/' m.vmdk >a; mv m-f001.vmdk b
seed vmdk two-gb-flat a b
# A child whose parentFileNameHint is b, over a sparse parent.
fresh; create -f vmdk b 1M; io vmdk b "write -P 0x55 0 8k"
create -f vmdk -b b -F vmdk a; io vmdk a "write -P 0x66 512 512"
seed vmdk child a b
# Hand-written descriptors: read-only, zero and offset flat extents; a vmfs disk.
fresh; rawfile b 64K
cat >a <<'EOF'
# Disk DescriptorFile
version=1
CID=12345678
parentCID=ffffffff
createType="monolithicFlat"

# Extent description
RW 32 FLAT "b" 16
RDONLY 32 FLAT "b" 0
RW 64 ZERO
NOACCESS 8 FLAT "b"
RW 32 FLAT "b" 64

# The Disk Data Base
#DDB
ddb.adapterType = "ide"
EOF
seed vmdk mixed-extents a b
fresh; truncate -s 64K b
cat >a <<'EOF'
# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=ffffffff
createType="vmfs"

# Extent description
RW 128 VMFS "b"
EOF
seed vmdk vmfs a b

# --- Hand-built images QEMU cannot make (LUKS containers small enough to fuzz among them) ---
cd "$root"
IMGFS_FUZZ_SEEDS="$root/fuzz/seeds" cargo test --quiet --lib \
    fuzz_seed -- --ignored >/dev/null

# --- status: a few seeds of every format, served through the catalog ---
for s in vdi/dynamic qcow/backing qcow2/snapshots qcow2/backing-qcow2 qcow2/extended-l2 \
    vhdx/dynamic vmdk/two-gb-sparse vmdk/mixed-extents vmdk/child; do
    cp "fuzz/seeds/$s" "fuzz/seeds/status/${s%%/*}-${s##*/}"
done

# Disks with partition tables (an MBR with two logical partitions in an EBR chain, a GPT), so
# that the fuzzer reaches the partitions' raw files and the table parser.
fresh
truncate -s 4M mbr.raw
printf 'label: dos\nstart=64, size=960, type=83\nstart=1024, size=6144, type=5\nstart=1088, size=1024, type=83\nstart=2176, size=2048, type=7\n' |
    sfdisk -q mbr.raw
printf 'first partition' | dd of=mbr.raw bs=1 seek=$((64 * 512)) conv=notrunc status=none
printf 'logical five' | dd of=mbr.raw bs=1 seek=$((1088 * 512)) conv=notrunc status=none
qemu-img convert -O vdi mbr.raw a
"$seed_tool" "$root/fuzz/seeds/status/vdi-mbr-logical" a
truncate -s 4M gpt.raw
printf 'label: gpt\nstart=2048, size=2048, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root"\nstart=4096, size=2048, type=EBD0A0A2-B9E5-4433-87C0-68B6B7299A7A\n' |
    sfdisk -q gpt.raw
printf 'gpt root' | dd of=gpt.raw bs=1 seek=$((2048 * 512)) conv=notrunc status=none
rm a
qemu-img convert -O qcow2 gpt.raw a
"$seed_tool" "$root/fuzz/seeds/status/qcow2-gpt" a
cd "$root"

du -sh fuzz/seeds
for t in fuzz/seeds/*/; do echo "$(basename "$t"): $(ls "$t" | wc -l) seeds"; done
