#!/usr/bin/env bash
# Boots the kvm-lab nested host and runs one scenario inside it.
#
#   resources/kvm-lab/run.sh SCENARIO [--timeout SECONDS] [--repeat N] [--log FILE]
#
# The scenario (l1/scenarios/SCENARIO.sh) runs in L1, an ordinary SVM KVM
# host that QEMU's TCG emulates (-accel tcg,thread=multi, -cpu EPYC with
# svm and npt); its serial console is printed here as it comes and kept in
# the log (LAB_TCG_THREAD=single runs both vCPUs on one host thread, for
# experiments; LAB_APPEND adds to L1's command line, e.g. lab.thp=never).
# Exit 0 when every try ended "pass"; 1 when a try failed; 3 when the
# emulator failed, not the scenario: the nested host itself died (no
# scenario can reset L1), or every failed try had a guest die executing
# L1's own code (LAB-EMULATOR: no guest can reach the host's addresses) or
# of a #PF under nested paging (LAB-EMULATOR-SUSPECT: README);
# 124 when the time limit (default 300 s) killed QEMU, after the log's tail.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
target="${CARGO_TARGET_DIR:-$here/../../target}"
lab="${LAB_DIR:-$target/kvm-lab}"

scenario="${1:?usage: run.sh SCENARIO [--timeout S] [--repeat N] [--log FILE]}"
shift
limit=300
repeat=1
log=
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) limit="$2"; shift 2 ;;
        --repeat) repeat="$2"; shift 2 ;;
        --log) log="$2"; shift 2 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -f "$here/l1/scenarios/$scenario.sh" ] || { echo "run.sh: no scenario $scenario" >&2; exit 2; }
[ -f "$lab/l1.cpio" ] || { echo "run.sh: no lab image in $lab: run resources/kvm-lab/build.sh" >&2; exit 2; }
[ -n "$log" ] || log="$lab/$scenario.log"
# What a scenario needs of L1 beyond the defaults: its "# lab-append:" line.
append="$(sed -n 's/^# lab-append: *//p' "$here/l1/scenarios/$scenario.sh" | head -n1)"

# The run is read back from a private copy; the log is kept for people.
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
set +e
timeout --kill-after=5 "$limit" qemu-system-x86_64 \
    -accel "tcg,thread=${LAB_TCG_THREAD:-multi}" -smp 2 -m 3G -cpu EPYC,+svm,+npt \
    -kernel "$lab/vmlinuz" -initrd "$lab/l1.cpio" \
    -append "console=ttyS0 panic=-1 quiet lab.scenario=$scenario lab.repeat=$repeat $append ${LAB_APPEND:-}" \
    -nographic -no-reboot -nodefaults -serial stdio -monitor none \
    -d cpu_reset,guest_errors -D "$lab/$scenario.qemu.log" </dev/null \
    2> >(grep -v "TCG doesn't support requested feature" >&2) |
    sed -u 's/\r//g' | tee "$out"
rc=${PIPESTATUS[0]}
set -e
cp "$out" "$log"
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "LAB-TIMEOUT $scenario: killed after ${limit} s; the log's tail:"
    tail -n 40 "$out"
    exit 124
fi
ends=$(grep -ac "^LAB-SCENARIO-END $scenario " "$out" || true)
if [ "$ends" -lt "$repeat" ] && ! grep -aq "^LAB-POWEROFF" "$out" && grep -aq "LAB-BOOTED" "$out"; then
    # QEMU ended by itself before L1 powered off: the nested host's own
    # kernel died (a reset on a triple fault; -no-reboot ends QEMU). No
    # process inside can do that, so this is the emulator's, not the
    # scenario's: exit 3, with what QEMU logged of L1's last CPU state.
    echo "LAB-L1-DIED $scenario: the nested host itself reset (QEMU exit $rc); QEMU's log:"
    { grep -a -B2 -A12 "CPU Reset\|Triple fault" "$lab/$scenario.qemu.log" || true; } | tail -n 30
    exit 3
fi
passes=$(grep -ac "^LAB-SCENARIO-END $scenario .* pass " "$out" || true)
echo "LAB-SUMMARY $scenario: $passes of $repeat tries passed ($ends ended)"
[ "$passes" -eq "$repeat" ] && exit 0
# Failed tries in which no guest died running L1's own code, or of a page
# fault under the emulator's nested paging (LAB-EMULATOR and
# LAB-EMULATOR-SUSPECT, l1/lib.sh's dump), are the scenario's.
own=$(awk -v s="$scenario" '
    $0 ~ "^LAB-SCENARIO-START " s " " { emu = 0 }
    /^LAB-EMULATOR(-SUSPECT)? / { emu = 1 }
    $0 ~ "^LAB-SCENARIO-END " s " .* fail " && !emu { n++ }
    END { print n + 0 }' "$out")
if [ "$ends" -eq "$repeat" ] && [ "$own" -eq 0 ]; then
    echo "LAB-EMULATOR-FAULT $scenario: every failed try met a fault of the emulator (known or suspected)"
    exit 3
fi
exit 1
