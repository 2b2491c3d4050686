# cython: language_level=3, boundscheck=False, wraparound=False
"""`verified.read_verified` in C: see vdifs/store/verified.py for the contract.

One uninitialised bytes object for the covering blocks, one preadv2 with
RWF_NOWAIT into it, ISA-L's CRC-32 (zlib's values) over each block against
the table (an array('I'), read in place), then the requested bytes: the
buffer itself when the range is block-aligned, else one copy of just those
bytes."""

from cpython.array cimport array
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memset

cdef extern from "isa-l/crc.h" nogil:
    unsigned int crc32_gzip_refl(unsigned int init_crc, const unsigned char *buf, unsigned long long len)

cdef extern from "sys/uio.h" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, long long offset, int flags)

cdef enum:
    BLOCK = 16384  # checksums.BLOCK (a test checks they agree)
    RWF_NOWAIT = 8  # linux/fs.h

cdef unsigned char _zeros[BLOCK]
memset(_zeros, 0, BLOCK)
cdef unsigned int ZERO_CRC = crc32_gzip_refl(0, _zeros, BLOCK)

BLOCK_SIZE = BLOCK


def read_verified(int fd, long long offset, Py_ssize_t length, array table):
    if offset < 0 or length <= 0:
        return None
    cdef long long start = offset, end = offset + length
    if table is not None:
        start -= offset % BLOCK
        if end % BLOCK:
            end += BLOCK - end % BLOCK
    cdef Py_ssize_t n = end - start
    cdef bytes data = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(data)
    cdef iovec iov
    iov.iov_base = p
    iov.iov_len = n
    if preadv2(fd, &iov, 1, start, RWF_NOWAIT) != n:
        return None  # not all cached (EAGAIN), short, or an error: the awaiting path finds out
    cdef Py_ssize_t first, k, size
    cdef unsigned int want
    if table is not None:
        first = start // BLOCK
        size = len(table)  # an array('I'): checksums.Table
        for k in range(n // BLOCK):
            want = table.data.as_uints[first + k] if first + k < size else ZERO_CRC
            if crc32_gzip_refl(0, p + k * BLOCK, BLOCK) != want:
                return None
    if start == offset and n == length:
        return data
    return PyBytes_FromStringAndSize(<char *>p + (offset - start), length)
