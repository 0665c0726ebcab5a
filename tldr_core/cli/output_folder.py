"""An output folder (``--out``) that is never half-written, never silently replaced and never shared.

    with StagedOutput(args.out, overwrite=args.overwrite, names=OUTPUT_NAMES) as target:
        ...                                  # load data, run the attack (the checks below already passed)
        write files into target.stage
        target.commit()                      # the new folder replaces --out in one rename

Opening it (before any work) checks everything that could fail at the end: ``--out`` is not a file
or a link, its parent can be created and written to (a staging folder is created there, beside
``--out``, so the final rename stays on one file system), ``--out`` is empty or absent unless
``overwrite`` (and even then holds only files the tool writes, so ``--out ~`` never deletes a home
folder), and no other process is writing it: a non-blocking ``flock`` on ``.<name>.lock`` beside it
(:mod:`tldr_core.locks`), held until the end. ``commit`` swaps the staging folder in with one
``renameat2(RENAME_EXCHANGE)`` where the kernel has it, else two renames with the old folder put
back on failure; the previous output stays whole until the new one is complete. Leftover staging
folders of killed runs are removed the next time the lock is taken.

:class:`InPlaceOutput` is the same contract for a long run that saves its results as it goes (the
controls): same checks and lock, but written in ``--out`` itself, so an interrupted run keeps what it
finished; with ``overwrite`` the earlier output is moved aside when it opens, put back if the run ends
having written nothing, else deleted (after a kill, by the next run that takes the lock).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from tldr_core.locks import FileLock, LockBusy


class OutputError(RuntimeError):
    """An --out that cannot be used (the message says why and what to do)."""


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a))


class StagedOutput:
    """``--out`` written through a staging folder beside it and swapped in at the end, under a lock."""

    def __init__(self, out: str | Path, *, overwrite: bool = False, names: Iterable[str] = (),
                 tool: str = "audit") -> None:
        self.out = Path(os.path.abspath(os.fspath(out)))
        self.overwrite, self.names, self.tool = overwrite, frozenset(names), tool
        self.lock = FileLock(self.out.parent / f".{self.out.name}.lock")
        self.stage: Path | None = None

    def open(self) -> "StagedOutput":
        """Every check that could fail at the end, done now (OutputError); then hold the lock and the stage."""
        out = self.out
        if not out.name or out.name in (".", ".."):
            raise OutputError(f"--out {out} must name a folder inside another one")
        if out.is_symlink():
            raise OutputError(f"--out {out} is a symbolic link; pass the folder it points to")
        if out.exists() and not out.is_dir():
            raise OutputError(f"--out {out} exists and is not a folder")
        above = next(p for p in out.parents if p.exists())
        if not above.is_dir():
            raise OutputError(f"--out {out} cannot be created: {above} is a file, not a folder")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.lock.acquire(timeout=0)
        except LockBusy:
            raise OutputError(f"another {self.tool} is writing to {out} right now (lock {self.lock.path}); wait for it "
                              "to finish or choose another --out") from None
        except OSError as exc:
            raise OutputError(f"--out {out} cannot be written: {exc.strerror or exc} ({exc.filename or out.parent})") from None
        try:
            self._recover()
            self._check_contents()
            self._prepare()
        except OSError as exc:
            self.lock.release()
            raise OutputError(f"--out {out} cannot be written: {exc.strerror or exc} ({exc.filename or out.parent})") from None
        except OutputError:
            self.lock.release()
            raise
        return self

    def _prepare(self) -> None:
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.staging-", dir=self.out.parent))

    def _leftovers(self, kind: str) -> list[Path]:
        prefix = f".{self.out.name}.{kind}-"  # not glob: a folder name may hold [ or *
        found = [p for p in self.out.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
        return sorted(found, key=lambda p: p.stat().st_mtime)

    def _recover(self) -> None:
        """Under the lock, nothing else uses our leftovers: put back an old output a crash left aside
        (only possible between the two renames of the fallback swap), delete stale staging folders."""
        old = self._leftovers("old")
        if old and (not self.out.exists() or (self.out.is_dir() and not any(self.out.iterdir()))):
            os.rename(old.pop(), self.out)  # onto an empty folder too: nothing newer was written there
        for p in old + self._leftovers("staging"):
            shutil.rmtree(p, ignore_errors=True)

    def _check_contents(self) -> None:
        if not self.out.is_dir():
            return
        entries = sorted(p.name for p in self.out.iterdir())
        if not entries:
            return
        if not self.overwrite:
            raise OutputError(f"--out {self.out} already holds {len(entries)} file(s) ({', '.join(entries[:3])}"
                              f"{', ...' if len(entries) > 3 else ''}); pass --overwrite to replace them or choose "
                              "another folder")
        foreign = [n for n in entries if n not in self.names]
        if foreign:
            raise OutputError(f"--out {self.out} holds files this tool does not write ({', '.join(foreign[:3])}); "
                              "--overwrite only replaces an earlier output folder: choose another --out")

    def commit(self) -> Path:
        """Swap the staging folder in as --out (the previous one intact until then); returns --out."""
        if self.stage is None:
            raise OutputError("commit() before open()")
        stage, out = self.stage, self.out
        if not out.exists():
            os.rename(stage, out)
        elif _exchange(stage, out):
            shutil.rmtree(stage)  # now the previous output
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old)  # replaces the empty placeholder
            try:
                os.rename(stage, out)
            except OSError:
                os.rename(old, out)
                raise
            shutil.rmtree(old)
        self.stage = None
        return out

    def close(self) -> None:
        """Remove an uncommitted stage (a failed run leaves --out as it was) and release the lock."""
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None
        self.lock.release()

    def __enter__(self) -> "StagedOutput":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class InPlaceOutput(StagedOutput):
    """``--out`` under :class:`StagedOutput`'s checks and lock, written in place (``stage`` is ``out``)."""

    aside: Path | None = None  # the earlier output, moved aside by overwrite until this run writes
    created = False  # --out did not exist before this run

    def _prepare(self) -> None:
        self.created = not self.out.exists()
        if self.overwrite and self.out.is_dir() and any(self.out.iterdir()):
            self.aside = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.rename(self.out, self.aside)  # replaces the empty placeholder
        self.out.mkdir(exist_ok=True)
        self.stage = self.out

    def commit(self) -> Path:
        if self.stage is None:
            raise OutputError("commit() before open()")
        self.stage = None
        return self.out

    def close(self) -> None:
        """The earlier output goes back when this run wrote nothing, else it is deleted (a folder this run
        created and left empty is removed); the lock is released."""
        empty = self.stage is not None and self.out.is_dir() and not any(self.out.iterdir())
        if self.aside is not None:
            if empty:
                os.rename(self.aside, self.out)
            else:
                shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None
        elif empty and self.created:
            self.out.rmdir()
        self.stage = None
        self.lock.release()
