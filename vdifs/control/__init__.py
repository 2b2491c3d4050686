"""The local control channel: `vdifs vdi ...` (caller) talking to a running
mount (server) over a unix socket."""
