#!/bin/bash
# ipcd under systemd, inside the test VM: run as root by vmtest.service at boot, with its
# output on the serial console that tests/systemd/run-vm-test.sh reads. The payload disk
# is mounted read-only at $P: this script, src/ (the checkout) and wheels/ (ipcd and its
# dependencies, for this Python; the VM has no network).
#
# Each check prints "VMTEST-OK: what" or "VMTEST-FAIL: what"; the script ends with
# "VMTEST-SUMMARY: N passed, N failed" and "VMTEST-RESULT: PASS" or "FAIL". A check the
# later ones depend on (install, start) ends the run when it fails.
#
# It runs at three boots of the same root disk, resuming where the last one left off
# (guest-reboot.sh, sourced below, has the job store's checks): the first boot installs
# and drives ipcd with systemctl, queues jobs and ends with `systemctl reboot`
# ("VMTEST-REBOOT: ..."); the second checks them, queues more and says "VMTEST-POWERCUT:
# ready for power cut", and the host kills the VM; the third checks those and uninstalls.
# The counts carry over, so the last summary covers all three boots.
set -u
P=$(cd "$(dirname "$0")" && pwd)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The link `make install` puts in $(PREFIX)/bin, as users and cron scripts call it.
IPCCTL=/usr/local/bin/ipcctl
LOG=/var/log/ipcd/ipcd.log
EXAMPLE=/opt/ipcd/share/doc/ipcd/instance.toml.example
passed=0
failed=0
T0=$SECONDS

step() { echo "VMTEST-STEP: [$((SECONDS - T0)) s] $*"; }
info() { echo "VMTEST-INFO: $*"; }
ok() {
    passed=$((passed + 1))
    echo "VMTEST-OK: $*"
}
bad() {
    failed=$((failed + 1))
    echo "VMTEST-FAIL: $*"
}
# check WHAT COMMAND...: the command's success is the verdict.
check() {
    local what=$1
    shift
    if "$@"; then ok "$what"; else bad "$what"; fi
}
# expect WHAT WANTED ACTUAL
expect() {
    if [ "$2" = "$3" ]; then ok "$1"; else bad "$1: wanted '$2', got '$3'"; fi
}
not() { ! "$@"; }
finish() {
    echo "VMTEST-SUMMARY: $passed passed, $failed failed"
    if [ "$failed" = 0 ]; then echo "VMTEST-RESULT: PASS"; else echo "VMTEST-RESULT: FAIL"; fi
    exit 0
}
dump() {
    journalctl -b --no-pager -o short-monotonic -u 'ipcd*' | tail -40
    tail -n 20 /var/log/ipcd/*.log 2>/dev/null
}
# need WHAT COMMAND...: a check the rest depends on; when it fails, the run ends.
need() {
    local what=$1
    shift
    if "$@"; then
        ok "$what"
        return 0
    fi
    bad "$what (the remaining checks depend on it)"
    dump
    finish
}
# wait_for SECONDS COMMAND...: poll until the command succeeds.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}
member() { runuser -u member -- "$@"; }
outsider() { runuser -u outsider -- "$@"; }
main_pid() { systemctl show -p MainPID --value "${1:-ipcd}"; }
state_is() { [ "$(systemctl is-active "$1")" = "$2" ]; }      # UNIT STATE
children_at_least() { [ "$(pgrep -c -P "$1")" -ge "$2" ]; } # PID N
first_key() { "$IPCCTL" "$@" key | awk 'NR == 1 { print $NF }'; }
gone() { # PID...: none of them is alive any more
    local pid
    for pid in "$@"; do ! kill -0 "$pid" 2>/dev/null || return 1; done
}
restarted() { # OLD_PID: running again, under a new main PID
    local pid
    pid=$(main_pid)
    [ "$(systemctl is-active ipcd)" = active ] && [ "$pid" != 0 ] && [ "$pid" != "$1" ]
}
score_ok() { # UNIT: systemd-analyze security's exposure is 2.0 or lower
    local score
    score=$(systemd-analyze security "$1" 2>/dev/null |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    info "systemd-analyze security $1: exposure ${score:-unknown}"
    awk -v s="$score" 'BEGIN { exit !(s != "" && s + 0 <= 2.0) }'
}

# --- make uninstall ----------------------------------------------------------------------
uninstall_checks() {
    step "make uninstall"
    check "make uninstall" make -C /root/ipcd-src uninstall
    expect "ipcd is stopped" inactive "$(systemctl is-active ipcd)"
    check "/opt/ipcd is gone" test ! -e /opt/ipcd
    check "the links in /usr/local/bin are gone" test ! -e /usr/local/bin/ipcctl -a ! -L /usr/local/bin/ipcd
    check "the units are gone" test ! -e /etc/systemd/system/ipcd.service -a ! -e /etc/systemd/system/ipcd@.service
    check "the man pages and the completion are gone" test ! -e /usr/local/share/man/man1/ipcctl.1 \
        -a ! -e /usr/local/share/bash-completion/completions/ipcctl
    check "the clients are gone" test ! -e /usr/local/lib/ipcd
    check "the configuration is kept" test -f /etc/ipcd/ipcd.toml
    expect "the key file is kept (same inode)" "$key_inode" "$(stat -c %i /var/lib/ipcd/ipcd.key)"
    check "the job queue is kept" grep -q "^$k1 " <(ipcs -q)
}

step "guest: $(uname -r), $(systemd-detect-virt), systemd $(systemctl --version | awk 'NR == 1 { print $2 }'), $(python3 --version), $(nproc) CPUs"

# The test spans three boots of the same disk (guest-reboot.sh): phase 1 runs from here on
# and ends with a reboot, phase 2 ends with a power cut, phase 3 with make uninstall.
# shellcheck source=tests/systemd/guest-reboot.sh
. "$P/guest-reboot.sh"
phase=1
last_boot=
key_inode=
k1=
# shellcheck disable=SC1091
[ -f "$VT/state" ] && . "$VT/state" # phase, the counts so far, what later boots check
# IPCD_VMTEST_ONLY=store on the host: only install, start, and the store's phases.
ONLY=$(cat "$P/only" 2>/dev/null)
case $phase in
2)
    step "phase 2: booted again after the reboot ($passed passed, $failed failed before it)"
    reboot_verify
    powercut_prepare # returns only when no power cut came
    finish
    ;;
3)
    step "phase 3: booted again after the power cut ($passed passed, $failed failed before it)"
    powercut_verify
    uninstall_checks
    step "done"
    finish
    ;;
esac

# --- make install ------------------------------------------------------------------------
step "make install, offline from the wheels built on the host"
cp -a "$P/src" /root/ipcd-src
t=$SECONDS
# The image's own pip (byte-compiled when the image was built) installs into a venv made
# without one: ensurepip alone takes minutes under emulation.
need "make install" make -C /root/ipcd-src install INSTALL_SPEC=ipcd \
    PIP_FLAGS="--no-index --find-links $P/wheels" \
    VENV_FLAGS=--without-pip PIP="/opt/vmtest-pip/bin/pip --python /opt/ipcd/bin/python"
info "make install took $((SECONDS - t)) s"
check "ipcd is a system user (uid < 1000) whose group is ipcd" \
    test "$(id -u ipcd)" -lt 1000 -a "$(id -gn ipcd)" = ipcd
expect "/run/ipcd: owner and mode" "ipcd:ipcd 755" "$(stat -c '%U:%G %a' /run/ipcd)"
expect "/var/lib/ipcd: owner and mode" "ipcd:ipcd 751" "$(stat -c '%U:%G %a' /var/lib/ipcd)"
expect "/var/log/ipcd: owner and mode" "ipcd:ipcd 750" "$(stat -c '%U:%G %a' /var/log/ipcd)"
expect "key file made empty and read-only by tmpfiles" "ipcd:ipcd 444 0" \
    "$(stat -c '%U:%G %a %s' /var/lib/ipcd/ipcd.key)"
key_inode=$(stat -c %i /var/lib/ipcd/ipcd.key)
expect "ipcctl linked into /usr/local/bin" /opt/ipcd/bin/ipcctl "$(readlink /usr/local/bin/ipcctl)"
expect "ipcd linked into /usr/local/bin" /opt/ipcd/bin/ipcd "$(readlink /usr/local/bin/ipcd)"
check "/etc/ipcd/ipcd.toml installed" test -f /etc/ipcd/ipcd.toml
if command -v man >/dev/null; then
    check "man -P cat ipcctl shows the installed ipcctl(1)" \
        grep -q '^IPCCTL(1) ' <(MANWIDTH=80 man -P cat ipcctl 2>&1)
    check "man 5 ipcd.toml and man 8 ipcd show the installed pages" \
        grep -q '^IPCD(8) ' <(MANWIDTH=80 man -P cat 5 ipcd.toml 8 ipcd 2>&1)
else
    info "no man-db in the image: man pages not checked"
fi
check "the bash completion is installed for ipcctl and ipcd" \
    bash -c 'source /usr/local/share/bash-completion/completions/ipcd && complete -p ipcctl ipcd'
check "systemd-analyze verify ipcd.service" systemd-analyze verify ipcd.service
check "systemd-analyze security ipcd.service: exposure 2.0 or lower" score_ok ipcd.service
useradd --no-create-home --groups ipcd member
useradd --no-create-home outsider

# --- start -------------------------------------------------------------------------------
step "systemctl start ipcd"
need "systemctl start ipcd" systemctl start ipcd
expect "ipcd is active" active "$(systemctl is-active ipcd)"
main=$(main_pid)
expect "MainPID is the PID in /run/ipcd/ipcd.pid" "$main" "$(cat /run/ipcd/ipcd.pid 2>/dev/null)"
expect "the daemon runs as user ipcd, group ipcd" "ipcd ipcd" "$(ps -o user=,group= -p "$main" | xargs)"
expect "the daemon was reparented to PID 1 (double fork)" 1 "$(ps -o ppid= -p "$main" | xargs)"
check "the daemon is not a session leader" test "$(ps -o sid= -p "$main" | xargs)" != "$main"
check "the master forked its 2 workers" wait_for 20 children_at_least "$main" 2
expect "the daemon kept the key file's inode" "$key_inode" "$(stat -c %i /var/lib/ipcd/ipcd.key)"
ipcs
uid=$(id -u ipcd)
gid=$(getent group ipcd | cut -d: -f3)
objects=$(awk -v u="$uid" 'FNR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    $col["uid"] == u { print FILENAME, $col["key"], $col["perms"], $col["gid"] }' \
    /proc/sysvipc/msg /proc/sysvipc/shm /proc/sysvipc/sem)
# The job queue, the reply queue and the hand-off queue (the workers' doorbell).
expect "3 queues belong to user ipcd" 3 "$(grep -c '^/proc/sysvipc/msg ' <<<"$objects")"
has_kind() { grep -q "^/proc/sysvipc/$1 " <<<"$objects"; }
check "result segments belong to user ipcd" has_kind shm
check "semaphores belong to user ipcd" has_kind sem
# All but the hand-off queue (K + 0x09000000), which is the daemon's alone: mode 600.
handoff=$(( $(first_key) + 0x09000000 ))
expect "every IPC object of ipcd has mode 660 and group ipcd" "" \
    "$(awk -v g="$gid" -v h="$handoff" '!($1 == "/proc/sysvipc/msg" && $2 == h) && ($3 != 660 || $4 != g)' <<<"$objects")"
expect "the hand-off queue has mode 600" 1 \
    "$(awk -v h="$handoff" '$1 == "/proc/sysvipc/msg" && $2 == h && $3 == 600' <<<"$objects" | wc -l)"

if [ "$ONLY" = store ]; then
    info "IPCD_VMTEST_ONLY=store: straight to the job store's phases"
    reboot_prepare
fi

# --- who may submit ----------------------------------------------------------------------
step "a member of group ipcd submits jobs and reads the results"
out=$(member "$IPCCTL" submit echo hi --wait 2>&1)
expect "member: ipcctl submit echo hi --wait" "0 hi" "$? $out"
id=$(member "$IPCCTL" submit echo again 2>&1)
out=$(member "$IPCCTL" result "$id" --wait 2>&1)
expect "member: ipcctl result ID --wait" "0 again" "$? $out"

step "the installed PHP client"
check "make install put the PHP and C clients in /usr/local/lib/ipcd" test -f /usr/local/lib/ipcd/ipcd.php \
    -a -f /usr/local/lib/ipcd/ipcctl.php -a -f /usr/local/lib/ipcd/ipcd-submit.c
if command -v php >/dev/null; then
    out=$(member php /usr/local/lib/ipcd/ipcctl.php submit 2 "from php" --wait 2>&1)
    expect "member: php /usr/local/lib/ipcd/ipcctl.php submit 2 --wait" "0 from php" "$? $out"
    out=$(member php -r 'require "/usr/local/lib/ipcd/ipcd.php";
        $r = Ipcd\Client::fromKeyFile("/var/lib/ipcd/ipcd.key")->call(2, "required");
        echo $r->ok ? $r->value() : $r->error();' 2>&1)
    expect "member: require '/usr/local/lib/ipcd/ipcd.php' and call()" "0 required" "$? $out"
else
    info "no php in the image: the installed PHP client not run"
fi

step "a user outside group ipcd is refused"
out=$(outsider "$IPCCTL" submit echo hi 2>&1)
expect "outsider: ipcctl submit exits 77" 77 "$?"
info "outsider's submit: $out"
outsider "$IPCCTL" result "$id" >/dev/null 2>&1
expect "outsider: ipcctl result exits 77" 77 "$?"
outsider "$IPCCTL" status >/dev/null 2>&1
expect "outsider: ipcctl status exits 77" 77 "$?"

step "MemoryDenyWriteExecute=yes and ctypes"
expect "the unit has MemoryDenyWriteExecute=yes (and the jobs above ran under it)" yes \
    "$(systemctl show -p MemoryDenyWriteExecute --value ipcd)"
# A probe unit with exactly ipcd.service's sandbox (its [Service] settings less those that
# run the daemon) makes a ctypes callback, which needs a libffi closure. ipcd makes none:
# this tells handler authors whether they may.
probe=/run/systemd/system/ipcd-ctypes-probe.service
sed -e '/^\(Type\|PIDFile\|ExecStart\|ExecReload\|Restart\|RestartSec\|KillMode\|TimeoutStopSec\|WatchdogSec\|NotifyAccess\)=/d' \
    -e '/^\[Install\]/,$d' /etc/systemd/system/ipcd.service >"$probe"
printf '%s\n' 'Type=oneshot' \
    "ExecStart=/opt/ipcd/bin/python -c \"import ctypes; print('a ctypes callback returned', ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 42)())\"" \
    >>"$probe"
systemctl daemon-reload
systemctl start ipcd-ctypes-probe.service
out=$(journalctl -u ipcd-ctypes-probe --no-pager -o cat | grep -v -e '^Starting ' -e '^Finished ' \
    -e 'Deactivated successfully' -e 'Consumed ' | tr '\n' ' ')
info "ctypes callback under ipcd.service's sandbox (MemoryDenyWriteExecute=yes): $out"
rm -f "$probe"
systemctl daemon-reload

# --- reload and log rotation -------------------------------------------------------------
step "systemctl reload ipcd"
workers=$(pgrep -P "$main" | xargs)
check "systemctl reload ipcd" systemctl reload ipcd
check "the daemon logged daemon.reloaded" wait_for 30 grep -q daemon.reloaded "$LOG"
expect "reload kept the main PID" "$main" "$(main_pid)"
# shellcheck disable=SC2086
check "a new generation of workers replaced the old one" wait_for 30 gone $workers

step "logrotate -f /etc/logrotate.d/ipcd (its postrotate reloads ipcd)"
workers=$(pgrep -P "$main" | xargs)
check "logrotate -f /etc/logrotate.d/ipcd" logrotate -f /etc/logrotate.d/ipcd
check "the old log is now ipcd.log.1" test -s /var/log/ipcd/ipcd.log.1
check "the daemon reopened a fresh ipcd.log (daemon.reloaded in it)" \
    wait_for 30 grep -q daemon.reloaded "$LOG"
expect "the fresh log: owner and mode" "ipcd:ipcd 640" "$(stat -c '%U:%G %a' "$LOG")"
# shellcheck disable=SC2086
wait_for 30 gone $workers
id=$(member "$IPCCTL" submit echo after-rotation 2>&1)
out=$(member "$IPCCTL" result "$id" --wait 2>&1)
expect "a job after the rotation" "0 after-rotation" "$? $out"
check "its events go to the fresh log" wait_for 10 grep -q "$id" "$LOG"
check "and not to the rotated one" not grep -q "$id" /var/log/ipcd/ipcd.log.1

# --- the template ------------------------------------------------------------------------
step "ipcd@second, configured from instance.toml.example"
sed 's/NAME/second/g' "$EXAMPLE" >/etc/ipcd/second.toml
need "systemctl start ipcd@second" systemctl start ipcd@second
expect "ipcd@second: MainPID is the PID in /run/ipcd/second.pid" \
    "$(main_pid ipcd@second)" "$(cat /run/ipcd/second.pid 2>/dev/null)"
out=$(member "$IPCCTL" -c /etc/ipcd/second.toml submit echo hi-second --wait 2>&1)
expect "member: a job for ipcd@second" "0 hi-second" "$? $out"
k1=$(first_key)
k2=$(first_key -c /etc/ipcd/second.toml)
check "the instances use different keys ($k1, $k2)" test -n "$k2" -a "$k1" != "$k2"
check "ipcd@second logs to /var/log/ipcd/second.log" test -s /var/log/ipcd/second.log
check "systemd-analyze security ipcd@second.service: exposure 2.0 or lower" \
    score_ok ipcd@second.service
check "systemctl stop ipcd@second" systemctl stop ipcd@second
check "ipcd's PID file survives the stop of ipcd@second" test -s /run/ipcd/ipcd.pid
expect "ipcd is still active" active "$(systemctl is-active ipcd)"

# --- squatting ---------------------------------------------------------------------------
step "squatting: the outsider pre-creates a 0666 queue at ipcd@squat's key"
sed -e 's/NAME/squat/g' -e 's/^proj_id = .*/proj_id = 0x60/' "$EXAMPLE" >/etc/ipcd/squat.toml
install -o ipcd -g ipcd -m 0444 /dev/null /var/lib/ipcd/squat.key
ks=$(first_key -c /etc/ipcd/squat.toml)
outsider /opt/ipcd/bin/python -c \
    "import sysv_ipc; sysv_ipc.MessageQueue($ks, sysv_ipc.IPC_CREX, 0o666)"
check "systemctl start ipcd@squat fails" not systemctl start ipcd@squat
# Restart=on-failure retries a failed start (RestartPreventExitStatus= does not cover a
# forking unit's ExecStart) until the start limit (5 within 60 s): then it stays failed.
check "ipcd@squat gives up and stays failed" \
    wait_for 90 state_is ipcd@squat failed
info "ipcd@squat: $(systemctl show -p Result -p NRestarts ipcd@squat | xargs)"
journal=$(journalctl -u ipcd@squat --no-pager -o cat)
check "the journal names the planted queue (key $ks)" grep -q "at key $ks" <<<"$journal"
info "ipcd@squat: $(grep -m1 "at key $ks" <<<"$journal")"
systemctl stop ipcd@squat
systemctl reset-failed ipcd@squat
ipcrm -Q "$ks"

# --- stop: the queue stays ---------------------------------------------------------------
step "systemctl stop ipcd; jobs submitted meanwhile wait in the queue for the next start"
need "systemctl stop ipcd" systemctl stop ipcd
expect "ipcd is inactive" inactive "$(systemctl is-active ipcd)"
check "the PID file is gone" test ! -e /run/ipcd/ipcd.pid
check "the job queue is still in the kernel" grep -q "^$k1 " <(ipcs -q)
id1=$(member "$IPCCTL" submit --no-confirm echo queued-1 2>/tmp/submit-stopped.err)
expect "member: submit --no-confirm while stopped" 0 "$?"
check "submit while stopped warns that no daemon serves the queue" \
    grep -q "warning: no daemon is serving the queue" /tmp/submit-stopped.err
id2=$(member "$IPCCTL" submit echo queued-2 2>/tmp/submit-stopped.err)
expect "member: a confirmed submit while stopped is not confirmed (5)" 5 "$?"
check "it says the job waits in the kernel queue" \
    grep -q "not confirmed: ipcd is not running; it waits in the kernel queue" /tmp/submit-stopped.err
out=$(member "$IPCCTL" status 2>&1)
expect "ipcctl status while stopped exits 69" 69 "$?"
check "ipcctl status shows the 2 queued jobs" grep -q ': 2 messages' <<<"$out"
info "${out//$'\n'/ | }"
need "systemctl start ipcd (again)" systemctl start ipcd
out=$(member "$IPCCTL" result "$id1" --wait 2>&1)
expect "the first queued job ran after the start" "0 queued-1" "$? $out"
out=$(member "$IPCCTL" result "$id2" --wait 2>&1)
expect "the second queued job ran after the start" "0 queued-2" "$? $out"

# --- SIGKILL: Restart=on-failure ----------------------------------------------------------
step "systemctl kill -s KILL ipcd; Restart=on-failure starts it again"
old=$(main_pid)
restarts=$(systemctl show -p NRestarts --value ipcd)
check "systemctl kill -s KILL ipcd" systemctl kill -s KILL ipcd
check "ipcd restarted by itself under a new main PID" wait_for 90 restarted "$old"
expect "NRestarts counted it" $((restarts + 1)) "$(systemctl show -p NRestarts --value ipcd)"
expect "MainPID is the PID in the PID file" "$(main_pid)" "$(cat /run/ipcd/ipcd.pid 2>/dev/null)"
out=$(member "$IPCCTL" submit echo after-kill --wait 2>&1)
expect "a job after the restart" "0 after-kill" "$? $out"

# --- a reload the daemon refuses ----------------------------------------------------------
step "systemctl reload ipcd with a handler the daemon cannot import"
main=$(main_pid)
cp /etc/ipcd/ipcd.toml /root/ipcd.toml.good
printf '\n[handlers.broken]\ntype = 99\ntarget = "no_such_module:f"\n' >>/etc/ipcd/ipcd.toml
check "systemctl reload ipcd fails" not systemctl reload ipcd
check "the journal has the daemon's reason" \
    grep -q "reload failed.*no_such_module" <(journalctl -u ipcd --no-pager -o cat)
expect "ipcd is still active" active "$(systemctl is-active ipcd)"
expect "under the same main PID" "$main" "$(main_pid)"
cp /root/ipcd.toml.good /etc/ipcd/ipcd.toml
out=$(member "$IPCCTL" submit echo after-failed-reload --wait 2>&1)
expect "a job after the refused reload, on the old configuration" "0 after-failed-reload" "$? $out"
check "systemctl reload ipcd with the good file again" systemctl reload ipcd

# --- the watchdog -------------------------------------------------------------------------
step "kill -STOP the master; WatchdogSec= makes systemd restart it"
old=$(main_pid)
restarts=$(systemctl show -p NRestarts --value ipcd)
expect "ipcd.service has a 30 s watchdog" 30s "$(systemctl show -p WatchdogUSec --value ipcd)"
check "kill -STOP the master" kill -STOP "$old"
check "ipcd restarted by the watchdog under a new main PID" wait_for 120 restarted "$old"
expect "NRestarts counted it" $((restarts + 1)) "$(systemctl show -p NRestarts --value ipcd)"
check "the journal says why" grep -q "Watchdog timeout" <(journalctl -u ipcd --no-pager -o cat)
out=$(member "$IPCCTL" submit echo after-watchdog --wait 2>&1)
expect "a job after the watchdog's restart" "0 after-watchdog" "$? $out"

# --- the cron example --------------------------------------------------------------------
step "the jobs in /etc/cron.d/ipcd-example, run as cron would (sh, as a member)"
n=0
while IFS= read -r line; do
    n=$((n + 1))
    # "# m h dom mon dow user command": the command, with crontab's \% turned back into %.
    cmd=$(sed -E -e 's/^# +([^ ]+ +){5}[^ ]+ +//' -e 's/\\%/%/g' <<<"$line")
    (cd / && member env -i PATH=/usr/local/bin:/usr/bin:/bin sh -c "$cmd")
    expect "cron example $n exits 0" 0 "$?"
done < <(grep -E '^# [0-9*]' /etc/cron.d/ipcd-example)
check "the cron examples were found" test "$n" -ge 1
expect "the nightly example stored its result" "report for $(date +%F)" \
    "$(cat /var/tmp/ipcd-report.txt 2>/dev/null)"

# --- the journal -------------------------------------------------------------------------
step "journalctl -u ipcd"
journalctl -u ipcd --no-pager -o short-monotonic
journal=$(journalctl -u ipcd --no-pager -o cat)
for event in "Started ipcd.service" "Reloading ipcd.service" "Reloaded ipcd.service" \
    "Stopping ipcd.service" "Stopped ipcd.service" "code=killed, status=9/KILL" \
    "Scheduled restart job"; do
    check "journal: $event" grep -qF "$event" <<<"$journal"
done

# --- the job store across a reboot and a power cut (guest-reboot.sh) --------------------
reboot_prepare
