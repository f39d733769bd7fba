"""Side-by-side benchmarks against kernel KSM: a thin wrapper over ``ksm bench``.

    python benches/vs_kernel.py [--size 1G] [--only WORKLOAD ...] [--json] [--no-kernel]

The harness lives in ``ksm._bench`` so that the installed console script
(``ksm bench``) runs it too; ``ksm bench --help`` describes every option.
"""

from __future__ import annotations

import sys

from ksm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
