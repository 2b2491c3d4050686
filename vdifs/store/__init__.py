"""The object store: objects as sparse files with block checksums on one local
file system. Served over the network by a peer, or embedded in the mount
process (the single-node pool); it knows nothing of either."""
