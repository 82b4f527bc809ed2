"""train/atomic.py: files and directories are replaced whole or not at all."""

import pytest

from train.atomic import save_directory, write_text


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    write_text(target, "new ü")
    assert target.read_text(encoding="utf-8") == "new ü"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_failed_directory_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "adapter"
    save_directory(target, lambda tmp: (tmp.mkdir(), (tmp / "weights").write_text("v1")))
    assert (target / "weights").read_text() == "v1"

    def half_written(tmp):
        tmp.mkdir()
        (tmp / "weights").write_text("v2, half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_directory(target, half_written)
    assert (target / "weights").read_text() == "v1"  # the old version, whole
    save_directory(target, lambda tmp: (tmp.mkdir(), (tmp / "weights").write_text("v3")))
    assert (target / "weights").read_text() == "v3" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
