"""One command line (issue 13 item 2): the `tldr` dispatcher and its console entry point, the shared
flags (same name, default and help in every command), every default shown in --help, registry's
--tracking-uri after the subcommand, re-audit's Ray flags; and credentials never printed (issue 14 #3)."""
from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from local_servers import free_port
from tldr_core.cli import main as tldr
from tldr_core.platform import cli_flags
from cli_process import run_python  # tests/: commands forked from a server that imported torch once

REPO = Path(__file__).resolve().parents[2]
SECRET = "hunter2-s3cr3t"


def parsers() -> dict[str, argparse.ArgumentParser]:
    from tldr_core.cli.audit import build_parser as audit
    from tldr_core.cli.controls import build_parser as controls
    from tldr_core.platform.registry.audits.reaudit_cli import build_parser as reaudit
    from tldr_core.platform.registry.cli import build_parser as registry
    from tldr_core.platform.search.cli import build_parser as search

    return {"audit": audit(), "search": search(), "reaudit": reaudit(), "registry": registry(), "controls": controls()}


def options_without_default(p: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """The options of `p` (and its subcommands) whose --help line shows no default."""
    skip = (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._VersionAction)
    fmt, out = p._get_formatter(), []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += options_without_default(sub, f"{prefix}{name} ")
        elif action.option_strings and not action.required and not isinstance(action, skip):
            text = fmt._get_help_string(action) if action.help else ""
            if "default" not in (text % {"default": action.default} if "%(default)" in text else text).lower():
                out.append(prefix + action.option_strings[-1])
    return out


def run_tldr(*args: str, env: dict | None = None, cwd: Path = REPO):
    return run_python(["-m", "tldr_core.cli.main", *args], cwd=cwd, env=env, timeout=300)


# ------------------------------------------------------------------------------------ help and flags

@pytest.mark.parametrize("command", ["audit", "search", "reaudit", "registry", "controls"])
def test_every_option_shows_its_default(command):
    assert options_without_default(parsers()[command]) == []


def test_the_check_sees_a_missing_default():
    p = cli_flags.parser("x", None)
    p.add_argument("--n", type=int, default=3, help="a number")           # the formatter adds it
    p.add_argument("--m", default=None, help="the m thing")   # None, nothing said: caught
    p.add_argument("--k", default=None, help="k (default: derived)")
    assert options_without_default(p) == ["--m"] and "(default: 3)" in p.format_help()


def test_shared_flags_read_the_same_everywhere():
    ps = parsers()

    def help_of(name: str, flag: str) -> str:
        return next(a.help for a in ps[name]._actions if flag in a.option_strings)

    for flag, commands in (("--tracking-uri", ("search", "reaudit", "registry")),
                           ("--data-root", ("audit", "search", "reaudit", "controls")),
                           ("--address", ("search", "reaudit")), ("--storage", ("search", "reaudit")),
                           ("--gpus-per-trial", ("search", "reaudit"))):
        assert len({help_of(c, flag) for c in commands}) == 1, flag
    for c in ("audit", "search"):  # file or registry URI in both; only the default differs
        assert cli_flags.CLASSIFIER_HELP in help_of(c, "--classifier")
    assert cli_flags.TRACKING_DEFAULT in help_of("audit", "--tracking-uri")
    defaults = {c: {a.dest: a.default for a in ps[c]._actions} for c in ("search", "reaudit")}
    for dest in ("address", "storage", "cpus_per_trial", "gpus_per_trial", "max_concurrent", "tracking_uri"):
        assert defaults["search"][dest] == defaults["reaudit"][dest], dest


# ------------------------------------------------------------------------------------ the dispatcher

def test_pyproject_names_the_dispatcher():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["tldr"].split(":")
    assert (module, func) == ("tldr_core.cli.main", "main") and getattr(tldr, func) is tldr.main


def test_dispatcher_lists_and_refuses(capsys):
    assert tldr.main([]) == 2 and "commands:" in capsys.readouterr().out
    assert tldr.main(["--help"]) == 0
    for name in ("audit", "search", "reaudit", "registry", "controls", "controls-rescore"):
        assert name in tldr.usage() and callable(tldr.command(name))
    assert tldr.main(["bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown command 'bogus'; choose one of: audit, search, reaudit, registry, controls, "
                   "controls-rescore, defence"]


def test_dispatched_help_is_named_as_typed():
    out = run_tldr("search", "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: tldr search")
    assert "(default: 1.0)" in out.stdout  # --cpus-per-trial


@pytest.mark.slow
def test_registry_takes_tracking_uri_after_the_subcommand(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    for args in (("registry", "show", "--tracking-uri", uri, "--dataset", "toy"),
                 ("registry", "--tracking-uri", uri, "show", "--dataset", "toy")):
        out = run_tldr(*args)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["tldr-classifier-toy: no versions", "tldr-generator-toy: no versions"]
    assert (tmp_path / "m.db").exists()


def test_reaudit_passes_its_ray_flags_to_each_search(tmp_path, monkeypatch):
    from tldr_core.platform.registry.audits import reaudit as ra

    monkeypatch.setenv("TLDR_RUNS", str(tmp_path / "runs"))
    space = ra.write_space(None, None, tmp_path / "space.yaml")
    opts = ra.Options(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", smoke_test=True, address="10.0.0.1:6379",
                      storage="s3://bucket/tune", cpus_per_trial=2.0, gpus_per_trial=0.5)
    st = ra.search_settings(ra.Candidate("tldr-classifier-mnist-bundled", "1", "mnist-bundled", "x"), opts, space)
    assert (st.storage, st.cpus_per_trial, st.gpus_per_trial, st.max_concurrent) == ("s3://bucket/tune", 2.0, 0.5, 8)


@pytest.mark.parametrize("command", [["search"], ["reaudit"], ["registry", "show", "--dataset", "x"], ["audit"]])
def test_a_password_in_the_tracking_uri_is_never_printed(command, tmp_path):
    uri = f"http://bob:{SECRET}@127.0.0.1:{free_port()}"
    args = [*command, "--tracking-uri", uri]
    if command == ["audit"]:
        args += ["--out", str(tmp_path / "out")]
    out = run_tldr(*args, env={**__import__("os").environ, "TLDR_RUNS": str(tmp_path / "runs")})
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unreachable" in lines[0], out.stderr
    assert "bob:***@127.0.0.1" in lines[0] and SECRET not in out.stdout + out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()  # refused before any work


def test_reaudit_checks_the_ray_address_before_any_audit(tmp_path):
    out = run_python([REPO / "tune" / "reaudit.py", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                      "--address", f"127.0.0.1:{free_port()}"], timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("error: Ray cluster at 127.0.0.1:"), out.stderr
    assert not (tmp_path / "m.db").exists()


@pytest.mark.slow
def test_search_checks_a_registry_classifier_before_creating_the_store(tmp_path):
    import os

    db = tmp_path / "none" / "mlflow.db"
    out = run_tldr("search", "--smoke-test", "--classifier", "models:/tldr-classifier-mnist-bundled/1",
                   "--tracking-uri", f"sqlite:///{db}", env={**os.environ, "TLDR_RUNS": str(tmp_path / "runs")})
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "does not exist, so it holds no registered model" in out.stderr and not db.exists()
