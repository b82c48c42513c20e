"""Pack leases: of two runners on one store, one trains a pack; a dead runner's lease expires."""

from __future__ import annotations

import errno
import json
import logging
import os
import time

import pytest

from sweep.core.errors import UserError
from sweep.core.grid import expand
from sweep.core.plan import Pack
from sweep.store import leases
from sweep.store.results import ResultStore
from workers.run_pack import run_pack

DOC = {"name": "l", "dataset": "mnist", "model": "lenet5", "recipe": {"preset": "buda_mnist", "iters": 3},
       "max_per_class": 50, "imbalance": {"step": {"rho": [10], "mu": [0.5]}}, "methods": ["baseline"],
       "thresholding": [], "repeats": 1, "seed": 4}


def test_one_lease_per_pack_until_released_or_stale(tmp_path) -> None:
    first = leases.acquire(str(tmp_path), "p")
    assert first is not None
    assert leases.acquire(str(tmp_path), "p") is None  # held and fresh
    assert leases.acquire(str(tmp_path), "q") is not None  # other packs are free
    old = time.time() - leases.DEFAULT_TTL_SECONDS - 1
    os.utime(first.path, (old, old))  # its runner died: no refresh for longer than the TTL
    taken = leases.acquire(str(tmp_path), "p")
    assert taken is not None
    first.release()  # the dead runner's release must not drop the new owner's lease...
    assert os.path.exists(taken.path)
    assert leases.acquire(str(tmp_path), "p") is None
    taken.release()  # ...its own does
    assert leases.acquire(str(tmp_path), "p") is not None


def test_a_pack_leased_by_another_runner_is_skipped_and_nothing_is_written(tmp_path, small_mnist) -> None:
    store = ResultStore(str(tmp_path / "s"))
    pack = Pack(expand(DOC).specs)
    other = leases.acquire(store.lease_dir(), pack.pack_id)
    result = run_pack(pack, store, dataset=small_mnist)
    assert result.skipped and result.networks == 0 and store.table_names() == []
    assert os.path.exists(other.path)  # the holder's lease is untouched
    other.release()
    stored = run_pack(pack, store, dataset=small_mnist)
    assert not stored.skipped and len(store.read_table("trials")) == 1
    assert not os.listdir(store.lease_dir())  # released once stored
    # A runner that planned before the pack was stored finds it stored and does not train it again.
    again = run_pack(pack, store, dataset=small_mnist)
    assert again.skipped and len(store.files("trials")) == 1


# -- heartbeat, unreadable leases, full disk (issue 22, items 5 and 6) -----------------------

def _age(path: str) -> float:
    return time.time() - os.stat(path).st_mtime


def _make_old(path: str) -> None:
    old = time.time() - leases.DEFAULT_TTL_SECONDS - 1
    os.utime(path, (old, old))


def _wait_until(condition, limit_s: float = 20.0) -> bool:
    """Poll ``condition`` until it holds; the limit only ends a test that would hang."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def test_the_heartbeat_refreshes_a_lease_while_its_holder_does_nothing(tmp_path) -> None:
    lease = leases.acquire(str(tmp_path), "p")
    _make_old(lease.path)
    lease.start_heartbeat(interval_s=0.01)
    assert lease.beating
    assert _wait_until(lambda: _age(lease.path) < leases.DEFAULT_TTL_SECONDS)  # refreshed by the timer alone
    assert leases.acquire(str(tmp_path), "p") is None  # so a second runner keeps off
    lease.release()
    assert not lease.beating and not os.path.exists(lease.path)


@pytest.mark.parametrize("phase", ["evaluate", "latent_tables"])
def test_a_pack_keeps_its_lease_fresh_during_a_phase_that_reports_no_progress(
        tmp_path, small_mnist, monkeypatch, phase) -> None:
    import workers.pack_stage as rp  # evaluate and latent_tables run in a stage

    store = ResultStore(str(tmp_path / "s"))
    pack = Pack(expand({**DOC, "latent": phase == "latent_tables"}).specs)
    monkeypatch.setattr(leases, "REFRESH_SECONDS", 0.01)
    path = os.path.join(store.lease_dir(), f"{pack.pack_id}.json")
    seen: list[bool] = []
    real = getattr(rp, phase)

    def slow_phase(*args, **kwargs):
        # An evaluation or latent pass long enough for the lease to age past its TTL...
        _make_old(path)
        # ...during which nothing reports progress: only a heartbeat can bring it back.
        seen.append(_wait_until(lambda: _age(path) < leases.DEFAULT_TTL_SECONDS))
        return real(*args, **kwargs)

    monkeypatch.setattr(rp, phase, slow_phase)
    result = run_pack(pack, store, dataset=small_mnist)
    assert seen and all(seen)
    assert not result.skipped and len(store.read_table("trials")) == 1
    assert not os.listdir(store.lease_dir())


@pytest.mark.parametrize("content", [b"", b"garbage", b"{\"owner\": 5}", b"[1, 2]", b"\xff\xfe\x00"],
                         ids=["empty", "garbage", "owner-not-a-name", "not-a-mapping", "binary"])
def test_an_unreadable_lease_is_stale_and_taken_over_with_a_warning(tmp_path, content, caplog) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(content)  # fresh mtime: only its content says nobody holds it
    with caplog.at_level(logging.WARNING, logger=leases.__name__):
        lease = leases.acquire(str(tmp_path), "p")
    assert lease is not None
    assert "cannot be read" in caplog.text and str(path) in caplog.text
    assert json.loads(path.read_text())["owner"] == lease.owner
    lease.release()


def test_an_empty_lease_left_by_a_full_disk_does_not_block_the_pack(tmp_path, small_mnist) -> None:
    store = ResultStore(str(tmp_path / "s"))
    pack = Pack(expand(DOC).specs)
    os.makedirs(store.lease_dir())
    open(os.path.join(store.lease_dir(), f"{pack.pack_id}.json"), "wb").close()
    result = run_pack(pack, store, dataset=small_mnist)
    assert not result.skipped and len(store.read_table("trials")) == 1


def _full_disk(monkeypatch) -> None:
    """Every write to a file (not stdout/stderr) fails as on a full disk."""
    real = os.write

    def write(fd: int, data) -> int:
        if fd > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(leases.os, "write", write)


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_a_lease_on_a_full_disk_fails_clearly_and_leaves_no_file(tmp_path, monkeypatch, links) -> None:
    if not links:
        def no_link(*_args, **_kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(leases.os, "link", no_link)
    _full_disk(monkeypatch)
    with pytest.raises(leases.LeaseError) as info:
        leases.acquire(str(tmp_path), "p")
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert str(tmp_path / "p.json") in message and "bytes" in message and "No space left" in message
    assert os.listdir(tmp_path) == []  # neither the lease nor its temporary
    monkeypatch.undo()
    assert leases.acquire(str(tmp_path), "p") is not None  # the next try, with space, gets it


def test_without_hard_links_a_lease_is_still_exclusive(tmp_path, monkeypatch) -> None:
    def no_link(*_args, **_kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(leases.os, "link", no_link)
    first = leases.acquire(str(tmp_path), "p")
    assert first is not None and leases.acquire(str(tmp_path), "p") is None
    assert sorted(os.listdir(tmp_path)) == ["p.json"]
    first.release()


def test_run_pack_on_a_full_disk_raises_the_lease_error_and_stores_nothing(tmp_path, small_mnist,
                                                                           monkeypatch) -> None:
    store = ResultStore(str(tmp_path / "s"))
    pack = Pack(expand(DOC).specs)
    _full_disk(monkeypatch)
    with pytest.raises(leases.LeaseError, match=f"{pack.pack_id}.json"):
        run_pack(pack, store, dataset=small_mnist)
    monkeypatch.undo()
    assert os.listdir(store.lease_dir()) == [] and store.table_names() == []


def test_the_heartbeat_stops_when_another_runner_has_taken_the_lease_over(tmp_path, caplog) -> None:
    lease = leases.acquire(str(tmp_path), "p")
    with caplog.at_level(logging.WARNING, logger=leases.__name__):
        _make_old(lease.path)  # this runner stalled past the TTL...
        other = leases.acquire(str(tmp_path), "p")  # ...and another took the pack over
        assert other is not None
        lease.start_heartbeat(interval_s=0.01)
        assert _wait_until(lambda: not lease.beating)
    assert "taken over by" in caplog.text
    lease.release()  # leaves the new holder's lease alone
    assert json.loads(open(other.path).read())["owner"] == other.owner
    other.release()


def test_a_taker_never_removes_a_lease_another_taker_put_there_meanwhile(tmp_path) -> None:
    stale = tmp_path / "p.json"
    stale.write_bytes(b"")  # judged stale by two runners at once
    judged = os.stat(stale).st_ino
    first = leases.acquire(str(tmp_path), "p")  # the first taker replaced it (maybe on the same inode)...
    assert first is not None
    leases._remove_if_same(str(stale), judged, b"")  # ...so the second's removal must leave it
    assert json.loads(stale.read_text())["owner"] == first.owner
    assert sorted(os.listdir(tmp_path)) == ["p.json"]
    leases._remove_if_same(str(stale), os.stat(stale).st_ino, stale.read_bytes())  # the file judged goes
    assert os.listdir(tmp_path) == []


@pytest.mark.subprocess
def test_a_fresh_lease_of_a_process_of_this_host_that_is_gone_is_taken_over(tmp_path) -> None:
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that has just exited
    (tmp_path / "p.json").write_text(json.dumps({"owner": f"{socket.gethostname()}:{gone}:abcd", "pack_id": "p"}))
    taken = leases.acquire(str(tmp_path), "p")
    assert taken is not None and json.loads((tmp_path / "p.json").read_text())["owner"] == taken.owner
    taken.release()
