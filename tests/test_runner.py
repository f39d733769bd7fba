"""``ksm run`` and the ``KSM_*`` environment variables: merging with no code in the program.

Each test runs the program in a fresh interpreter (``python -m ksm run ...``); child
processes are set up by ``ksm_autorun.pth``, installed into site-packages with ksm.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from ksm import _autorun

np = pytest.importorskip("numpy")

# A program that never imports ksm: identical arrays, a result printed.
ARRAYS = """
import sys
import numpy as np
arrays = [np.full(1 << 18, 3.25) for _ in range(4)]  # 2 MiB each, identical
total = sum(float(a.sum()) for a in arrays)
arrays[0][7] = 1.0
print("total", total, float(arrays[0].sum()), float(arrays[1].sum()))
"""

POOL = """
import json, multiprocessing as mp, os, sys

def work(i):
    import numpy as np
    try:
        from numpy._core.multiarray import get_handler_name
    except ImportError:
        from numpy.core.multiarray import get_handler_name
    import ksm
    a = np.full(1 << 18, float(i))
    return [os.getpid(), get_handler_name(a), ksm.ksmd.run, float(a.sum())]

if __name__ == "__main__":
    ctx = mp.get_context(sys.argv[1])
    with ctx.Pool(3) as pool:
        out = pool.map(work, range(6))
    print(json.dumps(out))
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _autorun.ENV}
    env.update(extra)
    return env


def ksm_run(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ksm", "run", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        env=env or clean_env(),
        timeout=120,
        check=False,
    )


def script(tmp_path: Path, code: str, name: str = "prog.py") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(code))
    return p


def test_pth_is_installed_and_lists_every_variable() -> None:
    pth = Path(sysconfig.get_paths()["purelib"]) / "ksm_autorun.pth"
    assert pth.exists(), "ksm_autorun.pth is not installed (maturin's data directory)"
    text = pth.read_text()
    assert text.startswith("import ") and "ksm._autorun" in text
    for name in _autorun.ENV:
        assert f'"{name}"' in text
    src = Path(__file__).resolve().parents[1] / "packaging" / "ksm.data" / "purelib" / "ksm_autorun.pth"
    assert src.read_text() == text


def test_numpy_arrays_of_a_program_that_never_imports_ksm_merge(tmp_path: Path) -> None:
    prog = script(tmp_path, ARRAYS)
    plain = subprocess.run(
        [sys.executable, str(prog)], capture_output=True, text=True, env=clean_env(), check=True
    )
    r = ksm_run("--numpy", "--report", "--sleep-millisecs", "0", str(prog), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == plain.stdout
    m = re.search(r"pages_sharing=(\d+)", r.stderr)
    assert m is not None, r.stderr
    # 4 arrays of 512 identical pages (one page changed): at least 3 * 512 sharing.
    assert int(m.group(1)) >= 3 * 512
    assert "numpy_allocations=4" in r.stderr and "numpy_fallbacks=0" in r.stderr


def test_without_numpy_option_arrays_stay_numpys(tmp_path: Path) -> None:
    prog = script(tmp_path, ARRAYS)
    r = ksm_run("--report", str(prog), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "numpy_allocations=0" in r.stderr


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_pool_workers_are_set_up(tmp_path: Path, method: str) -> None:
    prog = script(tmp_path, POOL)
    r = ksm_run("--numpy", str(prog), method, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [x[3] for x in out] == [float(i * (1 << 18)) for i in range(6)]
    assert all(x[1] == "ksm" and x[2] == 1 for x in out), out
    assert len({x[0] for x in out}) >= 1 and all(x[0] != os.getpid() for x in out)


def test_subprocess_running_python_is_set_up(tmp_path: Path) -> None:
    prog = script(
        tmp_path,
        """
        import subprocess, sys
        code = "import ksm, os; print(ksm.ksmd.run, ksm.ksmd.pages_to_scan, os.environ['KSM_NUMPY'])"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        print(r.stdout, end="")
        """,
    )
    r = ksm_run("--numpy=2M", "--pages-to-scan", "321", str(prog), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "321", str(2 << 20)]


def test_argv_exit_status_stdin_and_main(tmp_path: Path) -> None:
    prog = script(
        tmp_path,
        """
        import sys
        print(__name__, sys.argv, sys.path[0] == __import__("os").path.dirname(__file__))
        print("read", sys.stdin.read().upper())
        if "exit" in sys.argv:
            sys.exit(7)
        """,
    )
    r = ksm_run(str(prog), "a", "--b", "exit", cwd=tmp_path, stdin="hello")
    assert r.returncode == 7, r.stderr
    assert r.stdout.splitlines() == [f"__main__ {[str(prog), 'a', '--b', 'exit']} True", "read HELLO"]
    r = ksm_run("--", str(prog), "--numpy", cwd=tmp_path)
    assert r.returncode == 0 and "'--numpy'" in r.stdout


def test_uncaught_exception_traceback_and_status_1(tmp_path: Path) -> None:
    prog = script(tmp_path, "def f():\n    raise RuntimeError('boom')\nf()\n")
    plain = subprocess.run([sys.executable, str(prog)], capture_output=True, text=True, env=clean_env())
    r = ksm_run(str(prog), cwd=tmp_path)
    assert r.returncode == plain.returncode == 1
    assert r.stderr == plain.stderr
    assert "_runner" not in r.stderr and "runpy" not in r.stderr


def test_module(tmp_path: Path) -> None:
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text("import sys\nprint(__name__, sys.argv[1:])\nsys.exit(3)\n")
    r = ksm_run("-m", "mypkg", "x", "y", cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "__main__ ['x', 'y']\n"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "no program"),
        (["missing.py"], "can't open file"),
        (["--bogus", "prog.py"], "unknown option --bogus"),
        (["--numpy=-5", "prog.py"], "--numpy"),
        (["--numpy=lots", "prog.py"], "--numpy"),
        (["--pages-to-scan", "-1", "prog.py"], "--pages-to-scan"),
        (["--pages-to-scan", "99999999999", "prog.py"], "pages_to_scan"),
        (["--sleep-millisecs"], "needs a value"),
        (["-m"], "-m needs a module"),
        (["-m", "no_such_module_here"], "no_such_module_here"),
    ],
)
def test_bad_input_one_line_status_2_program_not_started(tmp_path: Path, args: list[str], words: str) -> None:
    marker = tmp_path / "started"
    script(tmp_path, f"open({str(marker)!r}, 'w').close()\n")
    r = ksm_run(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and words in r.stderr, r.stderr
    assert r.stderr.startswith("ksm run: ")
    assert not marker.exists()


def test_unavailable_says_why_once_and_runs_unchanged(tmp_path: Path) -> None:
    prog = script(tmp_path, ARRAYS)
    r = ksm_run("--numpy", str(prog), cwd=tmp_path, env=clean_env(KSM_DISABLE_USERFAULTFD="1"))
    assert r.returncode == 0
    assert r.stdout.startswith("total ")
    assert len(r.stderr.splitlines()) == 1 and "KSM_DISABLE_USERFAULTFD" in r.stderr


def test_help() -> None:
    r = subprocess.run([sys.executable, "-m", "ksm", "run", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--numpy[=MIN_BYTES]" in r.stdout


# ---- the environment variables without the runner ----------------------------------

SHOW = """
import ksm, numpy as np
try:
    from numpy._core.multiarray import get_handler_name
except ImportError:
    from numpy.core.multiarray import get_handler_name
print(ksm.ksmd.run, ksm.ksmd.pages_to_scan, ksm.ksmd.sleep_millisecs, get_handler_name())
"""


def run_env(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SHOW], capture_output=True, text=True, env=clean_env(**env), timeout=60
    )


def test_environment_sets_up_a_plain_python() -> None:
    r = run_env(KSM_RUN="1", KSM_NUMPY="1M", KSM_PAGES_TO_SCAN="500", KSM_SLEEP_MILLISECS="5")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.split() == ["1", "500", "5", "ksm"]
    r = run_env()
    assert r.stdout.split() == ["0", "100", "20", "default_allocator"]


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("KSM_RUN", "yes"),
        ("KSM_NUMPY", "big"),
        ("KSM_PAGES_TO_SCAN", "lots"),
        ("KSM_PAGES_TO_SCAN", "-3"),
        ("KSM_SLEEP_MILLISECS", "99999999999"),
    ],
)
def test_bad_variable_warns_in_one_line_and_the_program_runs(var: str, value: str) -> None:
    r = run_env(**{var: value})
    assert r.returncode == 0
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("ksm: ") and var in r.stderr
    assert r.stdout.split() == ["0", "100", "20", "default_allocator"]


def test_numpy_is_not_imported_for_the_variable() -> None:
    code = "import sys; print('numpy' in sys.modules)"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(KSM_NUMPY="0")
    )
    assert r.stdout.strip() == "False" and r.stderr == ""


def test_pandas_columns_land_in_ksm_memory(tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    prog = script(
        tmp_path,
        """
        import numpy as np, pandas as pd, ksm

        def owner(a):
            # pandas keeps columns of one dtype in one 2-D block: a column is a view into
            # it, and the allocation is the array that owns the data.
            while not a.flags.owndata and isinstance(a.base, np.ndarray):
                a = a.base
            return a

        df = pd.DataFrame({"a": np.ones(1 << 18), "b": np.arange(1 << 18, dtype=np.float64)})
        df["c"] = df["a"] * 2
        print(all(ksm._ksm._numpy_owns(owner(df[c].to_numpy()).ctypes.data) for c in df.columns))
        """,
    )
    r = ksm_run("--numpy", str(prog), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


# ---- merge domains ---------------------------------------------------------------------


def test_domain_is_joined_and_exported(tmp_path: Path) -> None:
    prog = script(tmp_path, "import os, ksm\nprint(os.environ['KSM_DOMAIN'], ksm.domain())\n")
    r = ksm_run("--domain", "team-a", str(prog), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "team-a team-a"


def test_bad_domain_name_is_bad_input(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    prog = script(tmp_path, f"open({str(marker)!r}, 'w').close()\n")
    r = ksm_run("--domain", "", str(prog), cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "--domain" in r.stderr
    assert not marker.exists()
