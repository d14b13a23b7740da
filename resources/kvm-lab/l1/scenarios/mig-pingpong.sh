# Three live hops: a -> b -> c -> d, each a new process.
# (Precopy of the dirtier with L1's nested paging off: QEMU's TCG
# corrupts L2 state under NPT there; see the lab README.)
# lab-append: lab.kvm_amd=npt=0
DIRTIER_MEMORY=${DIRTIER_MEMORY:-64M}
dirtier a
check "the first guest passes" wait_for 60 dirtier_beyond a 2
from=a
port=4444
for to in b c d; do
    dirtier "$to" --incoming "tcp:127.0.0.1:$port"
    check "hop $from -> $to completes" migrate "$from" "tcp:127.0.0.1:$port" --downtime-limit "$LIVE_LIMIT_MS"
    check "$to runs" wait_for 30 is_status "$to" running
    goes_on "$from" "$to"
    q "$from" quit >/dev/null
    from="$to"
    port=$((port + 1))
done
