#!/usr/bin/env bash
# Stopped migration over loopback TCP, measured by query-migrate: a dirtier
# of the given size (2 vCPUs, 2 helpers each side) is paused, sent to a
# target on this machine, and the target resumes it; repeated, then the
# medians of total-time (ms, the guest is paused all along) and throughput.
#
#   benches/migrate-stopped.sh [MEMORY] [RUNS] [HELPERS]   (default 256M 5 2)
#
# Needs the release binary (cargo build --release) and /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
memory="${1:-256M}"
runs="${2:-5}"
helpers="${3:-2}"
case "$memory" in
    *[Gg]) mib=$(( ${memory%[Gg]} * 1024 )) ;;
    *[Mm]) mib=${memory%[Mm]} ;;
    *) mib=$memory ;;
esac
settle=$(( 2 + mib / 128 ))
bin=./target/release/cgsvmm
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
dir="$(mktemp -d)"
trap 'pkill -P $$ 2>/dev/null || true; rm -rf "$dir"' EXIT
printf '%064x\n' 0x42 > "$dir/key"

field() { # field NAME JSON: the first number after "NAME":
    sed -n "s/.*\"$1\": *\([0-9.]*\).*/\1/p" <<<"$2" | head -n1
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

common=(--memory "$memory" --cpus 2 --mirror-cpus "$helpers"
        --transport-key-file "$dir/key" --serial null)
: > "$dir/times"
: > "$dir/mbps"
for run in $(seq "$runs"); do
    port=$((20000 + RANDOM % 20000))
    "$bin" run "${common[@]}" --qmp "unix:$dir/src.sock" &
    src=$!
    "$bin" run "${common[@]}" --qmp "unix:$dir/dst.sock" \
        --incoming "tcp:127.0.0.1:$port" --paused &
    dst=$!
    for s in src dst; do
        until [ -S "$dir/$s.sock" ]; do sleep 0.05; done
    done
    # Let the dirtier run, and the target back its RAM with host memory
    # while it waits (about 6 ms per MiB on the lab host).
    sleep "$settle"
    "$bin" qmp "unix:$dir/src.sock" migrate "{\"uri\": \"tcp:127.0.0.1:$port\"}" >/dev/null
    while :; do
        info="$("$bin" qmp "unix:$dir/src.sock" query-migrate)"
        grep -q '"status": "\(completed\|failed\|cancelled\)"' <<<"$info" && break
        sleep 0.05
    done
    grep -q '"status": "completed"' <<<"$info" || { echo "$info" >&2; exit 1; }
    t="$(field total-time "$info")"
    m="$(field mbps "$info")"
    echo "run $run: $memory in $t ms, $(printf '%.0f' "$m") Mbit/s," \
        "$(field private-pages "$info") private and $(field shared-pages "$info") shared pages"
    echo "$t" >> "$dir/times"
    echo "$m" >> "$dir/mbps"
    "$bin" qmp "unix:$dir/src.sock" quit >/dev/null
    "$bin" qmp "unix:$dir/dst.sock" quit >/dev/null
    wait "$src" "$dst" || true
done
t="$(median < "$dir/times")"
m="$(median < "$dir/mbps")"
echo "median of $runs: $memory stopped migration over TCP in $t ms, $(printf '%.0f' "$m") Mbit/s" \
    "($(awk -v m="$m" 'BEGIN {printf "%.2f", m / 8 / 1000}') GB/s on the wire), $helpers helpers a side"
