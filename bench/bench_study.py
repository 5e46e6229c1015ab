"""The end-to-end study as a benchmark: wall time of `nag-toolkit study` with its defaults (what `make demo` runs),
against the 5-minute goal on 2 CPU cores, measured in this one run.

    python bench/bench_study.py [--no-notebooks]
"""
import argparse, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from common import row, machine, print_rows
from nag_toolkit.study_runs import run_study

def rows(quick:bool=False, notebooks:bool=True)->list:
    "One row: the study's wall time in seconds (goal <= 300). `quick` runs the stages in process, without papermill."
    notebooks = notebooks and not quick
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        run_study({'out': d, 'notebooks': notebooks})
        secs = time.perf_counter() - t0
    how = 'papermill notebooks, as make demo' if notebooks else 'stages in process'
    return [row('the study end to end (nag-toolkit study, defaults)', secs, '<= 300', 's', f'{os.cpu_count()} CPU cores; {how}')]

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--no-notebooks', action='store_true', help='run the stages in-process instead of through papermill')
    a = ap.parse_args()
    print(machine()); print_rows(rows(notebooks=not a.no_notebooks))

if __name__ == '__main__': main()
