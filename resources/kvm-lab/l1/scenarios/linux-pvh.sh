# The ELF vmlinux with Debian's PVH note: entered through PVH.
RUST_LOG=info vm lp --kernel "$GUEST/vmlinux" --initrd "$GUEST/initrd.cpio.gz" \
    --cmdline "$LINUX_CMDLINE" --cpus 2 --memory 256M
check "the kernel was entered through PVH" grep -q "PVH entry at" /tmp/lp.err
check "userspace comes up" wait_for 120 has lp "guest: userspace up"
check "both checkers pass" wait_for 60 checkers_beyond lp 2
