"""Metadata by consensus: CASPaxos registers and the meta-peer client, the
directory service built on a register, VDI leases, and the cluster's
credentials."""
