from vdifs.fsutil import machine_dirty_bytes


def test_machine_dirty_bytes_adds_dirty_and_writeback(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683520 kB\nDirty:              1536 kB\n"
                       "Writeback:           512 kB\nWritebackTmp:         99 kB\n")
    assert machine_dirty_bytes(str(meminfo)) == 2048 << 10
