# shellcheck shell=bash
# The job store across a reboot and a power cut, inside the test VM: sourced by
# guest-test.sh, whose helpers (check, expect, ok, bad, step, info, need, wait_for, member,
# finish) and variables (IPCCTL, passed, failed, key_inode, k1) it uses.
#
# The test spans three boots of the same root disk, and $VT/state (on that disk) says which
# phase a boot runs:
#   phase 1  guest-test.sh's systemctl checks, then reboot_prepare: jobs finished, failed,
#            running, queued and delayed, written down in $VT/reboot.jobs; `systemctl
#            reboot` (the host boots the disk again when qemu exits after the reboot).
#   phase 2  reboot_verify: what each of those jobs did after the boot; then
#            powercut_prepare: the same kinds of jobs with [store] sync = "full", and
#            "VMTEST-POWERCUT: ready for power cut" once they are confirmed; the host kills
#            qemu (SIGKILL) and boots the disk again.
#   phase 3  powercut_verify, then guest-test.sh's make uninstall checks.
#
# Each job that counts its runs is an exec job whose command (vmtest-record) appends
# "ID start|end BOOT_ID TIME" to $RUNS and fsyncs it, so the record survives a power cut
# too. "slow" jobs sleep an hour on their first attempt (they are the ones running at the
# reboot) and end at once on a later one.
#
# Checks named "store: ..." need the job store of issue 12 (ipcctl list --json, the store
# keeping jobs and results across boots); before it exists they fail, and say so.

VT=/var/lib/vmtest
RUNS=/var/lib/ipcd/vmtest-runs
RECORD=/usr/local/sbin/vmtest-record
CONFIG=/etc/ipcd/ipcd.toml
STORE_DB=/var/lib/ipcd/jobs.db

boot_id() { cat /proc/sys/kernel/random/boot_id; }

# save_state PHASE: what the next boot needs, durable before a reboot or a power cut.
save_state() {
    mkdir -p "$VT"
    cat >"$VT/state.new" <<EOF
phase=$1
passed=$passed
failed=$failed
key_inode=$key_inode
k1=$k1
last_boot=$(boot_id)
EOF
    mv "$VT/state.new" "$VT/state"
    sync
}

# count ID EVENT [BOOT_ID]: how many times the job recorded EVENT (start, end), in that boot.
count() {
    awk -v id="$1" -v ev="$2" -v b="${3:-}" \
        '$1 == id && $2 == ev && (b == "" || $3 == b) { n++ } END { print n + 0 }' "$RUNS"
}
# first_start ID: the time of the job's first recorded start (seconds since the epoch).
first_start() {
    awk -v id="$1" '$1 == id && $2 == "start" && (m == "" || $4 < m) { m = $4 } END { print m }' "$RUNS"
}
started() { [ "$(count "$1" start)" -ge 1 ]; }
# all_ended JOBS_FILE BOOT_ID: every queued, delayed and running job recorded an end in
# this boot.
all_ended() {
    local kind id arg
    while read -r kind id arg; do
        case $kind in queued | delayed | running)
            [ "$(count "$id" end "$2")" -ge 1 ] || return 1
            ;;
        esac
    done <"$1"
}

# The store's view: "ID STATE ATTEMPTS" per job from `ipcctl list --json` (a JSON array of
# records, or an object holding them under "jobs"). Its error, if any, in $VT/list.err.
store_listing() {
    member "$IPCCTL" list -n 1000 --json 2>"$VT/list.err" | python3 -c '
import json, sys
doc = json.load(sys.stdin)
for job in doc["jobs"] if isinstance(doc, dict) else doc:
    print(job["id"], job["state"], job["attempts"])
' 2>>"$VT/list.err"
}
# store_of LISTING ID: "STATE ATTEMPTS" of the job in the listing.
store_of() { awk -v id="$2" '$1 == id { print $2, $3 }' <<<"$1"; }
# store_answers: ipcctl knows `list` (exit status 64, a usage error, means this ipcd has no
# job store yet). Only to bound the waits: the store's checks run and fail either way.
store_answers() {
    member "$IPCCTL" list -n 1 --json >/dev/null 2>&1
    [ $? != 64 ]
}
# store_wait SECONDS: SECONDS, or 5 when there is no store to wait for.
store_wait() {
    if store_answers; then echo "$1"; else
        info "ipcctl list exits 64 (no job store in this ipcd): waiting 5 s, not $1 s" >&2
        echo 5
    fi
}
# store_says ID STATE: the store has the job in that state now.
store_says() { [ "$(store_of "$(store_listing)" "$1" | cut -d' ' -f1)" = "$2" ]; }
in_failed() { member "$IPCCTL" failed 2>/dev/null | grep -q "^$1 "; }
# check_listing LISTING: one check that the listing came, naming why not.
check_listing() {
    if [ -n "$1" ]; then
        ok "store: ipcctl list -n 1000 --json lists the jobs"
    else
        bad "store: ipcctl list -n 1000 --json lists the jobs: $(tr '\n' ' ' <"$VT/list.err" | cut -c1-300)"
    fi
}

# submit KIND ARG HANDLER PAYLOAD [OPTION...]: a job submitted by a member of group ipcd;
# exit status 0 means confirmed (stored), and only then is it written down in $JOBS.
submit() {
    local kind=$1 arg=$2 handler=$3 payload=$4 id rc
    shift 4
    id=$(member "$IPCCTL" submit "$@" "$handler" "$payload" 2>"$VT/submit.err")
    rc=$?
    if [ "$rc" = 0 ] && [ -n "$id" ]; then
        echo "$kind $id $arg" >>"$JOBS"
        sync "$JOBS"
        LAST_ID=$id
        return 0
    fi
    bad "$VARIANT: ipcctl submit $* $handler $payload: exit $rc, $(tr '\n' ' ' <"$VT/submit.err")"
    LAST_ID=
    return 1
}
ids_of() { awk -v k="$1" '$1 == k { print $2 }' "$JOBS"; }

# The handlers the store tests use: exec (for vmtest-record), and a short graceful stop so
# that the reboot does not wait 20 s for the slow jobs it is going to kill anyway.
configure_exec() {
    install -m 0755 /dev/stdin "$RECORD" <<'EOF'
#!/bin/sh
# vmtest-record record|slow: an exec job of the ipcd VM test that records each run it gets.
set -eu
f=/var/lib/ipcd/vmtest-runs
boot=$(cat /proc/sys/kernel/random/boot_id)
rec() {
    printf '%s %s %s %s\n' "$IPCD_JOB_ID" "$1" "$boot" "$(date +%s.%N)" >>"$f"
    sync -d "$f"
}
first=yes
grep -q "^$IPCD_JOB_ID start " "$f" && first=no
rec start
# A slow job's first attempt lasts until it is killed (the reboot or the power cut).
[ "$1" = slow ] && [ "$first" = yes ] && exec sleep 3600
rec end
echo "ran $IPCD_JOB_ID"
EOF
    install -o ipcd -g ipcd -m 0640 /dev/null "$RUNS"
    cp "$CONFIG" "$VT/ipcd.toml.shipped"
    sed -i 's/^graceful_timeout = .*/graceful_timeout = 5.0/' "$CONFIG"
    cat >>"$CONFIG" <<EOF

# Added by the VM test (tests/systemd/guest-reboot.sh).
[exec]
enabled = true
timeout = 3600.0
[exec.commands]
record = ["$RECORD", "record"]
slow = ["$RECORD", "slow"]

[handlers.exec]
type = 20
EOF
    sync
}

# queue_jobs VARIANT DELAY...: the jobs whose fate the next boot checks, in $VT/VARIANT.jobs:
# finished ones (with readable results), a failed one, two slow ones running (both
# workers busy), three queued behind them, and one delayed job per DELAY seconds.
queue_jobs() {
    VARIANT=$1
    shift
    JOBS=$VT/$VARIANT.jobs
    : >"$JOBS"
    local id i t t0 out
    for i in 1 2; do
        if submit done - exec record; then
            out=$(member "$IPCCTL" result "$LAST_ID" --wait --timeout 60 2>&1)
            check "$VARIANT: a finished job ran before it ($LAST_ID)" grep -q "ran $LAST_ID" <<<"$out"
        fi
    done
    if submit result "finished before the $VARIANT" echo "finished before the $VARIANT"; then
        out=$(member "$IPCCTL" result "$LAST_ID" --wait --timeout 60 2>&1)
        expect "$VARIANT: an echo job finished before it" "finished before the $VARIANT" "$out"
    fi
    if submit failed "failed before the $VARIANT" fail "failed before the $VARIANT"; then
        member "$IPCCTL" result "$LAST_ID" --wait --timeout 60 >/dev/null 2>&1
        check "$VARIANT: a failed job is in ipcctl failed" wait_for 30 in_failed "$LAST_ID"
    fi
    for i in 1 2; do submit running - exec slow; done
    for id in $(ids_of running); do
        check "$VARIANT: slow job $id is running" wait_for 60 started "$id"
    done
    for i in 1 2 3; do submit queued - exec record; done
    for t in "$@"; do
        t0=$(date +%s.%N)
        submit delayed "$(awk -v a="$t0" -v b="$t" 'BEGIN { printf "%.3f", a + b }')" \
            --delay "$t" exec record
    done
    # Both workers are busy with the slow jobs: nothing else can have started.
    for id in $(ids_of queued) $(ids_of delayed); do
        check "$VARIANT: job $id has not started yet" not started "$id"
    done
    # The store's view of them now.
    local listing kind arg want
    listing=$(store_listing)
    check_listing "$listing"
    while read -r kind id arg; do
        case $kind in
        done | result) want=done ;;
        failed) want=failed ;;
        running) want=running ;;
        queued) want=queued ;;
        delayed) want=scheduled ;;
        esac
        expect "store: before the $VARIANT, $kind job $id is $want" "$want" \
            "$(store_of "$listing" "$id" | cut -d' ' -f1)"
    done <"$JOBS"
    info "$VARIANT: confirmed jobs: $(cut -d' ' -f1 "$JOBS" | sort | uniq -c | xargs)"
}

# verify_jobs VARIANT: after the boot, every confirmed job ran as at-least-once allows.
verify_jobs() {
    VARIANT=$1
    JOBS=$VT/$VARIANT.jobs
    local now_boot prev_boot last_due limit kind id arg listing out
    now_boot=$(boot_id)
    prev_boot=$last_boot
    check "$VARIANT: this is a new boot (boot id $now_boot)" test "$now_boot" != "$prev_boot"
    check "$VARIANT: the job list written before it is on the root disk" test -s "$JOBS"
    check "$VARIANT: the run records written before it are on the root disk" test -s "$RUNS"
    # ipcd.service is enabled: systemd starts it at boot, not this test.
    check "$VARIANT: systemd started ipcd at boot" wait_for 90 state_is ipcd active
    expect "$VARIANT: the key file kept its inode (the same IPC key)" "$key_inode" \
        "$(stat -c %i /var/lib/ipcd/ipcd.key)"
    check "store: $VARIANT: the job store $STORE_DB is there, owned by ipcd" \
        test "$(stat -c %U "$STORE_DB" 2>/dev/null)" = ipcd
    # Bounded by the latest due time, plus a minute for a slow start.
    last_due=$(awk '$1 == "delayed" && $3 > m { m = $3 } END { printf "%d", m }' "$JOBS")
    limit=$((last_due - $(date +%s) + 60))
    [ "$limit" -ge 60 ] || limit=60
    limit=$(store_wait "$limit")
    check "store: $VARIANT: every queued, delayed and running job ran to its end after the boot" \
        wait_for "$limit" all_ended "$JOBS" "$now_boot"
    listing=$(store_listing)
    check_listing "$listing"
    while read -r kind id arg; do
        case $kind in
        done | result)
            if [ "$kind" = done ]; then
                expect "$VARIANT: job $id, finished before it, did not run again" "1 0" \
                    "$(count "$id" start) $(count "$id" start "$now_boot")"
                arg="ran $id" # vmtest-record's output
            fi
            out=$(member "$IPCCTL" result "$id" 2>&1)
            check "store: $VARIANT: ipcctl result $id, finished before it, still reads '$arg'" \
                grep -qF "$arg" <<<"$out"
            expect "store: $VARIANT: job $id is done, 1 attempt" "done 1" "$(store_of "$listing" "$id")"
            ;;
        failed)
            out=$(member "$IPCCTL" failed 2>&1)
            check "store: $VARIANT: ipcctl failed still lists job $id" grep -q "^$id .*$arg" <<<"$out"
            expect "store: $VARIANT: job $id is failed" failed "$(store_of "$listing" "$id" | cut -d' ' -f1)"
            ;;
        running)
            expect "store: $VARIANT: job $id, running at it, ran again after the boot, to its end" \
                "1 1 1" "$(count "$id" start "$prev_boot") $(count "$id" start "$now_boot") $(count "$id" end "$now_boot")"
            # An orderly stop (the reboot) keeps the attempt of a job it cut off: not the
            # job's failure. A power cut is a death: the job runs as its next attempt.
            want=2
            [ "$VARIANT" = reboot ] && want=1
            expect "store: $VARIANT: job $id is done, attempt $want" "done $want" "$(store_of "$listing" "$id")"
            ;;
        queued | delayed)
            expect "store: $VARIANT: $kind job $id ran exactly once, after the boot" "1 1 1" \
                "$(count "$id" start) $(count "$id" start "$now_boot") $(count "$id" end "$now_boot")"
            expect "store: $VARIANT: job $id is done, 1 attempt" "done 1" "$(store_of "$listing" "$id")"
            ;;
        esac
        if [ "$kind" = delayed ]; then
            check "store: $VARIANT: delayed job $id started no earlier than its due time $arg" \
                awk -v s="$(first_start "$id")" -v d="$arg" 'BEGIN { exit !(s != "" && s >= d) }'
        fi
    done <"$JOBS"
}

# Phase 1, after guest-test.sh's systemctl checks: the jobs, then `systemctl reboot`.
reboot_prepare() {
    step "the job store across a reboot: jobs finished, failed, running, queued and delayed"
    mkdir -p "$VT"
    # A persistent journal, so that the next boot can read how this one ended.
    mkdir -p /var/log/journal
    systemd-tmpfiles --create --prefix /var/log/journal
    journalctl --flush
    configure_exec
    need "ipcd check accepts the exec handler's configuration" \
        /opt/ipcd/bin/ipcd -c "$CONFIG" check
    # Enabled, as an operator would; the test boot target reaches multi-user.target too,
    # less the login prompt on the serial console, which would garble the test's lines.
    check "systemctl enable ipcd" systemctl enable --quiet ipcd
    systemctl add-wants vmtest.target multi-user.target
    systemctl mask --quiet serial-getty@ttyS0.service
    need "systemctl restart ipcd" systemctl restart ipcd
    k1=$(first_key)
    queue_jobs reboot 25 70
    # vmtest.service's SuccessAction=poweroff-force would cut the reboot short: this boot
    # only (the drop-in is in /run), the unit ends with no action.
    mkdir -p /run/systemd/system/vmtest.service.d
    printf '[Unit]\nSuccessAction=none\nFailureAction=none\n' \
        >/run/systemd/system/vmtest.service.d/reboot.conf
    systemctl daemon-reload
    save_state 2
    echo "VMTEST-REBOOT: phase 1 done ($passed passed, $failed failed so far): systemctl reboot"
    systemctl reboot
    exit 0
}

# Phase 2: the reboot's checks, then the power cut's jobs; the host kills the VM.
reboot_verify() {
    step "after the reboot: every confirmed job, the results and the failed list"
    check "the reboot was orderly: systemd stopped ipcd before it" \
        grep -qF "Stopped ipcd.service" <(journalctl -b -1 -u ipcd --no-pager -o cat 2>&1)
    verify_jobs reboot
}

powercut_prepare() {
    step "the job store across a power cut, with [store] sync = \"full\""
    cp "$CONFIG" "$VT/ipcd.toml.normal"
    # The shipped ipcd.toml has a [store] section: set its sync (or add the section).
    if grep -q '^sync = ' "$CONFIG"; then
        sed -i 's/^sync = .*/sync = "full"/' "$CONFIG"
    elif grep -q '^\[store\]' "$CONFIG"; then
        sed -i 's/^\[store\]$/[store]\nsync = "full"/' "$CONFIG"
    else
        printf '\n[store]\nsync = "full"\n' >>"$CONFIG"
    fi
    if /opt/ipcd/bin/ipcd -c "$CONFIG" check >"$VT/check.out" 2>&1; then
        ok "store: ipcd check accepts [store] sync = \"full\""
    else
        bad "store: ipcd check accepts [store] sync = \"full\": $(tr '\n' ' ' <"$VT/check.out" | cut -c1-300)"
        info "power cut without [store] sync = \"full\", to exercise the harness"
        cp "$VT/ipcd.toml.normal" "$CONFIG"
    fi
    need "systemctl restart ipcd" systemctl restart ipcd
    queue_jobs powercut 40
    # With sync = "full" a job the store shows done is durable: it must not run again.
    local id limit
    limit=$(store_wait 30)
    for id in $(ids_of done); do
        check "store: the store shows job $id done before the power cut" \
            wait_for "$limit" store_says "$id" done
    done
    save_state 3
    echo "VMTEST-POWERCUT: ready for power cut ($(wc -l <"$JOBS") confirmed jobs; $passed passed, $failed failed so far)"
    # The host kills qemu now; should it not, the test goes on to say so.
    sleep 300
    bad "the host did not cut the power within 300 s of 'ready for power cut'"
}

# Phase 3.
powercut_verify() {
    step "after the power cut: every confirmed job, the results and the failed list"
    info "ext4 at boot: $(dmesg | grep -m1 -o 'EXT4-fs (vda): recovery complete' || echo 'no journal recovery')"
    verify_jobs powercut
}
