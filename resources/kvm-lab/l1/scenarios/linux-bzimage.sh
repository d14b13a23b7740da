# Debian's bzImage with our initramfs on 2 vCPUs: userspace, both checkers.
linux lb "" --memory 256M
check "userspace comes up" wait_for 120 has lb "guest: userspace up"
check "the guest sees 2 CPUs" has lb "on 2 cpu"
check "the guest sees no SVM/VMX (no nested state to migrate)" wait_for 30 has lb "virtualization extensions: none"
check "both checkers pass" wait_for 60 checkers_beyond lb 2
note "boot_to_userspace_s=$(sed -n 's/.*userspace up after \([0-9.]*\) s.*/\1/p' /tmp/lb.log)"
check "no kernel trouble" kernel_quiet lb
kernel_lines lb
