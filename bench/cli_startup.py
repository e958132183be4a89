"""What a scheduler command costs to start: `realfake-scheduler runs` against the bare
interpreter and against importing the training side (torch, torchvision, scikit-learn),
side by side in one run, each the median of several fresh processes.

    python bench/cli_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def median_seconds(command: list[str], env: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REALFAKE_")} | {
            "REALFAKE_HOME": home, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-m", "scheduler.cli", "runs"], env=env, check=True, capture_output=True)  # migrate
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "realfake-scheduler runs": [sys.executable, "-m", "scheduler.cli", "runs", "--json"],
            "realfake-scheduler --help": [sys.executable, "-m", "scheduler.cli", "--help"],
            "import realfake.train (torch, torchvision, sklearn)": [sys.executable, "-c", "import realfake.train"],
        }
        seconds = {name: median_seconds(command, env, args.repeats) for name, command in cases.items()}
    reference = seconds["import realfake.train (torch, torchvision, sklearn)"]
    print(f"median of {args.repeats} fresh processes each, {os.cpu_count()} CPUs")
    for name, value in seconds.items():
        print(f"  {name:52} {value:6.2f} s   {value / reference:5.2f} x the training side's imports")


if __name__ == "__main__":
    main()
