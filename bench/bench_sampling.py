"""Benchmark (not a test): what guidance costs around a sampler step, on CPU, with a small MLP denoiser.

Prints three ratios, each from medians of repeated, interleaved timings in this one run:
  1. sampler overhead = time(N guided Euler steps) / (N * time of the one batched 3-branch forward they need);
  2. guided step (CFG + NAG, three branches in one forward) / unguided step, at equal per-sample batch;
  3. guided step (one batched forward) / three separate forwards with the same mix.
Run: python bench/bench_sampling.py [--batch 256] [--dim 64] [--hidden 512] [--steps 50] [--repeats 15] [--threads N]
"""
import argparse, math, statistics, time
import torch
from torch import nn
from nag_toolkit.guidance import Denoiser, GuidedDenoiser
from nag_toolkit.samplers import sample_euler, time_grid

class MLP(nn.Module):
    "A velocity MLP with the toolkit's network interface: time and class embeddings, learned null-t and null-class tokens."
    pred = 'v'
    def __init__(self, dim=64, hidden=512, num_classes=10, depth=3, n_freq=16):
        super().__init__()
        self.num_classes, self.freqs = num_classes, torch.exp(torch.linspace(0, math.log(1000), n_freq))
        self.t_proj, self.null_t = nn.Linear(2 * n_freq, hidden), nn.Parameter(torch.zeros(hidden))
        self.y_emb = nn.Embedding(num_classes + 1, hidden)                  # id num_classes: the null class
        self.inp, self.out = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))

    def forward(self, x, t, y=None, null_t=None, null_y=None):
        f = t[:, None].float() * self.freqs
        te = self.t_proj(torch.cat([f.sin(), f.cos()], 1))
        if null_t is not None: te = torch.where(null_t[:, None], self.null_t, te)
        y = torch.zeros(len(x), dtype=torch.long) if y is None else y
        if null_y is not None: y = torch.where(null_y, self.num_classes, y)
        h = self.inp(x) + te + self.y_emb(y)
        for b in self.blocks: h = h + b(h)
        return self.out(h)

def median_times(fns:dict, repeats:int)->dict:
    "Median wall time of each `fn()`, timed in interleaved rounds (so slow drifts of a shared machine hit all alike)."
    for fn in fns.values(): fn(); fn()                                      # warm up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter(); fn(); times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--batch', type=int, default=256); ap.add_argument('--dim', type=int, default=64)
    ap.add_argument('--hidden', type=int, default=512); ap.add_argument('--steps', type=int, default=50)
    ap.add_argument('--repeats', type=int, default=15)
    ap.add_argument('--threads', type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on a shared machine")
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = MLP(a.dim, a.hidden).eval()
    den = Denoiser(net, 'linear')
    guided = GuidedDenoiser(den, w_cfg=1.5, w_nag=0.5)
    B, ts = a.batch, time_grid(a.steps, t_max=1.0)
    x, y, t = torch.randn(B, a.dim), torch.randint(0, 10, (B,)), torch.full((B,), 0.5)
    off = torch.zeros(B, dtype=torch.bool)
    masks = {'null_y': torch.cat([off, ~off, off]), 'null_t': torch.cat([off, off, ~off])}
    x3, y3, t3 = x.repeat(3, 1), y.repeat(3), t.repeat(3)

    def three_separate():
        c = net(x, t, y=y); u_y = net(x, t, y=y, null_y=~off); u_t = net(x, t, y=y, null_t=~off)
        return den.to_x0(c + 1.5 * (c - u_y) + 0.5 * (c - u_t), x, t)

    with torch.no_grad():
        m = median_times({'fwd3': lambda: net(x3, t3, y=y3, **masks), 'step_g': lambda: guided(x, t, y=y),
                          'step_u': lambda: den(x, t, y=y), 'sep': three_separate,
                          'sample_g': lambda: sample_euler(guided, x, ts, 'linear', extra_args={'y': y}),
                          'sample_u': lambda: sample_euler(den, x, ts, 'linear', extra_args={'y': y})}, a.repeats)
    fwd3, step_g, step_u, sep, sample_g, sample_u = (m[k] for k in ('fwd3', 'step_g', 'step_u', 'sep', 'sample_g', 'sample_u'))
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; MLP dim={a.dim} hidden={a.hidden}, "
          f"batch {B} per branch, {a.steps} Euler steps, medians of {a.repeats} repeats")
    print(f"batched 3-branch forward: {fwd3 * 1e3:.3f} ms; guided step: {step_g * 1e3:.3f} ms; unguided step: {step_u * 1e3:.3f} ms; "
          f"three separate forwards + mix: {sep * 1e3:.3f} ms")
    print(f"1. sampler overhead, time({a.steps} guided steps) / ({a.steps} x batched forward): {sample_g / (a.steps * fwd3):.3f}")
    print(f"2. guided step / unguided step (equal per-sample batch): {step_g / step_u:.3f}  "
          f"(whole runs of {a.steps} steps: {sample_g / sample_u:.3f})")
    print(f"3. guided step (one batched forward) / three separate forwards: {step_g / sep:.3f}")

if __name__ == '__main__': main()
