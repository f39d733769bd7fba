"""A merge-domain member for the tests: a separate interpreter driven over its
stdin/stdout, one command per line, one JSON answer per line (never timers).

It holds ``PAGES`` pages of ksm memory with content made from a seed (the same
seed gives the same bytes in every member), in ``COPIES`` copies (argument 3,
default 1: page ``i`` holds what page ``i % (PAGES // COPIES)`` of one copy
does), plus a model of what every page must hold, and answers:

  join NAME | leave | scan N | sync | stats | dstats | check | pfns
  write PAGE BYTE       (fill one page with BYTE, in memory and in the model)
  inject POINT EVERY ERRNO   (make every EVERY-th call at POINT fail; 0 turns it off)
  knob NAME VALUE       (set ksm.ksmd.NAME)
  fork                  (fork a child that checks its inherited pages and exits)
  exit
"""

from __future__ import annotations

import json
import os
import struct
import sys

import ksm

PAGE = ksm.PAGE_SIZE


def page_bytes(seed: int, i: int) -> bytes:
    head = struct.pack("<QQ", seed, i)
    return (head * (PAGE // len(head)))[:PAGE]


def pfns(addr: int, n: int) -> list[int]:
    """Physical frame of each page (0 if absent or hidden: only root sees them)."""
    out = []
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        data = f.read(8 * n)
    for (v,) in struct.iter_unpack("<Q", data):
        out.append(v & ((1 << 55) - 1) if v >> 63 else 0)
    return out


def main() -> None:
    seed, pages = int(sys.argv[1]), int(sys.argv[2])
    copies = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    m = ksm.mmap(pages * PAGE)
    model = [page_bytes(seed, i % (pages // copies)) for i in range(pages)]
    for i, b in enumerate(model):
        m[i * PAGE : (i + 1) * PAGE] = b
    m.madvise(ksm.MADV_MERGEABLE)

    def answer(obj: object) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    answer({"ready": os.getpid(), "domain": ksm.domain()})
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "join":
            try:
                ksm.join(args[0])
                answer({"ok": True})
            except Exception as e:  # reported to the driver, which asserts on it
                answer({"error": type(e).__name__, "msg": str(e)})
        elif cmd == "leave":
            ksm.leave()
            answer({"ok": True})
        elif cmd == "scan":
            ksm.scan(int(args[0]))
            answer({"ok": True})
        elif cmd == "sync":
            answer({"ok": ksm._ksm._domain_sync(10.0)})
        elif cmd == "stats":
            answer({"stats": ksm.stats(), "member": ksm.member_stats(), "domain": ksm.domain()})
        elif cmd == "dstats":
            answer({"dstats": ksm.domain_stats()})
        elif cmd == "check":
            bad = [i for i in range(pages) if m[i * PAGE : (i + 1) * PAGE] != model[i]]
            answer({"bad": bad})
        elif cmd == "pfns":
            answer({"pfns": pfns(m.address, pages)})
        elif cmd == "write":
            i, byte = int(args[0]), int(args[1])
            model[i] = bytes([byte]) * PAGE
            m[i * PAGE : (i + 1) * PAGE] = model[i]
            answer({"ok": True})
        elif cmd == "fork":
            pid = os.fork()
            if pid == 0:
                bad = [i for i in range(pages) if m[i * PAGE : (i + 1) * PAGE] != model[i]]
                # The child's own copy: a write here must not reach the parent.
                m[0:PAGE] = b"\xee" * PAGE
                os._exit(
                    10 + min(len(bad), 100)
                    if bad
                    else (0 if ksm.domain() == os.environ.get("KSM_DOMAIN") else 3)
                )
            _, status = os.waitpid(pid, 0)
            answer({"child": os.waitstatus_to_exitcode(status)})
        elif cmd == "knob":
            setattr(ksm.ksmd, args[0], int(args[1]))
            answer({"ok": True})
        elif cmd == "inject":
            ksm._ksm._inject(args[0], int(args[1]), int(args[2]))
            answer({"ok": True})
        elif cmd == "exit":
            answer({"ok": True})
            return
        else:
            answer({"error": "unknown command", "msg": cmd})


if __name__ == "__main__":
    main()
