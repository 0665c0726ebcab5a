"""How `make test` shares the suite between its two pytest-xdist workers (`-n 2 --dist loadgroup`): tests
that share an expensive fixture run on one worker, so it is set up once, and the heavy work goes out
first, so neither worker is left alone with a long test at the end.

- A test with an `xdist_group` mark, or using a fixture of ONE_PER_SESSION (a real search), joins that
  group.
- Otherwise a test using a module-scoped fixture of the suite joins its module's group (a module-scoped
  server, search or trained model is set up once).
- Every other test is a unit of its own.
- Groups and units holding a test marked slow are sent first, each in collection order.

xdist 3.8's own loadgroup names groups by rewriting node ids, which pytest 9 no longer lets it do, so
the workers write each test's group to a file (GROUPS_ENV, set by the main process) and the main
process's scheduler (`make_scheduler`, from the pytest_xdist_make_scheduler hook) reads it. Used by
tests/conftest.py; a plain `pytest` run keeps the collection order and sees none of this."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

#: Session-scoped fixtures too costly to set up on both workers.
ONE_PER_SESSION = ("smoke",)
GROUPS_ENV = "TLDR_XDIST_GROUPS"


def _group(item: pytest.Item) -> str | None:
    marks = sorted(str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                   for m in item.iter_markers("xdist_group"))
    shared = sorted(n for n in item.fixturenames if n in ONE_PER_SESSION)
    if marks or shared:
        return "+".join(marks + shared)
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for name in item.fixturenames:
        fixturedefs = defs.get(name) or ()
        # baseid "" is pytest's own (tmp_path_factory, ...); ours are scoped to a tests/ folder or module
        if fixturedefs and fixturedefs[-1].scope in ("module", "package") and fixturedefs[-1].baseid:
            return item.nodeid.split("::")[0]
    return None


def group_and_order(items: list[pytest.Item]) -> None:
    """On a worker: put the units holding slow tests first (stable) and write every test's unit to the
    file of GROUPS_ENV for the main process's scheduler."""
    units = {item.nodeid: _group(item) or item.nodeid for item in items}
    heavy = {units[item.nodeid] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: units[item.nodeid] not in heavy)
    path = Path(os.environ[GROUPS_ENV])
    part = path.with_name(f"{path.name}.{os.getpid()}")
    part.write_text(json.dumps(units))
    os.replace(part, path)  # both workers write the same map: whole files only


def start(config: pytest.Config) -> Path | None:
    """On the main process of an xdist run: the file the workers write their groups to."""
    if not config.getoption("numprocesses", None) or config.getoption("dist", "no") != "loadgroup":
        return None
    folder = Path(tempfile.mkdtemp(prefix="tldr-xdist-"))
    os.environ[GROUPS_ENV] = str(folder / "groups.json")
    return folder


def make_scheduler(config: pytest.Config, log):
    """LoadScopeScheduling (whole units to one worker, in the order they were collected) with the units
    the workers wrote."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        units: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.units is None:  # read once: the workers wrote it before reporting their collection
                self.units = json.loads(Path(os.environ[GROUPS_ENV]).read_text())
            return self.units.get(nodeid, nodeid)

    config.option.loadscopereorder = False  # our order: heavy units first
    return GroupScheduling(config, log)
