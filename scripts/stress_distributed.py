"""Run the two-process training test many times in a row under CPU load (issue 13).

Starts ``--busy`` CPU-bound processes (``while True: pass``), then runs
``tests/train/test_distributed_training.py::test_two_processes_match_one_process_and_resume``
``--runs`` times, one pytest process each, and stops at the first failure. One line per run:
its number, exit status, seconds and the 1-minute load average. Exit status 0 only when every
run passed.

    python scripts/stress_distributed.py --runs 50 --busy 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

TEST = (
    "tests/train/test_distributed_training.py::"
    "test_two_processes_match_one_process_and_resume"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--busy", type=int, default=2, help="CPU-bound processes to run beside")
    parser.add_argument("--test", default=TEST)
    args = parser.parse_args()
    busy = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)
    ]
    passed = 0
    try:
        for run in range(1, args.runs + 1):
            start = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                 args.test],
                capture_output=True,
                text=True,
                check=False,
            )
            seconds = time.monotonic() - start
            print(
                f"run {run}/{args.runs}: exit {result.returncode}, {seconds:.0f} s, "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            if result.returncode != 0:
                print(result.stdout[-6000:], result.stderr[-6000:], sep="\n", flush=True)
                break
            passed += 1
    finally:
        for process in busy:
            process.kill()
            process.wait()
    print(f"{passed} of {args.runs} passed in a row with {args.busy} busy processes", flush=True)
    return 0 if passed == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
