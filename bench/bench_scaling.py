"""Benchmark (not a test): how sampling scales with the number of samples and of steps, on CPU, with the toolkit's MLP
denoiser, and whether sharded sampling's peak memory stays flat as the number of samples grows.

Prints the machine, then one row per ratio (medians of interleaved repeats, measured in this one run):
  1. time against the number of samples N at fixed steps: worst relative deviation from the least-squares line
     a + b*N (goal <= 0.1), and the time per sample at the largest N over that at the middle N (goal <= 1.1);
  2. time against the number of steps at fixed N: the same two rows (per step at 80 steps over per step at 20);
  3. sharded sampling's memory: the peak resident memory of `nag-toolkit sample` above the process's size once the
     toolkit is imported (a fresh process each, on a tiny trained checkpoint), at N = 65,536 over N = 512
     (goal <= 1.1; holding every sample would make it about 1.4); the shard files are checked to hold all samples.
Run: python bench/bench_scaling.py [--quick] [--threads N]      (about 90 s; --quick about 20 s, on 2 CPU cores)
"""
import argparse, json, math, os, subprocess, sys, tempfile
from pathlib import Path
import torch
from nag_toolkit.models import build_model
from nag_toolkit.guidance import Denoiser
from nag_toolkit.samplers import sample_euler, time_grid
sys.path.insert(0, str(Path(__file__).parent))
from common import median_times, row, machine, print_rows

DIM, CLASSES = 32, 10

def linear_fit(xs, ys)->tuple:
    "Least-squares (a, b) of y = a + b*x, and the worst |y - fit| / y."
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    return a, b, max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys))

def sampling_times(sizes, steps, repeats, warmup)->dict:
    "Median seconds of one unguided Euler run for each (N, steps) in `sizes` x `steps` (one of them a single value)."
    torch.manual_seed(0)
    den = Denoiser(build_model('mlp', dim=DIM, width=256, depth=3, num_classes=CLASSES).eval(), 'linear')
    def run(n, s):
        x, y, ts = torch.randn(n, DIM), torch.randint(0, CLASSES, (n,)), time_grid(s, t_max=1.0)
        return lambda: sample_euler(den, x, ts, 'linear', extra_args={'y': y})
    with torch.no_grad():
        return median_times({(n, s): run(n, s) for n in sizes for s in steps}, repeats, warmup)

def scaling_rows(what:str, xs, times:list, unit:str, fixed:str, mid, top)->list:
    "The linear-fit row and the per-`unit` cost ratio (at `what`=`top` over at `mid`) of `times` against `xs`."
    a, b, dev = linear_fit(xs, times)
    per = dict(zip(xs, (t / x for x, t in zip(xs, times))))
    return [row(f'sampling time vs {what} ({fixed}): worst deviation from a + b*{what}', dev, '<= 0.1',
                detail=f"(per {unit} at {what}={top}: {per[top] * 1e6:.1f} us of the whole run; intercept a = {a * 1e3:.2f} ms; "
                       f"times at {what}={', '.join(map(str, xs))}: {', '.join(f'{t * 1e3:.1f}' for t in times)} ms)"),
            row(f'time per {unit} at {what}={top} / at {what}={mid}', per[top] / per[mid], '<= 1.1',
                detail=f"({per[top] * 1e6:.1f} / {per[mid] * 1e6:.1f} us)")]

# A child process imports the toolkit, resets the kernel's peak-RSS mark (/proc/self/clear_refs, "5"), runs the
# sample command in process and reports its resident memory then and its peak since the reset: the growth is what
# sampling itself holds at its worst, without the import's transient peak (which alone is larger than sampling's).
_CHILD = """
import json, sys
import nag_toolkit.cli, nag_toolkit.sample
def status(key):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) / 1024
open('/proc/self/clear_refs', 'w').write('5')
base = status('VmRSS:')
nag_toolkit.cli.main(sys.argv[1:])
print(json.dumps({'base': base, 'peak': status('VmHWM:')}))
"""

def sampling_growth_mib(args:list, log:Path)->float:
    "Peak resident memory (MiB) of `nag-toolkit sample ARGS` above the process's size after importing the toolkit."
    env = {**os.environ, 'OMP_NUM_THREADS': str(torch.get_num_threads())}
    p = subprocess.run([sys.executable, '-c', _CHILD, *args], capture_output=True, text=True, env=env)
    log.write_text(p.stdout + p.stderr)
    if p.returncode: raise RuntimeError(f"sample {' '.join(args)} failed:\n{(p.stdout + p.stderr)[-2000:]}")
    m = json.loads(p.stdout.strip().splitlines()[-1])
    return m['peak'] - m['base']

def memory_rows(sizes, shard=256, batch=256, steps=4, repeats=3)->list:
    "Sampling's own peak memory growth (least of `repeats` runs) at the largest N over the smallest, on a checkpoint trained for 20 steps."
    from nag_toolkit.sample import shard_count
    cli = [sys.executable, '-m', 'nag_toolkit.cli']
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        subprocess.run(cli + ['train', '--dataset', 'gmm32', '--steps', '20', '--batch-size', '64', '--ckpt-every', '20',
                              '--device', 'cpu', '--out', str(d / 'run')], check=True, capture_output=True)
        growth, shards = {}, {}
        for n in sizes:
            growth[n] = []
            for rep in range(repeats):                                   # the least of a few runs: RSS moves by ~2 MiB
                out = d / f'samples_{n}_{rep}'
                growth[n].append(sampling_growth_mib(['sample', '--checkpoint', str(d / 'run'), '--out', str(out), '--num-samples', str(n),
                                                      '--shard-size', str(shard), '--batch-size', str(batch), '--steps', str(steps),
                                                      '--device', 'cpu'], d / 'sample.log'))
            growth[n] = min(growth[n])
            files = sorted(out.glob('shard_*.npz'))                 # so that a silent no-op cannot pass as flat memory
            shards[n] = len(files)
            if shards[n] != math.ceil(n / shard) or sum(shard_count(f) for f in files) != n:
                raise RuntimeError(f"N={n}: expected {math.ceil(n / shard)} shards holding {n} samples, found {shards[n]} in {out}")
    lo, hi = sizes[0], sizes[-1]
    return [row(f'sharded sampling, peak memory above the imported process: N={hi} / N={lo}', growth[hi] / growth[lo], '<= 1.1',
                detail=f"{growth[hi]:.1f} / {growth[lo]:.1f} MiB (least of {repeats} runs each), {shards[hi]} / {shards[lo]} shards of {shard}; "
                       f"holding all {hi} samples as float32 would add {hi * DIM * 4 / 2**20:.1f} MiB")]

def rows(quick:bool=False)->list:
    "The benchmark's rows; `quick` uses fewer repeats and smaller N in the memory rows."
    repeats, warmup = (3, 1) if quick else (15, 2)
    # N starts at 128: below that a forward's fixed cost (about 1 ms) dominates and bends the line at its start
    ns, steps, n_fixed, s_fixed = (128, 256, 512, 1024, 2048), (5, 10, 20, 40, 80), 256, 20
    t = sampling_times(ns, (s_fixed,), repeats, warmup)
    out = scaling_rows('N', ns, [t[n, s_fixed] for n in ns], 'sample', f'{s_fixed} steps', 512, 2048)
    t = sampling_times((n_fixed,), steps, repeats, warmup)
    out += scaling_rows('steps', steps, [t[n_fixed, s] for s in steps], 'step', f'N={n_fixed}', 20, 80)
    return out + memory_rows((256, 8192), repeats=1) if quick else out + memory_rows((512, 65536))

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer repeats, smaller N for memory (about 20 s)')
    ap.add_argument('--threads', type=int, default=1, help='torch threads (also given to the sampling subprocesses)')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(machine())
    print_rows(rows(a.quick))

if __name__ == '__main__': main()
