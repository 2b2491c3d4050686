"""vdifs: a distributed store for virtual disk images, served as sparse files over FUSE."""

__version__ = "0.1.0"
