"""The `vdifs` command line: one module per command group."""
