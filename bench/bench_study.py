"""The end-to-end study as a benchmark: wall time of `nag-toolkit study` with its defaults (what `make demo` runs),
against the 5-minute goal on 2 CPU cores. Prints the seconds and their ratio to 300 s, measured in this one run.

    python bench/bench_study.py [--no-notebooks]
"""
import argparse, os, tempfile, time
from nag_toolkit.study import run_study

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--no-notebooks', action='store_true', help='run the stages in-process instead of through papermill')
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        run_study({'out': d, 'notebooks': not a.no_notebooks})
        secs = time.perf_counter() - t0
    print(f"machine: {os.cpu_count()} CPU cores; study with defaults ({'in-process' if a.no_notebooks else 'papermill notebooks'})")
    print(f"study wall time: {secs:.1f} s; ratio to the 300 s goal: {secs / 300:.2f} (goal <= 1)")

if __name__ == '__main__': main()
