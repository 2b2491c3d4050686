"""What crosses a socket: frames, the authenticated RPC of peers and mounts,
paged object lists, and checked access to request arguments. Shared by the
peer, the mount and the control channel."""
