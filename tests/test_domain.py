"""Merge domains: merging across separate interpreters of one user.

Members are real processes (tests/domain_member.py) driven over pipes; a
domain-wide step is "every member scans, then makes a round trip to the
broker" (``ksm._ksm._domain_sync``), so what one member published has reached
the others before their next scan. Physical sharing is checked by PFN in
/proc/PID/pagemap where the kernel shows PFNs (root); everything else runs as
any user.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ksm

MEMBER = str(Path(__file__).with_name("domain_member.py"))
ROOT = os.geteuid() == 0

pytestmark = pytest.mark.skipif(not ksm.available(), reason="merging is not available here")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSM_")}
    env.update(extra)
    return env


class Member:
    """A member process: its pages are ``pages`` pages made from ``seed``, in
    ``copies`` copies of the same bytes."""

    def __init__(
        self,
        seed: int,
        pages: int,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
        copies: int = 1,
    ) -> None:
        self.p = subprocess.Popen(
            [sys.executable, MEMBER, str(seed), str(pages), str(copies)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env or clean_env(),
            pass_fds=pass_fds,
        )
        self.hello = self.read()
        self.pid = self.p.pid

    def read(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        assert line, f"member {self.p.pid} exited (status {self.p.poll()})"
        out: dict[str, Any] = json.loads(line)
        return out

    def __call__(self, line: str) -> dict[str, Any]:
        assert self.p.stdin is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        out = self.read()
        assert "error" not in out or line.startswith("join"), out
        return out

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait()
        self.close()

    def close(self) -> None:
        if self.p.poll() is None and self.p.stdin is not None and not self.p.stdin.closed:
            try:
                self("exit")
            except (AssertionError, BrokenPipeError):
                pass
            self.p.wait(timeout=30)
        for f in (self.p.stdin, self.p.stdout):
            if f is not None:
                f.close()


@pytest.fixture
def name() -> Iterator[str]:
    """A new domain name; its files in the meeting place are removed afterwards (the
    name is never used again, so a broker still ending its idle time loses nothing)."""
    name = "test-" + uuid.uuid4().hex[:12]
    yield name
    place = Path(f"/tmp/ksm-{os.geteuid()}")
    for f in place.glob(f"{name}.*"):
        f.unlink(missing_ok=True)


@pytest.fixture
def members() -> Iterator[list[Member]]:
    made: list[Member] = []
    yield made
    for m in made:
        if m.p.poll() is None:
            m.close()


def start(made: list[Member], n: int, seed: int, pages: int, domain: str) -> list[Member]:
    new = [Member(seed, pages) for _ in range(n)]
    made.extend(new)
    for m in new:
        assert m("join " + domain) == {"ok": True}
    return new


def step(group: list[Member]) -> None:
    """One domain-wide step: every member scans once, then syncs with the broker."""
    for m in group:
        m("scan 1")
        assert m("sync")["ok"]


def settle(group: list[Member], want_sharing: int, rounds: int = 40) -> dict[str, Any]:
    """Steps until the domain counts `want_sharing` pages saved (bounded)."""
    for _ in range(rounds):
        step(group)
        d = group[0]("dstats")["dstats"]
        if d["pages_sharing"] >= want_sharing:
            # One more step: every member's report is in.
            step(group)
            final: dict[str, Any] = group[0]("dstats")["dstats"]
            return final
    seen = [(m("stats")["member"], m("stats")["stats"]["pages_sharing"]) for m in group]
    pytest.fail(f"domain never reached pages_sharing {want_sharing}: {d}; members: {seen}")


def test_bad_names_are_refused_and_change_nothing() -> None:
    for bad, rule in [
        ("", "empty"),
        ("a/b", "'/'"),
        ("a\0b", "NUL"),
        (".", "'.'"),
        ("..", "'..'"),
        ("x" * 65, "longer than 64"),
    ]:
        with pytest.raises(ValueError, match=rule):
            ksm.join(bad)
        assert ksm.domain() is None
    for not_str in (5, b"name", None):
        with pytest.raises(TypeError, match="must be a str"):
            ksm.join(not_str)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="longer than 64"):
        ksm.domain_stats("y" * 65)
    assert ksm.domain() is None


def test_joining_again_is_a_noop_and_another_name_needs_leave(name: str) -> None:
    ksm.join(name)
    try:
        ksm.join(name)
        assert ksm.domain() == name
        with pytest.raises(RuntimeError, match="leave"):
            ksm.join(name + "-other")
        assert ksm.domain() == name
        assert ksm._ksm._domain_sync(10.0)
        assert ksm.domain_stats()["members"] == 1
        assert ksm.domain_stats(name)["members"] == 1
    finally:
        ksm.leave()
    assert ksm.domain() is None
    ksm.leave()  # leaving when in none: nothing happens


def test_an_unknown_domain_has_no_members(name: str) -> None:
    assert ksm.domain_stats(name) == dict.fromkeys(
        [
            "members",
            "pages_shared",
            "pages_sharing",
            "pool_bytes",
            "live_frames",
            "segments",
            "segments_retired",
            "refused",
        ],
        0,
    )
    assert ksm.domain_stats()["members"] == 0  # not joined: nothing


def test_two_interpreters_share_frames_and_writes_stay_private(name: str, members: list[Member]) -> None:
    pages = 64
    a, b = start(members, 2, seed=7, pages=pages, domain=name)
    d = settle([a, b], pages)
    assert (d["members"], d["pages_shared"], d["pages_sharing"]) == (2, pages, pages)
    assert d["live_frames"] == pages and d["pool_bytes"] >= pages * ksm.PAGE_SIZE
    for m in (a, b):
        s = m("stats")
        # Per process: every page is saved, no frame is this process's own.
        assert (s["stats"]["pages_sharing"], s["stats"]["pages_shared"]) == (pages, 0)
        assert s["member"]["pages"] == pages
        assert m("check")["bad"] == []
    if ROOT:
        pa, pb = a("pfns")["pfns"], b("pfns")["pfns"]
        assert all(pa) and pa == pb, "same physical frames"
    # A write stays in the writer.
    a("write 5 171")
    assert a("check")["bad"] == [] and b("check")["bad"] == []
    if ROOT:
        pa, pb = a("pfns")["pfns"], b("pfns")["pfns"]
        assert pa[5] != pb[5] and pa[6] == pb[6]
    step([a, b])
    d = b("dstats")["dstats"]
    assert (d["pages_shared"], d["pages_sharing"]) == (pages, pages - 1)


def test_a_broker_of_another_version_under_the_same_name_keeps_no_member_out(
    name: str, members: list[Member]
) -> None:
    # Brokers of other versions of ksm under this name (the layout of the files
    # before they carried the version, and a later version's), that never answer: a
    # member that knocked would wait in their backlog and never join.
    place = Path(ksm._ksm._domain_dir())
    others = [place / f"{name}.sock", place / f"{name}.v999.sock"]
    listeners = []
    try:
        for path in others:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.bind(str(path))
            s.listen(16)
            s.setblocking(False)
            listeners.append(s)
        pages = 32
        a, b = start(members, 2, seed=29, pages=pages, domain=name)
        d = settle([a, b], pages)
        assert (d["members"], d["pages_sharing"]) == (2, pages)
        assert a("check")["bad"] == [] and b("check")["bad"] == []
        # Nobody knocked at the other versions' doors.
        for s in listeners:
            with pytest.raises(BlockingIOError):
                s.accept()
        assert name in ksm._ksm._domains()
    finally:
        for s in listeners:
            s.close()
        for path in others:
            path.unlink(missing_ok=True)


def test_domains_are_isolated(name: str, members: list[Member]) -> None:
    pages = 32
    a1, a2 = start(members, 2, seed=3, pages=pages, domain=name + "-1")
    (b1,) = start(members, 1, seed=3, pages=pages, domain=name + "-2")
    settle([a1, a2], pages)
    for _ in range(3):
        step([a1, a2, b1])
    assert b1("stats")["stats"]["pages_sharing"] == 0
    assert ksm.domain_stats(name + "-2")["pages_sharing"] == 0
    if ROOT:
        assert not set(a1("pfns")["pfns"]) & set(b1("pfns")["pfns"])


def test_leave_keeps_contents_and_merges_nothing_new(name: str, members: list[Member]) -> None:
    pages = 32
    a, b = start(members, 2, seed=11, pages=pages, domain=name)
    settle([a, b], pages)
    a("leave")
    assert a("stats")["domain"] is None
    for _ in range(3):
        step([b])
        a("scan 1")
    assert a("check")["bad"] == [] and b("check")["bad"] == []
    # Still merged (segments never change), counted as before.
    assert a("stats")["stats"]["pages_sharing"] == pages
    d = b("dstats")["dstats"]
    assert d["members"] == 1


def test_members_starting_together_make_one_frame_of_a_content_each_holds_twice(
    name: str, members: list[Member]
) -> None:
    """Contents repeated inside every member, merged before any member has heard from
    the broker (which is still starting): one frame each in the domain, not one per
    member, as kernel KSM keeps one page per content. And the members joining
    together started one broker between them, not one each."""
    pages = 32
    group = [Member(31, pages) for _ in range(3)]
    members.extend(group)
    for m in group:
        for p in range(8):  # pages 0-7: four contents, each twice
            m(f"write {p} {p // 2 + 1}")
    for m in group:
        assert m("join " + name) == {"ok": True}
    for m in group:
        m("scan 2")  # candidates and merges inside each member, at once
    distinct = pages - 4
    d = settle(group, 3 * pages - distinct)
    assert (d["pages_shared"], d["pages_sharing"]) == (distinct, 3 * pages - distinct)
    for m in group:
        assert m("check")["bad"] == []
    assert [m("stats")["member"]["brokers_started"] for m in group].count(1) == 1
    assert sum(m("stats")["member"]["brokers_started"] for m in group) == 1


def test_pages_left_on_a_retired_segment_move_onto_a_new_one_without_vma_room(
    name: str, members: list[Member]
) -> None:
    """Members write the same part of their merged pages, each with bytes of its own:
    the frames those pages left are dead. Once more than a fifth of a segment is dead
    the domain retires it, and the pages still on it move onto a segment published
    anew, mapping for mapping, even with the VMA budget spent (``vma_reserve`` raised
    so that no page can get a private copy first). The pool comes down to its live
    frames, and no byte changes."""
    pages = 256
    a, b = start(members, 2, seed=17, pages=pages, domain=name)
    settle([a, b], pages)
    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    written = range(0, 200, 2)  # 100 pages of 256: more than a fifth
    for k, m in enumerate((a, b)):
        assert m(f"knob vma_reserve {limit - 8}")["ok"]
        for j, p in enumerate(written):
            m(f"write {p} {1 + j + 100 * k}")
    for _ in range(80):
        step([a, b])
        d = a("dstats")["dstats"]
        if d["segments_retired"] and d["pool_bytes"] <= 1.25 * d["live_frames"] * ksm.PAGE_SIZE:
            break
    else:
        pytest.fail(f"the pool never came down to its live frames: {d}")
    assert d["live_frames"] == pages - len(written)
    for m in (a, b):
        assert m("check")["bad"] == []
        member = m("stats")["member"]
        assert member["evicted"] == 0, "no room for private copies"
        # Every segment file the member maps is one it holds: a retired segment it
        # let go is unmapped whole (a mapping left on it, a covered page's say, would
        # keep the whole file's memory alive, counted in no pool figure).
        assert len(segment_files(m.pid)) == member["segments"], segment_files(m.pid)


def test_a_member_that_never_scans_does_not_hold_up_compaction(name: str, members: list[Member]) -> None:
    # KSM_DOMAIN joins every Python process started with it: a multiprocessing parent
    # or resource tracker is a member that holds no memory and may never scan.
    pages = 128
    a, b = start(members, 2, seed=19, pages=pages, domain=name)
    (idle,) = start(members, 1, seed=19, pages=1, domain=name)
    assert idle("sync")["ok"]  # connected (it never scans)
    settle([a, b], pages)
    assert a("dstats")["dstats"]["members"] == 3
    # Each member writes 120 of its pages with bytes of its own: those frames die.
    for k, m in enumerate((a, b)):
        for p in range(120):
            m(f"write {p} {1 + p + 120 * k}")
    for _ in range(60):
        step([a, b])
        d = a("dstats")["dstats"]
        live = d["live_frames"]
        if d["segments_retired"] and live == pages - 120 and d["pool_bytes"] <= 1.25 * live * ksm.PAGE_SIZE:
            break
    else:
        pytest.fail(f"the pool never came down while a member never scanned: {d}")
    for m in (a, b):
        assert m("check")["bad"] == []


def segment_files(pid: int) -> set[int]:
    """The inodes of the domain segments process `pid` maps (its views and its pages)."""
    with open(f"/proc/{pid}/maps") as f:
        return {int(line.split()[4]) for line in f if "ksm-segment" in line}


def test_a_late_member_merges_onto_what_the_domain_holds(name: str, members: list[Member]) -> None:
    pages = 32
    a, b = start(members, 2, seed=5, pages=pages, domain=name)
    settle([a, b], pages)
    (c,) = start(members, 1, seed=5, pages=pages, domain=name)
    d = settle([a, b, c], 2 * pages)
    assert (d["members"], d["pages_shared"], d["pages_sharing"]) == (3, pages, 2 * pages)
    assert c("check")["bad"] == []


def test_pages_merged_before_joining_are_shared_with_the_members(name: str, members: list[Member]) -> None:
    # Two copies of 32 pages merged inside one process, on frames of its own pool,
    # before it joins; then a member holding one copy joins too.
    half = 32
    a = Member(seed=13, pages=2 * half, copies=2)
    members.append(a)
    a("scan 2")
    s = a("stats")["stats"]
    assert (s["pages_shared"], s["pages_sharing"]) == (half, half)
    assert a("join " + name) == {"ok": True}
    (b,) = start(members, 1, seed=13, pages=half, domain=name)
    # Both copies of the first and the one of the second end on the same 32 domain
    # frames: 96 pages on 32 frames, the first member's own frames given back.
    d = settle([a, b], 2 * half)
    assert (d["members"], d["pages_shared"], d["pages_sharing"]) == (2, half, 2 * half)
    s = a("stats")["stats"]
    assert (s["pages_shared"], s["pages_sharing"]) == (0, 2 * half)
    assert a("check")["bad"] == [] and b("check")["bad"] == []
    if ROOT:
        pa, pb = a("pfns")["pfns"], b("pfns")["pfns"]
        assert all(pb) and pa[:half] == pb and pa[half:] == pb, "same physical frames"


def test_members_started_with_and_without_xdg_runtime_dir_meet(name: str, members: list[Member]) -> None:
    # One started from a desktop session (XDG_RUNTIME_DIR set, a private directory
    # with a path short enough for sockets), one from a service or cron job (not
    # set): one user, one domain.
    with tempfile.TemporaryDirectory(dir="/tmp") as runtime:
        a = Member(1, 4, env=clean_env(XDG_RUNTIME_DIR=runtime))
        b = Member(1, 4)
        members.extend([a, b])
        for m in (a, b):
            assert m("join " + name) == {"ok": True}
        settle([a, b], 4)
        assert a("dstats")["dstats"]["members"] == 2
        for m in (a, b):
            m.close()


def brokers_of(domain: str) -> list[int]:
    """The pids of the processes serving as `domain`'s broker."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone
            continue
        if domain.encode() in argv and any(b"_broker" in a for a in argv):
            pids.append(int(d.name))
    return pids


def test_the_broker_holds_no_descriptor_of_the_member_that_started_it(
    name: str, members: list[Member]
) -> None:
    # A pipe the member inherited, as a multiprocessing worker inherits the one its
    # parent waits on to see it exit: a broker holding it too would keep the parent
    # waiting in Process.join() until the broker exits.
    r, w = os.pipe()
    try:
        m = Member(1, 4, pass_fds=(w,))
        members.append(m)
        assert m("join " + name) == {"ok": True}
        step([m])
        assert m("stats")["member"]["brokers_started"] == 1
        brokers = brokers_of(name)
        assert len(brokers) == 1, brokers
        fds = Path(f"/proc/{brokers[0]}/fd")
        held = {os.readlink(fds / fd) for fd in os.listdir(fds)}
        assert f"pipe:[{os.fstat(w).st_ino}]" not in held, held
    finally:
        os.close(r)
        os.close(w)


def test_no_file_of_a_domain_outlives_its_broker(name: str, members: list[Member]) -> None:
    # The start claim goes once its holder connected, the socket and the lock file go
    # with the broker: a meeting place used under many names does not fill up.
    m = Member(1, 4)
    members.append(m)
    assert m("join " + name) == {"ok": True}
    step([m])
    place = Path(ksm._ksm._domain_dir())
    # (Each version of the protocol meets under its own files: NAME.vN.*.)
    sock = Path(ksm._ksm._domain_socket(name))
    assert sock.parent == place and sock.name.startswith(f"{name}.v")
    assert sorted(p.name for p in place.glob(f"{name}.*")) == [sock.with_suffix(".lock").name, sock.name]
    (broker,) = brokers_of(name)
    exited = os.pidfd_open(broker)
    try:
        m.close()
        # It leaves when its last member did, after its idle time.
        assert select.select([exited], [], [], 30)[0], "the broker did not exit"
    finally:
        os.close(exited)
    assert sorted(p.name for p in place.glob(f"{name}.*")) == []


def test_sigkilled_members_change_no_byte_of_the_survivors(name: str, members: list[Member]) -> None:
    pages = 48
    survivors = start(members, 2, seed=13, pages=pages, domain=name)
    for round_ in range(4):
        (victim,) = start(members, 1, seed=13, pages=pages, domain=name)
        # Killed at a different point of the merging each round.
        for _ in range(round_):
            step([*survivors, victim])
        victim("scan 1")
        victim.kill()
        for m in survivors:
            assert m("check")["bad"] == []
        step(survivors)
        # The broker noticed: two members left (bounded wait on a condition).
        deadline = time.monotonic() + 10
        while survivors[0]("dstats")["dstats"]["members"] != 2:
            assert time.monotonic() < deadline, "a killed member still counted"
            step(survivors)
    d = settle(survivors, pages)
    assert d["members"] == 2
    for m in survivors:
        assert m("check")["bad"] == []


def test_ksm_domain_joins_at_import(name: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import ksm; print(ksm.domain())"],
        env=clean_env(KSM_DOMAIN=name),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == name
    bad = subprocess.run(
        [sys.executable, "-c", "import ksm; print(ksm.domain())"],
        env=clean_env(KSM_DOMAIN="a/b"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert bad.stdout.strip() == "None"
    assert bad.stderr.startswith("ksm: ignoring KSM_DOMAIN='a/b': ") and "'/'" in bad.stderr
    assert len(bad.stderr.splitlines()) == 1, bad.stderr


def test_a_forked_child_keeps_its_pages_and_joins_only_with_ksm_domain(
    name: str, members: list[Member]
) -> None:
    pages = 32
    a, b = start(members, 2, seed=17, pages=pages, domain=name)
    settle([a, b], pages)
    # Without KSM_DOMAIN the child is in no domain (exit 0: pages right, domain None).
    assert a("fork") == {"child": 0}
    (c,) = [Member(17, pages, env=clean_env(KSM_DOMAIN=name))]
    members.append(c)
    assert c.hello["domain"] == name
    settle([a, b, c], 2 * pages)
    # With KSM_DOMAIN the child joins it too (its domain equals the variable).
    assert c("fork") == {"child": 0}
    for m in (a, b, c):
        assert m("check")["bad"] == []


def test_garbage_and_lies_on_the_socket_are_refused(name: str, members: list[Member]) -> None:
    pages = 16
    a, b = start(members, 2, seed=19, pages=pages, domain=name)
    settle([a, b], pages)
    before_segments = a("dstats")["dstats"]["segments"]
    path = Path(ksm._ksm._domain_socket(name))
    garbage = [b"", b"\xff" * 100, b"\x01\x01", bytes([2]) + (2**32 - 1).to_bytes(4, "little")]
    for g in garbage:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(str(path))
            s.send(g if g else b"\x00")
    # Two Publish lies, each carrying one page whose checksum is said to be 5: a memfd
    # that is not sealed, and a sealed one whose page's bytes do not have that checksum.
    plain = os.memfd_create("liar")
    os.ftruncate(plain, ksm.PAGE_SIZE)
    sealed = os.memfd_create("liar-sealed", os.MFD_ALLOW_SEALING)
    os.write(sealed, b"\x07" * ksm.PAGE_SIZE)
    seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, seals)
    try:
        for fd in (plain, sealed):
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(str(path))
                # Hello: tag 1, this protocol's version (the socket's name says it:
                # NAME.vN.sock), page size, the domain's name.
                version = int(path.name[len(name) + 2 :].split(".")[0])
                hello = bytes([1]) + version.to_bytes(2, "little") + ksm.PAGE_SIZE.to_bytes(4, "little")
                s.send(hello + bytes([len(name)]) + name.encode())
                assert s.recv(65536), "hello refused: the lie below would not be heard"
                publish = (
                    bytes([3])
                    + (1).to_bytes(4, "little")
                    + (1).to_bytes(4, "little")
                    + (5).to_bytes(4, "little")
                )
                socket.send_fds(s, [publish], [fd])
                # Refused: the broker hangs up on a liar.
                s.settimeout(10)
                while s.recv(65536):
                    pass
    finally:
        os.close(plain)
        os.close(sealed)
    step([a, b])
    d = a("dstats")["dstats"]
    assert d["refused"] >= len(garbage) + 2
    assert d["segments"] == before_segments, "no segment of a liar was passed on"
    assert (d["members"], d["pages_sharing"]) == (2, pages)
    for m in (a, b):
        assert m("check")["bad"] == []


POOL_SCRIPT = r"""
import json, multiprocessing as mp, sys
import numpy as np

def work(args):
    q, go = args
    a = np.arange(1 << 20, dtype=np.float64)          # 8 MiB, the same in every worker
    q.put((mp.current_process().pid, a.ctypes.data, a.nbytes))
    go.wait()
    return float(a.sum())

if __name__ == "__main__":
    mp.set_start_method(sys.argv[1])
    with mp.Manager() as m:
        q, go = m.Queue(), m.Event()
        with mp.Pool(3) as pool:
            res = pool.map_async(work, [(q, go)] * 3, chunksize=1)
            print(json.dumps([q.get() for _ in range(3)]), flush=True)
            sys.stdin.readline()                        # the test has looked
            go.set()
            print(json.dumps(res.get()), flush=True)
"""


def _pfns_of(pid: int, addr: int, nbytes: int) -> list[int]:
    page = ksm.PAGE_SIZE
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(addr // page * 8)
        data = f.read(nbytes // page * 8)
    return [int.from_bytes(data[i : i + 8], "little") & ((1 << 55) - 1) for i in range(0, len(data), 8)]


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_an_unmodified_pool_shares_its_arrays_through_ksm_run(method: str, name: str, tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    prog = tmp_path / "pool.py"
    prog.write_text(POOL_SCRIPT)
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ksm",
            "run",
            "--domain",
            name,
            "--numpy",
            "--pages-to-scan",
            "10000",
            "--sleep-millisecs",
            "0",
            str(prog),
            method,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        start_new_session=True,  # its workers are killed with it if the test fails
    )
    try:
        assert p.stdout is not None and p.stdin is not None
        workers = json.loads(p.stdout.readline())
        pages = workers[0][2] // ksm.PAGE_SIZE
        assert pages == 2048 and all(a % ksm.PAGE_SIZE == 0 for _, a, _ in workers)
        # Three workers, about one copy: 2 x 2048 pages saved domain-wide (bounded wait
        # on ksmd, which runs in every worker). About: on a loaded machine a content
        # can end up published by two members, and its pages then keep two frames
        # (docs/limitations.md, "Merge domains"); at most a few of 2,048.
        want = 2 * pages - pages // 200
        deadline = time.monotonic() + 60
        while ksm.domain_stats(name)["pages_sharing"] < want:
            assert time.monotonic() < deadline, ksm.domain_stats(name).items()
            time.sleep(0.05)
        if ROOT:
            maps = [_pfns_of(pid, addr, n) for pid, addr, n in workers]
            assert all(maps[0]), "every page present"
            one = sum(a == b == c for a, b, c in zip(*maps, strict=True))
            assert one >= pages - pages // 200, f"one physical copy: {one} of {pages} pages"
        p.stdin.write("\n")
        p.stdin.flush()
        sums = json.loads(p.stdout.readline())
        assert sums == [float(sum(range(1 << 20)))] * 3, "results unchanged"
        assert p.wait(timeout=60) == 0
    finally:
        # The whole session: the runner and whatever workers are left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()


def test_ksm_top_lists_each_domain_with_its_members(name: str, members: list[Member]) -> None:
    a, b = start(members, 2, seed=23, pages=16, domain=name)
    settle([a, b], 16)
    from ksm import cli

    stats = cli._domain_stats_now()
    assert stats[name]["members"] == 2 and stats[name]["pages_sharing"] == 16
    text = cli.domains_table([], stats)
    line = next(x for x in text.splitlines() if x.startswith(name))
    assert line.split()[1:4] == ["2", "16", "16"]


def test_demo_with_workers_merges_them_to_about_one_copy() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ksm", "demo", "--workers", "3", "--mib", "4", "--seed", "3"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "verified: 3 workers, 0 mismatched pages" in r.stdout
    dom = next(x for x in r.stdout.splitlines() if x.startswith("domain "))
    # 3 workers of 1,024 pages, 2% changed each: about 2 x 1,024 pages saved.
    m = re.search(r"pages_sharing ([\d,]+)", dom)
    assert m and int(m.group(1).replace(",", "")) >= 2 * 1024 * 0.95, dom
    # Not a terminal: each state of the progress line is a line of its own.
    progress = [x for x in r.stderr.splitlines() if "merging [" in x]
    assert progress and all(x.startswith("merging [") for x in progress), r.stderr
    assert "\r" not in r.stderr


def test_demo_of_an_unmodified_pool_goes_from_n_copies_to_about_one() -> None:
    pytest.importorskip("numpy")
    r = subprocess.run(
        [sys.executable, "-m", "ksm", "demo", "--workers", "3", "--numpy", "--mib", "16"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verified: every worker's table the same, in both runs; exit status 0 and 0" in r.stdout
    # 3 workers of a 16 MiB table (4,096 pages): 2 extra copies, every page of them saved.
    m = re.search(r"pages_shared ([\d,]+), pages_sharing ([\d,]+)", r.stdout)
    assert m and int(m.group(2).replace(",", "")) >= 2 * 4096 - 2, r.stdout
    # In PSS, less what ksm itself costs each process (its threads and bookkeeping, about
    # 1.5 MiB, a tenth of a table here).
    saved = re.search(r"saved [\d,.]+ MiB: ([\d.]+) of the 2 extra copies", r.stdout)
    assert saved and float(saved.group(1)) >= 1.5, r.stdout


@pytest.mark.parametrize(
    ("point", "every", "errno", "counter"),
    [
        ("seal", 1, 1, "publish_failures"),  # EPERM: no segment can be sealed
        ("map_segment", 1, 12, "segments_skipped"),  # ENOMEM: no segment can be mapped here
        ("send", 2, 32, "disconnects"),  # EPIPE: the link to the broker breaks
        ("recv", 2, 104, "disconnects"),  # ECONNRESET
    ],
)
def test_failing_domain_calls_lose_nothing_and_the_domain_recovers(
    point: str, every: int, errno: int, counter: str, name: str, members: list[Member]
) -> None:
    pages = 32
    a, b = start(members, 2, seed=29, pages=pages, domain=name)
    for m in (a, b):
        m(f"inject {point} {every} {errno}")
    for _ in range(8):
        for m in (a, b):
            m("scan 1")
            m("sync")
        for m in (a, b):
            assert m("check")["bad"] == []
    hit = sum(m("stats")["member"][counter] for m in (a, b))
    assert hit > 0, f"{point}: no failure was injected"
    for m in (a, b):
        m(f"inject {point} 0 0")
    d = settle([a, b], pages)
    assert (d["pages_shared"], d["pages_sharing"]) == (pages, pages)
    for m in (a, b):
        assert m("check")["bad"] == []
        if counter == "disconnects":
            # Connected again: the error that broke the link is not reported as current.
            assert m("stats")["member"]["last_error"] is None
