"""Metadata: registers and the directory service built on them."""
