"""Builds vdifs's one native module; everything else is declared in setup.cfg.

`vdifs/store/_verified.pyx` (verified page-cache reads, see
vdifs/store/verified.py) needs Cython, a C compiler and ISA-L's headers
(Debian: libisal-dev). It is optional: where it cannot be built, pip
installs vdifs without it and the same reads run in Python."""

from setuptools import Extension, setup


def native_extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    ext = Extension("vdifs.store._verified", ["vdifs/store/_verified.pyx"], libraries=["isal"], optional=True)
    return cythonize([ext], quiet=True)


setup(ext_modules=native_extensions())
