"""Helpers shared by the test suite, the lab and the benchmarks: a real etcd server on a free
loopback port, and network-namespace plumbing. Not used by the agent itself."""
