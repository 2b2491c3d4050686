"""The storage peer: an object store on local disk (served over TCP in a cluster,
embedded in the mount process otherwise)."""
