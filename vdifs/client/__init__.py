"""The client side: the object-pool interface and VDI volumes built on it."""
