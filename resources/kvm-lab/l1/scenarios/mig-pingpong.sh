# Three live hops: a -> b -> c -> d, each a new process.
dirtier a
check "the first guest passes" wait_for 60 dirtier_beyond a 2
from=a
port=4444
for to in b c d; do
    dirtier "$to" --incoming "tcp:127.0.0.1:$port"
    check "hop $from -> $to completes" migrate "$from" "tcp:127.0.0.1:$port"
    check "$to runs" wait_for 30 is_status "$to" running
    goes_on "$from" "$to"
    q "$from" quit >/dev/null
    from="$to"
    port=$((port + 1))
done
