"""sasq.atomic.atomic_write: old-or-new file after a crash, no temp left, normal permissions."""
import os
import stat

import pytest

from sasq.atomic import atomic_write


def test_crash_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "out.json"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(p, "w") as f:
            f.write("half of the new")
            raise RuntimeError("simulated crash")
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["out.json"]


def test_writes_new_file_with_umask_mode_and_creates_parent(tmp_path):
    p = tmp_path / "sub" / "x.bin"
    with atomic_write(p) as f:
        f.write(b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
