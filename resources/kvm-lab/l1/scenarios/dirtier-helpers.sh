# The dirtier on 2 vCPUs with the migration helper on 2 mirror vCPUs; the
# main vCPUs pause while the helpers keep running, and resume.
vm d --cpus 2 --memory 256M $HELPERS
check "the dirtier passes on both vCPUs" wait_for 60 dirtier_beyond d 3
mirror() { q d x-query-mirror; }
check "the helpers run and none faulted" sh -c "cgsvmm qmp unix:/tmp/d.sock x-query-mirror | grep -q '\"payload\": \"helper\"' && ! cgsvmm qmp unix:/tmp/d.sock x-query-mirror | grep -q '\"fault\": \"'"
q d stop >/dev/null
check "stop pauses the guest" [ "$(status d)" = paused ]
sleep 1
p0="$(pass_of d 0)"
w0="$(mirror | jget counter)"
sleep 2
check "no pass while paused ($p0 -> $(pass_of d 0))" [ "$(pass_of d 0)" -le "$((p0 + 1))" ]
w1="$(mirror | jget counter)"
check "the mirror runs while the guest is paused (counter $w0 -> $w1)" [ "$w1" -gt "$w0" ]
q d cont >/dev/null
check "cont resumes the guest" [ "$(status d)" = running ]
check "passes go on after cont" wait_for 30 dirtier_beyond d "$((p0 + 2))"
check "no memory error" no_memory_error d
q d quit >/dev/null
check "quit exits 0" wait_exit d 10
check "exit status 0 (got $EXIT)" [ "$EXIT" = 0 ]
