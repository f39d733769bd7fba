"""``ksm bench --sweep``: how the cost of merging grows with the memory merged.

One workload (``dataset`` unless ``--only`` names another) at each size of
``--sweep-sizes``, through ksm and through kernel KSM, each measured as ``ksm
bench`` measures it (``_bench.run_one``: the same builders, the same kernel
driver, the same definitions of every figure). Per size: madvise to settled,
scanner CPU to settle, peak RSS, pages saved, and seconds per GiB, the figure
that stays flat while the cost is linear.

- *peak RSS*: the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before the buffer is allocated) minus its RSS at that
  moment, taken when the workload settled: the memory the workload, its merging
  and (for ksm) the frames mapped from its pool added at their peak. Frames of
  ksm's pool count in RSS once in every mapping of them, as merged pages count in
  every mapping under kernel KSM; ksm's pool and bookkeeping at settling are
  printed besides (``pool_bytes``, ``metadata_bytes``).
- *dataset beyond the files found*: the data set is 4 copies of the files of the
  standard library and site-packages, 1 % of pages changed per copy. Where the
  files found are fewer than a quarter of a size, that size takes more copies of
  what there is (``ceil(size / files)``), each still 1 % changed; the table says
  how many.
- A size that does not fit in ``MemAvailable`` (with room for ksm's pool and a
  margin) is skipped, and the table says so.

Kernel KSM's knobs are saved first and restored afterwards, also on SIGINT and
SIGTERM (as ``ksm bench`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from . import _bench
from ._bench import GIB, MIB, Figures

DEFAULT_SIZES = "64M,256M,1G,4G,8G"
DEFAULT_WORKLOAD = "dataset"
MARGIN = 512 * MIB
"""Memory left free beyond what a size needs, for the rest of the machine."""


@dataclass
class SweepPoint:
    """One size: both sides' figures, or why it was skipped."""

    size: int
    pages: int
    copies: int | None = None
    ksm: Figures | None = None
    kernel: Figures | None = None
    skipped: str | None = None
    mem_available: int | None = None
    ratios: dict[str, float | None] = field(default_factory=dict)


def parse_sizes(text: str) -> list[int]:
    """'64M,256M,1G' -> bytes, ascending, without repeats."""
    parts = [t for t in text.replace(" ", "").split(",") if t]
    if not parts:
        raise ValueError("--sweep-sizes needs at least one size, e.g. 64M,256M,1G")
    return sorted({_bench.parse_size(t) for t in parts})


def mem_available() -> int | None:
    for line in (_bench._read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def needed_bytes(size: int, copies: int | None) -> int:
    """Memory one side needs at its peak: the buffer, ksm's pool (one copy of what
    repeats: at most the buffer over the copies, a quarter without copies) and a margin."""
    return size + size // (copies or 4) + MARGIN


def plan(size: int, page: int, workload: str, data_bytes: int | None) -> tuple[int, int | None]:
    """(bytes of the workload, copies) for a requested size."""
    unit = page * _bench.DATASET_COPIES
    if workload != "dataset":
        return max(unit, size // unit * unit), None
    assert data_bytes is not None
    copies = max(_bench.DATASET_COPIES, math.ceil(size / max(data_bytes, page)))
    per_copy = max(page, size // copies // page * page)
    per_copy = min(per_copy, data_bytes // page * page)
    return per_copy * copies, copies


def _gib(b: int) -> float:
    return b / GIB


def size_label(b: int) -> str:
    if b >= GIB and b % GIB == 0:
        return f"{b // GIB} GiB"
    if b >= GIB:
        return f"{b / GIB:.2f} GiB"
    if b < MIB and b % 1024 == 0:
        return f"{b // 1024} KiB"
    if b % MIB == 0:
        return f"{b // MIB} MiB"
    return f"{b / MIB:.2f} MiB"


def tick_label(b: int) -> str:
    """A short label of a size (a plot's axis): 4 GiB for 4 GiB less a few pages."""
    if b >= GIB:
        return f"{b / GIB:.3g} GiB"
    return f"{b / MIB:.3g} MiB" if b >= MIB else f"{b / 1024:.3g} KiB"


def per_gib(seconds: float | None, size: int) -> float | None:
    return None if seconds is None or size == 0 else seconds / _gib(size)


def compute(p: SweepPoint) -> None:
    k, x = p.ksm, p.kernel
    p.ratios = {
        "settle_s": None if k is None or x is None else _bench._ratio(k.settle_s, x.settle_s),
        "scanner_cpu_s": None if k is None or x is None else _bench._ratio(k.scanner_cpu_s, x.scanner_cpu_s),
    }


def _fmt(v: float | None, digits: int, scale: float = 1.0, prefix: str = "") -> str:
    return "-" if v is None else f"{prefix}{v * scale:,.{digits}f}"


COLUMNS = (
    "size",
    "copies",
    "ksm settle s",
    "kernel settle s",
    "ksm/kernel",
    "ksm s/GiB",
    "kernel s/GiB",
    "ksm CPU s",
    "kernel CPU s",
    "ksm peak RSS MiB",
    "kernel peak RSS MiB",
    "ksm pool+meta MiB",
    "ksm pages saved",
    "kernel pages saved",
    "ksm meta B/page",
)


def table(points: list[SweepPoint]) -> str:
    rows: list[tuple[str, ...]] = [COLUMNS]
    notes: list[str] = []
    for p in points:
        if p.skipped:
            rows.append((size_label(p.size), "-", *(["skipped"] + ["-"] * (len(COLUMNS) - 3))))
            notes.append(f"{size_label(p.size)}: skipped, {p.skipped}")
            continue
        k, x = p.ksm, p.kernel

        def settle(f: Figures | None) -> str:
            if f is None or f.settle_s is None:
                return "-"
            return ("" if f.settled else ">") + f"{f.settle_s:.3f}"

        def mib(v: int | None) -> str:
            return _fmt(None if v is None else float(v), 0, 1 / MIB)

        pool_meta = None
        if k is not None and k.pool_bytes is not None and k.metadata_bytes is not None:
            pool_meta = k.pool_bytes + k.metadata_bytes
        rows.append(
            (
                size_label(p.size),
                "-" if p.copies is None else str(p.copies),
                settle(k),
                settle(x),
                _fmt(p.ratios.get("settle_s"), 3),
                _fmt(per_gib(k.settle_s if k else None, p.size), 3),
                _fmt(per_gib(x.settle_s if x else None, p.size), 3),
                _fmt(k.scanner_cpu_s if k else None, 3),
                _fmt(x.scanner_cpu_s if x else None, 3),
                mib(k.peak_rss_bytes if k else None),
                mib(x.peak_rss_bytes if x else None),
                mib(pool_meta),
                _fmt(None if k is None or k.pages_sharing is None else float(k.pages_sharing), 0),
                _fmt(None if x is None or x.pages_sharing is None else float(x.pages_sharing), 0),
                _fmt(k.metadata_per_page if k else None, 1),
            )
        )
        for name, f in (("ksm", k), ("kernel", x)):
            if f is not None and f.error:
                notes.append(f"{size_label(p.size)}: {name} failed: {f.error}")
            elif f is not None and not f.settled:
                notes.append(f"{size_label(p.size)}: {name} not settled (time so far shown with '>')")
            if f is not None and f.verified is False:
                notes.append(f"{size_label(p.size)}: {name}: CONTENTS CHANGED")
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    out = []
    for i, r in enumerate(rows):
        cells = [c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append("  ".join(cells))
        if i == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out + notes)


def linearity(points: list[SweepPoint]) -> list[str]:
    """Seconds per GiB of each side at each size, against its value at the smallest size
    measured: 1.0 everywhere is linear cost; where it moves is where the cost bends."""
    lines = []
    done = [p for p in points if not p.skipped]
    for name in ("ksm", "kernel"):
        seq = [
            (p.size, per_gib(getattr(p, name).settle_s, p.size))
            for p in done
            if getattr(p, name) is not None and getattr(p, name).settle_s is not None
        ]
        if len(seq) < 2 or not seq[0][1]:
            continue
        base = seq[0][1]
        parts = [f"{size_label(s)} {v / base:.2f}" for s, v in seq if v is not None]
        lines.append(f"  {name:<6} s/GiB relative to {size_label(seq[0][0])}: " + ", ".join(parts))
    return lines


def check_plot() -> str | None:
    """Why ``--plot`` cannot work here, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return (
            "--plot needs matplotlib, which is not installed: pip install 'ksm[plot]' "
            "(or pip install matplotlib)"
        )
    return None


def plot(points: list[SweepPoint], path: str, title: str) -> None:
    from matplotlib.figure import Figure

    done = [p for p in points if not p.skipped]
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    fig.suptitle(title, fontsize=10)
    panels = (
        (axes[0][0], "madvise to settled (s)", lambda f, p: f.settle_s),
        (axes[0][1], "settle time per GiB (s/GiB)", lambda f, p: per_gib(f.settle_s, p.size)),
        (axes[1][0], "scanner CPU to settle (s)", lambda f, p: f.scanner_cpu_s),
        (
            axes[1][1],
            "peak RSS added (MiB)",
            lambda f, p: None if f.peak_rss_bytes is None else f.peak_rss_bytes / MIB,
        ),
    )
    for ax, label, get in panels:
        for name, style in (("ksm", "o-"), ("kernel", "s--")):
            xs, ys = [], []
            for p in done:
                f = getattr(p, name)
                v = None if f is None else get(f, p)
                if v is not None:
                    xs.append(p.size / GIB)
                    ys.append(v)
            if xs:
                ax.plot(xs, ys, style, label="ksm" if name == "ksm" else "kernel KSM")
        ax.set_xscale("log", base=2)
        ax.set_xticks([p.size / GIB for p in done], labels=[tick_label(p.size) for p in done])
        ax.minorticks_off()
        ax.set_xlabel("memory merged (log scale)")
        ax.set_ylabel(label)
        ax.set_title(label + ("" if "per GiB" in label else ", log scale"), fontsize=9)
        ax.grid(True, which="major", linewidth=0.4, color="0.85")
        ax.legend(fontsize=8)
        if "per GiB" in label:
            ax.set_ylim(bottom=0)
        else:
            ax.set_yscale("log")
    fig.savefig(path, dpi=110)


def sweep(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """The ``--sweep`` command (arguments as ``_bench.add_arguments`` defines them)."""
    import ksm

    def fail(msg: str) -> int:
        print(f"ksm bench: {msg}", file=err)
        return 2

    try:
        sizes = parse_sizes(args.sweep_sizes)
    except ValueError as e:
        return fail(str(e))
    only = list(dict.fromkeys(args.only or [DEFAULT_WORKLOAD]))
    if len(only) != 1 or only[0] not in _bench.WORKLOADS:
        return fail(f"--sweep takes one workload (--only), one of {', '.join(_bench.WORKLOADS)}")
    workload = only[0]
    if args.pages_to_scan < 1 or args.max_scans < 2 or args.timeout <= 0:
        return fail("need --pages-to-scan >= 1, --max-scans >= 2, --timeout > 0")
    if args.plot is not None:
        why = check_plot()
        if why is not None:
            return fail(why)
    if not ksm.available():
        return fail(f"merging is not available here: {ksm.unavailable_reason()}")

    page = int(ksm.PAGE_SIZE)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=err, flush=True)

    kernel_note: str | None = "--no-kernel given" if args.no_kernel else _bench.kernel_unavailable_reason()
    points: list[SweepPoint] = []
    dataset: bytearray | None = None
    data_note = ""
    k: _bench.KernelKsm | None = None
    restore_errors: list[str] = []
    old_term = signal.signal(signal.SIGTERM, _bench._on_sigterm)
    ksm_side = _bench.KsmSide(args.pages_to_scan)
    interrupted = False
    try:
        if kernel_note is None:
            k = _bench.KernelKsm()
            if k.saved.get("run") != "0" or k.num("pages_sharing") != 0:
                log(
                    f"warning: kernel KSM is in use (run={k.saved.get('run')}, "
                    f"pages_sharing={k.num('pages_sharing')}): its figures include other processes"
                )
        if workload == "dataset":
            t = time.monotonic()
            dataset, files = _bench.load_dataset(max(sizes) // _bench.DATASET_COPIES, page)
            if not dataset:
                return fail("dataset: no files found")
            data_note = (
                f"dataset: {files:,} files ({len(dataset) / MIB:,.1f} MiB page-aligned) from "
                f"{', '.join(_bench._dataset_roots())}; each copy {_bench.DATASET_CHANGE_PERCENT:g}% changed"
            )
            took = time.monotonic() - t
            log(f"dataset: {files:,} files, {len(dataset) / MIB:.1f} MiB, read in {took:.1f}s")
        for want in sizes:
            wsize, copies = plan(want, page, workload, None if dataset is None else len(dataset))
            p = SweepPoint(wsize, wsize // page, copies)
            points.append(p)
            avail = mem_available()
            p.mem_available = avail
            need = needed_bytes(wsize, copies)
            if avail is not None and avail < need:
                p.skipped = f"needs about {need / GIB:.1f} GiB, MemAvailable was {avail / GIB:.1f} GiB"
                log(f"{size_label(wsize)}: {p.skipped}")
                continue
            data = None
            if dataset is not None and copies is not None:
                data = memoryview(dataset)[: wsize // copies]
            filler = _bench.Filler(page, args.seed, data)
            sides: list[_bench.Side] = [ksm_side]
            if k is not None:
                sides.append(_bench.KernelSide(k, args.pages_to_scan))
            avail_s = "?" if avail is None else f"{avail / GIB:.1f} GiB"
            log(f"{size_label(wsize)} ({workload}, MemAvailable {avail_s}):")
            for side in sides:
                try:
                    f = _bench.run_one(side, workload, wsize, page, filler, args.timeout, args.max_scans, log)
                except (OSError, MemoryError, ValueError) as e:
                    f = Figures(error=f"{type(e).__name__}: {e}")
                    log(f"{size_label(wsize)}/{side.name}: failed: {e}")
                    with contextlib.suppress(Exception):
                        side.stop()
                setattr(p, side.name, f)
            del filler
            if data is not None:
                data.release()
            compute(p)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        restore_errors = _bench.restore_sides(ksm_side, k, old_term, err, log)
    if interrupted:
        print("interrupted", file=err)
        return 130

    info = _bench.machine()
    avail_start = next((p.mem_available for p in points if p.mem_available is not None), None)
    header = (
        f"ksm bench --sweep: workload {workload}, seed {args.seed}, ksm {ksm.__version__}\n"
        f"machine: {info['cpus']} x {info['cpu']}, Linux {info['kernel']}, {info['mem_gib']} GiB"
        + ("" if avail_start is None else f" ({avail_start / GIB:.1f} GiB available at the start)")
        + f", Python {info['python']}\n"
        f"both daemons: pages_to_scan={args.pages_to_scan} sleep_millisecs=0"
    )
    if k is None:
        header += f"\nkernel KSM not driven: {kernel_note}; ksm's figures alone"
    if args.json:
        doc: dict[str, Any] = {
            "workload": workload,
            "seed": args.seed,
            "ksm_version": ksm.__version__,
            "machine": info,
            "pages_to_scan": args.pages_to_scan,
            "kernel_note": kernel_note,
            "dataset": data_note or None,
            "points": [asdict(p) for p in points],
            "knobs_restored": not restore_errors,
        }
        json.dump(doc, out, indent=2)
        out.write("\n")
    else:
        print(header, file=out)
        if data_note:
            print(data_note, file=out)
        print(file=out)
        print(table(points), file=out)
        lin = linearity(points)
        if lin:
            print(file=out)
            print("cost per GiB against the smallest size (1.00 everywhere: linear):", file=out)
            for line in lin:
                print(line, file=out)
    if args.plot is not None:
        title = f"ksm bench --sweep: {workload}, {info['cpus']} x {info['cpu']}, Linux {info['kernel']}"
        try:
            plot(points, args.plot, title)
        except (OSError, ValueError) as e:
            print(f"ksm bench: could not write the plot to {args.plot}: {e}", file=err)
            return 1
        if not args.json:
            print(f"plot: {args.plot}", file=out)
    bad = [
        size_label(p.size) for p in points for f in (p.ksm, p.kernel) if f is not None and f.verified is False
    ]
    if bad:
        print(f"ksm bench: contents changed by merging at {', '.join(bad)}", file=err)
        return 1
    return 1 if restore_errors else 0
