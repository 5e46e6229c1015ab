"""Benchmark (not a test): what guidance costs around a sampler step, on CPU, with the toolkit's MLP denoiser.

Prints three ratios, each from medians of repeated, interleaved timings in this one run:
  1. sampler overhead = time(N guided Euler steps) / (N * time of the one batched 3-branch forward they need);
  2. guided step (CFG + NAG, three branches in one forward) / unguided step, at equal per-sample batch;
  3. guided step (one batched forward) / three separate forwards with the same mix.
Run: python bench/bench_sampling.py [--batch 256] [--dim 64] [--hidden 512] [--steps 50] [--repeats 15] [--threads N]
"""
import argparse, statistics, time
import torch
from nag_toolkit.models import build_model
from nag_toolkit.guidance import Denoiser, GuidedDenoiser
from nag_toolkit.samplers import sample_euler, time_grid

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
    ap.add_argument('--hidden', type=int, default=256); ap.add_argument('--steps', type=int, default=50)
    ap.add_argument('--repeats', type=int, default=15)
    ap.add_argument('--threads', type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on a shared machine")
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = build_model('mlp', dim=a.dim, width=a.hidden, depth=3, num_classes=10).eval()   # the toolkit's own MLP denoiser
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
