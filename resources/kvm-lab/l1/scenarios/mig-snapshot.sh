# A running dirtier's snapshot restored in a new process.
dirtier src
check "the source passes" wait_for 60 dirtier_beyond src 2
check "the snapshot is written" migrate src file:/tmp/dirtier.snap
check "the snapshot file exists" [ -s /tmp/dirtier.snap ]
note "snapshot_bytes=$(stat -c %s /tmp/dirtier.snap)"
q src quit >/dev/null
wait_exit src 10
dirtier dst --incoming file:/tmp/dirtier.snap
check "the restored guest runs" wait_for 60 is_status dst running
goes_on src dst
