"""How long `hf-deepseek --help` and each subcommand's `--help` take, in fresh processes (median of a few runs).

    python benchmarks/cli_help_time.py [--repeats 5]

A benchmark, not a test: the times depend on the machine and its load. `--help` imports none of torch,
transformers, TRL, lm-eval or Gradio (`tests/test_cli.py` checks that), so it should take well under 1.5 s.
"""

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = [
    [],
    ["demo"],
    ["train"],
    ["eval"],
    ["bench"],
    ["bench", "train"],
    ["bench", "decode"],
    ["chat"],
]


def help_seconds(words: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hf_deepseek.cli", *words, "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    print(f"| command | median of {repeats} (s) |\n|---|---:|")
    for words in COMMANDS:
        print(f"| `hf-deepseek {' '.join([*words, '--help'])}` | {help_seconds(words, repeats):.2f} |", flush=True)


if __name__ == "__main__":
    main()
