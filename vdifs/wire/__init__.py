"""Framing and request/reply codecs shared by the control channel and peers."""
