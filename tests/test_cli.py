"""The command line: `ksm demo`, `ksm info`, `ksm bench` (run as subprocesses).

`ksm top` and `ksm stat` are in test_publish.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import tomllib
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


def test_info_is_readable_at_a_glance() -> None:
    r = run("info")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    first = out.splitlines()[0]
    assert first.startswith(f"ksm {ksm.__version__} · Python ")
    assert f"Linux {os.uname().release}" in first
    for section in ("Merging in this process", "VMAs", "Kernel KSM", "Effective knobs", "Statistics"):
        assert re.search(rf"^{section}", out, flags=re.M), section
    budget = int(Path("/proc/sys/vm/max_map_count").read_text()) // 2
    assert re.search(rf"VMA budget:\s+{budget:,} VMAs", out), out
    assert re.search(r"drivable:\s+(yes|no) \(", out), out
    # What lifts the budget, and its price.
    flat = " ".join(out.split())
    assert "sysctl vm.max_map_count=N" in flat, out
    assert "about 200 bytes of kernel memory per VMA" in flat, out
    assert "vma_budget_bytes" in flat, out
    assert max(len(line) for line in out.splitlines()) <= 110  # wrapped, no endless lines


def test_info_json() -> None:
    r = run("info", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) >= {
        "ksm_version",
        "python",
        "kernel",
        "page_size",
        "available",
        "unavailable_reason",
        "userfaultfd",
        "vma",
        "kernel_ksm",
        "knobs",
        "publish",
        "extras",
    }
    assert d["ksm_version"] == ksm.__version__
    assert d["kernel"]["release"] == os.uname().release
    assert d["page_size"] == ksm.PAGE_SIZE
    assert d["available"] is ksm.available()
    assert (d["unavailable_reason"] is None) is ksm.available()
    uffd = d["userfaultfd"]
    assert set(uffd) >= {"mode", "source", "features", "feature_names", "unprivileged_userfaultfd"}
    if ksm.available():
        assert uffd["mode"] in ("full", "user-mode-only")
        assert isinstance(uffd["features"], int)
        assert "PAGEFAULT_FLAG_WP" in uffd["feature_names"] and "WP_UNPOPULATED" in uffd["feature_names"]
    max_map = int(Path("/proc/sys/vm/max_map_count").read_text())
    assert d["vma"]["max_map_count"] == max_map
    assert d["vma"]["budget"] == max_map // 2
    assert d["vma"]["used"] > 0
    slab = Path("/proc/slabinfo")
    if os.access(slab, os.R_OK):
        sizes = {f[0]: int(f[3]) for f in (line.split() for line in slab.read_text().splitlines()[2:])}
        assert d["vma"]["vm_area_struct_bytes"] == sizes["vm_area_struct"]
    else:
        assert d["vma"]["vm_area_struct_bytes"] is None
    kk = d["kernel_ksm"]
    assert kk["present"] == os.path.isdir("/sys/kernel/mm/ksm")
    if kk["drivable"]:
        assert os.geteuid() == 0 and kk["present"]
    for knob in ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing"):
        assert d["knobs"][knob] == getattr(ksm.ksmd, knob)
    assert d["publish"]["dir"] == os.environ.get("KSM_PUBLISH_DIR", "/dev/shm")


def test_info_user_mode_only_is_named() -> None:
    from ksm.cli import _uffd_mode

    assert _uffd_mode("userfaultfd(2), user-mode only") == "user-mode-only"
    assert _uffd_mode("/dev/userfaultfd") == "full"
    assert _uffd_mode("userfaultfd(2)") == "full"


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


@pytest.mark.skipif(not ksm.available(), reason="merging unavailable here")
def test_demo_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo.png"
    r = run("demo", "--copies", "2", "--mib", "1", "--seed", "3", "--plot", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"plot: {out}" in r.stdout
    assert png_size(out) == (900, 500)
    assert out.stat().st_size > 10_000  # axes, three lines, legend: not an empty canvas


def test_demo_plot_without_matplotlib_is_a_clear_error(tmp_path: Path) -> None:
    code = f"""
        import sys
        sys.modules["matplotlib"] = None   # as if it were not installed
        from ksm.cli import main
        sys.exit(main(["demo", "--mib", "1", "--copies", "2", "--plot", {str(tmp_path / "x.png")!r}]))
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    if not ksm.available():
        assert r.returncode == 2
        return
    assert r.returncode == 2, r.stdout + r.stderr
    assert "needs matplotlib" in r.stderr and "pip install 'ksm[plot]'" in r.stderr
    assert "data:" not in r.stdout  # refused before doing the work
    assert not (tmp_path / "x.png").exists()


def test_numpy_missing_is_a_clear_error() -> None:
    code = """
        import sys
        sys.modules["numpy"] = None   # as if it were not installed
        import ksm
        for f in (ksm.empty, ksm.zeros):
            try:
                f(10)
            except ImportError as e:
                print(type(e).__name__, e.name, "|", e)
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("ModuleNotFoundError numpy | ")
        assert "need numpy" in line and "pip install 'ksm[numpy]'" in line


def test_pyproject_declares_the_extras_and_pythons() -> None:
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(req.startswith("numpy") for req in extras["numpy"])
    assert any(req.startswith("matplotlib") for req in extras["plot"])
    assert project["requires-python"] == ">=3.11"
    assert "Programming Language :: Python :: 3.11" in project["classifiers"]
    dev = (root / "requirements-dev.txt").read_text()
    assert re.search(r"^numpy", dev, re.M) and re.search(r"^matplotlib", dev, re.M)


def test_demo_rejects_a_negative_hold() -> None:
    r = run("demo", "--hold", "-1")
    assert r.returncode == 2 and "--hold >= 0" in r.stderr


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


def test_help_speaks_of_the_installed_commands_only() -> None:
    # An installed user has the `ksm` command, not the repository: no make targets,
    # no files to look up, nothing about how the project was planned.
    texts = [run("--help").stdout]
    commands = re.findall(r"^    (\w+)\s", texts[0], re.M)
    assert {"demo", "top", "stat", "info", "bench", "soak"} <= set(commands), texts[0]
    texts += [run(c, "--help").stdout for c in commands]
    for text in texts:
        assert text.strip(), texts
        for word in ("make ", "README", "iss" + "ue", ".md"):
            assert word not in text, (word, text)
