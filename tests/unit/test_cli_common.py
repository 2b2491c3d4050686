"""The command line's shared pieces: finding the mount, the progress line, tables."""

import io
import os

import pytest

from vdifs.cli.common import CliError, Progress, bar, control_socket, progress_text, table
from vdifs.control.caller import NotMounted, socket_for_mount, socket_for_store
from vdifs.control.mounts import MountEntry, parse_mounts, unescape_mount_field, vdifs_mounts
from vdifs.fuse.mount import default_store
from vdifs.fuse.session import fusermount_options

MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
/dev/sda1 / ext4 rw,relatime 0 0
vdifs /srv/vdis fuse.vdifs rw,nosuid,nodev,relatime,user_id=0,group_id=0 0 0
vdifs /mnt/my\\040vdis\\011tab\\134back fuse.vdifs rw,relatime 0 0
sshfs#host: /mnt/remote fuse.sshfs rw 0 0
garbage
"""


def test_parse_mounts_unescapes_octal_fields():
    entries = parse_mounts(MOUNTS)
    assert entries[0] == MountEntry("sysfs", "/sys", "sysfs")
    assert len(entries) == 5  # the line with one field is skipped
    assert entries[3].mountpoint == "/mnt/my vdis\ttab\\back"
    assert unescape_mount_field("a\\012b\\040") == "a\nb "
    assert unescape_mount_field("plain\\") == "plain\\"


def test_vdifs_mounts_only_fuse_vdifs():
    assert [e.mountpoint for e in vdifs_mounts(parse_mounts(MOUNTS))] == ["/srv/vdis", "/mnt/my vdis\ttab\\back"]
    assert vdifs_mounts(parse_mounts("")) == []


def test_control_socket_discovery(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    with pytest.raises(CliError) as e:  # several: say which, and how to pick
        control_socket(None, None, str(mounts))
    assert "/srv/vdis" in str(e.value) and "/mnt/my vdis" in str(e.value) and "-m" in str(e.value)
    assert "\n" not in str(e.value).replace("\t", "")
    one = tmp_path / "one"
    one.mkdir()
    mounts.write_text(f"vdifs {one} fuse.vdifs rw 0 0\n")
    with pytest.raises(NotMounted, match=str(one)):  # the one mount is the one asked (here: not really vdifs)
        control_socket(None, None, str(mounts))
    store = tmp_path / "my store, with\\odd chars"
    escaped = str(store).replace("\\", "\\134").replace(" ", "\\040")  # as the kernel writes it
    mounts.write_text(f"vdifs:{escaped} {one} fuse.vdifs rw 0 0\n")
    assert control_socket(None, None, str(mounts)) == socket_for_store(str(store))  # the store in the source
    assert socket_for_mount(str(one), str(mounts)) == socket_for_store(str(store))
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\n")
    assert control_socket(None, None, str(mounts)) == socket_for_store(default_store())
    assert control_socket(None, None, str(tmp_path / "missing")) == socket_for_store(default_store())
    # an explicit choice never looks at the mounts
    assert control_socket(None, "rel/store", str(mounts)) == socket_for_store(os.path.abspath("rel/store"))
    with pytest.raises(CliError, match="not both"):
        control_socket("/mnt", "/store")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar():
    assert bar(25, 100) == "[######..................]  25%"
    assert bar(0, 0) == "[########################] 100%"  # nothing to do is done
    assert bar(5, 4) == bar(4, 4)
    assert progress_text(3, 12) == "[######..................]  25% 3/12"


def test_progress_draws_on_a_terminal_only():
    quiet = io.StringIO()
    p = Progress("export", 10, stream=quiet)
    p.add(10)
    p.close()
    assert quiet.getvalue() == ""

    now = [0.0]
    term = Terminal()
    p = Progress("export", 100, stream=term, interval=1.0, clock=lambda: now[0],
                 amount=lambda d, t: f"{d} of {t}")
    p.add(10)  # first: drawn
    p.add(10)  # too soon: not drawn
    now[0] = 2.0
    p.add(10)
    p.update(100)  # the end is always drawn
    p.close()
    lines = term.getvalue().split("\r")[1:]
    assert lines == ["export: [##......................]  10% 10 of 100",
                     "export: [#######.................]  30% 30 of 100",
                     "export: [########################] 100% 100 of 100\n"]


def test_progress_without_total_counts():
    term = Terminal()
    p = Progress("checked", None, stream=term, interval=0, amount=lambda d, _t: f"{d} objects")
    p.update(64)
    p.close()
    assert term.getvalue() == "\rchecked 64 objects\n"


def test_table():
    assert table([["a", "1"], ["bbb", ""]], ["NAME", "N"]) == "NAME  N\na     1\nbbb"


def test_fusermount_options_escape_what_fusermount3_splits_on():
    assert fusermount_options("vdifs:/var/lib/vdifs", ["allow_other"]) == \
        "fsname=vdifs:/var/lib/vdifs,subtype=vdifs,allow_other"
    assert fusermount_options("vdifs:/a,b\\c", []) == "fsname=vdifs:/a\\,b\\\\c,subtype=vdifs"
    assert MountEntry("vdifs:/s", "/m", "fuse.vdifs").store == "/s"
    assert MountEntry("vdifs", "/m", "fuse.vdifs").store is None
    assert MountEntry("vdifs:/s", "/m", "fuse.sshfs").store is None
