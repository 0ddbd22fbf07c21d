"""Result files are replaced whole or not at all."""

import pytest

from dualnet.files import atomic_path, write_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "trials.csv"
    write_atomic(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".csv" and tmp.parent == tmp_path
            tmp.write_text("half a ro")
            raise RuntimeError("the writer died")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trials.csv"]
    write_atomic(target, b"new\n")
    assert target.read_bytes() == b"new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["trials.csv"]
