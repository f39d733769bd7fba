"""The command line: `ksm demo`, `ksm info`, `ksm bench` (run as subprocesses)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ksm


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ksm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.skipif(not ksm.available(), reason="merging unavailable here")
def test_demo_small_merges_and_verifies() -> None:
    r = run("demo", "--copies", "2", "--mib", "4", "--seed", "7")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(r"verified: [\d,]+ bytes in 2 copies, 0 mismatches", out), out
    assert "before" in out and "after" in out
    for key in ("PSS", "pool frames", "pages_sharing", "general_profit", "vmas_added", "saving:"):
        assert key in out, (key, out)
    # 2 copies: roughly half the loaded data is saved.
    m = re.search(r"pages_sharing\s+0 \|\s+([\d,]+)", out)
    assert m is not None, out
    assert int(m.group(1).replace(",", "")) > 0.8 * 1024
    # stderr is a pipe: one progress line per scan, no carriage returns.
    assert "\r" not in r.stderr
    assert "scan 1/" in r.stderr and "pages_sharing" in r.stderr


@pytest.mark.skipif(not ksm.available(), reason="merging unavailable here")
def test_demo_is_deterministic_with_a_seed() -> None:
    a = run("demo", "--copies", "2", "--mib", "1", "--seed", "11")
    b = run("demo", "--copies", "2", "--mib", "1", "--seed", "11")
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr

    def changed(out: str) -> str:
        m = re.search(r"([\d,]+) pages changed", out)
        assert m is not None, out
        return m.group(1)

    assert changed(a.stdout) == changed(b.stdout)


def test_demo_rejects_bad_arguments() -> None:
    assert run("demo", "--copies", "0").returncode == 2
    assert run("demo", "--change-percent", "101").returncode == 2


def test_info_shows_the_machine() -> None:
    r = run("info")
    assert r.returncode == 0, r.stderr
    lines = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in r.stdout.splitlines())
    )
    assert lines["ksm version"] == ksm.__version__
    assert lines["available"] == ("yes" if ksm.available() else "no")
    assert lines["page size"] == f"{ksm.PAGE_SIZE} bytes"
    max_map = Path("/proc/sys/vm/max_map_count").read_text().strip()
    assert lines["vm.max_map_count"] == max_map
    assert "vm.unprivileged_userfaultfd" in lines
    assert lines["kernel KSM"].startswith(("present", "absent"))
    if ksm.available():
        assert "userfaultfd mode" in lines
        assert lines["userfaultfd features"].startswith("0x")
    for knob in ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing"):
        assert lines[f"ksmd.{knob}"] == str(getattr(ksm.ksmd, knob))


def test_bench_help_lists_workloads() -> None:
    r = run("bench", "--help")
    assert r.returncode == 0, r.stderr
    for name in ("identical", "pairs", "unique", "zero", "dataset", "--size", "--only", "--json"):
        assert name in r.stdout, (name, r.stdout)


def test_bench_rejects_unknown_workload() -> None:
    r = run("bench", "--only", "nosuch")
    assert r.returncode == 2
    assert "unknown workload nosuch" in r.stderr


def test_no_command_is_a_usage_error() -> None:
    r = run()
    assert r.returncode == 2
    assert "usage" in r.stderr


def test_console_script() -> None:
    exe = shutil.which("ksm", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("console script not installed")
    r = subprocess.run([exe, "bench", "--size", "nonsense"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "cannot parse size" in r.stderr


def test_main_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    from ksm.cli import main

    assert main(["bench", "--only", "nosuch"]) == 2
    assert "unknown workload" in capsys.readouterr().err
    assert main(["info"]) == 0
    assert "page size:" in capsys.readouterr().out
