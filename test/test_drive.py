"""Drive identity: the cache key of a drive profile."""
from nchunk_core.io.drive import drive_info


def test_drive_info_of_tmp(tmp_path):
    info = drive_info(tmp_path)
    assert info.fs_type and info.fs_type != "unknown"
    assert ":" in info.device
    key = info.key(6)
    assert key == drive_info(tmp_path / ".").key(6)  # stable for the same drive
    assert key != info.key(4)  # thread count is part of the key
    assert "/" not in key and " " not in key


def test_different_file_systems_differ(tmp_path):
    # /dev/shm is a tmpfs, a different file system from the test's temporary directory
    assert drive_info("/dev/shm").key(6) != drive_info(tmp_path).key(6)
