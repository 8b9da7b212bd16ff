"""The simulator: the library's window machinery run in one process on a virtual clock, with
simulated WAN links, device churn, outages and partitions, and non-IID data partitions."""
