"""The mount's VDI engine: object pools (embedded and remote), the catalog of
VDIs, snapshots, reports, background purging, and the volumes that carry
one VDI's I/O. Below FUSE and the control server, above the wire and the
store; it knows nothing of either face."""
