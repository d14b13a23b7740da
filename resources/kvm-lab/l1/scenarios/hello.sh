# The hello lab guest at CPL3 on 2 vCPUs: its first port I/O is its line.
vm hello --guest hello --cpus 2 --memory 64M
check "hello exits by itself" wait_exit hello 30
check "hello exits 0 (got $EXIT)" [ "$EXIT" = 0 ]
check "hello printed its line" has hello "hello: cgsvmm lab guest on 2 vcpu"
