# A stopped dirtier migrates over TCP; the target resumes it on cont.
dirtier src
check "the source passes" wait_for 60 dirtier_beyond src 2
dirtier dst --incoming tcp:127.0.0.1:4444
q src stop >/dev/null
check "the stopped migration completes" migrate src tcp:127.0.0.1:4444
check "the source is postmigrate" is_status src postmigrate
check "the target waits paused (the source was stopped)" wait_for 30 is_status dst paused
q dst cont >/dev/null
check "the target runs after cont" is_status dst running
goes_on src dst
