"""An account's area of a batch store: gpuq writes there only new files, reads only plain
files of the area's owner and removes through descriptors, so that no link, pipe or
foreign file an account puts in its area makes gpuq read or touch anything else."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from app.core.paths import (
    NotOwned,
    account_area,
    give_file,
    open_owned,
    passage,
    remove_owned,
    unreachable_by_others,
)
from app.core.settings import Settings
from app.store.retention import Gone, delete_files


@pytest.fixture
def area(tmp_path: Path) -> Path:
    return account_area(tmp_path / "users", "alice", os.getuid(), os.getgid())


def test_the_area_is_made_private_inside_a_passage(tmp_path: Path, area: Path):
    assert stat.S_IMODE(os.stat(tmp_path / "users").st_mode) == 0o711
    assert stat.S_IMODE(os.stat(area).st_mode) == 0o700
    area.chmod(0o755)  # opened by its account: closed again
    assert account_area(tmp_path / "users", "alice", os.getuid(), os.getgid()) == area
    assert stat.S_IMODE(os.stat(area).st_mode) == 0o700


def test_a_plain_file_of_the_owner_is_read(area: Path):
    (area / "results.3").mkdir()
    (area / "results.3" / "0.pkl").write_bytes(b"envelope")
    with open_owned(area, "results.3", "0.pkl") as f:
        assert f.read() == b"envelope"
    with pytest.raises(FileNotFoundError):
        open_owned(area, "results.4", "0.pkl")


def test_links_and_pipes_are_refused_not_followed(tmp_path: Path, area: Path):
    secret = tmp_path / "secret"
    secret.write_text("the stack's token")
    (area / "out").symlink_to(secret)
    (area / "results.3").symlink_to(tmp_path)
    os.mkfifo(area / "pipe")
    for names in (("out",), ("results.3", "secret"), ("pipe",)):
        with pytest.raises(NotOwned):
            open_owned(area, *names)


def test_a_file_of_another_account_is_refused(area: Path):
    if os.geteuid() != 0:
        pytest.skip("giving a file to another account needs root")
    nobody = pwd.getpwnam("nobody")
    give_file(area, "theirs", b"x", nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(NotOwned):
        open_owned(area, "theirs")


def test_a_file_given_replaces_a_link_in_its_place_and_is_the_accounts(tmp_path: Path,
                                                                     area: Path):
    target = tmp_path / "target"
    target.write_text("untouched")
    (area / "secrets.t.0").symlink_to(target)
    path = give_file(area, "secrets.t.0", b"A=1", os.getuid(), os.getgid())
    assert target.read_text() == "untouched"
    assert not path.is_symlink() and path.read_bytes() == b"A=1"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_removing_goes_through_no_link_below_the_area(tmp_path: Path, area: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "0.pkl").write_text("someone else's")
    (area / "results.3").symlink_to(elsewhere)
    remove_owned(area, "results.3", "0.pkl")
    assert (elsewhere / "0.pkl").exists()
    (area / "link").symlink_to(elsewhere / "0.pkl")
    remove_owned(area, "link")
    assert not (area / "link").exists() and (elsewhere / "0.pkl").exists()
    remove_owned(tmp_path / "no-such-area", "x")  # nothing there: nothing to do


def test_a_closed_directory_on_the_way_is_named():
    base = Path(tempfile.mkdtemp(prefix="gpuq-area-"))  # /tmp: others pass through
    try:
        base.chmod(0o755)
        closed = base / "closed"
        (closed / "store").mkdir(parents=True)
        closed.chmod(0o700)
        assert unreachable_by_others(closed / "store") == closed
        closed.chmod(0o711)
        assert unreachable_by_others(closed / "store") is None
    finally:
        shutil.rmtree(base)


def test_pruning_removes_a_jobs_files_in_its_owners_area_through_no_link(tmp_path: Path):
    settings = Settings(home=tmp_path / "home", slurm_shared_dir=tmp_path / "shared",
                        _env_file=None)
    area = account_area(tmp_path / "shared" / "batch" / "users", "alice", os.getuid(),
                        os.getgid())
    (area / "41.out").write_text("her output")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "0.pkl").write_text("not hers to have removed")
    (area / "results.j7").symlink_to(elsewhere)
    gone = Gone(job_id=7, launch_id=None, backend="slurm", rank=0, backend_id="41",
                owner="alice")
    assert delete_files(settings, [gone], [], []) == 1
    assert not (area / "41.out").exists()
    assert (elsewhere / "0.pkl").read_text() == "not hers to have removed"


def test_a_passage_and_the_folders_made_on_its_way_open_whatever_the_umask(tmp_path: Path):
    old = os.umask(0o077)
    try:
        passage(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)
    for made in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"):
        assert stat.S_IMODE(os.stat(made).st_mode) == 0o711, made
