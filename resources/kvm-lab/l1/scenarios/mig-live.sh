# A running dirtier migrates live (auto-converge on, QEMU's default here).
dirtier src
check "the source passes" wait_for 60 dirtier_beyond src 2
dirtier dst --incoming tcp:127.0.0.1:4444
check "the live migration completes" migrate src tcp:127.0.0.1:4444
check "the source is postmigrate" is_status src postmigrate
check "the target runs" wait_for 30 is_status dst running
goes_on src dst
