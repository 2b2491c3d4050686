"""The storage peer: serves one object store to the cluster over TCP.

`daemon` wires the parts and runs their tasks: `state` (identity, map,
gate), `membership`, `dataplane`, `recovery`, `health`, `journal`. See
docs/developer-notes/peer.md."""
