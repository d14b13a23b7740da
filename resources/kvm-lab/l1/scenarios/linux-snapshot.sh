# A Linux guest's snapshot restored in a new process: the checkers go on.
linux src "" --memory 256M $HELPERS
check "userspace comes up" wait_for 120 has src "guest: userspace up"
check "both checkers pass" wait_for 60 checkers_beyond src 2
check "the snapshot is written" migrate src file:/tmp/linux.snap
q src quit >/dev/null
wait_exit src 10
c1="$(checker_pass src 1)"
linux dst "" --memory 256M $HELPERS --incoming file:/tmp/linux.snap
check "the restored guest runs" wait_for 60 is_status dst running
check "the checkers go on (from $c1)" wait_for 90 sh -c ". /lab/lib.sh; [ \$(checker_pass dst 1) -gt $((c1 + 2)) ]"
check "the restored guest did not boot anew" sh -c "! grep -q 'userspace up' /tmp/dst.log"
sleep 3
check "no kernel trouble" kernel_quiet dst
kernel_lines dst
