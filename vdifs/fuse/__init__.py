"""The FUSE face of vdifs: one flat directory of sparse files, one per VDI."""
