"""``ksm demo --workers N --numpy``: a worker pool that knows nothing of ksm, run
through ``ksm run --domain NAME --numpy``, goes from N copies of its table to about
one.

The program below is what a user would write: a ``ProcessPoolExecutor`` whose
workers each load the same table into a numpy array (from the installed standard
library's files), with no ksm in it. The demo runs it through ``ksm run`` and
watches the workers' memory (PSS) from outside while ksmd merges them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TextIO

from ._workers import _bar, _Progress, _pss_kib

MIB = 1 << 20
TIMEOUT_S = 120.0

# The unmodified program: no ksm anywhere. Each worker loads the same table; one task
# per worker (a barrier) reports its pid and a digest of its table; a line on stdin
# makes them report again (to verify), then the program exits.
PROGRAM = '''\
import hashlib, json, os, sys
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import numpy as np

table = gate = None


def load(nbytes, barrier):
    """Every worker reads the same files into the same table."""
    global table, gate
    table = np.zeros(nbytes, dtype=np.uint8)
    view, have = memoryview(table), 0
    for d, dirs, files in os.walk(os.path.dirname(os.__file__)):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".py") and have < nbytes:
                with open(os.path.join(d, f), "rb") as fh:
                    have += fh.readinto(view[have:])
    gate = barrier


def report(_):
    gate.wait()  # one task per worker
    return os.getpid(), hashlib.blake2b(table).hexdigest()


if __name__ == "__main__":
    n, nbytes = int(sys.argv[1]), int(sys.argv[2])
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n)
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=load, initargs=(nbytes, barrier)) as pool:
        print(json.dumps(list(pool.map(report, range(n)))), flush=True)
        sys.stdin.readline()
        print(json.dumps(list(pool.map(report, range(n)))), flush=True)
'''


def _start(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], list[list[object]]]:
    """Start the program; wait until every worker has loaded its table."""
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"the program exited (status {p.wait()})")
    return p, json.loads(line)


def _finish(p: subprocess.Popen[str]) -> tuple[list[list[object]], int]:
    """Have the workers report again (to verify), and let the program exit."""
    assert p.stdin is not None and p.stdout is not None
    try:
        p.stdin.write("verify\n")
        p.stdin.flush()
        again = json.loads(p.stdout.readline())
    finally:
        p.stdin.close()
    return again, p.wait(timeout=60)


def demo(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the unmodified pool with python, then through ``ksm run --domain --numpy``:
    the workers' PSS in each case."""
    import ksm

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    n: int = args.workers
    nbytes = int(args.mib * MIB)
    if n < 2 or nbytes < MIB:
        print("ksm demo: --workers needs at least 2 processes and --numpy at least 1 MiB (--mib)", file=err)
        return 2
    try:
        import numpy  # noqa: F401
    except ImportError:
        print("ksm demo: --numpy needs numpy (pip install 'ksm[numpy]')", file=err)
        return 2
    domain = f"demo-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSM_")}
    table = nbytes / MIB
    with tempfile.TemporaryDirectory(prefix="ksm-demo-") as tmp:
        prog = Path(tmp) / "pool.py"
        prog.write_text(PROGRAM)
        args_ = [str(prog), str(n), str(nbytes)]
        print(
            f"program (no ksm in it): a ProcessPoolExecutor of {n} workers, each loads the same "
            f"{table:g} MiB numpy table",
            file=out,
        )
        # 1. As the user runs it today.
        p, plain = _start([sys.executable, *args_], env)
        plain_pss = sum(_pss_kib(int(str(pid))) for pid, _ in plain)
        _, plain_status = _finish(p)
        print(f"python pool.py:                        workers' PSS {plain_pss / 1024:8,.1f} MiB", file=out)
        # 2. Through ksm run: ksmd in every worker, one merge domain, numpy's allocator.
        cmd = [
            sys.executable,
            "-m",
            "ksm",
            "run",
            "--domain",
            domain,
            "--numpy",
            "--pages-to-scan",
            "10000",
            "--sleep-millisecs",
            "0",
            *args_,
        ]
        t0 = time.monotonic()
        p, first = _start(cmd, env)
        pids = [int(str(pid)) for pid, _ in first]
        want = (n - 1) * nbytes // ksm.PAGE_SIZE
        last, since, deadline = -1, time.monotonic(), time.monotonic() + TIMEOUT_S
        progress = _Progress(err)
        while time.monotonic() < deadline:
            sharing = ksm.domain_stats(domain)["pages_sharing"]
            progress.show(f"merging {_bar(sharing, want)} pages_sharing {sharing:,}")
            if sharing != last:
                last, since = sharing, time.monotonic()
            elif sharing > 0 and time.monotonic() - since >= 1.0:
                break
            time.sleep(0.1)
        progress.done()
        merged_pss = sum(_pss_kib(pid) for pid in pids)
        d = ksm.domain_stats(domain)
        again, status = _finish(p)
    digests = {str(h) for _, h in first + again + plain}
    same = len(digests) == 1
    print(
        f"ksm run --domain NAME --numpy pool.py: workers' PSS {merged_pss / 1024:8,.1f} MiB, merged in "
        f"{since - t0:.1f}s",
        file=out,
    )
    saved = (plain_pss - merged_pss) / 1024
    print(
        f"saved {saved:,.1f} MiB: {saved / table:.2f} of the {n - 1} extra copies of the table "
        f"(domain: pages_shared {d['pages_shared']:,}, pages_sharing {d['pages_sharing']:,})",
        file=out,
    )
    print(
        f"verified: every worker's table {'the same, in both runs' if same else 'NOT THE SAME'}; exit status "
        f"{plain_status} and {status}",
        file=out,
    )
    return 0 if same and status == 0 and plain_status == 0 else 1
