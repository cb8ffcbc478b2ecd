#!/usr/bin/env bash
# ipcd's end-to-end test under a real systemd (`make test-systemd`).
#
# Boots a throw-away Debian 12 (bookworm) VM under qemu-system-x86_64 with systemd as PID 1
# and no network, runs `make install` in it from this checkout, then drives ipcd with
# systemctl (tests/systemd/guest-test.sh: start, jobs from a member of the ipcd group and
# a refused outsider, reload with log rotation, the journal, stop with queued jobs, SIGKILL
# and the automatic restart, the ipcd@ template, the squatting check, uninstall). Then the
# job store across a reboot and a power cut (guest-reboot.sh): the guest reboots itself,
# and this script boots the same disk again; then it kills qemu once the guest says
# "VMTEST-POWERCUT: ready for power cut", and boots it once more. The guest's verdicts
# come back on the serial console, appended to across the boots. Nothing on the host is touched except
# the cache and work directories below: systemd only ever runs inside the VM.
#
#   tests/systemd/run-vm-test.sh [run]   build the image if needed, then run the test
#   tests/systemd/run-vm-test.sh build   only build (and cache) the image
#   tests/systemd/run-vm-test.sh clean   delete the cached image and the runs
#
# The image (Debian's own packages, installed with mmdebstrap, ~600 MB) is built once and
# cached; so are the dependency wheels for the guest's Python. Building it needs root
# (mmdebstrap --mode=root) and, the first time, apt-get for the host tools.
#
# Environment (all optional):
#   IPCD_VMTEST_CACHE    image and wheel cache  (default ${XDG_CACHE_HOME:-~/.cache}/ipcd-vmtest)
#   IPCD_VMTEST_WORK     per-run directories    (default /var/tmp/ipcd-vmtest; last 5 runs kept)
#   IPCD_VMTEST_ACCEL    auto|kvm|tcg           (auto: kvm only where a stock kernel can use it)
#   IPCD_VMTEST_SMP, IPCD_VMTEST_MEM            (default 2 CPUs, 1024 MiB)
#   IPCD_VMTEST_TIMEOUT  seconds for all three boots, the test and power-off (default 900)
#   IPCD_VMTEST_LIVE     1: stream the serial console while it runs (default 1)
#   IPCD_VMTEST_APPEND   extra kernel command line (e.g. systemd.log_level=debug)
#   IPCD_VMTEST_KEEP     1: keep the run's disk overlay and payload for a post-mortem
#   IPCD_VMTEST_ONLY     store: skip the systemctl checks, only install, start, the job
#                        store across the reboot and the power cut, and uninstall
#   PYTHON               the host Python whose pip builds and fetches wheels (python3)
# Prints "test-systemd: N passed, N failed" last. Exit status: 0 all passed, 1 a check
# failed or the VM gave no verdict, 2 the set-up failed.
#
# Pitfalls met (the reasons for several lines below):
# - /dev/kvm may be a paravirtual device (kvm_pvm) on which stock kernels hang: detected,
#   and the VM then runs under software emulation (accel=tcg).
# - SuccessAction=/FailureAction= work only in [Unit]; in [Service] they are ignored and
#   the VM would never power off.
# - With StandardOutput=journal+console a guest line arrives as "[uptime] name[pid]: line".
# - pip is slow under emulation (ensurepip alone takes minutes): the guest installs wheels
#   built and downloaded here with a pip baked into the image; it has no network and no
#   compiler. The DESTDIR checks here cover `make install` with the virtualenv's own pip.
# - The Debian kernel needs an initrd with the virtio and ext4 modules.
# - A boot that falls into emergency mode would wait for the timeout: the image's
#   emergency and rescue units report FAIL and power off instead.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE_ROOT=${IPCD_VMTEST_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/ipcd-vmtest}
WORK=${IPCD_VMTEST_WORK:-/var/tmp/ipcd-vmtest}
export TMPDIR=$WORK/tmp
ACCEL=${IPCD_VMTEST_ACCEL:-auto}
SMP=${IPCD_VMTEST_SMP:-2}
MEM=${IPCD_VMTEST_MEM:-1024}
TIMEOUT=${IPCD_VMTEST_TIMEOUT:-900}
LIVE=${IPCD_VMTEST_LIVE:-1}
PYTHON=${PYTHON:-python3}

SUITE=bookworm
# On top of Debian's minbase: systemd as init, the kernel, Python with venv (what `make
# install` uses), make, logrotate (etc/logrotate.d/ipcd is tested), passwd (useradd),
# man-db (`man ipcctl` after `make install`; the image drops Debian's own pages).
PKGS="systemd systemd-sysv udev linux-image-amd64 python3 python3-venv make logrotate passwd procps man-db php-cli"
IMG_SIZE=2G

log() { printf '[test-systemd %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "ERROR: $*"
    echo "test-systemd: 0 passed, 1 failed"
    exit 2
}

ensure_host_tools() {
    local need=()
    command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
    command -v qemu-img >/dev/null || need+=(qemu-utils)
    command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
    command -v mke2fs >/dev/null || need+=(e2fsprogs)
    if ((${#need[@]})); then
        [ "$(id -u)" = 0 ] || die "need root to apt-get install ${need[*]}"
        log "apt-get install ${need[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
            install -y -q --no-install-recommends "${need[@]}" >/dev/null
    fi
    "$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip (set PYTHON=)"
}

# Baked into the image: a runner that mounts the payload disk (/dev/vdb) and runs its
# guest-test.sh, as the boot target, powering the VM off whatever happens.
write_baked_files() { # $1 = root file system
    local r=$1
    install -d "$r/etc/systemd/system" "$r/usr/local/sbin"
    cat >"$r/usr/local/sbin/vmtest-run" <<'EOF'
#!/bin/sh
mkdir -p /mnt/payload
if ! mount -o ro /dev/vdb /mnt/payload; then
    echo "VMTEST-RESULT: FAIL (cannot mount the payload disk /dev/vdb)"; exit 1
fi
bash /mnt/payload/guest-test.sh
rc=$?
[ $rc = 0 ] || echo "VMTEST-RESULT: FAIL (guest-test.sh exit status $rc)"
exit $rc
EOF
    chmod 0755 "$r/usr/local/sbin/vmtest-run"
    cat >"$r/etc/systemd/system/vmtest.service" <<'EOF'
[Unit]
Description=Run the injected ipcd test payload, then power off
After=basic.target
# *Action= belong in [Unit]; -force: no orderly stop of the other units (faster).
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vmtest-run
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=30min
EOF
    cat >"$r/etc/systemd/system/vmtest.target" <<'EOF'
[Unit]
Description=ipcd VM test boot target (kernel command line systemd.unit=vmtest.target)
Requires=basic.target
Wants=vmtest.service
After=basic.target
AllowIsolate=yes
EOF
    local u
    for u in emergency rescue; do
        install -d "$r/etc/systemd/system/$u.service.d"
        cat >"$r/etc/systemd/system/$u.service.d/vmtest.conf" <<EOF
[Service]
ExecStart=
ExecStart=/bin/sh -c 'echo "VMTEST-RESULT: FAIL ($u mode)" >/dev/console; journalctl -b -p warning --no-pager >/dev/console; systemctl --no-block poweroff --force'
EOF
    done
    # A pip installed and byte-compiled here, at native speed, for `make install
    # VENV_FLAGS=--without-pip PIP=...` in the guest: ensurepip takes minutes under TCG.
    chroot "$r" python3 -m venv /opt/vmtest-pip
    echo ipcd-vmtest >"$r/etc/hostname"
    printf '/dev/vda / ext4 rw,noatime 0 1\n' >"$r/etc/fstab"
    # No root password: console debugging only, and the VM has no network.
    sed -i 's/^root:[^:]*:/root::/' "$r/etc/shadow"
}

recipe_hash() {
    { echo "$SUITE $PKGS $IMG_SIZE"; declare -f build_image write_baked_files; } |
        sha256sum | cut -c1-16
}

build_image() { # $1 = final cache directory
    local out=$1 tmp="$1.tmp" t0=$SECONDS
    rm -rf "$tmp"
    mkdir -p "$tmp"
    local mirror=()
    # The host's own apt sources: the same Debian mirror the host already reaches.
    [ -f /etc/apt/sources.list.d/debian.sources ] && mirror=(/etc/apt/sources.list.d/debian.sources)
    log "mmdebstrap $SUITE (minbase + $PKGS)"
    mmdebstrap --variant=minbase --mode=root --format=directory \
        --include="${PKGS// /,}" \
        --dpkgopt=force-unsafe-io \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks"
            printf "MODULES=list\nCOMPRESS=zstd\n" > "$1/etc/initramfs-tools/conf.d/vmtest"
            printf "#!/bin/sh\n[ \"\$1\" = prereqs ] && exit 0\n. /usr/share/initramfs-tools/hook-functions\nmanual_add_modules virtio_pci virtio_blk ext4 crc32c_generic\n" > "$1/etc/initramfs-tools/hooks/vmtest"
            chmod 0755 "$1/etc/initramfs-tools/hooks/vmtest"' \
        --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*_Packages' \
        --customize-hook='cd "$1"/lib/modules/* && rm -rf kernel/drivers/gpu kernel/drivers/media \
            kernel/drivers/net/wireless kernel/drivers/infiniband kernel/drivers/staging \
            kernel/drivers/bluetooth kernel/drivers/isdn kernel/sound kernel/net/wireless \
            kernel/net/bluetooth && chroot "$1" depmod -a "${PWD##*/}"' \
        "$SUITE" "$tmp/root" "${mirror[@]}" >"$tmp/mmdebstrap.log" 2>&1 ||
        {
            tail -n 30 "$tmp/mmdebstrap.log" >&2
            die "mmdebstrap failed (log: $tmp/mmdebstrap.log)"
        }
    log "mmdebstrap done in $((SECONDS - t0)) s"
    write_baked_files "$tmp/root"
    cp -L "$tmp/root/vmlinuz" "$tmp/vmlinuz"
    cp -L "$tmp/root/initrd.img" "$tmp/initrd.img"
    chroot "$tmp/root" dpkg-query -W -f='${Package}=${Version}\n' >"$tmp/packages.txt"
    chroot "$tmp/root" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' >"$tmp/pyversion"
    truncate -s "$IMG_SIZE" "$tmp/rootfs.img"
    # mke2fs -d: a file system from a directory, with no loop device or mount on the host.
    mke2fs -q -F -t ext4 -L vmroot -d "$tmp/root" "$tmp/rootfs.img"
    rm -rf "$tmp/root"
    rm -rf "$out"
    mv "$tmp" "$out"
    log "image built in $((SECONDS - t0)) s: $(du -sh "$out" | cut -f1) on disk"
}

ensure_image() {
    IMG_DIR="$CACHE_ROOT/img-$(recipe_hash)"
    mkdir -p "$CACHE_ROOT" "$TMPDIR"
    exec 9>"$CACHE_ROOT/.lock"
    flock 9 # concurrent runs: one builds, the others wait for it
    if [ ! -f "$IMG_DIR/rootfs.img" ]; then
        [ "$(id -u)" = 0 ] || die "building the image needs root (mmdebstrap --mode=root)"
        # Images of older recipes are dead weight.
        find "$CACHE_ROOT" -maxdepth 1 -name 'img-*' ! -path "$IMG_DIR" -exec rm -rf {} +
        build_image "$IMG_DIR"
    else
        log "cached image $IMG_DIR"
    fi
    flock -u 9
}

# The checkout as the guest gets it: the files git tracks or would track (so no .venv,
# caches or build output), whether committed yet or not.
copy_source() { # $1 = destination
    mkdir -p "$1"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
        xargs -0 cp --parents -t "$1")
}

# ipcd's wheel, built from this checkout for each run, and its dependencies' wheels for
# the guest's Python (cached, per pyproject.toml). The PyPI wheel of sysv_ipc lacks
# semtimedop, which ipcd works around (README); the guest has no compiler to build it.
make_wheels() { # $1 = source copy, $2 = destination
    local src=$1 dest=$2 pyver
    pyver=$(cat "$IMG_DIR/pyversion")
    mkdir -p "$dest"
    "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$dest" "$src" >"$WORK/pip-wheel.log" 2>&1 ||
        {
            cat "$WORK/pip-wheel.log" >&2
            die "building the ipcd wheel failed"
        }
    local deps
    deps="$CACHE_ROOT/wheels-cp${pyver/./}-$(sha256sum "$src/pyproject.toml" | cut -c1-12)"
    if [ ! -f "$deps/.complete" ]; then
        log "pip download: ipcd's dependencies for CPython $pyver, manylinux x86_64"
        rm -rf "$deps"
        mkdir -p "$deps"
        "$PYTHON" -m pip download --quiet --only-binary=:all: \
            --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
            --implementation cp --python-version "$pyver" --abi "cp${pyver/./}" \
            --dest "$deps" "$dest"/ipcd-*.whl >"$WORK/pip-download.log" 2>&1 ||
            {
                cat "$WORK/pip-download.log" >&2
                die "pip download of the dependencies failed"
            }
        rm -f "$deps"/ipcd-*.whl
        touch "$deps/.complete"
    fi
    cp "$deps"/*.whl "$dest/"
}

# `make install` and `make uninstall` into a DESTDIR, here on the host (natively, seconds):
# the staged virtualenv names its final place, PREFIX places the links, an existing
# configuration is never overwritten and uninstall keeps it. The guest covers the rest.
HOST_PASSED=0
HOST_FAILED=0
hcheck() { # WHAT COMMAND...
    local what=$1
    shift
    if "$@"; then
        HOST_PASSED=$((HOST_PASSED + 1))
        echo "HOST-OK: $what"
    else
        HOST_FAILED=$((HOST_FAILED + 1))
        echo "HOST-FAIL: $what"
    fi
}
hexpect() { # WHAT WANTED ACTUAL
    if [ "$2" = "$3" ]; then hcheck "$1" true; else hcheck "$1: wanted '$2', got '$3'" false; fi
}

host_install_checks() { # $1 = source copy, $2 = wheels, $3 = scratch directory
    local src=$1 stage=$3/stage pyver
    pyver=$(cat "$IMG_DIR/pyversion")
    if ! /usr/bin/python3 -c "import sys, venv; sys.exit('%d.%d' % sys.version_info[:2] != '$pyver')" 2>/dev/null; then
        log "skipping the DESTDIR checks: the host's /usr/bin/python3 is not Python $pyver with venv"
        return 0
    fi
    local mk=(make --no-print-directory -C "$src" DESTDIR="$stage"
        PIP_FLAGS="--no-index --find-links $2" INSTALL_SPEC=ipcd)
    local rc=0
    "${mk[@]}" install >"$3/install-1.log" 2>&1 || rc=$?
    hexpect "make install DESTDIR=…" 0 "$rc"
    hcheck "the staged ipcctl's #! names /opt/ipcd/bin/python" \
        grep -qxE '#!/opt/ipcd/bin/python3?' <(head -n 1 "$stage/opt/ipcd/bin/ipcctl")
    hexpect "no staged script names the staging directory" "" \
        "$(grep -rlI -e "$stage" "$stage/opt/ipcd/bin" "$stage/opt/ipcd/pyvenv.cfg")"
    hcheck "the staged virtualenv imports ipcd and its dependencies" \
        "$stage/opt/ipcd/bin/python" -c 'import ipcd.cli.ipcd, ipcd.cli.ipcctl, daemon, structlog, sysv_ipc'
    hexpect "ipcctl linked into PREFIX/bin (/usr/local/bin)" /opt/ipcd/bin/ipcctl \
        "$(readlink "$stage/usr/local/bin/ipcctl")"
    local f
    for f in etc/systemd/system/ipcd.service etc/systemd/system/ipcd@.service \
        etc/sysusers.d/ipcd.conf etc/tmpfiles.d/ipcd.conf etc/logrotate.d/ipcd \
        etc/cron.d/ipcd-example opt/ipcd/share/doc/ipcd/security.md \
        opt/ipcd/share/doc/ipcd/instance.toml.example usr/local/share/man/man1/ipcctl.1 \
        usr/local/share/man/man5/ipcd.toml.5 usr/local/share/man/man8/ipcd.8 \
        usr/local/share/bash-completion/completions/ipcctl; do
        hcheck "installed /$f" test -s "$stage/$f"
    done
    hcheck "installed /etc/ipcd/ipcd.toml, the shipped one" cmp -s "$src/etc/ipcd/ipcd.toml" "$stage/etc/ipcd/ipcd.toml"
    echo "# a local change" >>"$stage/etc/ipcd/ipcd.toml"
    rc=0
    "${mk[@]}" PREFIX=/usr install >"$3/install-2.log" 2>&1 || rc=$?
    hexpect "make install PREFIX=/usr over an installed tree" 0 "$rc"
    hcheck "it kept the existing /etc/ipcd/ipcd.toml" grep -q '^# a local change$' "$stage/etc/ipcd/ipcd.toml"
    hexpect "ipcctl linked into PREFIX/bin (/usr/bin)" /opt/ipcd/bin/ipcctl "$(readlink "$stage/usr/bin/ipcctl")"
    rc=0
    { "${mk[@]}" PREFIX=/usr uninstall && "${mk[@]}" uninstall; } >"$3/uninstall.log" 2>&1 || rc=$?
    hexpect "make uninstall DESTDIR=… (PREFIX=/usr, then the default)" 0 "$rc"
    hcheck "uninstall removed the virtualenv" test ! -e "$stage/opt/ipcd"
    hcheck "uninstall removed the links" test ! -L "$stage/usr/bin/ipcctl" -a ! -L "$stage/usr/local/bin/ipcd"
    hexpect "uninstall removed the units and the etc/ files" "" \
        "$(cd "$stage" && find etc/systemd etc/sysusers.d etc/tmpfiles.d etc/logrotate.d etc/cron.d ! -type d)"
    hexpect "uninstall removed the man pages and the completion" "" \
        "$(cd "$stage" && find usr/share usr/local/share ! -type d 2>/dev/null)"
    hcheck "uninstall kept the configuration" grep -q '^# a local change$' "$stage/etc/ipcd/ipcd.toml"
    if [ "$HOST_FAILED" != 0 ]; then
        log "make install/uninstall logs: $3/*.log"
        tail -n 20 "$3"/*.log >&2
    fi
}

kvm_usable() {
    [ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
    # PVM (kvm_pvm: nested KVM without VMX/SVM) runs only PVM-enabled guest kernels; a
    # stock Debian kernel hangs in its decompressor there.
    [ -d /sys/module/kvm_pvm ] && {
        log "/dev/kvm is PVM (kvm_pvm): stock kernels hang there, using TCG"
        return 1
    }
    grep -Eqw 'vmx|svm' /proc/cpuinfo || return 1
    timeout 5 qemu-system-x86_64 -accel kvm -machine none -display none -nodefaults \
        -S -monitor none </dev/null >/dev/null 2>&1 &
    local pid=$!
    sleep 1
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        wait "$pid" 2>/dev/null
        return 0
    fi
    wait "$pid" 2>/dev/null
    return 1
}

# boot_vm SECONDS CACHE: one boot of the run's disk, watched. Sets BOOT_END to "reboot"
# (the guest said VMTEST-REBOOT and qemu exited by itself: -no-reboot ends it at the
# reset), "power cut" (the guest said VMTEST-POWERCUT and was killed here), "poweroff",
# "timeout" or "qemu status N", and BOOT_SECONDS to how long it ran. Uses run_vm's locals.
boot_vm() {
    # said MARKER: the guest printed that line in this boot (grep -c reads to the end: no
    # SIGPIPE upstream for pipefail to report).
    said() { guest_lines < <(tail -c "+$from" "$serial") | grep -c "^$1: " >/dev/null; }
    local tboot=$SECONDS cut=0 qrc=0 qpid
    # -no-reboot: a reboot or a panic (panic=-1) ends qemu instead of looping.
    # The serial console is appended to, boot after boot.
    timeout --kill-after=10 "$1" qemu-system-x86_64 \
        "${accel_args[@]}" -smp "$SMP" -m "$MEM" \
        -nodefaults -no-user-config -display none -no-reboot \
        -chardev "file,id=console,path=$serial,append=on" -serial chardev:console \
        -monitor none -nic none -pidfile "$run/qemu.pid" \
        -kernel "$IMG_DIR/vmlinuz" -initrd "$IMG_DIR/initrd.img" -append "$append" \
        -drive "file=$run/overlay.qcow2,if=virtio,format=qcow2,cache=$2" \
        -drive "file=$run/payload.img,if=virtio,format=raw,readonly=on" \
        -device virtio-rng-pci \
        </dev/null >"$run/qemu.log" 2>&1 &
    qpid=$!
    while kill -0 "$qpid" 2>/dev/null; do
        if said VMTEST-POWERCUT; then
            # The power cut: qemu itself (not timeout, its parent) dies at once, with
            # whatever the guest has not flushed to its disk.
            [ -s "$run/qemu.pid" ] && kill -KILL "$(cat "$run/qemu.pid")" && cut=1
            break
        fi
        sleep 0.5
    done
    { wait "$qpid"; } 2>/dev/null || qrc=$? # no "Killed" line from bash for the power cut
    BOOT_SECONDS=$((SECONDS - tboot))
    if [ $cut = 1 ]; then
        BOOT_END="power cut"
    elif [ $qrc = 124 ] || [ $qrc = 137 ]; then
        BOOT_END=timeout
    elif [ $qrc != 0 ]; then
        BOOT_END="qemu status $qrc"
    elif said VMTEST-REBOOT; then
        BOOT_END=reboot
    else
        BOOT_END=poweroff
    fi
}

run_vm() {
    mkdir -p "$WORK"
    { ls -1dt "$WORK"/run.* 2>/dev/null || true; } | tail -n +5 | xargs -r rm -rf
    local run
    run=$(mktemp -d "$WORK/run.XXXXXX")
    local t0=$SECONDS
    mkdir -p "$run/payload"
    cp "$HERE/guest-test.sh" "$HERE/guest-reboot.sh" "$run/payload/"
    [ -z "${IPCD_VMTEST_ONLY:-}" ] || echo "$IPCD_VMTEST_ONLY" >"$run/payload/only"
    copy_source "$run/payload/src"
    make_wheels "$run/payload/src" "$run/payload/wheels"
    log "payload: $(ls "$run/payload/wheels" | tr '\n' ' ')"
    host_install_checks "$run/payload/src" "$run/payload/wheels" "$run"
    rm -rf "$run/stage" "$run/payload/src/build" "$run/payload/src/ipcd.egg-info"
    truncate -s 64M "$run/payload.img"
    mke2fs -q -F -t ext4 -d "$run/payload" "$run/payload.img"

    local accel=$ACCEL accel_args
    if [ "$accel" = auto ]; then
        if kvm_usable; then accel=kvm; else accel=tcg; fi
    fi
    case $accel in
    kvm) accel_args=(-machine q35,accel=kvm -cpu host) ;;
    tcg) accel_args=(-machine q35,accel=tcg -cpu max) ;;
    *) die "IPCD_VMTEST_ACCEL must be auto, kvm or tcg" ;;
    esac
    local append="console=ttyS0 root=/dev/vda rw systemd.unit=vmtest.target panic=-1 quiet"
    [ -n "${IPCD_VMTEST_APPEND:-}" ] && append+=" $IPCD_VMTEST_APPEND"
    # The guest writes to a throw-away overlay; the cached image stays pristine.
    qemu-img create -q -f qcow2 -b "$IMG_DIR/rootfs.img" -F raw "$run/overlay.qcow2"
    local serial="$run/serial.log"
    : >"$serial"
    log "boot: accel=$accel smp=$SMP mem=${MEM}M timeout=${TIMEOUT}s, serial log $serial"
    local tpid=
    if [ "$LIVE" = 1 ]; then
        tail -n +1 -f "$serial" &
        tpid=$!
    fi
    # The guest test spans three boots of the same disk (guest-test.sh): the first ends
    # with the guest's own `systemctl reboot`, the second with a power cut (qemu killed
    # once the guest says "VMTEST-POWERCUT: ready for power cut"), the third powers off.
    local deadline=$((SECONDS + TIMEOUT)) boot=0 how cache left from
    while :; do
        boot=$((boot + 1))
        # Boot 1 ends with an orderly reboot, at which qemu writes everything out:
        # cache=unsafe (guest flushes ignored) is safe there and saves time. A power cut
        # must not lose what the guest flushed, so the later boots honour its flushes
        # (cache=writeback: on to the host's file, which outlives the killed qemu).
        cache=writeback
        [ $boot = 1 ] && cache=unsafe
        left=$((deadline - SECONDS))
        [ $left -gt 0 ] || left=1
        from=$(($(stat -c %s "$serial") + 1))
        rm -f "$run/qemu.pid"
        log "boot $boot (cache=$cache)"
        boot_vm "$left" "$cache"
        how=$BOOT_END
        [ -s "$run/qemu.log" ] && {
            log "qemu stderr:"
            sed 's/^/  /' "$run/qemu.log" >&2
        }
        log "boot $boot: $how after $BOOT_SECONDS s; the whole run took $((SECONDS - t0)) s"
        case $how in
        "reboot")
            hcheck "boot $boot ended with the guest's reboot (qemu exited by itself)" true
            ;;
        "power cut")
            hcheck "boot $boot ended with a power cut (qemu killed with SIGKILL)" true
            ;;
        "timeout")
            log "TIMEOUT after ${TIMEOUT}s"
            break
            ;;
        *) break ;; # powered off (the end), or qemu failed
        esac
        if [ $boot -ge 3 ]; then
            hcheck "the guest asked for no more than 3 boots" false
            break
        fi
    done
    [ -n "$tpid" ] && { kill "$tpid" 2>/dev/null || true; }
    [ "${IPCD_VMTEST_KEEP:-0}" = 1 ] || rm -rf "$run/overlay.qcow2" "$run/payload.img" "$run/payload"
    verdict "$serial"
}

# The guest's own lines (from stdin), without journald's "[uptime] vmtest-run[pid]: " prefix.
guest_lines() { tr -d '\r' | sed -nE 's/^(\[ *[0-9.]+\] [^[]+\[[0-9]+\]: )?(VMTEST-[A-Z]+: .*)$/\2/p'; }

verdict() { # $1 = serial log
    local lines passed failed summary
    lines=$(guest_lines <"$1")
    passed=$(($(grep -c '^VMTEST-OK: ' <<<"$lines" || true) + HOST_PASSED))
    failed=$(($(grep -c '^VMTEST-FAIL: ' <<<"$lines" || true) + HOST_FAILED))
    summary=$(grep -E '^VMTEST-SUMMARY: [0-9]+ passed, [0-9]+ failed$' <<<"$lines" | tail -1 || true)
    if [ "$LIVE" != 1 ] || [ "$failed" != 0 ]; then
        grep -E '^VMTEST-(FAIL|SUMMARY|RESULT)' <<<"$lines" >&2 || true
    fi
    if [ -z "$summary" ]; then
        log "the guest gave no summary (crash, timeout or early power-off): serial log $1"
        tail -n 20 "$1" >&2
        failed=$((failed + 1))
    elif grep -q '^VMTEST-RESULT: PASS$' <<<"$lines" && [ "$failed" = 0 ]; then
        echo "test-systemd: $passed passed, 0 failed"
        return 0
    fi
    [ "$failed" = 0 ] && failed=1
    log "FAILED (serial log: $1)"
    echo "test-systemd: $passed passed, $failed failed"
    return 1
}

case ${1:-run} in
build)
    ensure_host_tools
    ensure_image
    log "image: $IMG_DIR"
    ;;
run)
    ensure_host_tools
    ensure_image
    run_vm
    ;;
clean) rm -rf "$CACHE_ROOT" "$WORK" ;;
*)
    echo "usage: $0 [run|build|clean]" >&2
    exit 2
    ;;
esac
