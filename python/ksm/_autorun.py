"""ksm set up from environment variables, in any Python process, with no code in the program.

Imported at interpreter start by ``ksm_autorun.pth`` (installed into
site-packages with ksm) when one of ``ENV`` is set and not empty; ``ksm run``
exports them, so that every Python process the program starts (multiprocessing
with spawn or forkserver, subprocess running python) is set up as it is.
``KSM_DOMAIN`` is read by ``import ksm`` itself. A bad value is reported in one
line on stderr and ignored; the program runs in any case.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# The variables that make the .pth import this module (its one line lists them too).
ENV = ("KSM_RUN", "KSM_NUMPY", "KSM_DOMAIN", "KSM_PAGES_TO_SCAN", "KSM_SLEEP_MILLISECS")

# Knob variables, in the order they are applied (before KSM_RUN starts ksmd).
KNOBS = (("KSM_PAGES_TO_SCAN", "pages_to_scan"), ("KSM_SLEEP_MILLISECS", "sleep_millisecs"))

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_bytes(text: str) -> int:
    """``'1048576'``, ``'1M'``, ``'64KiB'``, ``'0'`` → bytes; ValueError saying what is accepted."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in ("k", "m", "g") else ""
    digits = t[: len(t) - len(unit)]
    if not digits.isdigit():
        raise ValueError(
            f"{text!r} is not a size: it takes bytes as a whole number of 0 or more, or with K, M or G"
        )
    return int(digits) * _UNITS[unit]


def warn(message: str) -> None:
    print(f"ksm: {message}", file=sys.stderr)


def setup(environ: Mapping[str, str]) -> None:
    """Apply the ``KSM_*`` variables of ``environ`` to this process."""
    import ksm  # joins KSM_DOMAIN, where merge domains exist

    if not ksm.available():
        if any(environ.get(k) for k in ("KSM_RUN", "KSM_NUMPY")):
            why = ksm.unavailable_reason()
            warn(f"merging is unavailable in this process, KSM_RUN and KSM_NUMPY do nothing: {why}")
        return
    for var, knob in KNOBS:
        text = environ.get(var, "").strip()
        if not text:
            continue
        try:
            setattr(ksm.ksmd, knob, int(text))
        except ValueError as e:
            detail = str(e) if text.lstrip("-").isdigit() else f"it takes a whole number (ksmd.{knob})"
            warn(f"ignoring {var}={text!r}: {detail}")
    run = environ.get("KSM_RUN", "").strip()
    if run == "1":
        ksm.ksmd.run = 1
    elif run not in ("", "0"):
        warn(f"ignoring KSM_RUN={run!r}: it takes 1 (start ksmd) or 0")
    numpy = environ.get("KSM_NUMPY", "").strip()
    if numpy:
        try:
            min_bytes = parse_bytes(numpy)
        except ValueError as e:
            warn(f"ignoring KSM_NUMPY: {e} (the smallest array, in bytes, to put in ksm memory)")
        else:
            from . import _numpy

            _numpy.install_when_imported(min_bytes)


def _main() -> None:
    try:
        setup(os.environ)
    except Exception as e:  # never stop the program from starting
        warn(f"set-up from the environment failed, the program runs without it: {type(e).__name__}: {e}")


_main()
