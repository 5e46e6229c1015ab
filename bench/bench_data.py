"""Benchmark (not a test): training from memory-mapped latent shards, on CPU.

Prints the machine, then one row per measurement (made in this one run):
  1. flat memory: the peak resident memory of `nag-toolkit train` on a synthetic latent shard folder of 1,048,576
     rows (4x32x32 float16, ImageNet 256's latent shape: 8 GiB) above the process's size once the toolkit is
     imported, over the same run on 10,240 rows (goal <= 1.1; a fresh process each, batches read in the loop, so
     every page the reads touch counts), and the run's whole peak over the dataset's size (goal <= 0.25; loading
     it, as before, needs twice the dataset as float32);
  2. throughput: training steps/s reading batches from the memory-mapped shards over steps/s with the same rows
     held in memory as one tensor, same batch and model, batches read in the loop (no worker to hide the reads;
     goal >= 0.9), medians of interleaved repeats;
  3. two gloo processes (`torchrun --standalone --nproc_per_node=2`) on float16 shards: each rank's reads are
     logged and checked to be exactly its half of every step's global batch (disjoint, together the whole batch),
     and the weights after training agree with one process (goal: largest difference <= 1e-5).
Run: python bench/bench_data.py [--quick] [--json]    (about 5 min on 2 CPU cores and 8 GiB of disk; --quick: smaller folders)
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from common import row, machine, print_rows, median_times
from nag_toolkit.core import sample_seed
from nag_toolkit.data import save_latent_shard, ArrayDataset, get_dataset
from nag_toolkit.checkpoint import load_checkpoint

SHAPE = (4, 8, 8)

def write_folder(path:Path, rows:int, shard_rows:int=65_536, shape=SHAPE, dtype=torch.float32, seed:int=0, block:int|None=None)->int:
    "A folder of synthetic latent shards (standard normal latents, labels in 0..999); returns its size in bytes."
    g = torch.Generator().manual_seed(seed)
    fresh = lambda n: torch.randn(n, *shape, generator=g).to(dtype)
    z = fresh(min(block, rows)) if block else None              # one block written again and again: quick to make
    for k, a in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - a)
        save_latent_shard(path / f'shard_{k:05d}', fresh(n) if z is None else z[:n], torch.randint(1000, (n,), generator=g), {'num_classes': 1000})
    return sum(p.stat().st_size for p in path.iterdir())

# The child imports the toolkit, resets the kernel's peak-RSS mark (/proc/self/clear_refs, "5"), trains in process
# and reports its resident memory then and its peak since (as bench_scaling.py does for sampling).
_CHILD = """
import json, sys
import nag_toolkit.cli, nag_toolkit.train
def status(key): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) / 1024
open('/proc/self/clear_refs', 'w').write('5')
base = status('VmRSS:')
nag_toolkit.cli.main(sys.argv[1:])
print(json.dumps({'base': base, 'peak': status('VmHWM:')}))
"""

BIG = (4, 32, 32)     # ImageNet 256's latent shape, stored as float16: 8 KiB a row, 8 GiB for 1,048,576 rows

def train_growth_mib(folder:Path, out:Path, steps:int, batch:int)->tuple:
    "`(growth, peak)` in MiB: `nag-toolkit train` on `folder`, peak resident memory above the imported process, and the peak."
    args = ['train', '--dataset', 'latents', '--set', f'dataset_options.path={folder}', '--model', 'digits', '--set', 'model_options.in_channels=4',
            '--set', 'model_options.channels=8', '--batch-size', str(batch), '--steps', str(steps), '--log-every', str(steps),
            '--ckpt-every', str(steps), '--device', 'cpu', '--out', str(out)]
    env = {**os.environ, 'OMP_NUM_THREADS': str(torch.get_num_threads())}
    p = subprocess.run([sys.executable, '-c', _CHILD, *args], capture_output=True, text=True, env=env)
    if p.returncode: raise RuntimeError(f"train failed:\n{(p.stdout + p.stderr)[-2000:]}")
    m = json.loads(p.stdout.strip().splitlines()[-1])
    if load_checkpoint(out)['state']['step'] != steps: raise RuntimeError(f"{out} did not reach step {steps}")
    return m['peak'] - m['base'], m['peak']

def memory_rows(d:Path, sizes, steps:int, batch:int, repeats:int)->list:
    "Peak memory growth at the largest folder over the smallest (least of `repeats` runs each), and the peak over its size."
    growth, peak, size = {}, {}, {}
    for n in sizes:
        size[n] = write_folder(d / f'lat_{n}', n, shape=BIG, dtype=torch.float16, block=65_536) / 2**20
        runs = [train_growth_mib(d / f'lat_{n}', d / f'run_{n}_{r}', steps, batch) for r in range(repeats)]
        growth[n], peak[n] = min(g for g, _ in runs), min(p for _, p in runs)
    lo, hi = sizes
    return [row(f'training on latent shards, peak memory above the imported process: {hi:,} rows / {lo:,} rows', growth[hi] / growth[lo], '<= 1.1',
                detail=f"{growth[hi]:.1f} / {growth[lo]:.1f} MiB (least of {repeats} runs); {steps} steps of batch {batch}, digits U-Net, "
                       f"batches read in the loop; shards of {BIG} float16 ({size[hi]:.0f} / {size[lo]:.0f} MiB)"),
            row(f'training on latent shards, peak resident memory / dataset size, {hi:,} rows', peak[hi] / size[hi], '<= 0.25',
                detail=f"peak {peak[hi]:.0f} MiB (torch and the toolkit included) for a {size[hi]:.0f} MiB folder; at {lo:,} rows: "
                       f"{peak[lo]:.0f} MiB; holding the folder as float32, as before, would add {2 * size[hi]:.0f} MiB")]

def throughput_row(d:Path, rows:int, batch:int, steps:int, repeats:int)->list:
    "Training steps/s with batches read from the memory-mapped shards over the same with the rows held in memory."
    from nag_toolkit.train import TrainConfig, setup, train_step, draw_batch, _to
    size = write_folder(d / 'lat_speed', rows) / 2**20
    cfg = TrainConfig(dataset='latents', dataset_options={'path': str(d / 'lat_speed')}, model='digits',
                      model_options={'in_channels': 4, 'channels': 16}, batch_size=batch, device='cpu')
    runs = {k: setup(TrainConfig(**{**cfg.__dict__, 'out': str(d / f'speed_{k}')})) for k in ('mapped', 'memory')}
    mapped = runs['mapped']['ds']
    runs['memory']['ds'] = ArrayDataset(*mapped.read(range(len(mapped))), meta=dict(mapped.meta))   # the same rows, in memory
    at = {'step': 0}
    def steps_of(run):
        def go():
            for _ in range(steps):
                at['step'] += 1
                train_step(run, run['model'], _to(draw_batch(run['ds'], at['step'], run['cfg']), run['device']))
        return go
    t = median_times({k: steps_of(r) for k, r in runs.items()}, repeats, warmup=1)
    g = torch.Generator().manual_seed(1)
    read = median_times({'read': lambda: mapped.read(torch.randint(rows, (batch,), generator=g))}, 50, warmup=2)['read']
    return [row(f'training throughput, memory-mapped latent shards / the same rows in memory', t['memory'] / t['mapped'], '>= 0.9',
                detail=f"{steps / t['mapped']:.1f} vs {steps / t['memory']:.1f} steps/s, batch {batch}, digits U-Net; {rows:,} rows "
                       f"({size:.0f} MiB float32); a batch's read alone: {read * 1e3:.2f} ms (median)")]

# Each rank logs the rows it reads (the first read is setup's check on two rows), then trains as `nag-toolkit train`.
_DDP_CHILD = """
import json, os, sys
import nag_toolkit.data as D, nag_toolkit.cli
real, log = D.LatentShards.read, []
def read(self, indices):
    log.append(D.as_indices(indices, len(self)).tolist()); return real(self, indices)
D.LatentShards.read = read
nag_toolkit.cli.main(sys.argv[1:])
open(os.environ['READ_LOG'] + '.' + os.environ.get('RANK', '0'), 'w').write(json.dumps(log))
"""

def ddp_rows(d:Path, rows:int, batch:int, steps:int)->list:
    "Two gloo processes: each reads exactly its half of every global batch, and the weights match one process."
    write_folder(d / 'lat_ddp', rows, shape=(32,), dtype=torch.float16)
    args = ['train', '--dataset', 'latents', '--set', f"dataset_options.path={d / 'lat_ddp'}", '--set', 'model_options.width=64',
            '--set', 'model_options.depth=2', '--batch-size', str(batch), '--steps', str(steps), '--device', 'cpu']
    (d / 'child.py').write_text(_DDP_CHILD)
    for cmd, out in (([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'], 'ddp'), ([sys.executable], 'one')):
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'READ_LOG': str(d / f'reads_{out}')}
        p = subprocess.run(cmd + [str(d / 'child.py'), *args, '--out', str(d / out)], capture_output=True, text=True, env=env)
        if p.returncode: raise RuntimeError(f"{out} failed:\n{p.stderr[-2000:]}")
    logs = [json.loads((d / f'reads_ddp.{r}').read_text())[1:] for r in (0, 1)]
    for k in range(steps):                                    # step k's global batch, as draw_batch draws it
        idx = torch.randint(rows, (batch,), generator=torch.Generator().manual_seed(sample_seed(0, k))).tolist()
        if logs[0][k] != idx[:batch // 2] or logs[1][k] != idx[batch // 2:]: raise RuntimeError(f"step {k}: the ranks did not read their halves")
    a, b = load_checkpoint(d / 'ddp')['model'], load_checkpoint(d / 'one')['model']
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    return [row('2 gloo processes (torchrun) / 1 process on latent shards: largest weight difference', diff, '<= 1e-5', unit='abs',
                detail=f"{steps} steps of batch {batch} (float16 shards, {rows:,} rows of 32); each rank read exactly its "
                       f"{batch // 2} rows of every step's global batch ({sum(map(len, logs[0])) + sum(map(len, logs[1]))} rows in all, checked)")]

def rows(quick:bool=False)->list:
    "The benchmark's rows; `quick` uses smaller folders and fewer repeats."
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        sizes, steps = ((10_240, 131_072), 10) if quick else ((10_240, 1_048_576), 40)
        out = memory_rows(d, sizes, steps, 32, 1 if quick else 2)
        for p in d.glob('lat_*'):                               # free the disk and the page cache before timing
            for f in p.iterdir(): f.unlink()
        out += throughput_row(d, 65_536 if quick else 262_144, 128, 5 if quick else 10, 3 if quick else 7)
        return out + ddp_rows(d, 65_536, 16, 10)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='smaller folders, fewer repeats (about 1 min)')
    ap.add_argument('--threads', type=int, default=1, help='torch threads (also given to the training subprocesses)')
    ap.add_argument('--json', action='store_true', help='also print the rows as JSON (to merge into results.csv)')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(machine())
    rs = rows(a.quick)
    print_rows(rs)
    if a.json: print(json.dumps(rs))

if __name__ == '__main__': main()
