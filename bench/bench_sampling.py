"""What guidance costs around a sampler step, on CPU, for the mixture MLP and the digits U-Net (benchmark, not a test).

Rows, each a ratio of medians of interleaved repeats in this one run:
  1. sampler overhead = time(N guided Euler steps) / (N x time of the one batched 3-branch forward they need), the
     forward called as the sampler calls it (one time shared by the batch). Goal <= 1.05.
  2. a guided step (CFG + NAG, three branches in one forward) / an unguided step, equal per-sample batch. Goal <= 3.1.
  3. a guided step (one batched forward) / three separate forwards with the same mix. Goal < 1.
  4. Self-Guidance's cost per step: a guided Euler run with `self-guidance` (two branches, (c, t) and (c, t + dt), in
     one batched forward) / the same run unguided. Goal <= 2.1.
  5. the same with `self-guidance:prev=true` (SG-prev: the previous step's output is the negative branch, one forward
     per step) / the same run unguided. Goal <= 1.1.

    python bench/bench_sampling.py [--quick] [--threads 1] [--json]
With NAG_TOOLKIT_MALLOC=default in the environment the toolkit leaves glibc's allocator settings alone: that is
how `run_all.py` measures ratio 3 before the allocator fix (see `nag_toolkit.perf.tune_cpu_allocator`).
"""
import argparse, json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from common import median_times, row, machine, print_rows
from nag_toolkit.models import build_model
from nag_toolkit.guidance import Denoiser, GuidedDenoiser, guide
from nag_toolkit.samplers import sample_euler, time_grid

MODELS = {'mlp': dict(name='mlp', dim=64, width=256, depth=3, num_classes=10),
          'digits': dict(name='digits', channels=32, num_classes=10)}
SHAPES = {'mlp': (64,), 'digits': (1, 8, 8)}

def measure(model:str, batch:int, steps:int, repeats:int)->dict:
    ("Median seconds of: the batched 3-branch forward, a guided and an unguided step, three separate forwards, whole "
     "runs (guided, unguided, Self-Guidance, SG-prev).")
    torch.manual_seed(0)
    net = build_model(**MODELS[model]).eval()
    den = Denoiser(net, 'linear')
    w_cfg, w_nag = 1.5, 0.5
    guided = GuidedDenoiser(den, w_cfg=w_cfg, w_nag=w_nag)
    sg, sg_prev = guide(den, 'self-guidance:w=0.5'), guide(den, 'self-guidance:w=0.5,prev=true')
    B, ts = batch, time_grid(steps, t_max=1.0)
    x, y = torch.randn(B, *SHAPES[model]), torch.randint(0, 10, (B,))
    t = torch.tensor(0.5).expand(B)                                   # one time for the batch, as a sampler passes it
    off = torch.zeros(B, dtype=torch.bool)
    masks = {'null_y': torch.cat([off, ~off, off]), 'null_t': torch.cat([off, off, ~off])}
    x3, y3, t3 = x.repeat(3, *([1] * (x.ndim - 1))), y.repeat(3), torch.tensor(0.5).expand(3 * B)

    def three_separate():
        c = net(x, t, y=y); u_y = net(x, t, y=y, null_y=~off); u_t = net(x, t, y=y, null_t=~off)
        return den.to_x0(c + w_cfg * (c - u_y) + w_nag * (c - u_t), x, t)

    run = lambda d: lambda: sample_euler(d, x, ts, 'linear', extra_args={'y': y})     # a whole Euler run
    with torch.no_grad():
        return median_times({'fwd3': lambda: net(x3, t3, y=y3, **masks), 'step_g': lambda: guided(x, t, y=y),
                             'step_u': lambda: den(x, t, y=y), 'sep': three_separate, 'sample_g': run(guided),
                             'sample_u': run(den), 'sample_sg': run(sg), 'sample_sgp': run(sg_prev)}, repeats)

def rows(quick:bool=False, steps:int=50, repeats:int=15)->list:
    "The five ratios for the MLP (batch 256) and the digits U-Net (batch 64)."
    if quick: steps, repeats = 10, 5
    out, alloc = [], 'glibc default allocator' if os.environ.get('NAG_TOOLKIT_MALLOC', '').lower() == 'default' else 'tuned allocator'
    for model, batch in (('mlp', 256), ('digits', 64)):
        m = measure(model, batch, steps, repeats)
        what = f'{model}, batch {batch} per branch'
        out += [row(f'sampler overhead: {steps} guided Euler steps / ({steps} x batched 3-branch forward), {model}',
                    m['sample_g'] / (steps * m['fwd3']), '<= 1.05', detail=f"{what}; forward {m['fwd3'] * 1e3:.2f} ms"),
                row(f'guidance cost: 3-branch guided step / unguided step, {model}', m['step_g'] / m['step_u'], '<= 3.1',
                    detail=f"{what}; {m['step_g'] * 1e3:.2f} ms vs {m['step_u'] * 1e3:.2f} ms"),
                row(f'guidance cost: one batched 3-branch step / three separate forwards, {model}', m['step_g'] / m['sep'], '< 1',
                    detail=f"{what}; {m['step_g'] * 1e3:.2f} ms vs {m['sep'] * 1e3:.2f} ms; {alloc}")]
        per_step = lambda k: f"{m[k] / steps * 1e3:.2f} ms per step"
        out += [row(f'Self-Guidance cost per step: self-guidance (2 branches, one forward) / no guidance, {model}',
                    m['sample_sg'] / m['sample_u'], '<= 2.1',
                    detail=f"{what}; {steps}-step Euler runs; {per_step('sample_sg')} vs {per_step('sample_u')}"),
                row(f'Self-Guidance cost per step: SG-prev (one forward) / no guidance, {model}',
                    m['sample_sgp'] / m['sample_u'], '<= 1.1',
                    detail=f"{what}; {steps}-step Euler runs; {per_step('sample_sgp')} vs {per_step('sample_u')}")]
    return out

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true'); ap.add_argument('--steps', type=int, default=50)
    ap.add_argument('--repeats', type=int, default=15)
    ap.add_argument('--threads', type=int, default=1, help="torch threads (0: torch's default); 1 is steadier on a shared machine")
    ap.add_argument('--json', action='store_true', help='print the rows as JSON (for run_all.py)')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    rs = rows(a.quick, a.steps, a.repeats)
    if a.json: print(json.dumps(rs)); return
    print(machine()); print_rows(rs)

if __name__ == '__main__': main()
