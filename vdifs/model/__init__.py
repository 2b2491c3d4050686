"""Pure logic: identifiers, extents, object maps, names, sizes and the directory.

Nothing in this package does I/O, so all of it is unit-testable in isolation.
"""
