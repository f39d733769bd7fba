"""Published statistics (``/dev/shm/ksm-<pid>.json``), ``ksm top`` and ``ksm stat``.

Children run in their own interpreter and publish into a per-test directory
(``KSM_PUBLISH_DIR``), refreshing every 50 ms; the parent waits on their
``ready`` line and polls the published file with a deadline.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import ksm
from ksm import _publish

needs_merging = pytest.mark.skipif(not ksm.available(), reason="merging unavailable here")

CHILD = """
import json, sys
import ksm

page = ksm.PAGE_SIZE
m = ksm.mmap(16 * page)
for i in range(16):
    m[i * page:(i + 1) * page] = b"A" * page   # 16 identical pages
m.madvise(ksm.MADV_MERGEABLE)
ksm.scan(2)
print(json.dumps({"ready": True, "stats": ksm.stats()}), flush=True)
sys.stdin.read()                               # until the test closes stdin
m.close()
"""


class KsmChild:
    """A fresh interpreter that merges 16 identical pages, reports ``ready`` and waits on stdin."""

    def __init__(self, proc: subprocess.Popen[str], stats: dict[str, Any]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.stats = stats

    def exit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0, self.proc.stderr.read() if self.proc.stderr else ""


def env_for(directory: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "KSM_PUBLISH_DIR": str(directory), "KSM_PUBLISH_INTERVAL": "0.05", **extra}


@contextmanager
def ksm_child(directory: Path, **extra_env: str) -> Iterator[KsmChild]:
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_for(directory, **extra_env),
    ) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready, "child did not report ready within 60 s"
            line = proc.stdout.readline()
            assert line, f"child died: {proc.stderr.read() if proc.stderr else ''}"
            msg = json.loads(line)
            assert msg["ready"]
            yield KsmChild(proc, msg["stats"])
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def wait_for(condition: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy (subprocess coordination only)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def published(directory: Path, pid: int) -> dict[str, Any] | None:
    path = directory / f"ksm-{pid}.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data


def published_after_scans(directory: Path, child: KsmChild) -> dict[str, Any]:
    """The child's record once it shows the figures the child printed (its last refresh)."""

    def current() -> dict[str, Any] | None:
        data = published(directory, child.pid)
        if data is not None and data["stats"]["full_scans"] == child.stats["full_scans"]:
            return data
        return None

    result: dict[str, Any] = wait_for(current, what="the child's refreshed statistics")
    return result


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ksm", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


# ---- the file ----------------------------------------------------------------------


def test_file_appears_with_first_use_and_disappears_at_exit(tmp_path: Path) -> None:
    with ksm_child(tmp_path) as child:
        data = published_after_scans(tmp_path, child)
        assert data["pid"] == child.pid
        assert data["start_time"] == _publish.start_time(child.pid)
        assert data["cmdline"][0] == sys.executable
        assert abs(data["updated_at"] - time.time()) < 30
        assert data["page_size"] == ksm.PAGE_SIZE
        assert data["knobs"]["run"] == 0
        for name in _publish.KSM_STAT_NAMES:
            assert name in data["ksm_stat"]
        assert set(child.stats) <= set(data["stats"])
        # Written atomically: no temporary file is ever left beside it.
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"ksm-{child.pid}.json"]
        child.exit()
    assert list(tmp_path.iterdir()) == []


def test_file_is_refreshed(tmp_path: Path) -> None:
    with ksm_child(tmp_path) as child:
        first = wait_for(lambda: published(tmp_path, child.pid), what="the file")["updated_at"]
        wait_for(
            lambda: (published(tmp_path, child.pid) or {"updated_at": first})["updated_at"] > first,
            what="a refresh",
        )
        child.exit()


def test_importing_alone_publishes_nothing(tmp_path: Path) -> None:
    code = """if True:
        import ksm, os
        ksm.stats()
        print(ksm.ksmd.run)
        print(os.listdir(os.environ["KSM_PUBLISH_DIR"]))
    """
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env_for(tmp_path), timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["0", "[]"]


@pytest.mark.parametrize(
    "use",
    [
        "m = ksm.mmap(ksm.PAGE_SIZE)",
        "b = bytearray(3 * ksm.PAGE_SIZE); ksm.madvise(0, 0, ksm.MADV_MERGEABLE)",
        "ksm.ksmd.pages_to_scan = 200",
    ],
)
def test_each_first_use_starts_publishing(tmp_path: Path, use: str) -> None:
    code = f"import ksm, os\n{use}\nprint(os.listdir(os.environ['KSM_PUBLISH_DIR']))"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env_for(tmp_path), timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"\['ksm-\d+\.json'\]\n", r.stdout), r.stdout
    assert list(tmp_path.iterdir()) == []  # removed at exit


def test_publishing_can_be_turned_off(tmp_path: Path) -> None:
    with ksm_child(tmp_path, KSM_PUBLISH="0") as child:
        assert list(tmp_path.iterdir()) == []
        r = cli("stat", str(child.pid), env=env_for(tmp_path))
        assert r.returncode == 1
        assert f"process {child.pid}" in r.stderr and "does not use ksm" in r.stderr
        assert "KSM_PUBLISH=0" in r.stderr
        child.exit()


def test_this_process_publishes() -> None:
    # The test process has used ksm (the fixture writes knobs): its file is live.
    ksm.ksmd.run = 0
    path = _publish.publishing()
    if not _publish.enabled():
        pytest.skip("KSM_PUBLISH=0")
    assert path is not None and path == _publish.path_for(os.getpid())
    record = _publish.read(os.getpid(), clean=False)
    assert record is not None
    assert record.data["pid"] == os.getpid()


def test_a_forked_child_publishes_under_its_own_pid(tmp_path: Path) -> None:
    code = """
        import os, sys, json
        import ksm
        m = ksm.mmap(ksm.PAGE_SIZE)
        d = os.environ["KSM_PUBLISH_DIR"]
        pid = os.fork()
        if pid == 0:
            before = sorted(os.listdir(d))
            c = ksm.mmap(ksm.PAGE_SIZE)           # the child's first use
            after = sorted(os.listdir(d))
            c.close()
            print(json.dumps([before, after]), flush=True)
            sys.exit(0)                           # runs atexit: must remove only the child's file
        os.waitpid(pid, 0)
        print(json.dumps([sorted(os.listdir(d)), pid, os.getpid()]))
    """
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env_for(tmp_path),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    child_line, parent_line = r.stdout.splitlines()
    before, after = json.loads(child_line)
    remaining, child_pid, parent_pid = json.loads(parent_line)
    assert before == [f"ksm-{parent_pid}.json"]
    assert after == sorted([f"ksm-{parent_pid}.json", f"ksm-{child_pid}.json"])
    assert remaining == [f"ksm-{parent_pid}.json"]  # the child's exit left the parent's file
    assert list(tmp_path.iterdir()) == []


@needs_merging
def test_demo_hold_publishes_its_final_figures(tmp_path: Path) -> None:
    env = {**env_for(tmp_path), "KSM_PUBLISH_INTERVAL": "3600"}  # only the explicit refresh
    args = ["demo", "--copies", "2", "--mib", "1", "--seed", "5", "--hold", "60"]
    with subprocess.Popen(
        [sys.executable, "-m", "ksm", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    ) as proc:
        try:
            assert proc.stdout is not None
            out = ""
            while "holding" not in out:
                line = proc.stdout.readline()
                assert line, f"demo ended early:\n{out}"
                out += line
            m = re.search(r"pages_sharing\s+0 \|\s+([\d,]+)", out)
            assert m is not None, out
            data = published(tmp_path, proc.pid)
            assert data is not None
            assert data["stats"]["pages_sharing"] == int(m.group(1).replace(",", "")) > 0
            assert f"pid {proc.pid}, published in {tmp_path}/ksm-{proc.pid}.json" in out
        finally:
            proc.kill()
            proc.wait()


# ---- stale files ---------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert _publish.start_time(proc.pid) is None
    return proc.pid


def _fake_record(pid: int, start_time: int | None) -> dict[str, Any]:
    return {
        "format": 1,
        "pid": pid,
        "start_time": start_time,
        "cmdline": ["fake"],
        "updated_at": time.time(),
        "page_size": ksm.PAGE_SIZE,
        "knobs": {"run": 1},
        "stats": {"pages_sharing": 123, "pages_shared": 1, "rmap_items": 124},
    }


def test_stale_files_are_ignored_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KSM_PUBLISH_DIR", str(tmp_path))
    dead = _dead_pid()
    me = os.getpid()
    my_start = _publish.start_time(me)
    assert my_start is not None
    (tmp_path / f"ksm-{dead}.json").write_text(json.dumps(_fake_record(dead, 12345)))
    # A live pid whose start time differs: the pid was reused by another process.
    (tmp_path / f"ksm-{me}.json").write_text(json.dumps(_fake_record(me, my_start - 1)))
    (tmp_path / "ksm-1.json").write_text("{not json")
    (tmp_path / "unrelated.json").write_text("{}")

    r = cli("top", "--once", env=env_for(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "0 processes using ksm" in r.stdout
    assert "fake" not in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated.json"]

    # The same, read in-process; a live record is kept.
    (tmp_path / f"ksm-{dead}.json").write_text(json.dumps(_fake_record(dead, 12345)))
    (tmp_path / f"ksm-{me}.json").write_text(json.dumps(_fake_record(me, my_start)))
    records = _publish.read_all()
    assert [r.pid for r in records] == [me]
    assert records[0].stats["pages_sharing"] == 123
    assert not (tmp_path / f"ksm-{dead}.json").exists()
    assert (tmp_path / f"ksm-{me}.json").exists()

    r = cli("stat", str(dead), env=env_for(tmp_path))
    assert r.returncode == 1
    assert f"no process with pid {dead}" in r.stderr


def test_a_file_claiming_another_pid_is_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KSM_PUBLISH_DIR", str(tmp_path))
    me = os.getpid()
    (tmp_path / "ksm-1.json").write_text(json.dumps(_fake_record(me, _publish.start_time(me))))
    assert _publish.read_all() == []
    assert list(tmp_path.iterdir()) == []


def test_foreign_files_are_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KSM_PUBLISH_DIR", str(tmp_path))
    me = os.getpid()
    start = _publish.start_time(me)
    # A symlink (here to an endless device) is never followed, and is removed.
    (tmp_path / f"ksm-{me}.json").symlink_to("/dev/zero")
    assert _publish.read_all() == []
    assert list(tmp_path.iterdir()) == []
    # A file the process's user did not write is not its statistics.
    path = tmp_path / f"ksm-{me}.json"
    path.write_text(json.dumps(_fake_record(me, start)))
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        assert _publish.read_all() == []
        os.chown(path, os.getuid(), os.getgid())
    assert [r.pid for r in _publish.read_all()] == [me]
    # Oversized: ignored.
    path.write_text(" " * (2 << 20))
    assert _publish.read_all() == []


def test_ksm_stat_names_use_the_core_fields_when_present() -> None:
    base = {"rmap_items": 10, "pages_shared": 2, "pages_sharing": 5, "general_profit": 99, "advised_pages": 4}
    assert _publish.ksm_stat(base) == {
        "ksm_rmap_items": 10,
        "ksm_zero_pages": 0,
        "ksm_merging_pages": 7,
        "ksm_process_profit": 99 + 2 * ksm.PAGE_SIZE,  # the frames' first users count too
        "ksm_merge_any": 0,
        "ksm_mergeable": 1,
    }
    richer = {**base, "ksm_zero_pages": 3, "ksm_merging_pages": 6}
    stat = _publish.ksm_stat(richer, merge_any=True)
    assert (stat["ksm_zero_pages"], stat["ksm_merging_pages"], stat["ksm_merge_any"]) == (3, 6, 1)
    assert _publish.ksm_stat({})["ksm_mergeable"] == 0


def test_ksm_stat_from_stats_agrees_with_the_core() -> None:
    # The figures computed from a stats() snapshot are the core's own ksm_stat().
    page = ksm.PAGE_SIZE
    with ksm.mmap(8 * page) as m:
        m[:] = bytes(range(256)) * (8 * page // 256)
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.scan(2)
        core, derived = ksm.ksm_stat(), _publish.ksm_stat(ksm.stats(), ksm.get_memory_merge())
        assert core["ksm_merging_pages"] >= 8
        assert derived == {k: int(v) for k, v in core.items()}
        m.madvise(ksm.MADV_UNMERGEABLE)


def test_publish_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KSM_PUBLISH", "KSM_PUBLISH_DIR", "KSM_PUBLISH_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    assert _publish.enabled()
    assert _publish.directory() == Path("/dev/shm")
    assert _publish.path_for(123) == Path("/dev/shm/ksm-123.json")
    assert _publish.interval() == 1.0


def test_publish_environment_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    for raw, expected in (("2", 2.0), ("0", 0.01), ("nan", 1.0), ("junk", 1.0), ("", 1.0)):
        monkeypatch.setenv("KSM_PUBLISH_INTERVAL", raw)
        assert _publish.interval() == expected
    for raw, on in (("0", False), ("off", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("KSM_PUBLISH", raw)
        assert _publish.enabled() is on


# ---- ksm top, ksm stat -----------------------------------------------------------------


@needs_merging
def test_top_once_shows_a_child_using_ksm(tmp_path: Path) -> None:
    with ksm_child(tmp_path) as child:
        assert child.stats["pages_sharing"] == 15
        published_after_scans(tmp_path, child)
        r = cli("top", "--once", env=env_for(tmp_path))
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout  # not a tty: plain tables
        lines = r.stdout.splitlines()
        assert lines[0].startswith("ksm top - ") and "1 process using ksm" in lines[0]
        header = lines[2].split()
        assert header == [
            "PID",
            "SHARING",
            "SAVED",
            "MiB",
            "PROFIT",
            "MiB",
            "FRAMES",
            "VMAS",
            "SCANS",
            "STATE",
            "COMMAND",
        ]
        (row,) = [line for line in lines[3:] if line.split()[:1] == [str(child.pid)]]
        cells = row.split()
        saved_mib = 15 * ksm.PAGE_SIZE / (1 << 20)
        assert cells[1:8] == [
            "15",
            f"{saved_mib:,.1f}",
            f"{child.stats['general_profit'] / (1 << 20):,.1f}",
            str(child.stats["frames"]),
            str(child.stats["vmas_used"]),
            str(child.stats["full_scans"]),
            "stopped",
        ]
        assert cells[8] == os.path.basename(sys.executable) and cells[9] == "-c"
        child.exit()
    r = cli("top", "-n", "2", "--interval", "0.01", env=env_for(tmp_path))
    assert r.returncode == 0
    assert r.stdout.count("ksm top - ") == 2
    assert r.stdout.count("0 processes using ksm") == 2


@needs_merging
def test_stat_matches_the_child(tmp_path: Path) -> None:
    with ksm_child(tmp_path) as child:
        published_after_scans(tmp_path, child)
        r = cli("stat", str(child.pid), env=env_for(tmp_path))
        assert r.returncode == 0, r.stderr
        pairs = [line.split(" ") for line in r.stdout.splitlines()]
        assert all(len(p) == 2 for p in pairs), r.stdout
        names = [p[0] for p in pairs]
        assert names[:6] == list(_publish.KSM_STAT_NAMES)  # the kernel's names first
        values = {k: int(v) for k, v in pairs}
        s = child.stats
        assert values["ksm_rmap_items"] == s["rmap_items"]
        assert values["ksm_merging_pages"] == s.get("ksm_merging_pages", 16)
        # Per process, the first user of each frame counts too (docs/kernel-contract.md,
        # "Per-process statistics").
        assert values["ksm_process_profit"] == s["general_profit"] + s["pages_shared"] * ksm.PAGE_SIZE
        assert values["ksm_mergeable"] == 1
        for name, value in s.items():
            if not name.startswith("ksm_"):
                assert values[name] == int(value), name

        j = cli("stat", str(child.pid), "--json", env=env_for(tmp_path))
        assert j.returncode == 0, j.stderr
        data = json.loads(j.stdout)
        assert data["pid"] == child.pid
        assert data["stats"] == s
        assert data["ksm_stat"]["ksm_rmap_items"] == s["rmap_items"]
        child.exit()
    r = cli("stat", str(child.pid), env=env_for(tmp_path))
    assert r.returncode == 1
    assert "no process" in r.stderr or "does not use ksm" in r.stderr


def test_stat_errors() -> None:
    r = cli("stat", str(os.getppid()), env={**os.environ, "KSM_PUBLISH_DIR": "/nonexistent"})
    assert r.returncode == 1 and "does not use ksm" in r.stderr
    r = cli("stat", "0")
    assert r.returncode == 1 and "no process with pid 0" in r.stderr
    r = cli("stat", "abc")
    assert r.returncode == 2 and "invalid int value" in r.stderr


def test_top_rejects_bad_arguments() -> None:
    assert cli("top", "--interval", "0").returncode == 2
    assert cli("top", "-n", "0").returncode == 2


def test_top_redraws_on_a_tty(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ksm", "top", "-n", "2", "--interval", "0.01"],
            stdout=slave,
            stderr=subprocess.DEVNULL,
            env=env_for(tmp_path),
        )
        os.close(slave)
        slave = -1
        out = b""
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, "ksm top wrote nothing within 30 s"
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=30) == 0
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert out.count(b"\x1b[H\x1b[2J") == 2
    assert out.count(b"ksm top - ") == 2


def test_top_counts_a_merge_domains_frames_once_in_its_totals() -> None:
    # Two members with 100 MiB each on the frames of one domain (100 MiB of frames,
    # a 128 MiB pool): each counts its pages as saved, the domain's copy is counted
    # once, so 100 MiB are saved in all, 72 MiB net of the pool.
    from ksm import _publish, cli

    mib = 2**20
    records = [
        _publish.Record(
            pid, Path("-"), {"domain": "d", "stats": {"pages_sharing": 25_600, "general_profit": 100 * mib}}
        )
        for pid in (101, 102)
    ]
    domains = {"d": {"pages_shared": 25_600, "pool_bytes": 128 * mib}}
    title = cli.top_table(records, None, domains).splitlines()[0]
    assert "100.0 MiB saved, general_profit 72.0 MiB" in title, title
    title = cli.top_table(records, None).splitlines()[0]
    assert "200.0 MiB saved, general_profit 200.0 MiB" in title, title
    # A domain none of whose members is listed takes nothing off.
    title = cli.top_table(records, None, {"other": domains["d"]}).splitlines()[0]
    assert "200.0 MiB saved" in title, title


def test_top_shows_a_domain_name_with_a_newline_on_one_line() -> None:
    from ksm import cli

    stats = {"a\nb": {"members": 1, "pages_shared": 0, "pages_sharing": 0, "pool_bytes": 0, "live_frames": 0}}
    lines = cli.domains_table([], stats).splitlines()  # a blank line, a title, the header, one row
    assert lines[-1].startswith("'a\\nb'") and len(lines) == 4, lines
