"""`sweep resume --repair` on a store it cannot write (issue 22, item 9): one line, exit 1,
and not a byte moved (it used to end in an OSError traceback, part-way through moving).

In-process through click's CliRunner. Root ignores permission bits, so a read-only store
is simulated two ways: the folders' permissions (non-root only) and ``os.access`` saying
what a read-only mount says (every user).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from sweep.cli import cli
from sweep.store.results import ResultStore


def damaged_store(tmp_path: Path) -> Path:
    store = ResultStore(str(tmp_path / "s"))
    store.write_pack("p1", "g", {"trials": [{"trial_id": "t1", "network_id": "n1", "pack_id": "p1",
                                             "status": "ok"}]})
    [trials] = [p for p in (tmp_path / "s").rglob("*.parquet") if "trials" in p.parts]
    data = bytearray(trials.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: verify finds it, repair would move it
    trials.write_bytes(bytes(data))
    assert store.verify()
    return tmp_path / "s"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused_unmoved(root: Path, before: dict[str, bytes]) -> None:
    res = CliRunner().invoke(cli, ["resume", str(root), "--repair", "-q"])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("Error: repair refused, nothing was moved: "), res.output
    assert res.output.count("\n") == 1 and "Traceback" not in res.output, res.output
    assert str(root) in res.output
    assert snapshot(root) == before
    assert not (root / "_damaged").exists()


def test_repair_on_a_store_mounted_read_only_is_refused_before_anything_moves(tmp_path, monkeypatch) -> None:
    root = damaged_store(tmp_path)
    before = snapshot(root)
    real = os.access

    def read_only_mount(path, mode, *args, **kwargs):  # what access(2) answers on a ro mount: EROFS
        if str(path).startswith(str(root)) and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", read_only_mount)
    assert_refused_unmoved(root, before)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the permission bits say")
def test_repair_on_a_store_without_write_permission_is_refused(tmp_path) -> None:
    root = damaged_store(tmp_path)
    before = snapshot(root)
    folders = [root] + [p for p in root.rglob("*") if p.is_dir()]
    for d in folders:
        d.chmod(d.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        assert_refused_unmoved(root, before)
    finally:
        for d in folders:
            d.chmod(d.stat().st_mode | stat.S_IWUSR)


def test_one_unwritable_table_folder_is_enough_to_refuse(tmp_path, monkeypatch) -> None:
    root = damaged_store(tmp_path)
    before = snapshot(root)
    partition = next(p for p in (root / "trials").iterdir() if p.is_dir())
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: (str(path) != str(partition)
                                                                   and real(path, mode, *a, **k)))
    assert_refused_unmoved(root, before)


def test_repair_on_a_writable_store_still_moves_the_damaged_pack(tmp_path) -> None:
    root = damaged_store(tmp_path)
    res = CliRunner().invoke(cli, ["resume", str(root), "--repair", "-q"])
    # No saved grid in this store: resume ends there, after the repair.
    assert "repair: 1 damaged file(s)" in res.output, res.output
    assert (root / "_damaged").exists()
