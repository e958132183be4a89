"""What a scheduler command costs to start: `realfake-scheduler runs` and `--help` against
the bare interpreter and against importing the training side (torch, torchvision,
scikit-learn), side by side in one run, each the median of several fresh processes.
`--compare DIR` times the same commands from another checkout (an older commit) as well.

    python bench/cli_startup.py [--repeats 7] [--compare /tmp/older-checkout]
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
HEAVY = ("torch", "torchvision", "sklearn")
LOADED = f"import sys; print(*sorted(set({HEAVY!r}) & set(sys.modules)))"


def median_seconds(command: list[str], env: dict, cwd: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, env=env, cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scheduler_cases(checkout: Path, label: str) -> dict[str, tuple[list[str], Path]]:
    return {
        f"realfake-scheduler runs{label}": ([sys.executable, "-m", "scheduler.cli", "runs", "--json"], checkout),
        f"realfake-scheduler --help{label}": ([sys.executable, "-m", "scheduler.cli", "--help"], checkout),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, choices=range(1, 101), metavar="1..100")
    parser.add_argument("--compare", type=Path, help="another checkout whose scheduler to time alongside")
    args = parser.parse_args()
    cases = {"python -c pass": ([sys.executable, "-c", "pass"], REPO)}
    cases |= scheduler_cases(REPO, "")
    if args.compare:
        cases |= scheduler_cases(args.compare.resolve(), f" ({args.compare.name})")
    cases["import realfake.train (torch, torchvision, sklearn)"] = ([sys.executable, "-c", "import realfake.train"], REPO)
    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REALFAKE_", "PYTHONPATH"))} | {"REALFAKE_HOME": home}
        # `-m` puts the working directory first on sys.path: each checkout runs its own code
        subprocess.run([sys.executable, "-m", "scheduler.cli", "runs"], env=env, cwd=REPO, check=True, capture_output=True)
        loaded = subprocess.run([sys.executable, "-c", f"import scheduler.cli; {LOADED}"], env=env, cwd=REPO,
                                check=True, capture_output=True, text=True).stdout.split()
        seconds = {name: median_seconds(command, env, cwd, args.repeats) for name, (command, cwd) in cases.items()}
    reference = seconds["import realfake.train (torch, torchvision, sklearn)"]
    print(f"median of {args.repeats} fresh processes each, {os.cpu_count()} CPUs")
    for name, value in seconds.items():
        print(f"  {name:52} {value:6.2f} s   {value / reference:5.2f} x the training side's imports")
    print(f"heavy libraries scheduler.cli imports here: {', '.join(loaded) or 'none'}")


if __name__ == "__main__":
    main()
