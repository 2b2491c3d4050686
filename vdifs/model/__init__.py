"""Pure logic: object ids, extents, object maps, names, sizes, the directory
(the super object), the cluster map and placement, zero detection and the
diff-stream codec.

Nothing in this package does I/O, so all of it is unit-testable in isolation;
every other layer may import it, and it imports nothing of vdifs but errors.
"""
