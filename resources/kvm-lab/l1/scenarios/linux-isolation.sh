# Root in the guest cannot read the migration helper's transport key: the
# mirror region (the helper's code, key page, counters and mailboxes) is
# mapped only into the mirror VM, so the guest's /dev/mem reads of it come
# back as unbacked (all ones), neither the key page's magic nor the key.
linux li "lab.action=peek" --memory 256M $HELPERS
check "the guest tried" wait_for 120 has li "guest: helper secret page reads"
grep -a "guest: helper" /tmp/li.log
# The key file holds 0x42 in its last byte: as a u64 (little endian), the
# last key word reads 0x4200000000000000; the page's magic is CGSVMHCF.
check "the guest did not read the key" sh -c "! grep -a 'guest: helper secret page reads' /tmp/li.log | grep -qi '0x4200000000000000'"
check "the guest did not read the key page's magic" sh -c "! grep -a 'guest: helper' /tmp/li.log | grep -qi '0x4643484D56534743'"
check "the guest did not find the helper's header" sh -c "! grep -a 'secret page is at' /tmp/li.log | grep -qiE '0x00000000F8[0-9A-F]{6}'"
check "the guest runs on" wait_for 60 checkers_beyond li 2
