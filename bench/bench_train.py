"""Training benchmarks, printed as ratios measured in one run (medians of interleaved repeats).

1. Noise-condition dropout: training throughput with p_drop = 0.1 over p_drop = 0 (goal >= 0.98), for the mixture
   MLP and the digits U-Net on CPU.
2. CPU throughput (steps/s, samples/s) of the mixture and digits trainings.
The DiT-XL/2 training step on a GPU is in bench/bench_gpu.py.

    python bench/bench_train.py [--repeats 11] [--steps 20] [--quick]
"""
import argparse, statistics, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from common import row, machine, print_rows
from nag_toolkit.train import TrainConfig, setup, train_step, draw_batch, _to

def _time_steps(run, net, steps, start):
    "Seconds per step over `steps` training steps (after the run's first step)."
    dev = run['device']
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' else (lambda: None)
    batches = [_to(draw_batch(run['ds'], start + i, run['cfg']), dev) for i in range(steps)]
    sync(); t0 = time.perf_counter()
    for b in batches: train_step(run, net, b)
    sync()
    return (time.perf_counter() - t0) / steps

def dropout_ratio(dataset, model, batch, steps, repeats, **opts):
    "Median steps/s with p_drop=0.1 over p_drop=0, interleaved; also the raw throughputs."
    runs = {}
    for p in (0.0, 0.1):
        d = tempfile.mkdtemp()
        runs[p] = setup(TrainConfig(dataset=dataset, model=model, batch_size=batch, p_drop=p, out=d, **opts))
        _time_steps(runs[p], runs[p]['model'], 3, 0)     # warm-up
    times = {0.0: [], 0.1: []}
    for r in range(repeats):
        for p in (0.0, 0.1): times[p].append(_time_steps(runs[p], runs[p]['model'], steps, 100 * (r + 1)))
    med = {p: statistics.median(v) for p, v in times.items()}
    return med[0.0] / med[0.1], med

def rows(quick:bool=False, steps:int=20, repeats:int=11)->list:
    "The dropout throughput ratio and the CPU throughput, for the mixture MLP and the digits U-Net."
    if quick: steps, repeats = 5, 3
    out = []
    for dataset, model, batch in (('gmm32', 'mlp', 256), ('digits', 'digits', 128)):
        ratio, med = dropout_ratio(dataset, model, batch, steps, repeats, device='cpu')
        out += [row(f'noise-condition dropout: training throughput with / without, {model}', ratio, '>= 0.98',
                    detail=f'p_drop 0.1 vs 0, {dataset}, batch {batch}'),
                row(f'CPU training throughput, {model} on {dataset}', 1 / med[0.1], unit='steps/s',
                    detail=f'batch {batch}: {batch / med[0.1]:.0f} samples/s')]
    return out

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--repeats', type=int, default=11); ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--quick', action='store_true')
    a = ap.parse_args()
    print(machine()); print_rows(rows(a.quick, a.steps, a.repeats))

if __name__ == '__main__': main()
