# Helpers for the kvm-lab scenarios (sourced inside L1 by run-one.sh).
#
# A scenario is a shell script that starts cgsvmm processes with `vm`,
# waits with `wait_for`, asks them with `q`, and states what must hold with
# `check`. What the host sees are the serial lines:
#   LAB-CHECK ok|FAIL <what>      one per check (the first FAIL ends it)
#   LAB-NOTE <key>=<value> ...    a measured number
#   LAB-SCENARIO-END <name> <try> pass|fail seconds=<s>
# Every VM's serial log is /tmp/NAME.log, its stderr /tmp/NAME.err and its
# QMP socket /tmp/NAME.sock.

KEY=/tmp/transport.key
printf '%064x\n' 0x42 >"$KEY"
GUEST=/lab/guest
# The Linux guest's command line: warnings and worse (loglevel=5: levels
# 0-4) reach the console, and so the test; no ACPI, PCI or i8042 on this platform yet.
LINUX_CMDLINE="console=ttyS0 reboot=k panic=1 loglevel=5 i8042.noaux i8042.nokbd"
HELPERS="--transport-key-file $KEY --mirror-cpus 2"
# The downtime limit of the lab's live migrations: under emulation the
# guest dirties memory ~50x faster than the stream moves it, so the default
# 300 ms would take a dozen throttled rounds; correctness is the same.
LIVE_LIMIT_MS=2000

now() { cut -d' ' -f1 /proc/uptime; }
# Seconds (two decimals) since $1 (an uptime reading).
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# check WHAT COMMAND...: COMMAND must succeed. The first check that fails
# ends the scenario there (with the dump): what follows it depends on it,
# and waiting for it would only spend the scenario's time limit and lose
# the evidence.
check() {
    local what="$1"
    shift
    if "$@"; then
        echo "LAB-CHECK ok $what"
    else
        fail "$what"
    fi
}
fail() {
    echo "LAB-CHECK FAIL $*"
    FAILED=1
    end_scenario
}
note() { echo "LAB-NOTE $*"; }

# vm NAME ARGS...: `cgsvmm run ARGS` in the background with its serial log,
# stderr and QMP socket named after NAME; waits for the socket.
vm() {
    local name="$1"
    shift
    rm -f "/tmp/$name.sock" "/tmp/$name.log" "/tmp/$name.err"
    RUST_LOG="${RUST_LOG:-warn}" cgsvmm run "$@" --serial "file:/tmp/$name.log" \
        --qmp "unix:/tmp/$name.sock" 2>"/tmp/$name.err" &
    echo $! >"/tmp/$name.pid"
    VMS="$VMS $name"
    local i=0
    while [ ! -S "/tmp/$name.sock" ] && [ $i -lt 100 ]; do
        kill -0 "$(cat "/tmp/$name.pid")" 2>/dev/null || break
        sleep 0.1
        i=$((i + 1))
    done
    [ -S "/tmp/$name.sock" ]
}

# q NAME COMMAND [JSON]: one QMP command; its reply on stdout.
q() {
    local name="$1"
    shift
    cgsvmm qmp "unix:/tmp/$name.sock" "$@" --timeout 20
}

# jget KEY: the first value of KEY in the (pretty-printed) JSON on stdin.
jget() { sed -n "s/^ *\"$1\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p" | head -n1; }

status() { q "$1" query-status | jget status; }

# wait_for SECONDS CMD...: polls CMD every 0.2 s until it holds (exit 0);
# gives up at the limit, or at once when CMD exits 2 (it never will).
wait_for() {
    local limit="$1" start
    shift
    start="$(now)"
    while :; do
        "$@"
        case $? in
        0) return 0 ;;
        2) return 1 ;; # it can no longer hold
        esac
        if awk -v a="$start" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then
            return 1
        fi
        sleep 0.2
    done
}

# has NAME PATTERN: the VM's serial log has a line matching PATTERN; 1 if
# not yet, 2 if never (the VM has exited), which ends a `wait_for` at once.
has() {
    file_has "/tmp/$1.log" "$2" && return 0
    kill -0 "$(cat "/tmp/$1.pid" 2>/dev/null)" 2>/dev/null && return 1
    file_has "/tmp/$1.log" "$2" && return 0
    return 2
}
# file_has FILE PATTERN: FILE has a line matching PATTERN (1 if it does
# not, or does not exist yet).
file_has() { grep -qE "$2" "$1" 2>/dev/null || return 1; }

# The dirtier's last pass on vCPU $2 in VM $1's log (0 if none).
pass_of() {
    { grep -oE "dirtier: vcpu $2 pass [0-9]+ ok" "/tmp/$1.log" 2>/dev/null || true; } |
        awk '{ p = $5 } END { print p + 0 }'
}
# Both dirtier vCPUs of VM $1 are past pass $2.
dirtier_beyond() { [ "$(pass_of "$1" 0)" -gt "$2" ] && [ "$(pass_of "$1" 1)" -gt "$2" ]; }
no_memory_error() { ! grep -q "MEMORY-ERROR" "/tmp/$1.log"; }

# The checker's last pass (seed $2) in VM $1's log (0 if none).
checker_pass() {
    { grep -oE "checker $2: pass [0-9]+ ok" "/tmp/$1.log" 2>/dev/null || true; } |
        awk '{ p = $4 } END { print p + 0 }'
}
checkers_beyond() { [ "$(checker_pass "$1" 1)" -gt "$2" ] && [ "$(checker_pass "$1" 2)" -gt "$2" ]; }
# Kernel complaints a migration must not cause, in VM $1's log (a WARN
# splat prints "WARNING: CPU: ..."; boot notes such as SRSO's "WARNING: See" are
# not trouble).
KERNEL_TROUBLE='rcu.*(stall|detected)|soft lockup|hard LOCKUP|clocksource|hung_task|BUG:|WARNING: CPU|cut here|Call Trace|Oops|MEMORY-ERROR|CLOCK-ERROR'
kernel_quiet() { ! grep -qE "$KERNEL_TROUBLE" "/tmp/$1.log"; }

# linux NAME EXTRA_CMDLINE ARGS...: a Linux guest (bzImage, our initramfs
# with the checker) on 2 vCPUs.
linux() {
    local name="$1" extra="$2"
    shift 2
    vm "$name" --kernel "$GUEST/bzImage" --initrd "$GUEST/initrd.cpio.gz" \
        --cmdline "$LINUX_CMDLINE $extra" --cpus 2 "$@"
}

# wait_exit NAME SECONDS: waits for the VM to exit; its status in $EXIT.
wait_exit() {
    local pid
    pid="$(cat "/tmp/$1.pid")"
    EXIT=
    if wait_for "$2" sh -c "! kill -0 $pid 2>/dev/null"; then
        wait "$pid"
        EXIT=$?
        return 0
    fi
    return 1
}

# migrate SRC URI [cgsvmm migrate flags]: drives the migration with
# `cgsvmm migrate`; its summary is printed, the final query-migrate is in
# /tmp/migrate.json and its numbers become LAB-NOTEs.
migrate() {
    local src="$1" uri="$2"
    shift 2
    local start rc
    start="$(now)"
    cgsvmm migrate --qmp "unix:/tmp/$src.sock" --no-progress "$@" "$uri" >/tmp/migrate.out 2>&1
    rc=$?
    sed 's/^/  /' /tmp/migrate.out
    q "$src" query-migrate >/tmp/migrate.json
    note "migration=$src status=$(jget status </tmp/migrate.json) total_ms=$(jget total-time </tmp/migrate.json)" \
        "downtime_ms=$(jget downtime </tmp/migrate.json) rounds=$(($(jget dirty-sync-count </tmp/migrate.json) + 1))" \
        "private=$(jget private-pages </tmp/migrate.json) shared=$(jget shared-pages </tmp/migrate.json) wall_s=$(since "$start")"
    return $rc
}

# Stops every VM this scenario started.
stop_all() {
    local name pid
    for name in $VMS; do
        pid="$(cat "/tmp/$name.pid" 2>/dev/null)" || continue
        kill -0 "$pid" 2>/dev/null || continue
        q "$name" quit >/dev/null 2>&1
        sleep 0.3
        kill -9 "$pid" 2>/dev/null
    done
    VMS=
}

# What the host needs to see when a scenario fails: each VM's log tails
# and the shutdown exits KVM traced.
dump() {
    local name
    for name in $VMS; do
        echo "---- $name serial (tail)"
        tail -n 15 "/tmp/$name.log" 2>/dev/null
        echo "---- $name stderr (tail)"
        tail -n 15 "/tmp/$name.err" 2>/dev/null
    done
    echo "---- trace (kvm_exit shutdown, kvm_inj_exception)"
    tail -n 30 /sys/kernel/tracing/trace 2>/dev/null | grep -v '^#'
    # A guest RIP that is one of L1's own kernel addresses names the code.
    # A guest that died executing L1's code (the instruction after VMRUN in
    # kvm_amd's __svm_vcpu_run, so far) met the emulator's known fault: a
    # guest cannot reach the host's addresses, whatever its VMM did. run.sh
    # counts such a try as the emulator's, not the scenario's.
    local rip sym
    for rip in $(grep -o 'reason shutdown rip 0xffff[0-9a-f]*' /sys/kernel/tracing/trace 2>/dev/null | awk '{print $4}'); do
        sym="$(l1_symbol "$rip")"
        echo "---- $rip in L1's kernel: ${sym#? }"
        case "$sym" in
            [tT]" "*) echo "LAB-EMULATOR a guest vCPU died at $rip, L1's own code (${sym#? }): the emulator ran the host's instructions as the guest's" ;;
        esac
    done
    # Suspected, not proven: a guest that died of a page fault while the
    # emulator walks nested page tables (kvm_amd npt=Y). Every such death
    # seen had that form (README: a Linux source in precopy at a user RIP,
    # a helper at the `ret` after a copy whose stack shares the 2 MiB page
    # it fetched code from), and none happened with npt=0 in 23 runs of
    # the dirtier's precopy. Any other death is the scenario's.
    if [ "$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)" = Y ] &&
        grep -q 'reason shutdown .* intr_info 0x80000b0e' /sys/kernel/tracing/trace 2>/dev/null; then
        echo "LAB-EMULATOR-SUSPECT a guest vCPU died of a #PF under the emulator's nested paging"
    fi
}

# The L1 kernel symbol at or below address $1 (0x...), as its kallsyms
# type letter and symbol+offset ("t __svm_vcpu_run [kvm_amd]+0xa0"), the
# type "?" when the address lies 64 KiB or more past the symbol (not in
# it). awk's numbers are doubles, so only the low 32 bits are compared,
# among the symbols that share the address's upper half.
l1_symbol() {
    local a="${1#0x}"
    awk -v high="${a%????????}" -v low="${a#????????}" '
        function hex(s,   i, n) { n = 0; s = tolower(s)
            for (i = 1; i <= length(s); i++) n = n * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
            return n }
        BEGIN { w = hex(low); best = -1 }
        tolower(substr($1, 1, 8)) == tolower(high) {
            v = hex(substr($1, 9)); if (v <= w && v > best) { best = v; type = $2; name = $3 " " $4 } }
        END { if (best < 0) print "? ?"
              else printf "%s %s+0x%x\n", (w - best < 65536 ? type : "?"), name, w - best }' /proc/kallsyms
}

# KVM's tracepoints for what kills guests: shutdown exits (SVM exit code
# 0x7f) with the exception that escalated, and every injected exception.
trace_start() {
    local t=/sys/kernel/tracing
    [ -d $t/events/kvm ] || return 0
    echo 0 >$t/tracing_on
    echo >$t/trace
    echo 'exit_reason == 127' >$t/events/kvm/kvm_exit/filter
    echo 1 >$t/events/kvm/kvm_exit/enable
    echo 1 >$t/events/kvm/kvm_inj_exception/enable
    echo 1 >$t/tracing_on
}

is_status() { [ "$(status "$1")" = "$2" ]; }

# dirtier NAME ARGS...: the dirtier on 2 vCPUs with the helpers, in
# $DIRTIER_MEMORY (default 256M) of RAM.
dirtier() {
    local name="$1"
    shift
    vm "$name" --cpus 2 --memory "${DIRTIER_MEMORY:-256M}" $HELPERS "$@"
}

# beyond_each NAME P0 P1: the dirtier's vCPU 0 is past P0, vCPU 1 past P1.
beyond_each() { [ "$(pass_of "$1" 0)" -gt "$2" ] && [ "$(pass_of "$1" 1)" -gt "$3" ]; }

# goes_on FROM TO: the dirtier's passes in TO go on from where FROM's
# stopped, both vCPUs, without a memory error.
goes_on() {
    local p0 p1
    p0="$(pass_of "$1" 0)"
    p1="$(pass_of "$1" 1)"
    check "$2 goes on from $1's passes ($p0, $p1)" wait_for 60 beyond_each "$2" "$((p0 + 2))" "$((p1 + 2))"
    check "no memory error in $2" no_memory_error "$2"
}

# Kernel lines worth seeing in VM $1's log, for the report.
kernel_lines() { grep -E "$KERNEL_TROUBLE" "/tmp/$1.log" | head -n 5; }
