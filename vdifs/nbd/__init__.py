"""NBD beside the FUSE mount: the same VDIs as block devices over a unix
socket, for what FUSE cannot carry (TRIM, holes, reconnecting clients)."""
