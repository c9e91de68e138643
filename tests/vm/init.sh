#!/bin/busybox sh
# /init of the test VMs' initramfs (busybox only). Driven by the kernel command line:
#   vmtest.mode=root    mount the 9p share tagged "root" read-only, overlay a tmpfs on it,
#                       mount the read-write shares, chroot and run vmtest.run; write its
#                       exit code to <vmtest.ctl>/rc; power off.
#   vmtest.mode=serial  write the lines of vmtest.lines (comma-separated base64, one
#                       write each) to the virtio port vmtest.port; echo back whatever
#                       arrives on the port vmtest.echo; then wait (never exits).
#   vmtest.modules=a,b  extra kernel modules to load (with their dependencies)
#   vmtest.shares=tag:/path,...  read-write 9p shares to mount (root mode)
#   vmtest.ctl=/path    the share holding run.sh, rc and the console log (root mode)
#   vmtest.run=/path    the executable to run in the chroot (default <ctl>/run.sh)
#   vmtest.repo=/path   a directory that must stay visible in the chroot: when it lies
#                       under /tmp or /run (hidden by their tmpfs), it gets its own overlay
#   vmtest.hostname=NAME, vmtest.verbose=1, vmtest.tmpfs=SIZE (overlay upper, default 75%)
/bin/busybox mkdir -p /usr/bin /sbin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

mode=root modules= shares= ctl= run= repo= verbose=0 port= lines= echo= tmpfs=75% name=vm
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vmtest.mode=*) mode=${arg#*=} ;;
    vmtest.modules=*) modules=${arg#*=} ;;
    vmtest.shares=*) shares=${arg#*=} ;;
    vmtest.ctl=*) ctl=${arg#*=} ;;
    vmtest.run=*) run=${arg#*=} ;;
    vmtest.repo=*) repo=${arg#*=} ;;
    vmtest.verbose=*) verbose=${arg#*=} ;;
    vmtest.port=*) port=${arg#*=} ;;
    vmtest.lines=*) lines=${arg#*=} ;;
    vmtest.echo=*) echo=${arg#*=} ;;
    vmtest.tmpfs=*) tmpfs=${arg#*=} ;;
    vmtest.hostname=*) name=${arg#*=} ;;
  esac
done

log() { [ "$verbose" = 1 ] && echo "vmtest-init: $*"; }
die() {
  echo "vmtest-init: FATAL: $*"
  [ "$mode" = root ] && { sync; poweroff -f; }
  exec sleep 1000000
}

load() { # load module $1 and its dependencies
  for m in $(cat "/lib/vmtest/deps/$1" 2>/dev/null || echo "$1"); do
    grep -q "^$m " /proc/modules && continue
    insmod "/lib/vmtest/modules/$m.ko" || die "insmod $m failed"
  done
}

# /dev/virtio-ports/<name> links, as udev would make them (under $1/dev).
port_links() {
  mkdir -p "$1/dev/virtio-ports"
  for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] || continue
    n=$(cat "$p/name")
    [ -n "$n" ] && ln -sf "../${p##*/}" "$1/dev/virtio-ports/$n"
  done
}

wait_port() { # wait (up to ~10 s) for the virtio port named $1
  i=0
  while [ $i -lt 200 ]; do
    for p in /sys/class/virtio-ports/*; do
      [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && return 0
    done
    i=$((i + 1))
    sleep 0.05
  done
  return 1
}

hostname "$name"
ip link set lo up 2>/dev/null
stty -F /dev/console -onlcr 2>/dev/null
log "mode=$mode modules=$modules"
for m in virtio_pci virtio_console virtio_rng $(echo "$modules" | tr , ' '); do load "$m"; done

if [ "$mode" = serial ]; then
  for n in $port $echo; do wait_port "$n" || die "no virtio port named $n"; done
  port_links ""
  if [ -n "$echo" ]; then
    # One open of the port for both directions (a virtio port opens once at a time).
    sh -c 'while :; do cat <&3 >&3; sleep 0.1; done' 3<>"/dev/virtio-ports/$echo" &
  fi
  if [ -n "$port" ]; then
    for l in $(echo "$lines" | tr , ' '); do
      echo "$l" | base64 -d > "/dev/virtio-ports/$port" || echo "vmtest-init: write to $port failed"
    done
  fi
  log "serial guest ready"
  while :; do sleep 1000000; done
fi

[ "$mode" = root ] || die "unknown vmtest.mode=$mode"
[ -n "$ctl" ] || die "vmtest.ctl is not set"
load 9pnet_virtio
load 9p
load overlay
mkdir -p /mnt/lower /mnt/rw /mnt/root
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose root /mnt/lower ||
  die "cannot mount the root 9p share"
mount -t tmpfs -o "size=$tmpfs,mode=0755" rw /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work root /mnt/root ||
  die "cannot mount the overlay root"
r=/mnt/root
mount -t proc proc $r/proc
mount -t sysfs sys $r/sys
mount -t devtmpfs dev $r/dev
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $r/dev/pts
mount -t tmpfs -o mode=1777 shm $r/dev/shm
mount -t tmpfs -o mode=1777 tmp $r/tmp
mount -t tmpfs -o mode=0755 run $r/run
if [ -n "$repo" ] && [ ! -d "$r$repo" ] && [ -d "/mnt/lower$repo" ]; then
  mkdir -p /mnt/rw/repo-upper /mnt/rw/repo-work "$r$repo"
  mount -t overlay -o "lowerdir=/mnt/lower$repo,upperdir=/mnt/rw/repo-upper,workdir=/mnt/rw/repo-work" \
    repo "$r$repo" || die "cannot mount the overlay for $repo"
fi
for s in $(echo "$shares" | tr , ' '); do
  mkdir -p "$r${s#*:}"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none "${s%%:*}" "$r${s#*:}" ||
    die "cannot mount share $s"
done
port_links $r
[ -n "$run" ] || run=$ctl/run.sh
log "running $run"
cut -d" " -f1 /proc/uptime > "$r$ctl/started" 2>/dev/null
chroot $r "$run"
rc=$?
log "exit code $rc"
echo $rc > "$r$ctl/rc.tmp" && mv "$r$ctl/rc.tmp" "$r$ctl/rc"
sync
poweroff -f
