"""Issue 14 finding 5: --out is checked before any work, written through a staging folder that replaces
it in one rename, never replaced without --overwrite, and locked against a second writer."""
from __future__ import annotations

import os

import pytest

from tldr_core.cli import output_folder as of
from tldr_core.cli.output_folder import OutputError, StagedOutput

NAMES = {"metrics.json", "grid.png"}


def previous(tmp_path, text="old"):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.json").write_text(text)
    (out / "grid.png").write_text(text)
    return out


def contents(folder):
    return {p.name: p.read_text() for p in folder.iterdir()}


def leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".o.") and p.name != ".o.lock")


def test_a_fresh_folder_appears_only_at_commit(tmp_path):
    out = tmp_path / "deep" / "o"
    with StagedOutput(out, names=NAMES) as target:
        assert target.stage.parent == out.parent and target.stage.name.startswith(".o.staging-")
        (target.stage / "metrics.json").write_text("new")
        assert not out.exists()
        assert target.commit() == out
    assert contents(out) == {"metrics.json": "new"} and leftovers(out.parent) == []


def test_a_non_empty_out_is_refused_without_overwrite_and_left_intact(tmp_path):
    out = previous(tmp_path)
    with pytest.raises(OutputError, match=r"already holds 2 file\(s\) \(grid.png, metrics.json\); pass --overwrite"):
        StagedOutput(out, names=NAMES).open()
    assert contents(out) == {"metrics.json": "old", "grid.png": "old"} and leftovers(tmp_path) == []
    StagedOutput(tmp_path / "empty", names=NAMES).open().close()  # an empty or absent folder is fine


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_swaps_the_new_folder_in_whole(tmp_path, monkeypatch, exchange):
    if not exchange:  # the two-rename fallback of file systems without RENAME_EXCHANGE
        monkeypatch.setattr(of, "_exchange", lambda a, b: False)
    out = previous(tmp_path)
    with StagedOutput(out, overwrite=True, names=NAMES) as target:
        (target.stage / "metrics.json").write_text("new")
        assert contents(out) == {"metrics.json": "old", "grid.png": "old"}  # untouched until the swap
        target.commit()
    assert contents(out) == {"metrics.json": "new"} and leftovers(tmp_path) == []


def test_a_failure_before_commit_keeps_the_previous_output(tmp_path):
    out = previous(tmp_path)
    with pytest.raises(ZeroDivisionError):
        with StagedOutput(out, overwrite=True, names=NAMES) as target:
            (target.stage / "metrics.json").write_text("half")
            1 / 0
    assert contents(out) == {"metrics.json": "old", "grid.png": "old"} and leftovers(tmp_path) == []


def test_a_failed_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(of, "_exchange", lambda a, b: False)
    out = previous(tmp_path)
    real, calls = os.rename, []

    def flaky(a, b):
        calls.append(b)
        if len(calls) == 2:  # the new folder's rename into place
            raise OSError(28, "No space left on device")
        return real(a, b)

    with StagedOutput(out, overwrite=True, names=NAMES) as target:
        monkeypatch.setattr(of.os, "rename", flaky)
        with pytest.raises(OSError):
            target.commit()
        monkeypatch.setattr(of.os, "rename", real)
    assert contents(out) == {"metrics.json": "old", "grid.png": "old"} and leftovers(tmp_path) == []


def test_overwrite_never_replaces_a_folder_with_foreign_files(tmp_path):
    out = previous(tmp_path)
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match=r"holds files this tool does not write \(thesis.tex\)"):
        StagedOutput(out, overwrite=True, names=NAMES).open()
    assert (out / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.write_text("x") and p, "exists and is not a folder"),
    (lambda p: (p.parent / "file").write_text("x") and p.parent / "file" / "o", "file is a file, not a folder"),
    (lambda p: os.symlink(p.parent, p) or p, "is a symbolic link"),
])
def test_unusable_outs_fail_at_open(tmp_path, make, needle):
    out = make(tmp_path / "o")
    with pytest.raises(OutputError, match=needle):
        StagedOutput(out, names=NAMES).open()


def test_an_out_under_proc_fails_at_open():
    with pytest.raises(OutputError, match="/proc/tldr-out cannot be written"):
        StagedOutput("/proc/tldr-out", names=NAMES).open()


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "o"
    with StagedOutput(out, names=NAMES):
        with pytest.raises(OutputError, match="another audit is writing to .*/o right now"):
            StagedOutput(out, names=NAMES).open()
    with StagedOutput(out, names=NAMES) as again:  # released at the end of the first
        assert again.lock.held


def test_leftovers_of_a_killed_run_are_cleaned_or_restored(tmp_path):
    (tmp_path / ".o.staging-abc").mkdir()  # a run killed while writing
    old = tmp_path / ".o.old-xyz"  # killed between the fallback's two renames: the previous output
    old.mkdir()
    (old / "metrics.json").write_text("old")
    with StagedOutput(tmp_path / "o", overwrite=True, names=NAMES) as target:
        assert contents(tmp_path / "o") == {"metrics.json": "old"}
        assert leftovers(tmp_path) == [target.stage.name]


# ------------------------------------------------------------------------------ in place (issue 24 #5)

def test_in_place_writes_into_out_as_it_goes_and_refuses_a_used_folder(tmp_path):
    out = tmp_path / "o"
    with of.InPlaceOutput(out, names=NAMES, tool="controls run") as target:
        assert target.stage == out and out.is_dir()
        (out / "metrics.json").write_text("cell 1")  # visible at once: an interruption keeps it
        with pytest.raises(OutputError, match="another controls run is writing to"):
            of.InPlaceOutput(out, names=NAMES, tool="controls run").open()
        target.commit()
    with pytest.raises(OutputError, match="already holds 1 file"):
        of.InPlaceOutput(out, names=NAMES).open()
    assert contents(out) == {"metrics.json": "cell 1"} and leftovers(tmp_path) == []


def test_in_place_failure_keeps_what_was_written(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        with of.InPlaceOutput(out, names=NAMES):
            (out / "metrics.json").write_text("cell 1")
            raise KeyboardInterrupt
    assert contents(out) == {"metrics.json": "cell 1"}
    with pytest.raises(RuntimeError):
        with of.InPlaceOutput(tmp_path / "fresh", names=NAMES):
            raise RuntimeError("no data")
    assert not (tmp_path / "fresh").exists()  # a folder this run created and left empty is removed


@pytest.mark.parametrize("writes", [True, False])
def test_in_place_overwrite_puts_the_earlier_output_back_only_when_nothing_was_written(tmp_path, writes):
    out = previous(tmp_path)
    with pytest.raises(RuntimeError):
        with of.InPlaceOutput(out, overwrite=True, names=NAMES) as target:
            assert contents(out) == {} and leftovers(tmp_path) == [target.aside.name]  # aside, not deleted
            if writes:
                (out / "grid.png").write_text("new")
            raise RuntimeError("failed")
    assert contents(out) == ({"grid.png": "new"} if writes else {"metrics.json": "old", "grid.png": "old"})
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("writes", [True, False])
def test_in_place_overwrite_killed_is_settled_by_the_next_run(tmp_path, writes):
    out = previous(tmp_path)
    killed = of.InPlaceOutput(out, overwrite=True, names=NAMES).open()
    if writes:
        (out / "grid.png").write_text("new")
    killed.lock.release()  # kill -9: the kernel drops the lock and nothing else runs
    with pytest.raises(OutputError, match=f"already holds {1 if writes else 2} file"):
        of.InPlaceOutput(out, names=NAMES).open()  # refused, after settling the killed run's leftovers
    assert contents(out) == ({"grid.png": "new"} if writes else {"metrics.json": "old", "grid.png": "old"})
    assert leftovers(tmp_path) == []
