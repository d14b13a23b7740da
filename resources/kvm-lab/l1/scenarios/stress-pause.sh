# An experiment, not a test: the dirtier with its helpers, its main vCPUs
# paused and resumed 300 times (QMP stop/cont), no migration, no dirty log.
dirtier d
check "the dirtier passes" wait_for 60 dirtier_beyond d 2
i=0
while [ $i -lt 300 ] && kill -0 "$(cat /tmp/d.pid)" 2>/dev/null; do
    q d stop >/dev/null
    q d cont >/dev/null
    i=$((i + 1))
done
note "stop_cont_cycles=$i"
check "the guest survived $i stop/cont cycles" is_status d running
check "no memory error" no_memory_error d
