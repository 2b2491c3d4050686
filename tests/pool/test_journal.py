import os

from vdifs.peer.journal import KEEP_EPOCHS, ChangeJournal


async def test_changes_after_an_epoch_survive_a_clean_stop(tmp_path):
    j = ChangeJournal(str(tmp_path))
    assert j.open(current_epoch=3) is True  # a new store
    j.record(3, 10)
    j.record(4, 11)
    j.record(4, 11)  # once per epoch
    j.record(5, 10)
    assert j.changed_after(3) == [10, 11]
    assert j.changed_after(4) == [10]
    assert j.changed_after(5) == []
    assert j.changed_after(1) is None  # before the journal began: cannot tell
    await j.close_cleanly()
    again = ChangeJournal(str(tmp_path))
    assert again.open(current_epoch=5) is True
    assert again.changed_after(3) == [10, 11]
    assert os.path.getsize(os.path.join(j.dir, f"{4:012d}")) == 8


async def test_after_a_crash_the_journal_only_vouches_for_later_epochs(tmp_path):
    j = ChangeJournal(str(tmp_path))
    j.open(current_epoch=1)
    j.record(1, 7)
    await j.flush(sync=False)
    j.record(2, 8)  # never flushed: lost in the crash
    # crash: no close_cleanly
    again = ChangeJournal(str(tmp_path))
    assert again.open(current_epoch=2) is False
    assert again.changed_after(1) is None and again.changed_after(0) is None
    assert again.changed_after(2) == []  # from epoch 3 on it is complete again
    again.record(3, 9)
    assert again.changed_after(2) == [9]
    # a torn append (half an id) is ignored, not misread
    with open(os.path.join(j.dir, f"{1:012d}"), "ab") as f:
        f.write(b"\x01\x02\x03")
    await again.close_cleanly()
    third = ChangeJournal(str(tmp_path))
    assert third.open(current_epoch=3) is True
    assert third.changed_after(2) == [9]


async def test_old_epochs_are_pruned_and_the_journal_says_so(tmp_path):
    j = ChangeJournal(str(tmp_path))
    j.open(current_epoch=1)
    for e in range(1, KEEP_EPOCHS + 11):
        j.record(e, e)
    await j.flush(sync=False)
    assert j.changed_after(5) is None  # pruned: a peer away since epoch 5 resyncs fully
    assert j.changed_after(KEEP_EPOCHS + 5) == list(range(KEEP_EPOCHS + 6, KEEP_EPOCHS + 11))
