#!/usr/bin/env bash
# make test-kernels: nsflow's tests on a matrix of real kernels.
#
# For each kernel of the matrix (Debian 12's own packages, fetched with apt
# and cached), it packs the statically built test binaries (the bpf package's
# tests and test/kernels' end-to-end count test), a static busybox and the
# kernel's modules nsflow needs (veth, sch_ingress for clsact, cls_bpf, tun
# for the bpf tests' frames, with their dependencies) into an initramfs,
# boots it under QEMU, runs the tests inside and reads their results from the
# serial console. A kernel that hangs is killed after a timeout and reported
# as failed. The running kernel is the matrix's last row: the same binaries,
# run natively. The per-kernel table goes to stdout; the full serial logs to
# $NSFLOW_KERNEL_CACHE/logs/<run>/ (logs/latest). Exit status: 0 only if
# every row passed.
#
# Settings (environment):
#   NSFLOW_KERNEL_CACHE    cache of packages, extracted kernels and logs
#                          (default /var/cache/nsflow-kernels, outside the repo)
#   NSFLOW_KERNELS         Debian flavours of linux-image-<flavour>, resolved to
#                          their current 6.1 package through the metapackage
#                          (default "cloud-amd64 rt-amd64"); or exact packages
#                          (linux-image-6.1.0-57-rt-amd64-unsigned)
#   NSFLOW_KERNEL_NATIVE   1 (default): also run on the running kernel
#   NSFLOW_KERNEL_SMP      vCPUs per VM (default 2: the count test sends from
#                          every CPU at once)
#   NSFLOW_KERNEL_MEM      MiB per VM (default 1024)
#   NSFLOW_KERNEL_TIMEOUT  seconds before a VM is killed (default 300)
#   NSFLOW_KERNEL_ACCEL    QEMU accelerator (default tcg: nested KVM hangs here)
#   NSFLOW_KERNEL_BPF_RUN  -test.run pattern of the bpf tests (default: all)
#   NSFLOW_KERNEL_BPF_SKIP -test.skip pattern of the bpf tests (default: the
#                          random and fuzz-seed frames, 60 of the 150 s the
#                          bpf tests take under TCG; the crafted frames run,
#                          and `go test ./...` runs them all natively). Set it
#                          empty for the full set
#   NSFLOW_KERNEL_COUNT_RUN -test.run pattern of test/kernels' nsflow tests
#                          (default ^Test(Count|Restart)$; TestHarness, the harness's own
#                          canary with a minimal TC program, always runs first)
set -euo pipefail
cd "$(dirname "$0")/../.."

GO=${GO:-go}
CACHE=${NSFLOW_KERNEL_CACHE:-/var/cache/nsflow-kernels}
KERNELS=${NSFLOW_KERNELS:-"cloud-amd64 rt-amd64"}
NATIVE=${NSFLOW_KERNEL_NATIVE:-1}
SMP=${NSFLOW_KERNEL_SMP:-2}
MEM=${NSFLOW_KERNEL_MEM:-1024}
TIMEOUT=${NSFLOW_KERNEL_TIMEOUT:-300}
ACCEL=${NSFLOW_KERNEL_ACCEL:-tcg}
BPF_RUN=${NSFLOW_KERNEL_BPF_RUN:-.}
BPF_SKIP=${NSFLOW_KERNEL_BPF_SKIP-^(TestRandomFrames|FuzzProgram)\$}
COUNT_RUN=${NSFLOW_KERNEL_COUNT_RUN:-^Test(Count|Restart)\$}
TEST_TIMEOUT=${NSFLOW_KERNEL_TEST_TIMEOUT:-4m}
# The kernel modules nsflow and its tests need; their dependencies are added.
# xfrm_user and nfnetlink: the netlink library opens a route, an xfrm and a
# netfilter socket per handle; a node's kernel autoloads their modules
# (modprobe), the initramfs has no modprobe, so they are loaded up front.
MODULES="veth sch_ingress cls_bpf tun xfrm_user nfnetlink"

say() { echo "test-kernels: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (BPF, namespaces; apt for the kernel packages)"
for c in qemu-system-x86_64 busybox cpio gzip dpkg-deb apt-get; do
	command -v "$c" >/dev/null || die "$c not found: make deps installs qemu-system-x86, busybox-static and cpio"
done
BUSYBOX=$(command -v busybox)

mkdir -p "$CACHE/debs" "$CACHE/logs"
WORK=$(mktemp -d /tmp/nsflow-kernels.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# Each run's logs in a directory of its own (runs may overlap), the newest
# also as logs/latest; the last 20 runs are kept.
LOGS=$CACHE/logs/$(date -u +%Y%m%dT%H%M%SZ)-$$
mkdir -p "$LOGS" && ln -sfn "$LOGS" "$CACHE/logs/latest"
ls -d "$CACHE"/logs/2*-* 2>/dev/null | sort | head -n -20 | xargs -r rm -rf
# Fetching and extracting a kernel is serialized between runs.
exec 9>"$CACHE/.lock"

# --- the test binaries, static ---------------------------------------------
t0=$(date +%s)
CGO_ENABLED=0 $GO test -c -o "$WORK/bpf.test" ./bpf/
CGO_ENABLED=0 $GO test -c -o "$WORK/kernels.test" ./test/kernels/
say "test binaries built in $(( $(date +%s) - t0 ))s"

# --- kernels: resolve, fetch (cached), extract (cached) --------------------
apt_updated=0
resolve() { # flavour or package -> package name of the unsigned image
	local k=$1 pkg
	case "$k" in linux-image-*) echo "$k"; return;; esac
	pkg=$(apt-cache depends "linux-image-$k" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
	if [ -z "$pkg" ] && [ $apt_updated -eq 0 ]; then
		apt-get update -qq >&2 || true; apt_updated=1
		pkg=$(apt-cache depends "linux-image-$k" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
	fi
	if [ -z "$pkg" ]; then # offline: the newest one cached
		pkg=$(ls -d "$CACHE"/linux-image-*-"$k"-unsigned 2>/dev/null | sort -V | tail -n1 | xargs -r basename)
		[ -n "$pkg" ] || { say "cannot resolve linux-image-$k (apt-cache depends) and none is cached"; return 1; }
		echo "$pkg"; return
	fi
	echo "${pkg%-unsigned}-unsigned"
}

fetch() { # package -> extracted dir
	local pkg=$1 dir=$CACHE/$1
	flock 9
	if [ ! -e "$dir/.ok" ]; then
		local deb
		deb=$(ls "$CACHE/debs/${pkg}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)
		if [ -z "$deb" ]; then
			( cd "$CACHE/debs" && apt-get download -q "$pkg" >&2 ) || { say "apt-get download $pkg failed"; return 1; }
			deb=$(ls "$CACHE/debs/${pkg}_"*.deb | sort -V | tail -n1)
		fi
		rm -rf "$dir" && mkdir -p "$dir"
		dpkg-deb -x "$deb" "$dir"
		touch "$dir/.ok"
	fi
	flock -u 9
	echo "$dir"
}

# modfile DIR NAME: the module file of NAME (- and _ are one) in the tree
modfile() { find "$1" -name "$2.ko*" -o -name "$(echo "$2" | tr _ -).ko*" -o -name "$(echo "$2" | tr - _).ko*" | head -n1; }

# Modules in load order (dependencies first), copied decompressed to $2.
declare -A seen
addmod() { # moddir name dest order-file
	local dir=$1 name=$2 dest=$3 order=$4 f base deps d
	[ -n "${seen[$name]:-}" ] && return 0
	seen[$name]=1
	if grep -qE "/${name//_/[-_]}\.ko\$" "$dir/modules.builtin" 2>/dev/null; then return 0; fi
	f=$(modfile "$dir/kernel" "$name")
	[ -n "$f" ] || { say "module $name not found in $dir"; return 1; }
	base=$(basename "$f"); base=${base%%.ko*}
	case "$f" in
		*.ko.xz) xz -dc "$f" >"$dest/$base.ko";;
		*.ko.zst) zstd -qdc "$f" >"$dest/$base.ko";;
		*.ko.gz) gzip -dc "$f" >"$dest/$base.ko";;
		*) cp "$f" "$dest/$base.ko";;
	esac
	deps=$(tr '\0' '\n' <"$dest/$base.ko" | sed -n 's/^depends=//p' | head -n1 | tr , ' ')
	for d in $deps; do addmod "$dir" "$d" "$dest" "$order"; done
	echo "$base.ko" >>"$order"
}

# --- the guest's init --------------------------------------------------------
write_init() { # root
	cat >"$1/init" <<EOF
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /usr/bin /sbin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/bin CI=true HOME=/tmp
mount -t devtmpfs dev /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
for m in \$(cat /modules.order); do insmod /modules/\$m || echo "NSFLOW-INSMOD-FAILED \$m"; done
ip link set lo up
echo "NSFLOW-KERNEL \$(uname -r) cpus=\$(nproc) boot=\$(cut -d' ' -f1 /proc/uptime)s btf=\$([ -e /sys/kernel/btf/vmlinux ] && echo yes || echo no)"
run() {
	name=\$1; shift
	s=\$(cut -d' ' -f1 /proc/uptime)
	"\$@"; rc=\$?
	echo "NSFLOW-RESULT \$name rc=\$rc start=\$s end=\$(cut -d' ' -f1 /proc/uptime)"
}
cd /tmp
run harness /kernels.test -test.v -test.count=1 -test.timeout $TEST_TIMEOUT -test.run '^TestHarness$'
run bpf /bpf.test -test.v -test.count=1 -test.timeout $TEST_TIMEOUT -test.run '$BPF_RUN' -test.skip '$BPF_SKIP'
run count /kernels.test -test.v -test.count=1 -test.timeout $TEST_TIMEOUT -test.run '$COUNT_RUN'
echo NSFLOW-DONE
poweroff -f
EOF
	chmod +x "$1/init"
}

# --- the table -------------------------------------------------------------
ROWS=()
NOTES=()
FAILED=0
FMT='%-24s %-9s %-6s %-11s %-11s %-11s %-7s %-7s %s'
secs() { awk -v s="$1" -v e="$2" 'BEGIN{printf "%.1f", e-s}'; }
verdict() { [ "$1" = 0 ] && echo PASS || echo "FAIL"; }
# summarize NAME WHERE LOG WALL: one row from a log with NSFLOW-* lines
summarize() {
	local name=$1 where=$2 log=$3 wall=$4 boot harness bpf count mode line rc s e r
	boot=$(sed -n 's/.*NSFLOW-KERNEL .* boot=\([0-9.]*\)s.*/\1/p' "$log" | head -n1)
	for t in harness bpf count; do
		line=$(grep -a "NSFLOW-RESULT $t " "$log" | head -n1 || true)
		if [ -z "$line" ]; then r="NOT-RUN"; else
			rc=$(echo "$line" | sed -n 's/.* rc=\([0-9]*\).*/\1/p')
			s=$(echo "$line" | sed -n 's/.* start=\([0-9.]*\).*/\1/p')
			e=$(echo "$line" | sed -n 's/.* end=\([0-9.]*\).*/\1/p')
			r="$(verdict "$rc") $(secs "$s" "$e")s"
		fi
		case $t in harness) harness=$r;; bpf) bpf=$r;; count) count=$r;; esac
	done
	mode=$(grep -ao 'NSFLOW-MODE auto -> [a-z]*' "$log" | head -n1 | awk '{print $4}' || true)
	local status=PASS
	case "$harness $bpf $count" in *FAIL*|*NOT-RUN*) status=FAIL;; esac
	grep -aq NSFLOW-DONE "$log" || status=FAIL
	[ "$status" = PASS ] || FAILED=1
	local skips
	skips=$(grep -a -E '^\s*--- SKIP: ' "$log" | awk '{print $3}' | tr '\n' ' ' || true)
	[ -z "$skips" ] || NOTES+=("$name: skipped: ${skips}(log: $log)")
	ROWS+=("$(printf "$FMT" "$name" "$where" "${boot:--}" "$harness" "$bpf" "$count" "${mode:--}" "${wall}s" "$status")")
	if [ "$status" != PASS ]; then
		say "$name: FAILED (log: $log)"
		grep -a -E '^\s*--- FAIL|NSFLOW-INSMOD-FAILED|Kernel panic|NSFLOW-TIMEOUT|^panic:|NSFLOW-RESULT' "$log" | head -n 40 | sed 's/^/    /' >&2 || true
		grep -a -E '^\s+[a-z_]+_test\.go:[0-9]+: ' "$log" | cut -c1-400 | head -n 30 | sed 's/^/    | /' >&2 || true
	fi
}

# --- boot each kernel --------------------------------------------------------
for k in $KERNELS; do
	pkg=$(resolve "$k") || { FAILED=1; ROWS+=("$(printf '%-28s %-14s %s' "$k" "-" "cannot fetch: FAIL")"); continue; }
	dir=$(fetch "$pkg") || { FAILED=1; ROWS+=("$(printf '%-28s %-14s %s' "$pkg" "-" "cannot fetch: FAIL")"); continue; }
	vmlinuz=$(ls "$dir"/boot/vmlinuz-* | head -n1)
	ver=${vmlinuz##*/vmlinuz-}
	moddir=""
	for d in "$dir"/lib/modules/"$ver" "$dir"/usr/lib/modules/"$ver"; do [ -d "$d" ] && moddir=$d && break; done
	[ -n "$moddir" ] || die "$pkg: no lib/modules/$ver"
	root=$WORK/root-$ver
	mkdir -p "$root/bin" "$root/dev" "$root/modules"
	cp "$BUSYBOX" "$root/bin/busybox"
	cp "$WORK/bpf.test" "$WORK/kernels.test" "$root/"
	mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
	: >"$root/modules.order"
	seen=()
	for m in $MODULES; do addmod "$moddir" "$m" "$root/modules" "$root/modules.order"; done
	write_init "$root"
	( cd "$root" && find . | cpio -o -H newc --quiet ) | gzip -1 >"$WORK/initrd-$ver.gz"
	log=$LOGS/$ver.log
	say "booting $ver (modules: $(tr '\n' ' ' <"$root/modules.order"); initrd $(du -m "$WORK/initrd-$ver.gz" | cut -f1) MiB; $ACCEL, $SMP vCPUs; log $log)"
	t0=$(date +%s.%N)
	rc=0
	timeout --foreground -k 10 "$TIMEOUT" qemu-system-x86_64 -accel "$ACCEL" -cpu max -smp "$SMP" -m "$MEM" \
		-kernel "$vmlinuz" -initrd "$WORK/initrd-$ver.gz" \
		-append "console=ttyS0 panic=-1 loglevel=4" \
		-nographic -no-reboot -monitor none -serial stdio -display none </dev/null >"$log" 2>&1 || rc=$?
	wall=$(secs "$t0" "$(date +%s.%N)")
	[ $rc -eq 124 ] && echo "NSFLOW-TIMEOUT killed after ${TIMEOUT}s" >>"$log"
	rm -f "$WORK/initrd-$ver.gz"; rm -rf "$root"
	summarize "$ver" "qemu-$ACCEL" "$log" "$wall"
done

# --- the running kernel: the same binaries, natively ------------------------
if [ "$NATIVE" = 1 ]; then
	ver=$(uname -r)
	log=$LOGS/native-$ver.log
	say "running natively on $ver (log $log)"
	t0=$(date +%s.%N)
	{
		echo "NSFLOW-KERNEL $ver cpus=$(nproc) boot=0s"
		for t in harness bpf count; do
			skip=""
			case $t in
				harness) b=$WORK/kernels.test pat='^TestHarness$';;
				bpf) b=$WORK/bpf.test pat=$BPF_RUN skip=$BPF_SKIP;;
				count) b=$WORK/kernels.test pat=$COUNT_RUN;;
			esac
			s=$(cut -d' ' -f1 /proc/uptime); rc=0
			( cd "$WORK" && CI=true "$b" -test.v -test.count=1 -test.timeout "$TEST_TIMEOUT" -test.run "$pat" -test.skip "$skip" ) || rc=$?
			echo "NSFLOW-RESULT $t rc=$rc start=$s end=$(cut -d' ' -f1 /proc/uptime)"
		done
		echo NSFLOW-DONE
	} >"$log" 2>&1
	summarize "$ver" "native" "$log" "$(secs "$t0" "$(date +%s.%N)")"
fi

echo
printf "$FMT\n" KERNEL WHERE BOOT HARNESS BPF-TESTS COUNT-TEST MODE WALL RESULT
for r in "${ROWS[@]}"; do echo "$r"; done
for n in "${NOTES[@]}"; do echo "$n"; done
echo
exit $FAILED
