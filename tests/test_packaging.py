"""Packaging: ``maturin build --release`` makes one abi3 wheel that installs and works in a fresh virtualenv.

The core is built against CPython's stable ABI (PyO3's ``abi3-py311``), so one
wheel, tagged ``cp311-abi3``, serves CPython 3.11 and every later version with
the GIL. It is built once (about 20 s when the release build of ``make dev`` is
cached) and installed into a fresh virtualenv of each interpreter: the one
running the tests, or every CPython named in ``KSM_WHEEL_PYTHONS`` (``make
wheels`` names the ones installed here). A free-threaded interpreter (3.13t,
3.14t) named there must refuse the wheel: the stable ABI does not cover those
builds. Nothing is downloaded: the wheel is installed with ``--no-index
--no-deps``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATURIN = Path(sys.executable).parent / "maturin"


def pythons() -> list[str]:
    names = os.environ.get("KSM_WHEEL_PYTHONS", "").split()
    return names or [sys.executable]


def clean_env() -> dict[str, str]:
    """The environment without this virtualenv's traces, so the fresh one stands alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def describe(exe: str) -> tuple[str, bool]:
    """``(version, free_threaded)`` of the interpreter ``exe``."""
    code = (
        "import platform, sysconfig; "
        "print(platform.python_version(), bool(sysconfig.get_config_var('Py_GIL_DISABLED')))"
    )
    out = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    version, free_threaded = out.split()
    return version, free_threaded == "True"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release wheel, built once for every interpreter of the module's tests."""
    if not MATURIN.exists():
        pytest.skip("maturin is not installed next to this interpreter (pip install -r requirements-dev.txt)")
    wheels = tmp_path_factory.mktemp("wheels")
    build = subprocess.run(
        [str(MATURIN), "build", "--release", "-q", "-i", sys.executable, "-o", str(wheels)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=880,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (built,) = wheels.glob("ksm-*.whl")
    print(f"built {built.name}")
    return built


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_abi3_wheel_for_cpython_3_11_and_later(wheel: Path) -> None:
    # cp311-abi3: CPython's stable ABI from 3.11 (the buffer protocol joined it then).
    machine = re.escape(platform.machine())
    assert re.fullmatch(rf"ksm-[^-]+-cp311-abi3-(linux|manylinux\w*)_{machine}\.whl", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = z.read(metadata_name).decode()
        (wheel_name,) = [n for n in names if n.endswith(".dist-info/WHEEL")]
        tags = re.findall(r"^Tag: (\S+)$", z.read(wheel_name).decode(), re.M)
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = z.read(entry_points).decode()
    assert tags and all(t.startswith("cp311-abi3-") for t in tags), tags
    # One extension for every version: the stable ABI's file name, no version in it.
    extension = sorted(n for n in names if n.startswith("ksm/_ksm."))
    assert extension == ["ksm/_ksm.abi3.so", "ksm/_ksm.pyi"], names
    assert "ksm/py.typed" in names and "ksm/_ksm.pyi" in names and "ksm/_publish.py" in names
    # Child processes of `ksm run` are set up by this .pth, installed into site-packages.
    assert any(n.endswith(".data/purelib/ksm_autorun.pth") for n in names), names
    assert "Requires-Python: >=3.11" in metadata
    assert "Provides-Extra: numpy" in metadata and "Provides-Extra: plot" in metadata
    assert "ksm=ksm.cli:main" in scripts.replace(" ", "")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("python", pythons())
def test_wheel_installs_and_works_in_a_fresh_virtualenv(tmp_path: Path, python: str, wheel: Path) -> None:
    exe = shutil.which(python)
    if exe is None or subprocess.run([exe, "-c", ""], capture_output=True, check=False).returncode:
        pytest.skip(f"{python} is not installed or does not run")
    version, free_threaded = describe(exe)
    print(f"{python}: CPython {version}{' (free-threaded)' if free_threaded else ''}")

    venv = tmp_path / "venv"
    env = clean_env()
    subprocess.run([exe, "-m", "venv", str(venv)], check=True, env=env, timeout=300)
    vpy = venv / "bin" / "python"
    install = subprocess.run(
        [str(vpy), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if free_threaded:
        # The stable ABI does not cover free-threaded builds: pip refuses the wheel
        # (a source build is what serves them; see docs/packaging.md).
        assert install.returncode != 0, install.stdout + install.stderr
        assert "is not a supported wheel on this platform" in install.stderr, install.stderr
        return
    assert install.returncode == 0, install.stdout + install.stderr

    # Run from an empty directory, so the source tree cannot be imported by accident.
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = """
import json, ksm
page = ksm.PAGE_SIZE
merged = None
if ksm.available():
    with ksm.mmap(8 * page) as m:
        m[:] = b"x" * (8 * page)
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.scan(2)
        merged = ksm.stats()["pages_sharing"]
        m.madvise(ksm.MADV_UNMERGEABLE)
print(json.dumps({"file": ksm.__file__, "version": ksm.__version__, "merged": merged}))
"""
    r = subprocess.run(
        [str(vpy), "-c", code], cwd=work, capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["file"].startswith(str(venv)), result
    if result["merged"] is not None:
        assert result["merged"] == 7

    info = subprocess.run(
        [str(venv / "bin" / "ksm"), "info", "--json"],
        cwd=work,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert info.returncode == 0, info.stderr
    d = json.loads(info.stdout)
    assert d["ksm_version"] == result["version"]
    # numpy and matplotlib are extras: not installed with --no-deps, and ksm works without them.
    assert d["extras"] == {"numpy": None, "matplotlib": None}
    human = subprocess.run(
        [str(venv / "bin" / "ksm"), "info"], cwd=work, capture_output=True, text=True, env=env, timeout=120
    )
    assert human.returncode == 0 and "not installed (pip install 'ksm[numpy]')" in human.stdout

    # ksm_autorun.pth, installed into the fresh site-packages, sets a plain interpreter up.
    auto = subprocess.run(
        [str(vpy), "-c", "import ksm; print(ksm.ksmd.run, ksm.ksmd.pages_to_scan)"],
        cwd=work,
        capture_output=True,
        text=True,
        env={**env, "KSM_RUN": "1", "KSM_PAGES_TO_SCAN": "222"},
        timeout=120,
        check=False,
    )
    assert auto.returncode == 0, auto.stderr
    if result["merged"] is not None:
        assert auto.stdout.split() == ["1", "222"], auto.stdout + auto.stderr
