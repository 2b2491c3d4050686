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
    # a second clean stop keeps what the first wrote and adds the new changes
    again.record(6, 12)
    await again.close_cleanly()
    third = ChangeJournal(str(tmp_path))
    assert third.open(current_epoch=6) is True
    assert third.changed_after(3) == [10, 11, 12]


async def test_after_a_crash_the_journal_only_vouches_for_later_epochs(tmp_path):
    j = ChangeJournal(str(tmp_path))
    j.open(current_epoch=1)
    j.record(1, 7)
    await j.close_cleanly()
    j = ChangeJournal(str(tmp_path))
    assert j.open(current_epoch=2) is True
    j.record(2, 8)
    # crash: no close_cleanly, so the change at epoch 2 was never written
    again = ChangeJournal(str(tmp_path))
    assert again.open(current_epoch=2) is False
    assert again.changed_after(1) is None and again.changed_after(0) is None
    assert again.changed_after(2) == []  # from epoch 3 on it is complete again
    assert not any(n.isdigit() for n in os.listdir(again.dir))  # what the crash left is dropped
    again.record(3, 9)
    assert again.changed_after(2) == [9]
    await again.close_cleanly()
    third = ChangeJournal(str(tmp_path))
    assert third.open(current_epoch=3) is True
    assert third.changed_after(2) == [9] and third.changed_after(1) is None


async def test_a_crash_before_the_first_clean_stop_is_noticed(tmp_path):
    j = ChangeJournal(str(tmp_path))
    j.open(current_epoch=4)
    j.record(4, 1)
    again = ChangeJournal(str(tmp_path))  # crash, restart at the same epoch
    assert again.open(current_epoch=4) is False
    assert again.changed_after(3) is None and again.changed_after(4) == []


async def test_old_epochs_are_pruned_and_the_journal_says_so(tmp_path):
    j = ChangeJournal(str(tmp_path))
    j.open(current_epoch=1)
    for e in range(1, KEEP_EPOCHS + 11):
        j.record(e, e)
    assert j.changed_after(5) is None  # pruned: a peer away since epoch 5 resyncs fully
    assert j.changed_after(KEEP_EPOCHS + 5) == list(range(KEEP_EPOCHS + 6, KEEP_EPOCHS + 11))
    await j.close_cleanly()
    assert len([n for n in os.listdir(j.dir) if n.isdigit()]) == KEEP_EPOCHS
    again = ChangeJournal(str(tmp_path))
    assert again.open(current_epoch=KEEP_EPOCHS + 10) is True
    assert again.changed_after(9) is None and again.changed_after(10) == list(range(11, KEEP_EPOCHS + 11))
