#!/usr/bin/env bash
# The Linux-host lab: a stock Debian kernel with nvme-cli and fio, booted under QEMU (TCG), used as a
# real NVMe/TCP host against nvmetro-tgt running on this machine.
#
#   vendor-scripts/lab.sh setup     install host packages, build the guest root, kernel and initramfs
#   vendor-scripts/lab.sh test      start nvmetro-tgt on 127.0.0.1, run the guest's checks, print verdicts
#   vendor-scripts/lab.sh rdma      only the RDMA verbs check: rdma_pingpong over Soft-RoCE (rdma_rxe) in a guest
#   vendor-scripts/lab.sh shell     boot a guest with a shell on the console (for debugging)
#
# The guest reaches the host's 127.0.0.1:PORT as 10.0.2.2:PORT through QEMU user networking; nothing
# else is addressed. Everything comes from Debian's packages; LAB (default /var/tmp/nvmetro-lab) caches
# the root file system so that a second run skips the downloads.
set -euo pipefail
LAB=${LAB:-/var/tmp/nvmetro-lab}
REPO=$(cd "$(dirname "$0")/.." && pwd)
MIRROR=${MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
T0=$(date +%s)
step() { echo "[lab $(($(date +%s) - T0))s] $*"; }
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

setup() {
  mkdir -p "$LAB"/{bin,share,debs}
  step "host packages (QEMU from bookworm-backports so the image's qemu-utils stays)"
  if ! command -v qemu-system-x86_64 >/dev/null || ! command -v debootstrap >/dev/null \
     || [ ! -x /bin/busybox ] || ! command -v cpio >/dev/null; then
    local aptd=$LAB/apt-sources.d
    rm -rf "$aptd"; mkdir -p "$aptd"
    cp /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list "$aptd"/ 2>/dev/null || true
    [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$aptd/base.list"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$MIRROR" > "$aptd/lab-bookworm-backports.sources"
    local apto=(-o Dir::Etc::SourceParts="$aptd" -o DPkg::Lock::Timeout=900)
    $SUDO apt-get "${apto[@]}" update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${apto[@]}" install -y -qq --no-install-recommends \
      -t bookworm-backports qemu-system-x86 qemu-utils > "$LAB/apt.log"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${apto[@]}" install -y -qq --no-install-recommends \
      busybox-static debootstrap cpio kmod python3 >> "$LAB/apt.log"
  fi
  qemu-system-x86_64 --version | head -1

  step "guest root: debootstrap with nvme-cli, fio"
  if [ ! -x "$LAB/rootfs/usr/bin/fio" ] || [ ! -x "$LAB/rootfs/usr/sbin/nvme" ]; then
    $SUDO rm -rf "$LAB/rootfs"
    $SUDO debootstrap --variant=minbase --include=nvme-cli,fio,iproute2,kmod,busybox,util-linux \
      bookworm "$LAB/rootfs" "$MIRROR" > "$LAB/debootstrap.log" 2>&1 \
      || { tail -20 "$LAB/debootstrap.log"; exit 1; }
  fi

  step "guest RDMA user space: libibverbs, librdmacm, the rxe provider (for the verbs check)"
  if [ ! -e "$LAB/rootfs/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so" ] \
     || [ ! -e "$LAB/rootfs/usr/lib/x86_64-linux-gnu/librdmacm.so.1" ]; then
    # Unpacked like the kernel below, so that a root cached by an older lab.sh gains them too.
    local p
    for p in libnl-3-200 libnl-route-3-200 libibverbs1 librdmacm1 ibverbs-providers ibverbs-utils; do
      ls "$LAB"/debs/"${p}"_*.deb >/dev/null 2>&1 || (cd "$LAB/debs" && apt-get download "$p" >/dev/null 2>&1)
      dpkg-deb --fsys-tarfile "$LAB"/debs/"${p}"_*.deb | $SUDO tar -x -C "$LAB/rootfs" --keep-directory-symlink
    done
  fi

  step "kernel: Debian's linux-image-amd64, unpacked into the guest root"
  local kpkg k
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  if [ -z "$kpkg" ]; then $SUDO apt-get update -qq; kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); fi
  k=${kpkg#linux-image-}
  if [ ! -e "$LAB/rootfs/boot/vmlinuz-$k" ]; then
    (cd "$LAB/debs" && apt-get download "$kpkg" >/dev/null 2>&1)
    # --keep-directory-symlink keeps rootfs/lib -> usr/lib (merged /usr); dpkg-deb -x would break /bin/sh
    dpkg-deb --fsys-tarfile "$LAB"/debs/"${kpkg}"_*.deb | $SUDO tar -x -C "$LAB/rootfs" --keep-directory-symlink
    $SUDO depmod -b "$LAB/rootfs" "$k"
  fi
  echo "K=$k" > "$LAB/kernel.env"

  step "initramfs: static busybox, virtio/9p/overlay modules, /init that switches to the 9p root"
  cat > "$LAB/bin/init" <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_pci virtio_net 9pnet_virtio 9p overlay; do modprobe $m; done
mkdir -p /mnt/share /ro /rw
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share /mnt/share
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro rootfs /ro
mount -t tmpfs tmpfs /rw; mkdir -p /rw/up /rw/work
mount -t overlay overlay -o lowerdir=/ro,upperdir=/rw/up,workdir=/rw/work /newroot
mkdir -p /newroot/mnt/share; mount --move /mnt/share /newroot/mnt/share
for d in proc sys dev; do mount --move /$d /newroot/$d; done
exec switch_root /newroot /bin/sh /mnt/share/guest-init.sh
EOF
  local st=$LAB/initramfs.d
  rm -rf "$st"; mkdir -p "$st"/{bin,sbin,proc,sys,dev,tmp,mnt,newroot,lib/modules/$k}
  cp /bin/busybox "$st/bin/busybox"
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$st/bin/$a"; done
  for m in virtio_pci virtio_net 9p 9pnet_virtio overlay; do
    modprobe -d "$LAB/rootfs" -S "$k" --show-depends "$m"
  done | awk '$1=="insmod"{print $2}' | sort -u | while read -r f; do
    rel=${f#"$LAB"/rootfs/}; rel=${rel#usr/}; mkdir -p "$st/$(dirname "$rel")"; cp "$f" "$st/$rel"; done
  cp "$LAB/rootfs/lib/modules/$k"/modules.{order,builtin,builtin.modinfo} "$st/lib/modules/$k/"
  depmod -b "$st" "$k"
  install -m755 "$LAB/bin/init" "$st/init"
  (cd "$st" && find . | cpio -o -H newc --quiet | gzip -1) > "$LAB/initramfs.cpio.gz"

  cat > "$LAB/share/guest-init.sh" <<'EOF'
#!/bin/sh
# PID 1 in the Debian root (9p read-only + tmpfs overlay): run the job named on the command line.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /run
arg() { for x in $(cat /proc/cmdline); do case $x in $1=*) echo "${x#*=}";; esac; done; }
ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
JOB=$(arg lab.job)
echo "LAB: guest up after $(cut -d' ' -f1 /proc/uptime)s, job $JOB"
if [ -n "$JOB" ] && [ -f "/mnt/share/$JOB" ]; then sh "/mnt/share/$JOB"; echo "LAB: job rc=$?";
else setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'; fi
sync; busybox poweroff -f; echo o > /proc/sysrq-trigger; sleep 30
EOF
  step "setup done"
}

boot_guest() { # JOB LOG APPEND-EXTRA
  . "$LAB/kernel.env"
  timeout "${GUEST_TIMEOUT:-900}" qemu-system-x86_64 -accel tcg -bios /usr/share/qemu/qboot.rom -m 1536 -smp 2 \
    -nographic -no-reboot -kernel "$LAB/rootfs/boot/vmlinuz-$K" -initrd "$LAB/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1 lab.job=$1 $3" \
    -virtfs local,path="$LAB/rootfs",mount_tag=rootfs,security_model=none,readonly=on,id=rootfs \
    -virtfs local,path="$LAB/share",mount_tag=share,security_model=none,id=share \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= < /dev/null > "$2" 2>&1 || true
}

# The RDMA verbs layer (nvmetro-ffi's `rdma` feature) against a real device: the guest's kernel
# has Soft-RoCE, so rdma_rxe on eth0 gives an RDMA device, and rdma_pingpong runs its server and
# client over rdma_cm on the guest's address (SEND/RECV, WRITE, WRITE with immediate, READ, a
# wrong rkey). The host needs the rdma-core headers and libclang to build it.
build_rdma_check() {
  if [ ! -e /usr/include/infiniband/verbs.h ] || [ ! -e /usr/include/rdma/rdma_cma.h ] \
     || ! ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || ! command -v pkg-config >/dev/null; then
    $SUDO apt-get -o DPkg::Lock::Timeout=900 update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends \
      libibverbs-dev librdmacm-dev libclang-dev pkg-config >> "$LAB/apt.log"
  fi
  step "build rdma_pingpong (nvmetro-ffi --features rdma, release)"
  (cd "$REPO" && cargo build --release -q -p nvmetro-ffi --features rdma --example rdma_pingpong)
  local dir
  dir=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  cp "$dir/release/examples/rdma_pingpong" "$LAB/share/rdma_pingpong"
  # The crate's own rdma unit tests, which take their device path only where a device exists.
  local tbin
  tbin=$(cd "$REPO" && cargo test -q -p nvmetro-ffi --features rdma --lib --no-run --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "nvmetro_ffi": print(m["executable"])' | tail -1)
  cp "$tbin" "$LAB/share/ffi-rdma-tests"
  # nvmetro-tgt with NVMe/RDMA listeners, for the guest (the default build stays as it was:
  # building it again without the feature only relinks it).
  step "build nvmetro-tgt --features rdma (release) for the guest"
  (cd "$REPO" && cargo build --release -q -p nvmetro-tgt --features rdma --bin nvmetro-tgt --example rdma_hostile_host)
  cp "$dir/release/nvmetro-tgt" "$LAB/share/nvmetro-tgt-rdma"
  cp "$dir/release/examples/rdma_hostile_host" "$LAB/share/rdma_hostile_host"
  (cd "$REPO" && cargo build --release -q -p nvmetro-perf --features rdma --bin nvmetro-perf)
  cp "$dir/release/nvmetro-perf" "$LAB/share/nvmetro-perf-rdma"
  (cd "$REPO" && cargo build --release -q -p nvmetro-tgt -p nvmetro-perf)
  cat > "$LAB/share/job-rdma.sh" <<'EOF'
echo "== RDMA: Soft-RoCE on eth0, then rdma_pingpong (nvmetro-ffi's verbs layer)"
modprobe rdma_rxe && modprobe ib_uverbs && modprobe rdma_ucm && echo "CHECK rdma modules loaded"
rdma link add rxe0 type rxe netdev eth0 && echo "CHECK rdma rxe0 link added"
rdma link show
ibv_devinfo -d rxe0 | grep -E 'hca_id|state|link_layer'
timeout 120 /mnt/share/ffi-rdma-tests --test-threads=1 --nocapture rdma:: > /tmp/rdma-unit.txt 2>&1; urc=$?
grep -E '^test |test result|rdma unit checks|panicked' /tmp/rdma-unit.txt
[ $urc = 0 ] && grep -q 'rdma unit checks passed on device rxe0' /tmp/rdma-unit.txt && echo "CHECK rdma unit tests on rxe0 ok"
timeout 120 /mnt/share/rdma_pingpong --loopback 10.0.2.15:7471; rc=$?
[ $rc = 0 ] && echo "CHECK rdma pingpong ok"
echo "rdma_pingpong rc=$rc"
echo "== RDMA: the same between two processes (the client retries until the server listens)"
timeout 120 /mnt/share/rdma_pingpong --server 10.0.2.15:7472 > /tmp/rdma-server.txt 2>&1 & SP=$!
timeout 120 /mnt/share/rdma_pingpong --client 10.0.2.15:7472; crc=$?
wait $SP; src=$?
sed 's/^/  [server process] /' /tmp/rdma-server.txt
[ $crc = 0 ] && [ $src = 0 ] && echo "CHECK rdma pingpong between two processes ok"
sh /mnt/share/job-rdma-host.sh
sh /mnt/share/job-rdma-link.sh
EOF
  cat > "$LAB/share/job-rdma-link.sh" <<'EOF'
echo "== metro over RDMA: two nvmetro sites in this guest replicate over rxe0 (link = \"rdma\")"
S=nqn.2026-11.io.nvmetro:rdma-metro
for site in a b; do
  if [ $site = a ]; then role='role = "preferred"
listen = "10.0.2.15:7600"'; hp=4431; range="1, 99"; else role='role = "secondary"
peer = "10.0.2.15:7600"'; hp=4432; range="100, 199"; fi
  cat > /tmp/rlink-$site.toml <<TOML
[target]
cores = [0, 1]
site = $([ $site = a ] && echo 1 || echo 2)
[[bdev]]
name = "leg"
kind = "file"
path = "/tmp/rlink-$site.img"
size = "64MiB"
[[bdev]]
name = "m"
kind = "mirror"
local = "leg"
$role
link = "rdma"
lanes = 2
metadata = "/tmp/rlink-$site.meta"
secret = "lab-rdma-link-secret-0123456789"
[[subsystem]]
nqn = "$S"
allow_any_host = true
cntlid_range = [$range]
[[subsystem.namespace]]
nsid = 1
bdev = "m"
nguid = "6e766d6574726f2d72646d612d6d6972"
[[listener]]
address = "10.0.2.15:$hp"
TOML
done
/mnt/share/nvmetro-tgt-rdma --config /tmp/rlink-a.toml > /tmp/rlink-a.log 2>&1 & RA=$!
/mnt/share/nvmetro-tgt-rdma --config /tmp/rlink-b.toml > /tmp/rlink-b.log 2>&1 & RB=$!
for i in $(seq 150); do grep -q 'replication link up' /tmp/rlink-a.log && grep -q 'replication link up' /tmp/rlink-b.log && break; sleep 0.2; done
grep -h 'replication link up' /tmp/rlink-a.log /tmp/rlink-b.log
grep -q 'replication link up.*rdma' /tmp/rlink-b.log && echo "CHECK rdma link up between the sites"
for i in $(seq 150); do grep -q 'replication lane 1 up on a reactor of its own (2 of 2)' /tmp/rlink-a.log && grep -q 'replication lane 1 up on a reactor of its own (2 of 2)' /tmp/rlink-b.log && break; sleep 0.2; done
grep -h 'replication lane' /tmp/rlink-a.log /tmp/rlink-b.log
grep -q 'replication lane 1 up on a reactor of its own (2 of 2)' /tmp/rlink-a.log && grep -q 'replication lane 1 up on a reactor of its own (2 of 2)' /tmp/rlink-b.log \
  && echo "CHECK rdma link: two lanes up at both sites, lane 1 on its own reactor"
timeout 120 nvme connect -t tcp -a 10.0.2.15 -s 4431 -n $S && sleep 2
MD=$(nvme list | awk '/nvmetro/ {print $1}' | head -1); echo "site A device: $MD"
timeout 120 fio --name=rlink --filename="$MD" --rw=randwrite --bs=8k --iodepth=8 --ioengine=libaio --direct=1 --size=16m \
    --verify=crc32c --do_verify=0 > /tmp/rlink-fio1.txt 2>&1 && grep -q 'err= 0' /tmp/rlink-fio1.txt && echo "CHECK rdma link: writes through site A ok"
grep -E 'write: IOPS=' /tmp/rlink-fio1.txt
timeout 60 nvme disconnect -n $S; sleep 1
timeout 120 nvme connect -t tcp -a 10.0.2.15 -s 4432 -n $S && sleep 2
MD=$(nvme list | awk '/nvmetro/ {print $1}' | head -1); echo "site B device: $MD"
timeout 120 fio --name=rlink --filename="$MD" --rw=randwrite --bs=8k --iodepth=8 --ioengine=libaio --direct=1 --size=16m \
    --verify=crc32c --verify_only --verify_fatal=1 > /tmp/rlink-fio2.txt 2>&1 && grep -q 'err= 0' /tmp/rlink-fio2.txt && echo "CHECK rdma link: site B reads what A wrote"
timeout 60 nvme disconnect -n $S; sleep 1
echo "== SIGKILL of site B, writes at A meanwhile, B back: resync over RDMA"
kill -9 $RB; wait $RB 2>/dev/null
for i in $(seq 50); do grep -q 'replication link down' /tmp/rlink-a.log && break; sleep 0.1; done
grep 'replication link down' /tmp/rlink-a.log
grep -q 'replication link down.*the peer disconnected (rdma_cm)' /tmp/rlink-a.log && echo "CHECK rdma link: A learns of B's death from rdma_cm"
timeout 120 nvme connect -t tcp -a 10.0.2.15 -s 4431 -n $S && sleep 2
MD=$(nvme list | awk '/nvmetro/ {print $1}' | head -1)
timeout 120 fio --name=rlink2 --filename="$MD" --offset=32m --rw=randwrite --bs=8k --iodepth=8 --ioengine=libaio --direct=1 --size=16m \
    --verify=crc32c --do_verify=0 > /tmp/rlink-fio3.txt 2>&1 && grep -q 'err= 0' /tmp/rlink-fio3.txt && echo "CHECK rdma link: site A writes alone while B is down"
timeout 60 nvme disconnect -n $S; sleep 1
before=$(grep -c 'resync to the peer finished' /tmp/rlink-a.log)
/mnt/share/nvmetro-tgt-rdma --config /tmp/rlink-b.toml > /tmp/rlink-b2.log 2>&1 & RB=$!
for i in $(seq 300); do grep -q 'resync from the peer finished' /tmp/rlink-b2.log && break; sleep 0.2; done
grep -h 'resync to the peer' /tmp/rlink-a.log
[ "$(grep -c 'resync to the peer finished' /tmp/rlink-a.log)" -gt "$before" ] && grep -q 'resync from the peer finished' /tmp/rlink-b2.log \
  && echo "CHECK rdma link: resync over RDMA finished"
for i in $(seq 100); do grep -q 'replication lane 1 up on a reactor of its own (2 of 2)' /tmp/rlink-b2.log && break; sleep 0.2; done
grep -q 'replication lane 1 up on a reactor of its own (2 of 2)' /tmp/rlink-b2.log && echo "CHECK rdma link: two lanes again after B's restart"
timeout 120 nvme connect -t tcp -a 10.0.2.15 -s 4432 -n $S && sleep 2
MD=$(nvme list | awk '/nvmetro/ {print $1}' | head -1)
timeout 120 fio --name=rlink2 --filename="$MD" --offset=32m --rw=randwrite --bs=8k --iodepth=8 --ioengine=libaio --direct=1 --size=16m \
    --verify=crc32c --verify_only --verify_fatal=1 > /tmp/rlink-fio4.txt 2>&1 && grep -q 'err= 0' /tmp/rlink-fio4.txt \
  && timeout 120 fio --name=rlink --filename="$MD" --rw=randwrite --bs=8k --iodepth=8 --ioengine=libaio --direct=1 --size=16m \
    --verify=crc32c --verify_only --verify_fatal=1 > /tmp/rlink-fio5.txt 2>&1 && grep -q 'err= 0' /tmp/rlink-fio5.txt \
  && echo "CHECK rdma link: site B verifies both regions after the resync"
timeout 60 nvme disconnect -n $S
kill -INT $RA $RB; wait $RA $RB
echo "--- site A (rdma link) log"; tail -15 /tmp/rlink-a.log
echo "--- site B (rdma link) log, after its restart"; tail -10 /tmp/rlink-b2.log
EOF
  cat > "$LAB/share/job-rdma-host.sh" <<'EOF'
echo "== NVMe/RDMA: Linux's nvme-rdma host against nvmetro-tgt in this guest, over rxe0"
R=nqn.2026-11.io.nvmetro:rdma; RH=nqn.2014-08.org.nvmexpress:uuid:6c0a5b8e-0d1b-4c8e-9d6a-1ab0c0ffee0d
modprobe nvme-rdma && echo "CHECK rdma nvme-rdma loaded"
cat > /tmp/rdma-tgt.toml <<TOML
[target]
cores = [0, 1]
poll_mode = "adaptive"
[[bdev]]
name = "mal0"
kind = "malloc"
size = "64MiB"
[[subsystem]]
nqn = "$R"
serial = "NVMETRO-RDMA-1"
allowed_hosts = ["$RH"]
[[subsystem.namespace]]
nsid = 1
bdev = "mal0"
[[bdev]]
name = "mal1"
kind = "malloc"
size = "32MiB"
[[subsystem.namespace]]
nsid = 2
bdev = "mal1"
[[listener]]
address = "10.0.2.15:4420"
transport = "rdma"
[[listener]]
address = "10.0.2.15:4421"
[metrics]
address = "127.0.0.1:9464"
TOML
# Host data bytes of the NVMe/RDMA queue pairs: from the host zero_copy and copied, to the host
# zero_copy and copied.
rdma_data() {
  python3 -c 'import sys, urllib.request
m = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1]).read().decode()
v = {}
for l in m.splitlines():
    if l.startswith("nvmetro_rdma_host_data_bytes"):
        v[(l.split("direction=\"")[1].split("\"")[0], l.split("path=\"")[1].split("\"")[0])] = int(float(l.split()[-1]))
print(*(v.get(k, -1) for k in [("from_host", "zero_copy"), ("from_host", "copied"), ("to_host", "zero_copy"), ("to_host", "copied")]))' "$1"
}
# Hugepages for the queue pairs' registered pools (3 MiB each: two 2 MiB pages).
echo 16 > /proc/sys/vm/nr_hugepages; echo "hugepages reserved: $(cat /proc/sys/vm/nr_hugepages)"
# A timed 8k randwrite at QD1 on device $2, printed as the FIGURE named $3 (fio's output in
# /tmp/$1.txt); fails as fio does.
fio_qd1() {
  timeout 120 fio --name="$1" --filename="$2" --rw=randwrite --bs=8k --iodepth=1 --ioengine=libaio --direct=1 \
      --size=16m --time_based --runtime=10 --lat_percentiles=1 > "/tmp/$1.txt" 2>&1; r=$?
  echo "FIGURE $3: $(grep -E 'write: IOPS=' "/tmp/$1.txt" | head -1)"
  grep -E '50.00th|99.00th' "/tmp/$1.txt" | head -2
  return $r
}
NVMETRO_LOG=info,nvmetro_tgt=debug /mnt/share/nvmetro-tgt-rdma --config /tmp/rdma-tgt.toml > /tmp/rdma-tgt.log 2>&1 & TP=$!
for i in $(seq 100); do grep -q listening /tmp/rdma-tgt.log && break; sleep 0.2; done
grep -q 'rdma' /tmp/rdma-tgt.log && grep -q listening /tmp/rdma-tgt.log && echo "CHECK rdma target listening"
timeout 120 nvme discover -t rdma -a 10.0.2.15 -s 4420 --hostnqn=$RH > /tmp/rdma-disc.txt 2>&1; drc=$?
cat /tmp/rdma-disc.txt
[ $drc = 0 ] && grep -q "trtype: *rdma" /tmp/rdma-disc.txt && grep -q "subnqn: *$R" /tmp/rdma-disc.txt && echo "CHECK rdma discover ok"
timeout 120 nvme connect -t rdma -a 10.0.2.15 -s 4420 -n $R --hostnqn=$RH && echo "CHECK rdma connect ok"
sleep 2
RD=$(nvme list | awk '/NVMETRO-RDMA-1/ {print $1}' | grep 'n1$' | head -1); echo "NVMe/RDMA device: $RD"
nvme list-subsys
fio_qd1 rdma-fio1 "$RD" "nvmetro-tgt NVMe/RDMA 8k randwrite QD1" && grep -q 'err= 0' /tmp/rdma-fio1.txt && echo "CHECK rdma fio timed randwrite ok"
timeout 120 fio --name=rdmaverify --filename="$RD" --rw=randwrite --bs=8k --iodepth=8 --ioengine=libaio --direct=1 \
    --size=16m --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/rdma-fio2.txt 2>&1; rc=$?
grep -E 'err=|IOPS=|verify' /tmp/rdma-fio2.txt
[ $rc = 0 ] && grep -q 'err= 0' /tmp/rdma-fio2.txt && grep -qE 'read: IOPS=' /tmp/rdma-fio2.txt && echo "CHECK rdma fio write-then-verify crc32c ok"
timeout 120 fio --name=rdmabig --filename="$RD" --offset=32m --rw=write --bs=128k --iodepth=4 --ioengine=libaio --direct=1 \
    --size=16m --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/rdma-fio3.txt 2>&1 && grep -q 'err= 0' /tmp/rdma-fio3.txt && echo "CHECK rdma fio 128k write-then-verify ok"
grep -E 'err=|IOPS=' /tmp/rdma-fio3.txt
set -- $(rdma_data 9464); echo "FIGURE nvmetro-tgt NVMe/RDMA host data so far: from the host $1 bytes zero-copy, $2 copied; to the host $3 zero-copy, $4 copied"
# Every write above came in-capsule (8k) or by RDMA READ (128k), every read went by RDMA WRITE: all
# of it must have moved uncopied but for commands that found the queue pair's pool empty (and the
# admin queue's, which has no pool).
[ "$1" -gt 0 ] && [ "$2" -ge 0 ] && [ "$(( $1 * 10 ))" -ge "$(( ($1 + $2) * 9 ))" ] \
  && echo "CHECK rdma write data lands in registered buffers without a copy"
[ "$3" -gt 0 ] && [ "$4" -ge 0 ] && [ "$(( $3 * 10 ))" -ge "$(( ($3 + $4) * 9 ))" ] \
  && echo "CHECK rdma read data goes to the host from the buffer the bdev read into"
grep -m1 'zero-copy pool' /tmp/rdma-tgt.log
grep -q 'zero-copy pool: RegisteredPool(3145728 bytes on hugepages' /tmp/rdma-tgt.log && echo "CHECK rdma zero-copy pools registered on hugepages"
timeout 60 nvme disconnect -n $R && echo "CHECK rdma disconnect ok"
echo "== nvmetro-perf --transport rdma --verify against nvmetro-tgt (namespace 2, never written)"
timeout 120 /mnt/share/nvmetro-perf-rdma --transport rdma --addr 10.0.2.15:4420 --nqn $R --hostnqn $RH --nsid 2 \
  --rw randrw --bs 8k --qd 8 --time 5s --ramp 0s --verify --quiet && echo "CHECK nvmetro-perf rdma verify against nvmetro-tgt ok"
echo "== the copy path: a second target with rdma_zero_copy = false, the same checks (fio crc32c verify, nvmetro-perf --verify)"
sed -e 's/^poll_mode = "adaptive"/poll_mode = "adaptive"\nrdma_zero_copy = false/' -e 's/:4420"/:4422"/' -e 's/:4421"/:4423"/' \
    -e 's/127.0.0.1:9464/127.0.0.1:9465/' /tmp/rdma-tgt.toml > /tmp/rdma-copy.toml
/mnt/share/nvmetro-tgt-rdma --config /tmp/rdma-copy.toml > /tmp/rdma-copy.log 2>&1 & CP=$!
for i in $(seq 100); do grep -q listening /tmp/rdma-copy.log && break; sleep 0.2; done
timeout 120 nvme connect -t rdma -a 10.0.2.15 -s 4422 -n $R --hostnqn=$RH && sleep 2
CD=$(nvme list | awk '/NVMETRO-RDMA-1/ {print $1}' | grep 'n1$' | head -1)
fio_qd1 copy-fio1 "$CD" "nvmetro-tgt NVMe/RDMA 8k randwrite QD1, rdma_zero_copy = false"
timeout 120 fio --name=copybig --filename="$CD" --rw=write --bs=128k --iodepth=4 --ioengine=libaio --direct=1 \
    --size=16m --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/copy-fio2.txt 2>&1; crc=$?
timeout 60 nvme disconnect -n $R
timeout 120 /mnt/share/nvmetro-perf-rdma --transport rdma --addr 10.0.2.15:4422 --nqn $R --hostnqn $RH --nsid 2 \
  --rw randrw --bs 8k --qd 8 --time 5s --ramp 0s --verify --quiet; prc=$?
set -- $(rdma_data 9465); echo "FIGURE rdma_zero_copy = false: from the host $1 bytes zero-copy, $2 copied; to the host $3 zero-copy, $4 copied"
[ $crc = 0 ] && grep -q 'err= 0' /tmp/copy-fio2.txt && [ $prc = 0 ] && [ "$1" = 0 ] && [ "$2" -gt 0 ] && [ "$3" = 0 ] && [ "$4" -gt 0 ] \
  && echo "CHECK rdma copy path with zero copy off verifies, and copies every byte"
kill -INT $CP; wait $CP
echo "== the same target and namespace over NVMe/TCP in this guest, for the figure beside RDMA's"
modprobe nvme-tcp
timeout 120 nvme connect -t tcp -a 10.0.2.15 -s 4421 -n $R --hostnqn=$RH && sleep 2
TD=$(nvme list | awk '/NVMETRO-RDMA-1/ {print $1}' | grep 'n1$' | head -1)
fio_qd1 tcp-fio1 "$TD" "nvmetro-tgt NVMe/TCP 8k randwrite QD1"
timeout 60 nvme disconnect -n $R
echo "== NVMe/RDMA: a hostile host (bad private data, a too-long SGL, a wrong rkey, a host that vanishes)"
timeout 120 /mnt/share/rdma_hostile_host 10.0.2.15:4420 $R; hrc=$?
[ $hrc = 0 ] && echo "CHECK rdma hostile host cases ok"
timeout 120 nvme connect -t rdma -a 10.0.2.15 -s 4420 -n $R --hostnqn=$RH && sleep 2
RD=$(nvme list | awk '/NVMETRO-RDMA-1/ {print $1}' | grep 'n1$' | head -1)
# The 128k run's blocks (the TCP run above overwrote the first 16 MiB).
timeout 120 fio --name=rdmabig --filename="$RD" --offset=32m --rw=write --bs=128k --iodepth=4 --ioengine=libaio --direct=1 \
    --size=16m --verify=crc32c --verify_only --verify_fatal=1 > /tmp/rdma-fio4.txt 2>&1 && grep -q 'err= 0' /tmp/rdma-fio4.txt \
  && echo "CHECK rdma data verifies after the hostile host"
timeout 60 nvme disconnect -n $R
echo "== NVMe/RDMA: an unknown host and an unknown subsystem are refused"
timeout 120 nvme connect -t rdma -a 10.0.2.15 -s 4420 -n $R --hostnqn=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000bad1 > /tmp/rdma-bad1.txt 2>&1 \
  || echo "CHECK rdma unknown host refused"
timeout 120 nvme connect -t rdma -a 10.0.2.15 -s 4420 -n nqn.2026-11.io.nvmetro:nosuch --hostnqn=$RH > /tmp/rdma-bad2.txt 2>&1 \
  || echo "CHECK rdma unknown subsystem refused"
cat /tmp/rdma-bad1.txt /tmp/rdma-bad2.txt
kill -0 $TP && echo "CHECK rdma target alive after the refusals"
kill -INT $TP; wait $TP
echo "--- nvmetro-tgt (rdma) log"; grep -vE "DEBUG.*(I/O queue (connected|closed))" /tmp/rdma-tgt.log | tail -40
grep -q 'Connect refused' /tmp/rdma-tgt.log && echo "CHECK rdma refusals logged by the target"
grep -E 'RDMA connection accepted' /tmp/rdma-tgt.log | sed 's/.*reactor=/reactor /' | sort | uniq -c
grep -q 'RDMA connection accepted.*reactor=0' /tmp/rdma-tgt.log && grep -q 'RDMA connection accepted.*reactor=1' /tmp/rdma-tgt.log \
  && echo "CHECK rdma queue pairs served on both reactors"
grep -q 'RDMA queue pair ends: the RDMA READ of a command.s data from the host failed' /tmp/rdma-tgt.log && echo "CHECK rdma wrong rkey logged by the target"
grep -q 'NVMe/RDMA connect refused (invalid record format)' /tmp/rdma-tgt.log && echo "CHECK rdma bad private data logged by the target"
echo "== Linux's own target, nvmet-rdma, on a RAM disk in this guest: the same fio, for comparison"
modprobe configfs; mount -t configfs none /sys/kernel/config 2>/dev/null
modprobe nvmet; modprobe nvmet-rdma
# A file in tmpfs of its own (buffered: tmpfs has no O_DIRECT), whatever else uses ram disks.
truncate -s 64M /tmp/krdma.img
C=/sys/kernel/config/nvmet; K=nqn.2026-11.io.nvmetro:kernel-rdma
mkdir -p $C/subsystems/$K && echo 1 > $C/subsystems/$K/attr_allow_any_host
mkdir -p $C/subsystems/$K/namespaces/1 && echo /tmp/krdma.img > $C/subsystems/$K/namespaces/1/device_path
echo 1 > $C/subsystems/$K/namespaces/1/buffered_io && echo 1 > $C/subsystems/$K/namespaces/1/enable
mkdir -p $C/ports/2 && echo rdma > $C/ports/2/addr_trtype && echo ipv4 > $C/ports/2/addr_adrfam
echo 10.0.2.15 > $C/ports/2/addr_traddr && echo 4430 > $C/ports/2/addr_trsvcid && ln -s $C/subsystems/$K $C/ports/2/subsystems/$K
timeout 120 nvme connect -t rdma -a 10.0.2.15 -s 4430 -n $K && sleep 2
KD=$(nvme list | awk '/Linux/ {print $1}' | head -1)
fio_qd1 krdma-fio1 "$KD" "Linux nvmet-rdma 8k randwrite QD1"
timeout 60 nvme disconnect -n $K
echo "== nvmetro-perf --transport rdma --verify against Linux's nvmet-rdma"
truncate -s 0 /tmp/krdma.img; truncate -s 64M /tmp/krdma.img
timeout 120 /mnt/share/nvmetro-perf-rdma --transport rdma --addr 10.0.2.15:4430 --nqn $K \
  --rw randrw --bs 8k --qd 8 --time 5s --ramp 0s --verify --quiet && echo "CHECK nvmetro-perf rdma verify against nvmet-rdma ok"
EOF
}

rdma_checks() { # runs chk (defined by the caller) on the guest log
  chk "rdma: rdma_rxe, ib_uverbs, rdma_ucm loaded" "CHECK rdma modules loaded"
  chk "rdma: rxe0 on eth0" "CHECK rdma rxe0 link added"
  chk "rdma: nvmetro-ffi's rdma unit tests on the device" "CHECK rdma unit tests on rxe0 ok"
  chk "rdma: SEND/RECV both ways" "client: server buffer RemoteBuf"
  chk "rdma: RDMA WRITE bytes checked" "server: client's RDMA WRITE: 4096 bytes match"
  chk "rdma: WRITE with immediate" "server: WRITE with immediate 0xc0ffee arrived"
  chk "rdma: SEND with immediate" "client: SEND with immediate 0xd04e00 arrived"
  chk "rdma: RDMA READ bytes checked" "client: RDMA READ of the server's buffer: 4096 bytes match"
  chk "rdma: wrong rkey gives an error completion" "client: WRITE with a wrong rkey failed as it must"
  chk "rdma: rdma_pingpong passed" "CHECK rdma pingpong ok"
  chk "rdma: rdma_pingpong between two processes" "CHECK rdma pingpong between two processes ok"
  chk "nvme-rdma: host module loaded" "CHECK rdma nvme-rdma loaded"
  chk "nvme-rdma: nvmetro-tgt listens for NVMe/RDMA" "CHECK rdma target listening"
  chk "nvme-rdma: nvme discover -t rdma lists the subsystem" "CHECK rdma discover ok"
  chk "nvme-rdma: nvme connect -t rdma" "CHECK rdma connect ok"
  chk "nvme-rdma: fio timed 8k randwrite" "CHECK rdma fio timed randwrite ok"
  chk "nvme-rdma: fio write then verify crc32c" "CHECK rdma fio write-then-verify crc32c ok"
  chk "nvme-rdma: fio 128k (MDTS) write then verify" "CHECK rdma fio 128k write-then-verify ok"
  chk "nvme-rdma: write data lands in registered buffers uncopied (metrics)" "CHECK rdma write data lands in registered buffers without a copy"
  chk "nvme-rdma: read data goes to the host from the bdev's buffer uncopied (metrics)" "CHECK rdma read data goes to the host from the buffer the bdev read into"
  chk "nvme-rdma: the pools are registered on hugepages" "CHECK rdma zero-copy pools registered on hugepages"
  chk "nvme-rdma: the copy path (rdma_zero_copy = false) verifies" "CHECK rdma copy path with zero copy off verifies, and copies every byte"
  chk "rdma: zero-copy READs into a registered pool" "client: zero-copy RDMA READs of 4096 and 2048 bytes match"
  chk "rdma: a zero-copy read dropped in flight keeps its buffer until its QP is destroyed" "client: the buffer of the read dropped in flight came back"
  chk "nvme-rdma: nvme disconnect" "CHECK rdma disconnect ok"
  chk "nvme-rdma: unknown host refused" "CHECK rdma unknown host refused"
  chk "nvme-rdma: unknown subsystem refused" "CHECK rdma unknown subsystem refused"
  chk "nvme-rdma: target alive after the refusals" "CHECK rdma target alive after the refusals"
  chk "nvme-rdma: refusals logged" "CHECK rdma refusals logged by the target"
  chk "nvme-rdma: queue pairs spread over both reactors" "CHECK rdma queue pairs served on both reactors"
  chk "nvmetro-perf --transport rdma --verify against nvmetro-tgt" "CHECK nvmetro-perf rdma verify against nvmetro-tgt ok"
  chk "nvmetro-perf --transport rdma --verify against Linux nvmet-rdma" "CHECK nvmetro-perf rdma verify against nvmet-rdma ok"
  chk "rdma link: the sites' replication link comes up over RDMA" "CHECK rdma link up between the sites"
  chk "rdma link: two lanes (RC queue pairs) up at both sites, lane 1 driven by the second reactor" "CHECK rdma link: two lanes up at both sites, lane 1 on its own reactor"
  chk "rdma link: two lanes again after B's restart" "CHECK rdma link: two lanes again after B's restart"
  chk "rdma link: writes through site A" "CHECK rdma link: writes through site A ok"
  chk "rdma link: site B reads what A wrote" "CHECK rdma link: site B reads what A wrote"
  chk "rdma link: A learns of B's death at once (rdma_cm disconnect, not the heartbeat)" "CHECK rdma link: A learns of B's death from rdma_cm"
  chk "rdma link: A writes alone while B is killed" "CHECK rdma link: site A writes alone while B is down"
  chk "rdma link: resync over RDMA after B returns" "CHECK rdma link: resync over RDMA finished"
  chk "rdma link: B verifies both regions after the resync" "CHECK rdma link: site B verifies both regions after the resync"
  chk "nvme-rdma: hostile host: bad private data rejected with its status" "CASE bad-private-data: ok"
  chk "nvme-rdma: hostile host: too-long SGL completed with SGL length invalid" "CASE too-long-sgl: ok"
  chk "nvme-rdma: hostile host: wrong rkey ends only that queue pair" "CASE wrong-rkey: ok"
  chk "nvme-rdma: hostile host: a host that vanishes mid-transfer" "CASE vanish: ok"
  chk "nvme-rdma: data verifies after the hostile host" "CHECK rdma data verifies after the hostile host"
  chk "nvme-rdma: wrong rkey logged" "CHECK rdma wrong rkey logged by the target"
  chk "nvme-rdma: bad private data logged" "CHECK rdma bad private data logged by the target"
}

run_rdma() {
  [ -f "$LAB/kernel.env" ] && [ -f "$LAB/initramfs.cpio.gz" ] \
    && [ -e "$LAB/rootfs/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so" ] || setup
  build_rdma_check
  step "boot the guest for the RDMA check (TCG)"
  GUEST_TIMEOUT=${GUEST_TIMEOUT:-600} boot_guest job-rdma.sh "$LAB/guest-rdma.log" ""
  step "guest done"
  tr -d '\r' < "$LAB/guest-rdma.log" | grep -vE '^\s*$' | tail -60
  local npass=0 nfail=0
  chk() { if tr -d '\r' < "$LAB/guest-rdma.log" | grep -E -- "$2" > /dev/null; then echo "PASS $1"; npass=$((npass+1)); else echo "FAIL $1"; nfail=$((nfail+1)); fi; }
  rdma_checks
  echo "lab rdma: $npass passed, $nfail failed"
  [ $nfail = 0 ]
}

run_test() {
  [ -f "$LAB/kernel.env" ] && [ -f "$LAB/initramfs.cpio.gz" ] \
    && [ -e "$LAB/rootfs/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so" ] || setup
  step "build nvmetro-tgt and nvmetro-perf (release)"
  (cd "$REPO" && cargo build --release -q -p nvmetro-tgt -p nvmetro-perf)
  build_rdma_check
  local tgt port nqn hostnqn cfg
  tgt=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/nvmetro-tgt
  cp "$(dirname "$tgt")/nvmetro-perf" "$LAB/share/nvmetro-perf"
  port=${PORT:-$(freeport)}
  nqn=nqn.2026-11.io.nvmetro:lab
  hostnqn=nqn.2014-08.org.nvmexpress:uuid:6c0a5b8e-0d1b-4c8e-9d6a-1ab0c0ffee01
  cfg=$LAB/lab-target.toml
  cat > "$cfg" <<EOF
# written by vendor-scripts/lab.sh: one 256 MiB malloc namespace for the guest
[target]
cores = [0]
poll_mode = "adaptive"

[[bdev]]
name = "mal0"
kind = "malloc"
size = "256MiB"

[[subsystem]]
nqn = "$nqn"
serial = "NVMETRO-LAB-1"
allowed_hosts = ["$hostnqn"]
cntlid_range = [1, 999]

[[subsystem.namespace]]
nsid = 1
bdev = "mal0"
nguid = "6e766d6574726f2d6c61622d6e736964"

[[listener]]
address = "127.0.0.1:$port"
EOF
  local pa pb link wport
  pa=$(freeport); pb=$(freeport); link=$(freeport); wport=$(freeport)
  rm -f "$LAB/tgt.pid" "$LAB/share/reload-add-ns"
  rm -f "$LAB"/metro-*.img "$LAB"/metro-*.meta "$LAB"/witness-state.json "$LAB"/share/kill-a "$LAB"/share/restart-a
  # Metro HA: the witness (a third site) and two sites; the guest's host NQN belongs to site 1.
  cat > "$LAB/witness.toml" <<WIT
listen = "127.0.0.1:$wport"
secret = "lab-metro-witness-secret"
state = "$LAB/witness-state.json"
WIT
  "$(dirname "$tgt")/nvmetro-witness" --config "$LAB/witness.toml" > "$LAB/witness.log" 2>&1 &
  WP=$!
  for site in a b; do
    local role lport range
    if [ $site = a ]; then role="role = \"preferred\"
listen = \"127.0.0.1:$link\""; lport=$pa; range="1, 99"; else role="role = \"secondary\"
peer = \"127.0.0.1:$link\""; lport=$pb; range="100, 199"; fi
    cat > "$LAB/metro-$site.toml" <<METRO
[target]
cores = [0]
site = $([ $site = a ] && echo 1 || echo 2)
socket = "$LAB/metro-$site.sock"
[witness]
address = "127.0.0.1:$wport"
secret = "lab-metro-witness-secret"
[[host]]
nqn = "$hostnqn"
site = 1
[[bdev]]
name = "leg"
kind = "file"
path = "$LAB/metro-$site.img"
size = "128MiB"
[[bdev]]
name = "m"
kind = "mirror"
local = "leg"
$role
metadata = "$LAB/metro-$site.meta"
[[subsystem]]
nqn = "nqn.2026-11.io.nvmetro:lab-metro"
allow_any_host = true
cntlid_range = [$range]
[[subsystem.namespace]]
nsid = 1
bdev = "m"
[[listener]]
address = "127.0.0.1:$lport"
METRO
  done
  "$tgt" --config "$LAB/metro-a.toml" > "$LAB/metro-a.log" 2>&1 &
  echo $! > "$LAB/metro-a.pid"
  "$tgt" --config "$LAB/metro-b.toml" > "$LAB/metro-b.log" 2>&1 &
  MB=$!
  # The guest asks for site A's death and return through files in the shared folder.
  ( while :; do
      if [ -f "$LAB/share/kill-a" ]; then rm -f "$LAB/share/kill-a"; kill -9 "$(cat "$LAB/metro-a.pid")"; echo "$(date +%T.%N) site A killed" >> "$LAB/metro-events.log"; fi
      if [ -f "$LAB/share/switchover" ]; then rm -f "$LAB/share/switchover"
        # At the site that orders writes now (after A's death and return that may be B).
        for s in a b; do
          out=$("$(dirname "$tgt")/nvmetro" --config "$LAB/metro-$s.toml" switchover m 2>&1) && { echo $s > "$LAB/share/switched-from"; break; }
          echo "$(date +%T.%N) nvmetro switchover m at site $s: $out" >> "$LAB/metro-events.log"
        done
        echo "$(date +%T.%N) nvmetro switchover m at site $s: $out" >> "$LAB/metro-events.log"; fi
      if [ -f "$LAB/share/restart-a" ]; then rm -f "$LAB/share/restart-a"
        "$tgt" --config "$LAB/metro-a.toml" >> "$LAB/metro-a.log" 2>&1 & echo $! > "$LAB/metro-a.pid"; echo "$(date +%T.%N) site A restarted" >> "$LAB/metro-events.log"; fi
      if [ -f "$LAB/share/reload-add-ns" ] && [ -f "$LAB/tgt.pid" ]; then rm -f "$LAB/share/reload-add-ns"
        # An operator's edit: a second namespace, then SIGHUP; the guest stays connected.
        printf '\n[[bdev]]\nname = "mal1"\nkind = "malloc"\nsize = "64MiB"\n\n[[subsystem]]\nnqn = "%s"\nserial = "NVMETRO-LAB-1"\nallowed_hosts = ["%s"]\ncntlid_range = [1, 999]\n\n[[subsystem.namespace]]\nnsid = 1\nbdev = "mal0"\nnguid = "6e766d6574726f2d6c61622d6e736964"\n\n[[subsystem.namespace]]\nnsid = 2\nbdev = "mal1"\n' "$nqn" "$hostnqn" > "$LAB/lab-target.extra"
        python3 - "$cfg" "$LAB/lab-target.extra" <<'PY'
import sys
cfg, extra = sys.argv[1], open(sys.argv[2]).read()
text = open(cfg).read()
head, tail = text.split("[[subsystem]]", 1)
listener = "[[listener]]" + tail.split("[[listener]]", 1)[1]
open(cfg, "w").write(head + extra + "\n" + listener)
PY
        kill -HUP "$(cat "$LAB/tgt.pid")"; echo "$(date +%T.%N) target reloaded with a second namespace" >> "$LAB/metro-events.log"; fi
      sleep 0.1
    done ) &
  WATCH=$!
  step "start nvmetro-tgt on 127.0.0.1:$port"
  "$tgt" --config "$cfg" > "$LAB/target.log" 2>&1 &
  TPID=$!
  echo $TPID > "$LAB/tgt.pid"
  trap 'kill $TPID $MB $WP $WATCH $(cat "$LAB/metro-a.pid") 2>/dev/null || true' EXIT
  local tpid=$TPID
  for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null && break; sleep 0.1; done

  cat > "$LAB/share/job-host.sh" <<'EOF'
arg() { for x in $(cat /proc/cmdline); do case $x in $1=*) echo "${x#*=}";; esac; done; }
PORT=$(arg lab.port); NQN=$(arg lab.nqn); HOSTNQN=$(arg lab.hostnqn); PA=$(arg lab.pa); PB=$(arg lab.pb)
mkdir -p /etc/nvme; echo "$HOSTNQN" > /etc/nvme/hostnqn
modprobe nvme-tcp && echo "CHECK modprobe ok"
echo "== nvme discover"
nvme discover -t tcp -a 10.0.2.2 -s "$PORT" && echo "CHECK discover ok"
echo "== nvme connect"
nvme connect -t tcp -a 10.0.2.2 -s "$PORT" -n "$NQN" && echo "CHECK connect ok"
sleep 2
nvme list
DEV=$(ls /dev/nvme*n1 2>/dev/null | head -1)
[ -b "$DEV" ] && echo "CHECK namespace $DEV"
nvme id-ctrl /dev/nvme0 | grep -E '^(vid|sn|mn|subnqn|cmic|oaes|anacap|anatt|anagrpmax|nanagrpid|kas|mdts|fuses|vwc|oncs) '
nvme id-ns "$DEV" | grep -E '^(nsze|nmic|nguid|anagrpid|lbaf)'
nvme ana-log /dev/nvme0 && echo "CHECK ana-log ok"
nvme list-subsys
echo "== fio 8k randwrite QD1 for 20 s, crc32c headers (the figure)"
fio --name=lab8k --filename="$DEV" --rw=randwrite --bs=8k --iodepth=1 --ioengine=libaio --direct=1 \
    --size=64m --time_based --runtime=20 --verify=crc32c --do_verify=0 --lat_percentiles=1 > /tmp/fio.txt 2>&1; rc=$?
grep -E 'err=|IOPS=|^ +lat \(usec\)|50.00th|99.00th' /tmp/fio.txt
[ $rc = 0 ] && grep -q 'err= 0' /tmp/fio.txt && echo "CHECK fio timed randwrite ok"
echo "FIO $(grep -E 'write: IOPS=' /tmp/fio.txt | head -1)"
echo "== fio 8k randwrite of every block of 32 MiB at QD8, then read back and verify crc32c"
fio --name=labverify --filename="$DEV" --offset=64m --rw=randwrite --bs=8k --iodepth=8 --ioengine=libaio --direct=1 \
    --size=32m --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio2.txt 2>&1; rc=$?
grep -E 'err=|IOPS=|verify' /tmp/fio2.txt
[ $rc = 0 ] && grep -q 'err= 0' /tmp/fio2.txt && grep -qE 'read: IOPS=' /tmp/fio2.txt && echo "CHECK fio write-then-verify ok"
echo "== the stamps written in the timed run still verify after a reconnect"
nvme disconnect -n "$NQN" >/dev/null; nvme connect -t tcp -a 10.0.2.2 -s "$PORT" -n "$NQN" >/dev/null; sleep 2
DEV=$(ls /dev/nvme*n1 2>/dev/null | head -1)
fio --name=labverify --filename="$DEV" --offset=64m --rw=randwrite --bs=8k --iodepth=8 --ioengine=libaio --direct=1 \
    --size=32m --verify=crc32c --verify_only --verify_fatal=1 > /tmp/fio3.txt 2>&1 && grep -q 'err= 0' /tmp/fio3.txt && echo "CHECK fio verify after reconnect ok"
grep -E 'err=|read: IOPS=' /tmp/fio3.txt
echo "== reload: the operator adds a namespace; it appears here without a reconnect"
touch /mnt/share/reload-add-ns
for i in $(seq 60); do [ -b "${DEV%n1}n2" ] && break; sleep 0.5; done
nvme list
nvme list | grep -q "${DEV%n1}n2" && echo "CHECK reload namespace appeared without reconnect ($i polls)"
nvme disconnect -n "$NQN" && echo "CHECK disconnect ok"
echo "== metro: write through site A, read back and verify through site B"
M=nqn.2026-11.io.nvmetro:lab-metro
nvme connect -t tcp -a 10.0.2.2 -s "$PA" -n $M && sleep 2
MD=$(nvme list | awk '/nvmetro/ {print $1}' | head -1); echo "site A device: $MD"
fio --name=metro --filename="$MD" --rw=randwrite --bs=8k --iodepth=8 --ioengine=libaio --direct=1 --size=32m \
    --verify=crc32c --do_verify=0 > /tmp/fio-ma.txt 2>&1 && grep -q 'err= 0' /tmp/fio-ma.txt && echo "CHECK metro write via A ok"
grep -E 'write: IOPS=' /tmp/fio-ma.txt
nvme disconnect -n $M; sleep 1
nvme connect -t tcp -a 10.0.2.2 -s "$PB" -n $M && sleep 2
MD=$(nvme list | awk '/nvmetro/ {print $1}' | head -1); echo "site B device: $MD"
fio --name=metro --filename="$MD" --rw=randwrite --bs=8k --iodepth=8 --ioengine=libaio --direct=1 --size=32m \
    --verify=crc32c --verify_only --verify_fatal=1 > /tmp/fio-mb.txt 2>&1 && grep -q 'err= 0' /tmp/fio-mb.txt && echo "CHECK metro verify via B ok"
grep -E 'read: IOPS=|verify' /tmp/fio-mb.txt | head -3
nvme disconnect -n $M; sleep 1
echo "== metro HA: native multipath to both sites, fio with verify while site A is killed"
echo "native multipath: $(cat /sys/module/nvme_core/parameters/multipath)"
nvme connect -t tcp -a 10.0.2.2 -s "$PA" -n $M -c 1 -l 120 && nvme connect -t tcp -a 10.0.2.2 -s "$PB" -n $M -c 1 -l 120 && sleep 3
# Each path's ANA state as the kernel sees it: "A optimized" / "B non-optimized".
paths() { for c in /sys/class/nvme/nvme*; do [ "$(cat $c/subsysnqn 2>/dev/null)" = $M ] || continue
  port=$(sed -n 's/.*trsvcid=\([0-9]*\).*/\1/p' $c/address); site=B; [ "$port" = "$PA" ] && site=A
  echo "$site $(cat $c/state) $(cat $c/nvme*c*n1/ana_state 2>/dev/null | head -1)"; done | sort; }
nvme list-subsys
paths | tee /tmp/paths.txt
for c in /sys/class/nvme/nvme*; do [ "$(cat $c/subsysnqn)" = $M ] && nvme ana-log /dev/$(basename $c) | grep -E '^(state|nsid)' | head -2; done
grep -q '^A live optimized' /tmp/paths.txt && grep -q '^B live non-optimized' /tmp/paths.txt && echo "CHECK metro paths optimized and non-optimized"
MD=/dev/$(ls /sys/block | grep -E '^nvme[0-9]+n1$' | while read d; do [ "$(cat /sys/block/$d/device/subsysnqn 2>/dev/null || cat /sys/block/$d/device/../subsysnqn 2>/dev/null)" = $M ] && echo $d; done | head -1)
[ "$MD" = /dev/ ] && MD=$(nvme list | awk '/nvmetro/ {print $1}' | tail -1)
echo "multipath device: $MD"
( sleep 8; touch /mnt/share/kill-a; echo "asked the host to kill site A" ) &
fio --name=metroha --filename="$MD" --rw=randwrite --bs=8k --iodepth=4 --ioengine=libaio --direct=1 --size=16m \
    --rate_iops=150 --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio-ha.txt 2>&1; rc=$?
grep -E 'err=|IOPS=|verify|lat \(msec\)|clat \(msec\)' /tmp/fio-ha.txt | head -8
[ $rc = 0 ] && grep -q 'err= 0' /tmp/fio-ha.txt && grep -qE 'read: IOPS=' /tmp/fio-ha.txt && echo "CHECK metro fio verify through the death of site A ok"
paths | tee /tmp/paths2.txt
grep -q '^B live optimized' /tmp/paths2.txt && echo "CHECK metro surviving site B optimized"
touch /mnt/share/restart-a; echo "asked the host to restart site A"
for i in $(seq 120); do
  paths > /tmp/paths3.txt
  grep -q '^A live optimized' /tmp/paths3.txt && grep -q '^B live non-optimized' /tmp/paths3.txt && break; sleep 1; done
cat /tmp/paths3.txt
grep -q '^A live optimized' /tmp/paths3.txt && grep -q '^B live non-optimized' /tmp/paths3.txt && echo "CHECK metro back to optimized and non-optimized after A returned ($i s)"
fio --name=metroha --filename="$MD" --rw=randwrite --bs=8k --iodepth=4 --ioengine=libaio --direct=1 --size=16m \
    --verify=crc32c --verify_only --verify_fatal=1 > /tmp/fio-ha2.txt 2>&1 && grep -q 'err= 0' /tmp/fio-ha2.txt && echo "CHECK metro data verifies after failback"
echo "== metro: planned switchover (nvmetro switchover at the site that orders writes) under fio with verify"
rm -f /mnt/share/switched-from
( sleep 6; touch /mnt/share/switchover; echo "asked the host to switch the mirror over" ) &
timeout 300 fio --name=metrosw --filename="$MD" --offset=32m --rw=randwrite --bs=8k --iodepth=4 --ioengine=libaio --direct=1 --size=16m \
    --rate_iops=150 --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio-sw.txt 2>&1; rc=$?
grep -E 'err=|IOPS=|verify|clat \(msec\)|lat \(usec\)' /tmp/fio-sw.txt | head -6
[ $rc = 0 ] && grep -q 'err= 0' /tmp/fio-sw.txt && grep -qE 'read: IOPS=' /tmp/fio-sw.txt && echo "CHECK metro fio verify through a planned switchover ok"
F=$(cat /mnt/share/switched-from 2>/dev/null | tr a-b A-B); T=$([ "$F" = A ] && echo B || echo A)
echo "switched over from site ${F:-none} to site $T"
for i in $(seq 60); do paths > /tmp/paths4.txt
  grep -q "^$T live optimized" /tmp/paths4.txt && grep -q "^$F live non-optimized" /tmp/paths4.txt && break; sleep 1; done
cat /tmp/paths4.txt
[ -n "$F" ] && grep -q "^$T live optimized" /tmp/paths4.txt && grep -q "^$F live non-optimized" /tmp/paths4.txt \
  && echo "CHECK metro paths follow the switchover (the new ordering site optimized, the old one non-optimized)"
timeout 60 nvme disconnect -n $M
echo "== nvmetro-perf (our initiator) against the Linux kernel target, nvmet, on a RAM disk in the guest"
modprobe configfs; mount -t configfs none /sys/kernel/config 2>/dev/null
modprobe brd rd_nr=1 rd_size=65536 && modprobe nvmet && modprobe nvmet-tcp
C=/sys/kernel/config/nvmet; K=nqn.2026-11.io.nvmetro:kernel-target
mkdir $C/subsystems/$K && echo 1 > $C/subsystems/$K/attr_allow_any_host
mkdir $C/subsystems/$K/namespaces/1 && echo /dev/ram0 > $C/subsystems/$K/namespaces/1/device_path && echo 1 > $C/subsystems/$K/namespaces/1/enable
mkdir $C/ports/1 && echo tcp > $C/ports/1/addr_trtype && echo ipv4 > $C/ports/1/addr_adrfam
echo 127.0.0.1 > $C/ports/1/addr_traddr && echo 4420 > $C/ports/1/addr_trsvcid && ln -s $C/subsystems/$K $C/ports/1/subsystems/$K
/mnt/share/nvmetro-perf --addr 127.0.0.1:4420 --nqn $K --rw randrw --bs 8k --qd 8 --time 5s --ramp 0s --verify --digest \
  && echo "CHECK nvmetro-perf verify against nvmet ok"
sh /mnt/share/job-rdma.sh
EOF
  step "boot the guest (TCG; a few minutes)"
  GUEST_TIMEOUT=${GUEST_TIMEOUT:-1500} boot_guest job-host.sh "$LAB/guest.log" "lab.port=$port lab.nqn=$nqn lab.hostnqn=$hostnqn lab.pa=$pa lab.pb=$pb"
  kill $WATCH 2>/dev/null || true
  cat "$LAB/metro-events.log" 2>/dev/null || true
  step "guest done"
  tr -d '\r' < "$LAB/guest.log" | grep -vE '^\s*$' | tail -120

  local npass=0 nfail=0
  # grep without -q reads to the end: with -q, tr may die of SIGPIPE and pipefail calls it a miss.
  chk() { if tr -d '\r' < "$LAB/guest.log" | grep -E -- "$2" > /dev/null; then echo "PASS $1"; npass=$((npass+1)); else echo "FAIL $1"; nfail=$((nfail+1)); fi; }
  chk "guest loaded nvme-tcp" "CHECK modprobe ok"
  chk "nvme discover" "CHECK discover ok"
  chk "discovery log names the subsystem" "subnqn: +$nqn"
  chk "nvme connect" "CHECK connect ok"
  chk "namespace block device" "CHECK namespace /dev/nvme"
  chk "id-ctrl cmic multi-controller+ANA" "^cmic +: 0xa"
  chk "nvme ana-log" "CHECK ana-log ok"
  chk "ana-log lists namespace 1 in group 1" "nsid[[:space:]]+:[[:space:]]+1"
  chk "fio timed 8k randwrite" "CHECK fio timed randwrite ok"
  chk "fio write then verify" "CHECK fio write-then-verify ok"
  chk "fio verify after reconnect" "CHECK fio verify after reconnect ok"
  chk "reload: added namespace in nvme list without reconnect" "CHECK reload namespace appeared without reconnect"
  chk "nvme disconnect" "CHECK disconnect ok"
  chk "metro: fio writes through site A" "CHECK metro write via A ok"
  chk "metro: fio verifies through site B" "CHECK metro verify via B ok"
  chk "metro HA: host paths Optimized (own site) and Non-Optimized" "CHECK metro paths optimized and non-optimized"
  chk "metro HA: fio with verify through SIGKILL of site A" "CHECK metro fio verify through the death of site A ok"
  chk "metro HA: surviving site reports Optimized" "CHECK metro surviving site B optimized"
  chk "metro HA: paths go back after site A returns" "CHECK metro back to optimized and non-optimized"
  chk "metro HA: data verifies after failback" "CHECK metro data verifies after failback"
  chk "metro: fio with verify through a planned switchover, zero errors" "CHECK metro fio verify through a planned switchover ok"
  chk "metro: the switchover succeeded and the paths follow it" "CHECK metro paths follow the switchover"
  chk "nvmetro-perf --verify against Linux nvmet" "CHECK nvmetro-perf verify against nvmet ok"
  rdma_checks
  if kill -0 $tpid 2>/dev/null && python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),1)"; then
    echo "PASS target healthy after the host left"; npass=$((npass+1))
  else echo "FAIL target healthy after the host left"; nfail=$((nfail+1)); fi
  kill -INT $tpid 2>/dev/null || true; wait $tpid 2>/dev/null || true
  echo "--- target log (tail)"; tail -20 "$LAB/target.log"
  echo "lab: $npass passed, $nfail failed"
  [ $nfail = 0 ]
}

case "${1:-test}" in
  setup) setup ;;
  test) run_test ;;
  rdma) run_rdma ;;
  shell)
    . "$LAB/kernel.env"
    exec qemu-system-x86_64 -accel tcg -bios /usr/share/qemu/qboot.rom -m 1536 -smp 2 -nographic -no-reboot \
      -kernel "$LAB/rootfs/boot/vmlinuz-$K" -initrd "$LAB/initramfs.cpio.gz" -append "console=ttyS0 panic=-1" \
      -virtfs local,path="$LAB/rootfs",mount_tag=rootfs,security_model=none,readonly=on,id=rootfs \
      -virtfs local,path="$LAB/share",mount_tag=share,security_model=none,id=share \
      -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= ;;
  *) echo "usage: $0 setup|test|rdma|shell" >&2; exit 2 ;;
esac
