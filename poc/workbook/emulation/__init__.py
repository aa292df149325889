"""Links and faults on loopback: a fault proxy, WAN latency in user space and bandwidth in a network namespace of the run's own."""
