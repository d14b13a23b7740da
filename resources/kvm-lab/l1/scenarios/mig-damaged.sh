# A byte flipped in the stream (8 MB in, inside the first round's pages):
# the target refuses it without running the guest, the source resumes.
# (Precopy of the dirtier with L1's nested paging off: QEMU's TCG
# corrupts L2 state under NPT there; see the lab README.)
# lab-append: lab.kvm_amd=npt=0
DIRTIER_MEMORY=${DIRTIER_MEMORY:-128M}
dirtier src
check "the source passes" wait_for 60 dirtier_beyond src 2
dirtier dst --incoming tcp:127.0.0.1:4445
lab-proxy 4444 4445 --flip-at 8000000 >/tmp/proxy.out 2>&1 &
check "the proxy listens" wait_for 20 file_has /tmp/proxy.out listening
if migrate src tcp:127.0.0.1:4444; then fail "a damaged stream was accepted"; else echo "LAB-CHECK ok the migration fails"; fi
check "the proxy flipped its byte" wait_for 20 file_has /tmp/proxy.out "flipped byte"
check "the source runs again" wait_for 20 is_status src running
check "the target exits" wait_exit dst 30
check "the target's exit is a failure (got $EXIT)" [ "$EXIT" != 0 ]
check "the target names the damage" grep -qiE "checksum|crc|damaged|corrupt" /tmp/dst.err
p0="$(pass_of src 0)"
check "the source's passes go on" wait_for 30 dirtier_beyond src "$((p0 + 2))"
check "no memory error" no_memory_error src
