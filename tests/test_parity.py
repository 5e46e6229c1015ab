"""Parity with the official loops. On official-layout DiT-S/2 weights (set by hand, see `_net`, so that the outputs and
the variance values are non-trivial and a DDPM run stays O(1)), the toolkit's samplers and loss equal
references written here from the official formulas: DiT's respaced `p_sample_loop` (`diffusion/gaussian_diffusion.py`,
`diffusion/respace.py`) and `training_losses`, and SiT's `sample_sde` / `sample_ode` (`transport/transport.py`,
`transport/integrators.py`, `transport/path.py`). The references call the network with exactly what the official code
feeds its time embedder (DiT's original integer step, SiT's time t'), and both sides draw their noise from torch's
global generator seeded alike, so the comparison is sample for sample."""
import math
import numpy as np
import pytest, torch
from torchdiffeq import odeint
from nag_toolkit.models import build_model
from nag_toolkit.guidance import Denoiser
from nag_toolkit.samplers import time_grid, sde_grid, sample_ddpm, sample_euler_maruyama, sample_euler, sample_ode
from nag_toolkit.interpolants import get_interpolant
from nag_toolkit.train import batch_loss

C, S, N, B = 4, 8, 1, 20.0                          # latent channels, input size, batch; see _net

def _net(t_embed:str):
    """A DiT-S/2 in the official layout (learn_sigma) whose weights make it a near pass-through: patch embedding and
    output layer chosen so that the prediction is about the input (a sensible eps at high noise, so a DDPM run stays
    O(1) instead of growing 150-fold), with every zero-initialised layer perturbed (adaLN of all blocks, the final
    layer), so that the prediction depends on t and y and the variance values are non-trivial (std about 0.5)."""
    torch.manual_seed(0)
    net = build_model('DiT-S/2', input_size=S, in_channels=C, num_classes=10, learn_sigma=True, t_embed=t_embed)
    p, hidden = net.patch_size, net.pos_embed.shape[-1]
    with torch.no_grad():
        for name, w in net.named_parameters():
            if 'adaLN_modulation' in name or 'final_layer' in name: w.normal_(0, 0.02)
        net.pos_embed.zero_()
        pe, fl = net.x_embedder.proj.weight, net.final_layer.linear.weight     # [hidden, C, p, p], [p * p * 2C, hidden]
        pe.zero_(); net.x_embedder.proj.bias.zero_()
        net.x_embedder.proj.bias[C * p * p] = B                        # a constant unit: LayerNorm's scale ~ fixed
        fl[:, :] = torch.randn(fl.shape) * 0.001                               # a little noise on the prediction ...
        fl.view(p * p, 2 * C, hidden)[:, C:] = torch.randn(p * p, C, hidden) * 0.03   # ... the variance values
        for c in range(C):
            for i in range(p):
                for k in range(p):
                    j = (c * p + i) * p + k                                    # hidden unit j carries input (c, i, k)
                    pe[j, c, i, k] = 1.0
                    fl[(i * p + k) * 2 * C + c, j] += ((p * p * C + B * B) / hidden) ** 0.5   # LayerNorm's scale undone
    return net.eval()

def _official(net, x, s, y):
    "The network called the official way: its time embedder sees `s` exactly (DiT's integer step, SiT's t')."
    net.timestep_input = lambda t: torch.as_tensor(s, dtype=torch.float32).expand(len(x))
    try: return net(x, torch.zeros(len(x)), y)
    finally: del net.timestep_input

def rel_l2(a, b): return ((a - b).norm() / b.norm()).item()

# --- DiT: GaussianDiffusion with respacing, p_sample_loop ---------------------------------------------------------

def _space_timesteps(T, n):
    "DiT's `space_timesteps(T, [n])`."
    stride, cur, out = (T - 1) / (n - 1), 0.0, []
    for _ in range(n): out.append(round(cur)); cur += stride
    return set(out)

def _dit_respaced(n):
    "The float64 tables of DiT's `create_diffusion(str(n))`, and its timestep map."
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    use, last, new_b, tmap = _space_timesteps(1000, n), 1.0, [], []
    for i, ab in enumerate(np.cumprod(1 - betas)):
        if i in use: new_b.append(1 - ab / last); last = ab; tmap.append(i)
    b = np.array(new_b); ab = np.cumprod(1 - b); prev = np.append(1.0, ab[:-1])
    pv = b * (1 - prev) / (1 - ab)
    return tmap, {'b': b, 'pv': pv, 'log_pv_clipped': np.log(np.append(pv[1], pv[1:])),
                  'c1': b * np.sqrt(prev) / (1 - ab), 'c2': (1 - prev) * np.sqrt(1 - b) / (1 - ab),
                  'recip': np.sqrt(1 / ab), 'recipm1': np.sqrt(1 / ab - 1), 'large': np.append(pv[1], b[1:])}

def dit_p_sample_loop(net, noise, y, n, var_type):
    "DiT's `p_sample_loop(clip_denoised=False)` on `create_diffusion(str(n))`, learn_sigma output (eps, then v)."
    tmap, tab = _dit_respaced(n)
    ex = lambda name, i: torch.tensor(tab[name][i]).float()          # _extract_into_tensor: float64 -> float32
    img = noise
    for i in reversed(range(n)):
        eps, v = _official(net, img, tmap[i], y).split(C, dim=1)     # the network sees the original step index
        x0 = ex('recip', i) * img - ex('recipm1', i) * eps
        mean = ex('c1', i) * x0 + ex('c2', i) * img
        if var_type == 'learned':
            frac = (v + 1) / 2
            log_var = frac * torch.tensor(np.log(tab['b'][i])).float() + (1 - frac) * ex('log_pv_clipped', i)
        elif var_type == 'fixed_small': log_var = ex('log_pv_clipped', i)
        else: log_var = torch.tensor(np.log(tab['large'][i])).float()
        z = torch.randn_like(img)                                    # drawn after the call, on every step
        img = mean + float(i != 0) * torch.exp(0.5 * log_var) * z
    return img

VARIANCES = {'fixed_small': 'beta_tilde', 'fixed_large': 'beta', 'learned': 'learned'}

@pytest.fixture(scope='module')
def dit(): return _net('dit')

@torch.no_grad()
@pytest.mark.parametrize('n', [250, 25])
@pytest.mark.parametrize('dit_var', list(VARIANCES))
def test_ddpm_equals_dits_p_sample_loop(dit, dit_var, n):
    "sample_ddpm on DiT's respaced grid equals DiT's loop for all three variances: relative L2 gap <= 2e-3."
    torch.manual_seed(1)
    noise, y = torch.randn(N, C, S, S), torch.tensor([3, 7])[:N]
    torch.manual_seed(2); ref = dit_p_sample_loop(dit, noise, y, n, dit_var)
    torch.manual_seed(2)
    ours = sample_ddpm(Denoiser(dit, 'ddpm'), noise, time_grid(n, 'ddpm'), 'ddpm', extra_args={'y': y},
                       variance=VARIANCES[dit_var])
    assert rel_l2(ours, ref) <= 2e-3, rel_l2(ours, ref)

@torch.no_grad()
def test_the_variance_matters_on_this_network(dit):
    "The test is not blind to the variance: learned and fixed small differ by far more than the gate."
    torch.manual_seed(1)
    noise, y = torch.randn(N, C, S, S), torch.tensor([3, 7])[:N]
    torch.manual_seed(2); a = dit_p_sample_loop(dit, noise, y, 25, 'learned')
    torch.manual_seed(2); b = dit_p_sample_loop(dit, noise, y, 25, 'fixed_small')
    assert rel_l2(a, b) > 1e-2, rel_l2(a, b)

# --- DiT: training_losses with learn_sigma (MSE + VB, mean detached) -----------------------------------------------

def _normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))

def _approx_cdf(x): return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))

def _discretized_ll(x, means, log_scales):
    c, inv = x - means, torch.exp(-log_scales)
    cdf_plus, cdf_min = _approx_cdf(inv * (c + 1.0 / 255.0)), _approx_cdf(inv * (c - 1.0 / 255.0))
    log = lambda v: torch.log(v.clamp(min=1e-12))
    mid = torch.where(x > 0.999, log(1.0 - cdf_min), log(cdf_plus - cdf_min))
    return torch.where(x < -0.999, torch.log(cdf_plus.clamp(min=1e-12)), mid)

def dit_training_losses(net, x_start, k, y, noise):
    "DiT's `training_losses` (loss_type MSE, LEARNED_RANGE, eps prediction) on the full 1000-step process."
    tmap, tab = _dit_respaced(1000)
    ex = lambda name: torch.tensor(tab[name][k.numpy()]).float().reshape(-1, 1, 1, 1)
    ab = np.cumprod(1 - tab['b'])
    x_t = torch.tensor(np.sqrt(ab)[k.numpy()]).float().reshape(-1, 1, 1, 1) * x_start + \
          torch.tensor(np.sqrt(1 - ab)[k.numpy()]).float().reshape(-1, 1, 1, 1) * noise
    eps, v = _official(net, x_t, k.float(), y).split(C, dim=1)
    frozen = eps.detach()                                                 # the VB term does not train the mean
    x0 = ex('recip') * x_t - ex('recipm1') * frozen
    mean, true_mean = ex('c1') * x0 + ex('c2') * x_t, ex('c1') * x_start + ex('c2') * x_t
    frac = (v + 1) / 2
    log_beta = torch.tensor(np.log(tab['b'])[k.numpy()]).float().reshape(-1, 1, 1, 1)
    log_var = frac * log_beta + (1 - frac) * ex('log_pv_clipped')
    kl = _normal_kl(true_mean, ex('log_pv_clipped'), mean, log_var).mean((1, 2, 3)) / np.log(2.0)
    nll = -_discretized_ll(x_start, mean, 0.5 * log_var).mean((1, 2, 3)) / np.log(2.0)
    vb = torch.where(k == 0, nll, kl)
    return ((noise - eps) ** 2).mean((1, 2, 3)) + vb

def test_hybrid_loss_equals_dits_training_losses(dit):
    "batch_loss of a learn_sigma DiT on the ddpm path is DiT's mse + vb per row (k = 0: decoder NLL), gradients too."
    torch.manual_seed(3)
    k = torch.tensor([0, 1, 37, 999])
    x0, noise, y = torch.rand(4, C, S, S) * 2 - 1, torch.randn(4, C, S, S), torch.tensor([0, 1, 2, 3])
    ref = dit_training_losses(dit, x0, k, y, noise)
    g_ref = torch.autograd.grad(ref.sum(), dit.final_layer.linear.weight)[0]
    off = torch.zeros(4, dtype=torch.bool)
    batch = {'x0': x0, 'eps': noise, 't': (k + 1).float() / 1000, 'y': y, 'null_t': off, 'null_y': off}
    dit.timestep_input = lambda t: k.float()        # the step as DiT feeds it (t = (k + 1) / 1000 rounds in float32)
    try: ours = batch_loss(dit, batch, get_interpolant('ddpm'), 'eps')
    finally: del dit.timestep_input
    g_ours = torch.autograd.grad(ours.sum(), dit.final_layer.linear.weight)[0]
    assert rel_l2(ours, ref) <= 1e-4, (ours, ref)
    assert rel_l2(g_ours, g_ref) <= 1e-4
    mse_only = batch_loss(dit, {**batch}, get_interpolant('linear'), 'eps')
    assert (ours - mse_only).abs().max() > 1e-3                              # the VB term is there

# --- SiT: sample_sde (Euler-Maruyama, 'sigma', Mean) and sample_ode ---------------------------------------------------

@pytest.fixture(scope='module')
def sit(): return _net('sit')

def _sit_velocity(net, y):
    "SiT's model(x, t', y): the velocity dx/dt' (the toolkit's DiT flips it to d/dt; SiT's own output is the raw one)."
    return lambda x, tp: -_official(net, x, tp, y)[:, :C]

def _sit_score(v, x, tp):
    "SiT's `get_score_from_velocity` for the Linear path (alpha = t', sigma = 1 - t')."
    alpha, d_alpha, sigma, d_sigma = tp, 1.0, 1 - tp, -1.0
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)

def sit_sample_sde(model, init, num_steps=250, last_step_size=0.04, norm=1.0):
    "SiT's `sample_sde(sampling_method='Euler', diffusion_form='sigma', last_step='Mean')` for Linear/velocity."
    t = torch.linspace(0, 1 - last_step_size, num_steps)
    dt = t[1] - t[0]
    drift = lambda x, tp: (lambda v: v + norm * (1 - tp) * _sit_score(v, x, tp))(model(x, tp))
    x = init
    for ti in t[:-1]:
        w = torch.randn(x.size()).to(x)                                   # drawn before the network call
        x = x + drift(x, ti) * dt + torch.sqrt(2 * norm * (1 - ti)) * (w * torch.sqrt(dt))
    return x + drift(x, t[-1]) * last_step_size

@torch.no_grad()
def test_sit_sde_default_equals_sits_sample_sde(sit):
    "SiT-XL/2's FID 8.61 sampler: one call here equals SiT's loop sample for sample (relative L2 gap <= 2e-3)."
    torch.manual_seed(4)
    init, y = torch.randn(N, C, S, S), torch.tensor([5, 9])[:N]
    torch.manual_seed(5); ref = sit_sample_sde(_sit_velocity(sit, y), init)
    torch.manual_seed(5)
    ours = sample_euler_maruyama(Denoiser(sit, 'linear'), init, sde_grid(250, 0.04), 'linear', extra_args={'y': y},
                                 diffusion_form='sigma', diffusion_norm=1.0, last_step='mean')
    assert rel_l2(ours, ref) <= 2e-3, rel_l2(ours, ref)

@torch.no_grad()
def test_sit_sde_norm_means_what_it_means_in_sit(sit):
    "On 25 steps: norm 1 matches SiT's norm 1, and the old loop's diffusion (half of SiT's, i.e. norm 0.5) does not."
    torch.manual_seed(4)
    init, y = torch.randn(N, C, S, S), torch.tensor([5])
    torch.manual_seed(5); ref = sit_sample_sde(_sit_velocity(sit, y), init, num_steps=25)
    run = lambda norm: sample_euler_maruyama(Denoiser(sit, 'linear'), init, sde_grid(25, 0.04), 'linear',
                                             extra_args={'y': y}, diffusion_norm=norm)
    torch.manual_seed(5); one = run(1.0)
    torch.manual_seed(5); half = run(0.5)
    assert rel_l2(one, ref) <= 2e-3 and rel_l2(half, ref) > 2e-2, (rel_l2(one, ref), rel_l2(half, ref))

@torch.no_grad()
def test_euler_ode_equals_sits_sample_ode_euler(sit):
    "SiT's `sample_ode(sampling_method='euler', num_steps=50)` is sample_euler on time_grid(49): gap <= 1e-3."
    torch.manual_seed(6)
    init, y = torch.randn(N, C, S, S), torch.tensor([1, 2])[:N]
    v = _sit_velocity(sit, y)
    ref = odeint(lambda tp, x: v(x, tp), init, torch.linspace(0, 1, 50), method='euler')[-1]
    ours = sample_euler(Denoiser(sit, 'linear'), init, time_grid(49), 'linear', extra_args={'y': y})
    assert rel_l2(ours, ref) <= 1e-3, rel_l2(ours, ref)

@torch.no_grad()
def test_dopri5_equals_sits_sample_ode(sit):
    """SiT's default ODE sampler (dopri5, atol 1e-6, rtol 1e-3): sample_ode takes as many evaluations and lands within
    the solver's tolerance (the two differ only by float rounding of the times the network sees)."""
    torch.manual_seed(7)
    init, y = torch.randn(N, C, S, S), torch.tensor([4, 6])[:N]
    v, nfe_ref = _sit_velocity(sit, y), [0]
    def f(tp, x): nfe_ref[0] += 1; return v(x, tp)
    ref = odeint(f, init, torch.linspace(0, 1, 50), method='dopri5', atol=[1e-6], rtol=[1e-3])[-1]
    seen = []
    ours = sample_ode(Denoiser(sit, 'linear'), init, time_grid(49), 'linear', extra_args={'y': y}, callback=seen.append)
    assert rel_l2(ours, ref) <= 1e-3, rel_l2(ours, ref)
    assert abs(seen[-1]['nfe'] - nfe_ref[0]) <= 6, (seen[-1]['nfe'], nfe_ref[0])
