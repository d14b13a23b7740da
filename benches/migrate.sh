#!/usr/bin/env bash
# Migrations between two cgsvmm processes on this machine over loopback TCP,
# measured by query-migrate, medians of several runs.
#
#   benches/migrate.sh                    the suite: a 256 MiB dirtier live at
#                                         downtime-limit 300 ms and 10 ms, and an
#                                         idle (stopped) 1 GiB guest
#   benches/migrate.sh MEMORY RUNS MODE [DOWNTIME_MS] [HELPERS]
#                                         one case; MODE live or stopped
#
# The dirtier writes and checks every page of its memory at full speed, a
# quarter of it declared shared; 2 vCPUs, 2 helpers a side. Needs the
# release binary (cargo build --release) and /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=./target/release/cgsvmm
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
dir="$(mktemp -d)"
trap 'pkill -P $$ 2>/dev/null || true; rm -rf "$dir"' EXIT
printf '%064x\n' 0x42 > "$dir/key"

field() { # field NAME JSON: the first number after "NAME":
    sed -n "s/.*\"$1\": *\([0-9.]*\).*/\1/p" <<<"$2" | head -n1
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

one_case() { # MEMORY RUNS MODE DOWNTIME_MS HELPERS
    local memory=$1 runs=$2 mode=$3 limit=$4 helpers=$5 mib settle
    case "$memory" in
        *[Gg]) mib=$(( ${memory%[Gg]} * 1024 )) ;;
        *[Mm]) mib=${memory%[Mm]} ;;
        *) mib=$memory ;;
    esac
    # Let the dirtier run, and the target back its RAM with host memory
    # while it waits (about 6 ms per MiB on the lab host).
    settle=$(( 2 + mib / 128 ))
    local common=(--memory "$memory" --cpus 2 --mirror-cpus "$helpers"
                  --transport-key-file "$dir/key" --serial null)
    : > "$dir/rows"
    for run in $(seq "$runs"); do
        rm -f "$dir"/*.sock
        local port=$((20000 + RANDOM % 20000))
        "$bin" run "${common[@]}" --qmp "unix:$dir/src.sock" &
        local src=$!
        "$bin" run "${common[@]}" --qmp "unix:$dir/dst.sock" --incoming "tcp:127.0.0.1:$port" &
        local dst=$!
        for s in src dst; do
            until [ -S "$dir/$s.sock" ]; do sleep 0.05; done
        done
        sleep "$settle"
        [ "$mode" = stopped ] && "$bin" qmp "unix:$dir/src.sock" stop >/dev/null
        "$bin" qmp "unix:$dir/src.sock" migrate-set-parameters "{\"downtime-limit\": $limit}" >/dev/null
        "$bin" qmp "unix:$dir/src.sock" migrate "{\"uri\": \"tcp:127.0.0.1:$port\"}" >/dev/null
        local info
        while :; do
            info="$("$bin" qmp "unix:$dir/src.sock" query-migrate)"
            grep -q '"status": "\(completed\|failed\|cancelled\)"' <<<"$info" && break
            sleep 0.05
        done
        grep -q '"status": "completed"' <<<"$info" || { echo "$info" >&2; exit 1; }
        local rounds
        rounds="$(field dirty-sync-count "$info")"
        echo "$(field total-time "$info") $(field downtime "$info") ${rounds:-1}" \
            "$(field mbps "$info") $(field private-pages "$info") $(field shared-pages "$info")" \
            >> "$dir/rows"
        "$bin" qmp "unix:$dir/src.sock" quit >/dev/null
        "$bin" qmp "unix:$dir/dst.sock" quit >/dev/null
        wait "$src" "$dst" || true
    done
    col() { awk -v c="$1" '{print $c}' "$dir/rows" | median; }
    printf '%-8s %-8s %6s ms | total %6s ms | downtime %5s ms | rounds %3s | %6.0f MB/s | %s private + %s shared pages (median of %s)\n' \
        "$memory" "$mode" "$limit" "$(col 1)" "$(col 2)" "$(col 3)" "$(awk "BEGIN {print $(col 4) / 8}")" \
        "$(col 5)" "$(col 6)" "$runs"
}

if [ $# -eq 0 ]; then
    echo "memory   mode     limit     (2 helpers a side, loopback TCP)"
    one_case 256M 5 live 300 2
    one_case 256M 5 live 10 2
    one_case 1G 3 stopped 300 2
else
    one_case "$1" "${2:-5}" "${3:-live}" "${4:-300}" "${5:-2}"
fi
