import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdifs.errors import VdifsError
from vdifs.model import xattrs
from vdifs.model.xattrs import XATTR_CREATE, XATTR_REPLACE

names = st.sampled_from(["security.selinux", "trusted.libvirt.security.dac", "trusted.libvirt.security.ref_dac",
                         "security.capability", "user.x", "system.posix_acl_access", "trusted." + "n" * 300]
                        + [f"trusted.t{i}" for i in range(20)])
values = st.binary(max_size=5000)
calls = st.lists(st.tuples(st.sampled_from(["set", "remove"]), names, values,
                           st.sampled_from([0, XATTR_CREATE, XATTR_REPLACE, 3, 8])), max_size=60)


@given(calls)
def test_a_refused_call_changes_nothing_and_the_limits_hold(sequence):
    attrs: dict[str, bytes] = {}
    for op, name, value, flags in sequence:
        before = dict(attrs)
        try:
            if op == "set":
                xattrs.set_in(attrs, name, value, flags)
            else:
                xattrs.remove_from(attrs, name)
        except VdifsError as e:
            assert attrs == before
            assert e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.EEXIST, errno.ENODATA, errno.ENOSPC)
            continue
        assert xattrs.stored(name)
        if op == "set":
            assert attrs[name] == value and not (flags & XATTR_CREATE and name in before)
            assert not (flags & XATTR_REPLACE and name not in before)
        else:
            assert name in before and name not in attrs
        assert len(attrs) <= xattrs.PER_VDI
        assert sum(len(n.encode()) + len(v) for n, v in attrs.items()) <= xattrs.BYTES_PER_VDI
        assert all(len(v) <= xattrs.VALUE_MAX for v in attrs.values())


def test_what_libvirt_sets_is_kept_and_the_rest_refused():
    attrs: dict[str, bytes] = {}
    xattrs.set_in(attrs, "security.selinux", b"system_u:object_r:svirt_image_t:s0:c10,c20\0")
    xattrs.set_in(attrs, "trusted.libvirt.security.dac", b"+0:+0")
    xattrs.set_in(attrs, "trusted.libvirt.security.ref_dac", b"1")
    xattrs.set_in(attrs, "trusted.libvirt.security.ref_dac", b"2", XATTR_REPLACE)
    assert attrs["trusted.libvirt.security.ref_dac"] == b"2"
    for name, code in (("security.capability", errno.EOPNOTSUPP), ("system.posix_acl_access", errno.EOPNOTSUPP),
                       ("user.anything", errno.EOPNOTSUPP)):
        with pytest.raises(VdifsError) as e:
            xattrs.set_in(attrs, name, b"x")
        assert e.value.errno == code
    with pytest.raises(VdifsError) as e:
        xattrs.set_in(attrs, "security.selinux", b"y", XATTR_CREATE)
    assert e.value.errno == errno.EEXIST
    xattrs.remove_from(attrs, "security.selinux")
    with pytest.raises(VdifsError) as e:
        xattrs.remove_from(attrs, "security.selinux")
    assert e.value.errno == errno.ENODATA
