"""``ksm run``: run a Python program in this interpreter with ksm set up first, no code changes.

``ksm run [OPTIONS] [--] (SCRIPT | -m MODULE) [ARGS...]`` runs the program as
``python SCRIPT ARGS`` (or ``python -m MODULE ARGS``) would: the same ``sys.argv``,
``sys.path[0]``, ``__main__``, exit status, tracebacks, standard streams. Before
it starts: ksmd runs with the given knobs, the merge domain is joined, numpy's
allocator is installed (when numpy is imported). The settings are exported as
environment variables (see ``ksm._autorun``), so that the Python processes the
program starts are set up the same way.
"""

from __future__ import annotations

import builtins
import importlib.machinery
import importlib.util
import io
import os
import runpy
import signal
import sys
import types
import zipfile
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from . import _autorun

USAGE = (
    "usage: ksm run [--domain NAME] [--numpy[=MIN_BYTES]] [--pages-to-scan N] "
    "[--sleep-millisecs MS] [--report] [--] (SCRIPT | -m MODULE) [ARGS...]"
)

HELP = f"""{USAGE}

Run a Python program in this interpreter, as `python SCRIPT ARGS` would, with ksm
set up first and in every Python process it starts (through environment variables
read at interpreter start: KSM_RUN, KSM_NUMPY, KSM_DOMAIN, KSM_PAGES_TO_SCAN,
KSM_SLEEP_MILLISECS).

options:
  --domain NAME          join merge domain NAME (ksm.join) here and in child processes
  --numpy[=MIN_BYTES]    numpy arrays of at least MIN_BYTES (default 1M; 0 = all) get
                         their data in ksm memory, page aligned and mergeable
  --pages-to-scan N      ksmd.pages_to_scan (default 100)
  --sleep-millisecs MS   ksmd.sleep_millisecs (default 20)
  --report               at exit, finish two full scans and print what is saved (stderr)
  -m MODULE              run a module, as python -m MODULE
  -h, --help             show this help
"""

_VALUED = ("--domain", "--pages-to-scan", "--sleep-millisecs")


class BadInput(Exception):
    """A one-line error for stderr; exit status 2, the program not started."""


@dataclass
class Options:
    domain: str | None = None
    numpy: int | None = None
    pages_to_scan: int | None = None
    sleep_millisecs: int | None = None
    report: bool = False
    script: str | None = None
    module: str | None = None
    args: list[str] = field(default_factory=list)


def _int(option: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadInput(f"{option} takes a whole number, got {text!r}") from None
    if value < 0:
        raise BadInput(f"{option} takes a number of 0 or more, got {value}")
    return value


def parse(argv: list[str]) -> Options:
    o = Options()
    i = 0
    target: list[str] | None = None
    while i < len(argv):
        a = argv[i]
        if a == "--":
            target = argv[i + 1 :]
            break
        if a in ("-h", "--help"):
            raise SystemExit(print(HELP, end="") or 0)
        if a == "-m" or (a.startswith("-m") and not a.startswith("--")):
            target = argv[i:]
            break
        name, eq, value = a.partition("=")
        if name in _VALUED:
            if not eq:
                if i + 1 >= len(argv):
                    raise BadInput(f"{name} needs a value")
                i += 1
                value = argv[i]
            if name == "--domain":
                o.domain = value
            elif name == "--pages-to-scan":
                o.pages_to_scan = _int(name, value)
            else:
                o.sleep_millisecs = _int(name, value)
        elif name == "--numpy":
            if not eq:
                o.numpy = 1 << 20
            else:
                try:
                    o.numpy = _autorun.parse_bytes(value)
                except ValueError as e:
                    raise BadInput(f"--numpy: {e}") from None
        elif a == "--report":
            o.report = True
        elif a.startswith("-") and a != "-":
            raise BadInput(f"unknown option {a}")
        else:
            target = argv[i:]
            break
        i += 1
    if not target:
        raise BadInput("no program to run: give a SCRIPT or -m MODULE")
    first = target[0]
    if first == "-m" or (first.startswith("-m") and not first.startswith("--")):
        module = first[2:] or (target[1] if len(target) > 1 else "")
        if not module:
            raise BadInput("-m needs a module name")
        o.module = module
        o.args = target[2:] if first == "-m" else target[1:]
    else:
        o.script = first
        o.args = target[1:]
    return o


def _check_target(o: Options) -> None:
    if o.script is not None:
        if o.script == "-":
            raise BadInput("reading the program from standard input is not supported: give a SCRIPT file")
        if not os.path.exists(o.script):
            raise BadInput(f"can't open file {os.path.abspath(o.script)!r}: No such file or directory")
        return
    assert o.module is not None
    try:
        spec = importlib.util.find_spec(o.module)
    except (ImportError, ValueError) as e:
        raise BadInput(f"cannot find module {o.module!r}: {e}") from None
    if spec is None:
        raise BadInput(f"no module named {o.module!r}")


def _setup(o: Options) -> bool:
    """Set ksm up here and export it for child processes; False if merging is unavailable."""
    import ksm

    try:
        if o.pages_to_scan is not None:
            ksm.ksmd.pages_to_scan = o.pages_to_scan
        if o.sleep_millisecs is not None:
            ksm.ksmd.sleep_millisecs = o.sleep_millisecs
    except (ValueError, TypeError) as e:
        raise BadInput(str(e)) from None
    if o.domain is not None:
        try:
            ksm.join(o.domain)
        except (ValueError, TypeError) as e:
            raise BadInput(f"--domain: {e}") from None
        except OSError as e:
            if ksm.available():
                raise BadInput(f"--domain: {e}") from None
            # Unavailable here: said once below, and the program runs without ksm.
    if not ksm.available():
        why = ksm.unavailable_reason()
        print(f"ksm run: merging is unavailable here, running the program without it: {why}", file=sys.stderr)
        return False
    ksm.ksmd.run = 1
    env = {"KSM_RUN": "1"}
    if o.pages_to_scan is not None:
        env["KSM_PAGES_TO_SCAN"] = str(o.pages_to_scan)
    if o.sleep_millisecs is not None:
        env["KSM_SLEEP_MILLISECS"] = str(o.sleep_millisecs)
    if o.domain is not None:
        env["KSM_DOMAIN"] = o.domain
    if o.numpy is not None:
        env["KSM_NUMPY"] = str(o.numpy)
        from . import _numpy

        _numpy.install_when_imported(o.numpy)
    os.environ.update(env)
    return True


def _trim(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the program's first frame on (without the runner's and runpy's)."""
    ours = {os.path.abspath(p) for p in (__file__, runpy.__file__) if p}
    from . import cli

    ours.add(os.path.abspath(cli.__file__))
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not (name.startswith("<frozen runpy>") or os.path.abspath(name) in ours):
            break
        tb = tb.tb_next
    return tb


def _exec_script(path: str) -> Any:
    """Run a script file as ``__main__``, as ``python SCRIPT`` does (``__file__`` absolute,
    ``sys.argv[0]`` as given); a directory or zip file goes through ``runpy.run_path``."""
    if not os.path.isfile(path) or zipfile.is_zipfile(path):
        return runpy.run_path(path, run_name="__main__")
    full = os.path.abspath(path)
    main = types.ModuleType("__main__")
    main.__file__ = full
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", full)
    main.__dict__["__builtins__"] = builtins
    main.__cached__ = None  # type: ignore[attr-defined]
    main.__spec__ = None
    with io.open_code(full) as f:
        source = f.read()
    code = compile(source, full, "exec", dont_inherit=True)
    # The program's module stays __main__ until exit, as under `python SCRIPT`.
    sys.modules["__main__"] = main
    exec(code, main.__dict__)
    return main


def _report(available: bool) -> None:
    import ksm

    if not available:
        print("ksm run: nothing merged (merging is unavailable here)", file=sys.stderr)
        return
    ksm.scan(2)
    s = ksm.stats()
    n = ksm.numpy_allocator_stats()
    profit = int(s["general_profit"])
    print(
        f"ksm run: at exit, after 2 full scans: pages_sharing={s['pages_sharing']} "
        f"pages_shared={s['pages_shared']} pages_unshared={s['pages_unshared']} "
        f"general_profit={profit} ({profit / (1 << 20):.1f} MiB saved net) "
        f"full_scans={s['full_scans']} numpy_allocations={n['allocations']} numpy_fallbacks={n['fallbacks']}",
        file=sys.stderr,
    )


def _run(o: Options) -> tuple[int, Any]:
    """Run the program; its exit status (a SystemExit propagates) and what keeps its data alive."""
    if o.script is not None:
        sys.argv[:] = [o.script, *o.args]
        sys.path[0] = os.path.dirname(os.path.realpath(o.script))
    else:
        sys.argv[:] = ["-m", *o.args]  # runpy puts the module's path in sys.argv[0]
        sys.path[0] = os.getcwd()
    try:
        if o.script is not None:
            kept = _exec_script(o.script)
        else:
            assert o.module is not None
            kept = runpy.run_module(o.module, run_name="__main__", alter_sys=True)
    except SystemExit:
        raise
    except BaseException as e:
        tb = _trim(e.__traceback__)
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        return (130 if isinstance(e, KeyboardInterrupt) else 1), e
    return 0, kept


def main(argv: list[str]) -> int:
    try:
        o = parse(argv)
        _check_target(o)
        available = _setup(o)
    except BadInput as e:
        print(f"ksm run: error: {e} ({USAGE.removeprefix('usage: ')})", file=sys.stderr)
        return 2
    status, kept = 0, None
    try:
        status, kept = _run(o)
    finally:
        if o.report:
            sys.stdout.flush()
            _report(available)
        del kept
    if status == 130:
        # As Python does after an uncaught KeyboardInterrupt: exit by SIGINT.
        import atexit

        sys.stdout.flush()
        atexit._run_exitfuncs()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return status
