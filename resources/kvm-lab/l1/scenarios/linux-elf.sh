# The same kernel as an ELF vmlinux without its PVH note: the 64-bit entry.
RUST_LOG=info vm le --kernel "$GUEST/vmlinux-nopvh" --initrd "$GUEST/initrd.cpio.gz" \
    --cmdline "$LINUX_CMDLINE" --cpus 2 --memory 256M
check "the ELF took the 64-bit boot protocol" grep -q "64-bit boot protocol entry.*(ELF)" /tmp/le.err
check "userspace comes up" wait_for 120 has le "guest: userspace up"
check "both checkers pass" wait_for 60 checkers_beyond le 2
