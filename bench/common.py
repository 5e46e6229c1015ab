"""Shared pieces of the benchmark scripts: interleaved median timing, the machine's description and result rows.

Every script exposes `rows(quick=False) -> list[dict]` (what `bench/run_all.py` collects into one table) and, run on
its own, prints its rows. A row is `row(benchmark, measured, goal=..., ...)`: `measured` is a number (a ratio unless
`unit` says otherwise) and `goal` a string such as '<= 1.05', which `row` checks.
"""
import os, platform, re, statistics, time
import torch

def median_times(fns:dict, repeats:int, warmup:int=2)->dict:
    "Median wall time in seconds of each `fn()`, timed in interleaved rounds (slow drifts of a shared machine hit all alike)."
    for fn in fns.values():
        for _ in range(warmup): fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter(); fn(); times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}

def goal_met(measured:float, goal:str):
    "Whether `measured` meets a goal written '<= 1.05', '< 1', '>= 0.98' or '> 0' (None for no goal)."
    m = re.fullmatch(r'\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*', goal or '')
    if m is None: return None
    op, v = m.group(1), float(m.group(2))
    return {'<=': measured <= v, '>=': measured >= v, '<': measured < v, '>': measured > v}[op]

def row(benchmark:str, measured:float, goal:str='', unit:str='ratio', detail:str='')->dict:
    "One result row; `met` is computed from `goal`."
    return {'benchmark': benchmark, 'measured': float(measured), 'unit': unit, 'goal': goal,
            'met': goal_met(measured, goal), 'detail': detail}

def cpu_name()->str:
    "The CPU's model name (Linux), else the platform's processor string."
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()

def machine()->str:
    "One line describing where the numbers were measured."
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
    return (f"{cpu_name()}, {os.cpu_count()} CPU cores, {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads; python {platform.python_version()}")

def print_rows(rows:list):
    "The rows as aligned text."
    for r in rows:
        met = {True: 'met', False: 'MISSED', None: ''}[r['met']]
        print(f"{r['benchmark']}: {r['measured']:.4g} {r['unit'] if r['unit'] != 'ratio' else ''} "
              f"{'(goal ' + r['goal'] + ', ' + met + ')' if r['goal'] else ''} {r['detail']}".rstrip())
