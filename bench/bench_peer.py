"""Against a peer library: the same trained model sampled by the toolkit's DDIM and DDPM samplers and by diffusers'
`DDIMScheduler` / `DDPMScheduler` loops, from the same noise.

A small epsilon-prediction MLP is trained on the `ddpm` path (DiT's linear betas, 1000 steps) on the 32-D Gaussian
mixture. Both libraries then sample it on diffusers' own timesteps ('leading' spacing: 980, 960, ..., 0 for 50 steps;
the toolkit's time of step k is t = (k + 1) / 1000, so the grid is passed to the toolkit's samplers as those times and
then t = 0). The initial noise, and DDPM's noise on every step, come from one generator per sample in both (diffusers'
`randn_tensor` takes a list of generators). Printed rows:
  - agreement: the largest |ours - theirs| over all samples and coordinates, relative to the samples' RMS
    (goal <= 1e-4: float32 round-off, which the toolkit's eps -> x0 -> eps conversion amplifies near t = 1);
  - the loops' own overhead, around a network that costs nothing: ours / diffusers' (goal <= 1.0);
  - speed: our sampling time / diffusers' loop time, medians of interleaved repeats (goal <= 1.0). The network is
    called the same way in both (one time for the batch, an expanded tensor, as diffusers' UNets make it), so the
    ratio compares the sampler loops around identical forwards.

    python bench/bench_peer.py [--batch 256] [--steps 50] [--repeats 15] [--threads 1] [--quick]
Needs diffusers (`pip install -e ".[bench]"`).
"""
import argparse, sys, tempfile
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from common import median_times, row, machine, print_rows
from nag_toolkit.core import sample_generators, randn_per_sample
from nag_toolkit.guidance import Denoiser
from nag_toolkit.samplers import sample_ddim, sample_ddpm
from nag_toolkit.train import train
from nag_toolkit.checkpoint import load_model

BETAS = dict(num_train_timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02)

def trained_eps_model(steps:int=300, out=None):
    "An epsilon-prediction MLP on the `ddpm` path, trained briefly on gmm32 (the CLI's training loop, in process)."
    out = out or tempfile.mkdtemp(prefix='nag_peer_')
    train({'dataset': 'gmm32', 'model': 'mlp', 'path': 'ddpm', 'pred': 'eps', 'steps': steps, 'batch_size': 256,
           'model_options': {'width': 256, 'depth': 3}, 'log_every': steps, 'ckpt_every': steps, 'device': 'cpu', 'out': out})
    net, state = load_model(out)
    assert state['pred'] == 'eps', state['pred']
    return net

def _noise_and_generators(n, dim, seed):
    "Initial noise from per-sample generators, and those generators (their streams continue with the steps' noise)."
    gens = sample_generators(seed, range(n))
    return randn_per_sample((dim,), gens), gens

def ours(kind, net, n, dim, k_steps, y, seed=0):
    "The toolkit's DDIM (eta = 0) or DDPM (fixed-small variance) on the times of diffusers' timesteps."
    x, gens = _noise_and_generators(n, dim, seed)
    ts = torch.cat([(k_steps.double() + 1) / 1000, torch.zeros(1, dtype=torch.float64)])
    den = Denoiser(net, 'ddpm', pred='eps')            # trained on eps targets (the run's state['pred'])
    if kind == 'ddim': return sample_ddim(den, x, ts, 'ddpm', extra_args={'y': y})
    return sample_ddpm(den, x, ts, 'ddpm', extra_args={'y': y}, generators=gens, variance='beta_tilde')

def theirs(kind, net, n, dim, steps, y, seed=0):
    "diffusers' scheduler loop: the network sees t = (k + 1) / 1000 for diffusers' timestep k."
    from diffusers import DDIMScheduler, DDPMScheduler
    x, gens = _noise_and_generators(n, dim, seed)
    if kind == 'ddim': sched = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, prediction_type='epsilon')
    else: sched = DDPMScheduler(**BETAS, clip_sample=False, variance_type='fixed_small', prediction_type='epsilon')
    sched.set_timesteps(steps)
    with torch.no_grad():
        for k in sched.timesteps:
            eps = net(x, torch.tensor((int(k) + 1) / 1000).expand(n), y=y)   # one time for the batch, as diffusers' UNets expand it
            x = sched.step(eps, k, x, generator=gens).prev_sample if kind == 'ddpm' else sched.step(eps, k, x, eta=0.0).prev_sample
    return x

class NullEps(torch.nn.Module):
    "A network that costs (almost) nothing: the loops' own overhead per step is what is left."
    num_classes, pred = 10, 'eps'
    def forward(self, x, t, y=None, **kw): return x * 0.5

def rows(quick:bool=False, batch:int=256, steps:int=50, repeats:int=15, train_steps:int=300):
    "Agreement and time ratio, for DDIM and DDPM."
    from diffusers import DDIMScheduler
    if quick: batch, steps, repeats, train_steps = 128, 20, 5, 100
    torch.manual_seed(0)
    net, dim = trained_eps_model(train_steps), 32
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1)) if net.num_classes else None
    s = DDIMScheduler(**BETAS); s.set_timesteps(steps)
    k_steps = s.timesteps.clone()                                  # diffusers' timesteps, descending
    out = []
    for kind in ('ddim', 'ddpm'):
        a, b = ours(kind, net, batch, dim, k_steps, y), theirs(kind, net, batch, dim, steps, y)
        rel = float((a - b).abs().max() / b.pow(2).mean().sqrt())
        out.append(row(f'peer, {kind.upper()}: max |ours - diffusers| / RMS of the samples', rel, '<= 1e-4', 'rel',
                       f'{batch} samples, {steps} steps, same per-sample noise'))
        m = median_times({'ours': lambda: ours(kind, net, batch, dim, k_steps, y),
                          'theirs': lambda: theirs(kind, net, batch, dim, steps, y)}, repeats)
        out.append(row(f'peer, {kind.upper()}: our time / diffusers {"DDIMScheduler" if kind == "ddim" else "DDPMScheduler"} loop',
                       m['ours'] / m['theirs'], '<= 1.0',
                       detail=f"{m['ours'] * 1e3:.1f} ms vs {m['theirs'] * 1e3:.1f} ms for {batch} samples x {steps} steps"))
    for kind in ('ddim', 'ddpm'):       # the loops alone, around a network that costs nothing
        net0 = NullEps()
        m = median_times({'ours': lambda: ours(kind, net0, batch, dim, k_steps, y),
                          'theirs': lambda: theirs(kind, net0, batch, dim, steps, y)}, 3 * repeats)
        out.append(row(f'peer, {kind.upper()}: our loop overhead / diffusers loop overhead (network costs nothing)',
                       m['ours'] / m['theirs'], '<= 1.0',
                       detail=f"{m['ours'] / steps * 1e6:.0f} us vs {m['theirs'] / steps * 1e6:.0f} us per step, {batch} samples"))
    return out

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--batch', type=int, default=256); ap.add_argument('--steps', type=int, default=50)
    ap.add_argument('--repeats', type=int, default=15); ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--quick', action='store_true')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    print(machine())
    print_rows(rows(a.quick, a.batch, a.steps, a.repeats))

if __name__ == '__main__': main()
