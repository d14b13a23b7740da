# A running dirtier migrates live with auto-converge off: the switchover
# comes when the dirty set stops shrinking.
# (Precopy of the dirtier with L1's nested paging off: QEMU's TCG
# corrupts L2 state under NPT there; see the lab README.)
# lab-append: lab.kvm_amd=npt=0
DIRTIER_MEMORY=${DIRTIER_MEMORY:-128M}
dirtier src
check "the source passes" wait_for 60 dirtier_beyond src 2
dirtier dst --incoming tcp:127.0.0.1:4444
q src migrate-set-parameters '{"x-auto-converge": false}' >/dev/null
check "auto-converge is off" sh -c "cgsvmm qmp unix:/tmp/src.sock query-migrate-parameters | grep -q '\"x-auto-converge\": false'"
check "the live migration completes" migrate src tcp:127.0.0.1:4444
check "the target runs" wait_for 30 is_status dst running
goes_on src dst
