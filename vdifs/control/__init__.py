"""The local control channel: `vdifs vdi ...` talking to a running mount."""
