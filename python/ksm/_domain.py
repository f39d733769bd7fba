"""Merge domains: merging across cooperating processes of one user.

Processes that join the same domain share frames: an identical page in two
members ends up as one physical page, mapped privately by both (a write gives
the writer its own copy again, as inside one process). See
docs/design.md, "Merge domains", for how it works and what it guarantees.
"""

from __future__ import annotations

import os as _os
import sys as _sys

from . import _ksm

# Environment variables that must not reach a broker: it is not a member.
_KSM_PREFIX = "KSM_"

# The broker needs the extension module only: it is loaded from its file, with no
# site initialization and no import of the package (half the CPU of a start).
_BROKER_CODE = (
    "import sys, importlib.util as u; "
    "s = u.spec_from_file_location('ksm._ksm', sys.argv[2]); "
    "m = u.module_from_spec(s); s.loader.exec_module(m); m._broker(sys.argv[1])"
)


def _broker_command(name: str) -> tuple[list[str], list[str]]:
    """The command line and environment that start the broker of domain ``name``:
    this interpreter, isolated (``-I -S``), running this very extension module."""
    env = [f"{k}={v}" for k, v in _os.environ.items() if not k.startswith(_KSM_PREFIX)]
    argv = [_sys.executable or "python3", "-I", "-S", "-c", _BROKER_CODE, name, str(_ksm.__file__)]
    return argv, env


def join(name: str) -> None:
    """Join merge domain ``name``: this process's mergeable memory also merges with
    that of every process of the same user that joined ``name``.

    Joining the name already joined does nothing. The first member starts the
    domain's broker (a small process that exits when the last member leaves);
    nothing needs to run beforehand. ``join`` returns at once: the member connects
    in the background (``member_stats()["connected"]``; until then
    ``domain_stats()`` may not count it), and merges inside its own process
    meanwhile. Pages merged before joining move onto the domain's frames at
    later scans where another member holds the same bytes (joining first saves
    that work). Only processes that trust each other belong
    in one domain: a member can tell by timing a write whether another member
    holds the same page.

    Args:
        name: 1 to 64 bytes, no ``/`` or NUL, not ``.`` or ``..``. Names are per
            user: two users' domains of the same name never meet.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: ``name`` breaks the rules above (nothing changes).
        RuntimeError: this process is in another domain (call ``leave()`` first).
        OSError: merging is not available here, or the domain's directory cannot
            be used (errno kept).
    """
    if not isinstance(name, str):
        raise TypeError(f"a domain name must be a str, not {type(name).__name__}")
    argv, env = _broker_command(name)
    _ksm._join(name, argv, env)


def leave() -> None:
    """Stop merging with other processes. Pages already merged with them stay
    correct and merged (their frames never change); nothing new merges with them.
    Leaving when in no domain does nothing."""
    _ksm._leave()


def domain() -> str | None:
    """The name of the merge domain this process joined, or None."""
    return _ksm._domain()


def domain_stats(name: str | None = None) -> dict[str, int]:
    """The totals of a merge domain, counted like the kernel's system-wide figures.

    ``members`` (processes joined now), ``pages_shared`` (frames mapped by at least
    one page of some member), ``pages_sharing`` (sum over those frames of the pages
    mapping them minus one, all members together), ``pool_bytes`` (bytes of the
    domain's segments, mapped or not, and of the retired ones that pages of some
    member still map: memory the domain still holds), ``live_frames`` (frames in
    use), ``segments``,
    ``segments_retired`` and ``refused`` (messages the broker refused). Figures are
    those of the members' last full scans.

    Args:
        name: any domain of this user (joined or not); None: the one joined. A name
            no broker serves gives ``members`` 0 and every figure 0.

    Raises:
        TypeError, ValueError: as for ``join``.
        OSError: the domain's broker could not be asked (errno kept).
    """
    if name is None:
        name = _ksm._domain()
        if name is None:
            return dict.fromkeys(_STATS_KEYS, 0)
    return _ksm._domain_stats(name)


_STATS_KEYS = (
    "members",
    "pages_shared",
    "pages_sharing",
    "pool_bytes",
    "live_frames",
    "segments",
    "segments_retired",
    "refused",
)


def member_stats() -> dict[str, object]:
    """This process's side of its domain: whether its link to the broker is up,
    its member number, ``members`` (how many the domain had when this process
    connected: ``domain_stats()["members"]`` is the count now), the segments it
    maps and the pages of it on their frames,
    checksums announced, pages published, ``brokers_started`` (brokers this process
    started: members that join together start one between them), and
    ``last_error``: the last error met reaching or talking to the broker, or mapping
    a segment, since the link last connected (None if none)."""
    return _ksm._member_stats()


def _join_from_env() -> None:
    """``KSM_DOMAIN=name``: join when ksm is imported (and in forked children).
    A bad value or a failure is told in one line on stderr (``ksm: ignoring ...``, as
    for the other ``KSM_*`` variables), naming the variable; the program runs on."""
    name = _os.environ.get("KSM_DOMAIN")
    if not name:
        return
    try:
        join(name)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"ksm: ignoring KSM_DOMAIN={name!r}: {e}", file=_sys.stderr)
