"""Packaging: ``maturin build --release`` makes a wheel that installs and works in a fresh virtualenv.

The wheel is built for the interpreter running the tests (about 20 s when the
release build of ``make dev`` is cached). ``make wheels`` runs the same test
for every CPython named in ``KSM_WHEEL_PYTHONS`` (the supported versions
installed here). Nothing is downloaded: the wheel is installed with
``--no-index --no-deps``.
"""

from __future__ import annotations

import json
import os
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


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("python", pythons())
def test_wheel_installs_and_works_in_a_fresh_virtualenv(tmp_path: Path, python: str) -> None:
    exe = shutil.which(python)
    if exe is None or subprocess.run([exe, "-c", ""], capture_output=True, check=False).returncode:
        pytest.skip(f"{python} is not installed or does not run")
    if not MATURIN.exists():
        pytest.skip("maturin is not installed next to this interpreter (pip install -r requirements-dev.txt)")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [str(MATURIN), "build", "--release", "-q", "-i", exe, "-o", str(wheels)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=880,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("ksm-*.whl")

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = z.read(metadata_name).decode()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = z.read(entry_points).decode()
    assert "ksm/py.typed" in names and "ksm/_ksm.pyi" in names and "ksm/_publish.py" in names
    # Child processes of `ksm run` are set up by this .pth, installed into site-packages.
    assert any(n.endswith(".data/purelib/ksm_autorun.pth") for n in names), names
    assert "Requires-Python: >=3.11" in metadata
    assert "Provides-Extra: numpy" in metadata and "Provides-Extra: plot" in metadata
    assert "ksm=ksm.cli:main" in scripts.replace(" ", "")

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
