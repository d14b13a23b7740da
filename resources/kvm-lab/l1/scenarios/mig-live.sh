# A running dirtier migrates live (auto-converge on, QEMU's default here).
# (Precopy of the dirtier with L1's nested paging off: QEMU's TCG
# corrupts L2 state under NPT there; see the lab README.)
# lab-append: lab.kvm_amd=npt=0
dirtier src
check "the source passes" wait_for 60 dirtier_beyond src 2
dirtier dst --incoming tcp:127.0.0.1:4444
check "the live migration completes" migrate src tcp:127.0.0.1:4444 --downtime-limit "$LIVE_LIMIT_MS"
check "the source is postmigrate" is_status src postmigrate
check "the target runs" wait_for 30 is_status dst running
goes_on src dst
