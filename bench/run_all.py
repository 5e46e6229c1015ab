"""Run every benchmark in one go and write the table: bench/results.csv and bench/results.md (what `make bench` runs).

Each row is a ratio (or a time) measured in this one run, from medians of interleaved repeats, with its goal and
whether it was met; the Markdown names the machine. README.md shows bench/results.md (nbs/index.ipynb reads it), so
`make bench` ends by regenerating the README. A GPU adds bench/bench_gpu.py's rows.

    python bench/run_all.py [--quick] [--skip study,peer,...] [--out bench]
    python bench/run_all.py --render      # rewrite results.md from results.csv and results.json (no measuring)
"""
import argparse, csv, datetime, json, os, subprocess, sys, time
from pathlib import Path
import torch
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from common import machine, print_rows
import bench_sampling, bench_train, bench_peer, bench_scaling, bench_study, bench_data, bench_gpu

def allocator_before(quick:bool)->list:
    "bench_sampling's rows with glibc's default allocator settings (before the fix), in a fresh process."
    env = dict(os.environ, NAG_TOOLKIT_MALLOC='default', OMP_NUM_THREADS='1')
    cmd = [sys.executable, str(HERE / 'bench_sampling.py'), '--json'] + (['--quick'] if quick else [])
    out = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    return [dict(r, benchmark=r['benchmark'] + ' [before: glibc defaults]') for r in out if 'separate' in r['benchmark'] or 'unguided' in r['benchmark']]

SECTIONS = {  # name: (what, function) in the order of the list
    'sampling': ('sampler overhead and guidance cost', lambda q: bench_sampling.rows(q)),
    'allocator': ('the same, before the allocator fix', allocator_before),
    'train': ('noise-condition dropout', lambda q: bench_train.rows(q)),
    'peer': ('against diffusers', lambda q: bench_peer.rows(q)),
    'study': ('the study end to end', lambda q: bench_study.rows(q)),
    'scaling': ('scaling', lambda q: bench_scaling.rows(q)),
    'data': ('training from memory-mapped latent shards', lambda q: bench_data.rows(q)),
    'gpu': ('GPU', lambda q: bench_gpu.rows(q)),
}

def markdown(rows:list, where:str, when:str, secs:float)->str:
    "The table as Markdown, with the machine and date."
    fmt = lambda r: (f"{r['measured']:.3g}" if r['unit'] in ('ratio', 'rel') else f"{r['measured']:.3g} {r['unit']}")
    met = {True: 'yes', False: '**no**', None: ''}
    lines = [f"Measured {when} by `make bench` in {secs / 60:.0f} min on: {where}.", '',
             '| benchmark | measured | goal | met | detail |', '|---|---|---|---|---|']
    cell = lambda v: str(v).replace('|', '\\|')                      # a '|' inside a cell would split it
    lines += [f"| {cell(r['benchmark'])} | {fmt(r)} | {r['goal']} | {met[r['met']]} | {cell(r['detail'])} |" for r in rows]
    return '\n'.join(lines) + '\n'

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer repeats and smaller sizes (a smoke run)')
    ap.add_argument('--skip', default='', help=f"comma-separated sections to leave out, of: {', '.join(SECTIONS)}")
    ap.add_argument('--out', default=str(HERE), help='folder for results.csv and results.md')
    ap.add_argument('--render', action='store_true', help='measure nothing: rewrite results.md from results.csv and results.json')
    a = ap.parse_args()
    out = Path(a.out)
    if a.render:
        rows = [dict(r, measured=float(r['measured']), met={'True': True, 'False': False}.get(r['met']))
                for r in csv.DictReader(open(out / 'results.csv'))]
        meta = json.loads((out / 'results.json').read_text())
        (out / 'results.md').write_text(markdown(rows, meta['machine'], meta['date'], meta['seconds'])); return
    skip = {s for s in a.skip.split(',') if s}
    if bad := skip - set(SECTIONS): sys.exit(f"--skip has {sorted(bad)}; allowed: {', '.join(SECTIONS)}")
    torch.set_num_threads(1)                 # steadier on a shared machine; every ratio compares like with like
    where, t0, rows = machine(), time.perf_counter(), []
    print(where)
    for name, (what, fn) in SECTIONS.items():
        if name in skip: continue
        if name == 'gpu' and not torch.cuda.is_available(): print('gpu: no GPU here; bench/bench_gpu.py was not run'); continue
        print(f'--- {name}: {what}', flush=True)
        got = fn(a.quick); print_rows(got); rows += got
    secs = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    with open(out / 'results.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=['benchmark', 'measured', 'unit', 'goal', 'met', 'detail'])
        w.writeheader(); w.writerows(rows)
    meta = {'machine': where + ('' if torch.cuda.is_available() else '; the GPU rows need bench/bench_gpu.py on a GPU'),
            'date': datetime.date.today().isoformat(), 'seconds': secs}
    (out / 'results.json').write_text(json.dumps(meta, indent=1))
    (out / 'results.md').write_text(markdown(rows, meta['machine'], meta['date'], secs))
    missed = [r['benchmark'] for r in rows if r['met'] is False]
    print(f"wrote {out / 'results.csv'} and {out / 'results.md'} ({len(rows)} rows, {secs:.0f} s); goals missed: {len(missed)}")
    for m in missed: print('  missed:', m)

if __name__ == '__main__': main()
