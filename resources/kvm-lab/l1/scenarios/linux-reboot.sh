# A guest's reboot (reboot=k: through the i8042) ends cgsvmm with exit 0.
linux lr "lab.action=reboot" --memory 256M
check "the guest reboots and cgsvmm exits" wait_exit lr 150
check "cgsvmm exits 0 (got $EXIT)" [ "$EXIT" = 0 ]
check "the guest said it reboots" has lr "guest: rebooting"
