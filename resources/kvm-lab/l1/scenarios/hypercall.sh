# KVM_HC_MAP_GPA_RANGE from a ring-0 guest: the dirtier entered at CPL0
# declares its shared blocks with the hypercall; the exits feed the shared
# map, and a stopped migration carries exactly those pages as plaintext
# (the same 16384 of 65536 pages the lab port declares on the PVM host).
DIRTIER_MEMORY=256M
dirtier src --guest dirtier-ring0
check "the ring-0 dirtier passes" wait_for 60 dirtier_beyond src 2
check "it shares its blocks by hypercall" has src "shares blocks through KVM_HC_MAP_GPA_RANGE"
check "no hypercall failed" sh -c "! grep -q 'KVM_HC_MAP_GPA_RANGE failed' /tmp/src.log"
dirtier dst --incoming tcp:127.0.0.1:4444
q src stop >/dev/null
check "the stopped migration completes" migrate src tcp:127.0.0.1:4444
shared="$(jget shared-pages </tmp/migrate.json)"
private="$(jget private-pages </tmp/migrate.json)"
check "the hypercall's pages travel as plaintext (shared $shared)" [ "$shared" = 16384 ]
check "every other page through the helpers (private $private)" [ "$private" = 49152 ]
check "the target waits paused" wait_for 30 is_status dst paused
q dst cont >/dev/null
goes_on src dst
