"""Samplers with the exact mixture denoiser: convergence to the data, orders of accuracy, DiT's DDPM posterior,
injected randomness (batch-size independence) and the callback contract."""
import functools, math
import pytest, torch
from nag_toolkit.core import ConfigError, sample_generators, randn_per_sample
from nag_toolkit.interpolants import get_interpolant, respace
from nag_toolkit.analytic import GaussianMixture
from nag_toolkit.data import get_mixture
from nag_toolkit.samplers import run_sampler
from nag_toolkit.samplers import (time_grid, sde_grid, sample_euler, sample_heun, sample_ddpm, sample_ddim,
                                  sample_euler_maruyama, sample_dpmpp_2m, sample_ode, Denoised)

def _ring():
    "Eight Gaussians (std 0.2) on a circle of radius 2, weights proportional to 1..8."
    ang = torch.arange(8) * math.pi / 4
    return GaussianMixture(torch.stack([2 * ang.cos(), 2 * ang.sin()], 1), 0.2, weights=torch.arange(1, 9).float())

GM = _ring()
N = 2000
# The data's mean NLL (the mixture's entropy), from 40000 draws: Monte Carlo std about 1.1 / sqrt(40000) = 0.006 nats.
NLL_DATA = -GM.log_prob(GM.sample(40000, generator=torch.Generator().manual_seed(99)), 0.0, 'linear').mean().item()

def _metrics(out, path):
    "NLL gap to the data (nats) and the largest |share of a component - its weight|."
    gap = -GM.log_prob(out, 0.0, path).mean().item() - NLL_DATA
    share = torch.bincount(GM.responsibilities(out, 0.0, path).argmax(1), minlength=8) / len(out)
    return gap, (share - GM.weights.float()).abs().max().item()

_ddpm_grid = lambda n: time_grid(n, 'ddpm')
# name: (sampler, path, grid, options, few steps, many steps, NLL-gap tolerance at many steps)
# Tolerances. The per-sample NLL has std 1.1 nats, so the mean over N = 2000 samples has std 0.025: 0.1 is four
# standard deviations for a sampler with no bias left. DDPM with the fixed small variance ('beta_tilde') keeps a
# known bias at 250 steps: its kernel misses the posterior spread of x0 (c_0^2 Var[x0 | x_t]), which on modes as
# narrow as 0.2 makes the samples about 3-4 % too tight in std (gap about -0.07 to -0.15 here, shrinking with steps,
# e.g. -0.02 to -0.04 at 1000 steps), so its tolerance is 0.25.
CASES = {
    'euler': (sample_euler, 'linear', time_grid, {}, 4, 100, 0.1),
    'heun': (sample_heun, 'linear', time_grid, {}, 4, 50, 0.1),
    'dpmpp_2m': (sample_dpmpp_2m, 'linear', time_grid, {}, 4, 50, 0.1),
    'ddim': (sample_ddim, 'ddpm', _ddpm_grid, {}, 4, 100, 0.1),
    'ddim_eta0.5': (sample_ddim, 'linear', time_grid, {'eta': 0.5}, 4, 100, 0.1),
    'ddpm_small': (sample_ddpm, 'ddpm', _ddpm_grid, {}, 10, 250, 0.25),
    'ddpm_large': (sample_ddpm, 'ddpm', _ddpm_grid, {'variance': 'beta'}, 10, 250, 0.1),
    # Euler-Maruyama's signed NLL gap passes through zero near 4 steps on this ring (about +0.8 at 3 steps, -0.01 to
    # -0.08 at 4, across noise draws), so its "few steps" is 3.
    'euler_maruyama': (sample_euler_maruyama, 'linear', time_grid, {}, 3, 100, 0.1),
    'euler_maruyama_tweedie': (sample_euler_maruyama, 'linear', time_grid, {'last_step': 'tweedie'}, 3, 100, 0.1),
}
STOCHASTIC = (sample_ddpm, sample_ddim, sample_euler_maruyama)

@pytest.mark.parametrize('name', list(CASES))
def test_samples_converge_to_the_mixture(name):
    """From exact samples of p_1 (a standard normal; on the ddpm path alpha(1) = 0.006, so nearly), each sampler with
    the exact denoiser lands on the data: at many steps the NLL gap is within the tolerance above and every component's
    share is within 0.04 of its weight (the share of N = 2000 samples has std <= 0.0093: four std); at few steps the
    gap is clearly larger (by 0.05 nats at least, two std of the difference)."""
    f, path, grid, opts, few, many, tol = CASES[name]
    x1 = randn_per_sample((2,), sample_generators(1, range(N)))
    run = lambda steps: f(lambda x, t: GM.denoise(x, t, path), x1, grid(steps), path, **opts,
                          **({'generators': sample_generators(2, range(N))} if f in STOCHASTIC else {}))
    gap, cover = _metrics(run(many), path)
    gap_few, _ = _metrics(run(few), path)
    assert abs(gap) < tol, (gap, tol)
    assert cover < 0.04, cover
    assert abs(gap_few) > abs(gap) + 0.05, (gap_few, gap)

X1 = torch.randn(300, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

@functools.lru_cache
def _reference(path, steps):
    "A fine Heun solution of the probability-flow ODE from X1 (on DiT's grid for the ddpm path)."
    return sample_heun(lambda x, t: GM.denoise(x, t, path), X1, time_grid(steps, 'ddpm' if path == 'ddpm' else 'uniform'), path)

def _trajectory_errors(f, path, grid, steps, ref_steps=256):
    "Mean distance of the final states to a fine Heun reference, from the same 300 starting points (float64)."
    den, ref = (lambda x, t: GM.denoise(x, t, path)), _reference(path, ref_steps)
    return [(f(den, X1, grid(n), path) - ref).norm(dim=1).mean().item() for n in steps]

def test_euler_is_first_order_and_heun_second_order():
    """Error vs a 256-step Heun reference on the gvp path: halving the step halves Euler's error (measured 1.9-2.0)
    and quarters Heun's (measured 3.8-4.2); the bounds leave room for higher-order terms."""
    e = _trajectory_errors(sample_euler, 'gvp', time_grid, (32, 64))
    h = _trajectory_errors(sample_heun, 'gvp', time_grid, (32, 64))
    assert 1.6 < e[0] / e[1] < 2.5, e
    assert 3.2 < h[0] / h[1] < 5.0, h

def test_ddim_eta0_on_the_ddpm_grid_is_a_first_order_ode_solver():
    """DDIM (eta = 0) on DiT's respaced grids converges to the probability-flow ODE's solution (a Heun reference on
    all 1000 steps, each inside one piece of the piecewise-smooth ddpm path) at first order: ratio ~1.9 per doubling."""
    e = _trajectory_errors(sample_ddim, 'ddpm', _ddpm_grid, (32, 64), ref_steps=1000)
    assert 1.6 < e[0] / e[1] < 2.5, e
    assert e[1] < 0.05, e

def test_ddim_on_the_linear_path_is_euler():
    "On the linear path DDIM (eta = 0) and Euler take the same step."
    x1 = torch.randn(100, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    den = lambda x, t: GM.denoise(x, t, 'linear')
    torch.testing.assert_close(sample_ddim(den, x1, time_grid(12), 'linear'), sample_euler(den, x1, time_grid(12), 'linear'))

@pytest.mark.parametrize('path', ['linear', 'gvp'])
def test_dpmpp_2m_beats_first_order(path):
    """DPM-Solver++(2M) reuses the previous estimate for a second-order step: its error at 32 steps is a fraction of
    first-order DDIM's (measured 1/8 to 1/5) and falls faster than 2x from 16 to 32 steps (measured 5.5-6)."""
    m = _trajectory_errors(sample_dpmpp_2m, path, time_grid, (16, 32))
    d = _trajectory_errors(sample_ddim, path, time_grid, (32,))
    assert m[1] < d[0] / 3, (m, d)
    assert m[0] / m[1] > 3, m

def test_ddpm_posterior_on_dits_grid_uses_the_respaced_betas():
    "One DDPM step with a zero-noise generator-free check: the mean is DiT's posterior mean with the respaced betas."
    from nag_toolkit.samplers import _posterior
    ddpm, ts = get_interpolant('ddpm'), time_grid(250, 'ddpm')
    ks, betas = respace(ddpm.schedule, 250)
    abar = ddpm.schedule.abar[ks]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    c_x, c_0, var, v_ts = _posterior(ddpm, ts[:-1], ts[1:])
    torch.testing.assert_close(v_ts, betas.flip(0), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(var, (betas * (1 - prev) / (1 - abar)).flip(0), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(c_0, (betas * prev.sqrt() / (1 - abar)).flip(0), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(c_x, ((1 - prev) * (1 - betas).sqrt() / (1 - abar)).flip(0), rtol=1e-10, atol=1e-14)

def test_ddim_eta1_is_ddpm_with_beta_tilde():
    den = lambda x, t: GM.denoise(x, t, 'ddpm')
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = sample_ddpm(den, x, time_grid(15, 'ddpm'), 'ddpm', generators=sample_generators(5, range(200)))
    b = sample_ddim(den, x, time_grid(15, 'ddpm'), 'ddpm', generators=sample_generators(5, range(200)), eta=1.0)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

def _elementwise(x, t):
    "A per-sample, elementwise stand-in for a denoiser: its rows cannot depend on the batch."
    return torch.tanh(x) * (1 - t.reshape(-1, *([1] * (x.ndim - 1))))

@pytest.mark.parametrize('f,opts', [(sample_ddpm, {}), (sample_ddim, {'eta': 0.7}), (sample_euler_maruyama, {}),
                                    (sample_euler_maruyama, {'last_step': None})])
def test_stochastic_samplers_do_not_depend_on_batch_size(f, opts):
    """Sample i draws its start and all its noise from generator (seed, i): a batch of 64, of 7 and of 1 give the same
    samples, bit for bit with a per-sample denoiser, and to float precision with the exact oracle."""
    path = 'ddpm' if f is sample_ddpm else 'linear'
    ts = time_grid(20, 'ddpm') if f is sample_ddpm else time_grid(20)
    def run(idx, den):
        gens = sample_generators(7, idx)
        return f(den, randn_per_sample((3, 2), gens), ts, path, generators=gens, **opts)
    full, seven, one = run(range(64), _elementwise), run(range(7), _elementwise), run([5], _elementwise)
    assert torch.equal(full[:7], seven) and torch.equal(full[5:6], one)
    oracle = lambda x, t: GM.denoise(x.reshape(-1, 2), t.repeat_interleave(3), path).reshape(x.shape)
    torch.testing.assert_close(run(range(64), oracle)[:7], run(range(7), oracle), rtol=1e-6, atol=1e-6)

def test_generators_must_match_the_batch():
    with pytest.raises(ConfigError, match='one per sample'):
        sample_ddpm(_elementwise, torch.zeros(4, 2), time_grid(3, 'ddpm'), generators=sample_generators(0, range(3)))

def test_bad_options_are_one_line_errors():
    x = torch.zeros(2, 2)
    with pytest.raises(ConfigError, match="variance='learned' needs a network with learned sigma"):
        sample_ddpm(_elementwise, x, variance='learned')
    with pytest.raises(ConfigError, match="variance='small'"): sample_ddpm(_elementwise, x, variance='small')
    with pytest.raises(ConfigError, match="last_step='heun'"):
        sample_euler_maruyama(_elementwise, x, time_grid(3), last_step='heun')
    with pytest.raises(ConfigError, match='eta=-1'): sample_ddim(_elementwise, x, time_grid(3), eta=-1)
    with pytest.raises(ConfigError, match='needs a discrete path'): sample_ddpm(_elementwise, x, path='linear')

def test_ddpm_defaults_to_dits_250_steps():
    calls = []
    sample_ddpm(lambda x, t: calls.append(t[0].item()) or torch.zeros_like(x), torch.zeros(2, 2), generators=sample_generators(0, range(2)))
    assert len(calls) == 250 and calls[0] == 1.0 and abs(calls[-1] - 0.001) < 1e-8

def test_euler_maruyama_last_steps():
    """'tweedie' returns the last state's denoised estimate; 'mean' adds no noise on the last step (a one-step run does
    not depend on the generators); None does."""
    den = lambda x, t: GM.denoise(x, t, 'linear')
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    seen = []
    out = sample_euler_maruyama(den, x, sde_grid(10), 'linear', callback=seen.append, generators=sample_generators(0, range(50)), last_step='tweedie')
    assert torch.equal(out, seen[-1]['denoised'])
    one = lambda seed, last: sample_euler_maruyama(den, x, torch.tensor([0.3, 0.0], dtype=torch.float64), 'linear',
                                                   generators=sample_generators(seed, range(50)), last_step=last)
    assert torch.equal(one(0, 'mean'), one(1, 'mean'))
    assert not torch.equal(one(0, None), one(1, None))

class _WithBranches:
    "A denoiser that returns its branch outputs in its record, as guidance wrappers do (a plain callable)."
    def __call__(self, x, t):
        return Denoised(x * 0.5, branches={'cond': x * 0 + t[:, None]})

ALL = [(sample_euler, 'linear', {}), (sample_heun, 'linear', {}), (sample_dpmpp_2m, 'linear', {}), (sample_ddim, 'linear', {}),
       (sample_ddpm, 'ddpm', {'generators': sample_generators(0, range(3))}),
       (sample_euler_maruyama, 'linear', {'generators': sample_generators(0, range(3))})]

@pytest.mark.parametrize('f,path,opts', ALL)
def test_callback_contract(f, path, opts):
    "Every sampler calls back once per step with x, i, t, t_next, denoised, and the branches of the step's first call."
    seen, den = [], _WithBranches()
    ts = time_grid(4, 'ddpm') if path == 'ddpm' else time_grid(4, t_max=0.9)
    out = f(den, torch.ones(3, 2), ts, path, callback=seen.append, **opts)
    assert [d['i'] for d in seen] == [0, 1, 2, 3]
    for i, d in enumerate(seen):
        assert {'x', 'i', 't', 't_next', 'denoised', 'branches'} <= set(d)
        assert d['t'] == ts[i] and d['t_next'] == ts[i + 1]
        assert torch.allclose(d['branches']['cond'][:, 0], ts[i].float())   # from the call at t, not Heun's second one
    assert torch.equal(seen[-1]['x'], out)


# --- No host-device synchronisation inside sampling loops, checked without a GPU --------------------------------
# The 'meta' device stands in for a GPU: its tensors have shapes but no values. A dispatch mode sees every aten call
# of a sampling run and records the two things that would block a GPU: reading a device tensor's value on the host
# (`_local_scalar_dense`: .item(), float(), bool(), ...) and a blocking copy from host memory to the device.

# The audit itself is nag_toolkit.perf's (the appendix, nbs/19_performance.ipynb, explains it).
from nag_toolkit.perf import HostSyncAudit, sync_events as _audit
from nag_toolkit.guidance import Denoiser, GuidedDenoiser, EpsScaling, Autoguidance, guide


@pytest.mark.parametrize('name', ['euler', 'heun', 'ddim', 'ddpm', 'dpmpp_2m'])
def test_guided_sampling_loop_never_syncs_with_the_device(name):
    """A guided (CFG + NAG, no interval) sampling loop on a device makes no host reads and no blocking copies:
    the time grid lives on the host and each step's time is filled in on the device."""
    from nag_toolkit.models import build_model
    from nag_toolkit import samplers
    path = 'ddpm' if name in ('ddim', 'ddpm') else 'linear'
    net = build_model('mlp', dim=4, width=16, depth=1, num_classes=3).eval().to('meta')
    den = GuidedDenoiser(Denoiser(net, path), w_cfg=1.0, w_nag=0.5)
    x, y = torch.empty(6, 4, device='meta'), torch.zeros(6, dtype=torch.long, device='meta')
    ts = samplers.time_grid(8, 'ddpm' if path == 'ddpm' else 'uniform', t_max=1.0 if path == 'linear' else 1.0)
    fn = getattr(samplers, f'sample_{name}')
    with torch.no_grad(): events = _audit(lambda: fn(den, x, ts, path, extra_args={'y': y}))
    assert events == [], events

def test_the_audit_catches_a_read_and_a_blocking_copy():
    "The audit is not blind: an .item() on a device tensor and a plain host-to-device copy are both recorded."
    x = torch.empty(3, device='meta')
    with HostSyncAudit() as audit:
        torch.ones(3).to('meta')
        try: x.sum().item()
        except Exception: pass         # meta tensors have no value to read; the attempt is what counts
    assert any('copy' in e for e in audit.events) and any('read' in e for e in audit.events), audit.events

WINDOWED = {  # guided denoisers with a window (t_lo = 0.2, t_hi = 0.6), from a function making a meta-device MLP
    'interval': lambda mk: GuidedDenoiser(mk(16), w_cfg=1.0, w_nag=0.5, interval=(0.2, 0.6)),
    'eps_scaling': lambda mk: GuidedDenoiser(mk(16), [EpsScaling(k=0.0, b=1.005, t_lo=0.2, t_hi=0.6)]),
    'autoguidance': lambda mk: GuidedDenoiser(mk(16), [Autoguidance(0.5, weak=mk(8), t_lo=0.2, t_hi=0.6)]),
    'time_shift': lambda mk: guide(mk(16), 'time-shift:data_var=0.5,t_lo=0.2,t_hi=0.6'),
    'self_guidance': lambda mk: guide(mk(16), 'cfg', 'cf-nag:w=0.5', 'self-guidance:w=0.5,t_lo=0.2,t_hi=0.6'),
    'sg_prev': lambda mk: guide(mk(16), 'self-guidance:w=0.5,prev=true,t_lo=0.2,t_hi=0.6'),
}

@pytest.mark.parametrize('wrapper', list(WINDOWED))
def test_windowed_and_peer_guiders_never_sync_in_a_sampling_loop(wrapper):
    """Guidance windows, the peer fixes and Self-Guidance (also SG-prev, which keeps the previous step's output)
    decide 'on or off' from the step's time, which samplers pass as a host number: still no read of a device tensor
    and no blocking copy in the loop (both inside and outside the window)."""
    from nag_toolkit.models import build_model
    mk = lambda w: Denoiser(build_model('mlp', dim=4, width=w, depth=1, num_classes=3).eval().to('meta'), 'linear')
    den = WINDOWED[wrapper](mk)
    x, y = torch.empty(6, 4, device='meta'), torch.zeros(6, dtype=torch.long, device='meta')
    with torch.no_grad(): events = _audit(lambda: sample_euler(den, x, time_grid(8), 'linear', extra_args={'y': y}))
    assert events == [], events

def test_windows_decided_on_the_host_equal_the_per_sample_masks():
    "A step time given as a host number and the same time stored per sample give the same guided estimate."
    from nag_toolkit.models import build_model
    torch.manual_seed(0)
    den = Denoiser(build_model('mlp', dim=4, width=16, depth=1, num_classes=3).eval(), 'linear')
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    for g in (GuidedDenoiser(den, w_cfg=1.0, w_nag=0.5, interval=(0.2, 0.6)),
              GuidedDenoiser(den, [EpsScaling(k=0.1, b=1.0, t_lo=0.2, t_hi=0.6)]),
              guide(den, 'self-guidance:w=0.5,t_lo=0.2,t_hi=0.6')):
        for t in (0.1, 0.4, 0.9):
            with torch.no_grad():
                host, per_sample = g(x, torch.tensor(t, dtype=torch.float64), y=y), g(x, torch.full((5,), t), y=y)
            torch.testing.assert_close(host, per_sample)

def test_sample_ode_counts_evaluations_and_refuses_unknown_methods():
    """torchdiffeq's fixed-step Euler on the grid is sample_euler (one evaluation per step, in SiT's time); dopri5
    reports its evaluations in every callback; an unknown method is a one-line ConfigError."""
    den = lambda x, t: GM.denoise(x, t, 'linear')
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ts, seen = time_grid(8, t_max=0.999), []
    a = sample_ode(den, x, ts, 'linear', method='euler', callback=seen.append)
    torch.testing.assert_close(a, sample_euler(den, x, ts, 'linear'), rtol=1e-10, atol=1e-10)
    assert [d['i'] for d in seen] == list(range(8)) and seen[-1]['nfe'] == 8
    seen = []
    sample_ode(den, x, time_grid(4, t_max=0.999), 'linear', callback=seen.append)
    assert len(seen) == 4 and seen[-1]['nfe'] > 6 and len({d['nfe'] for d in seen}) == 1
    with pytest.raises(ConfigError, match="method='lms' is not a torchdiffeq method"): sample_ode(den, x, ts, method='lms')

# ---- Restart sampling ----

def test_restart_counts_its_evaluations_and_is_euler_without_restarts():
    "8 main steps + 2 restarts x 3 steps = 14 calls; restarts=0 (or t_max below the restart point) is Euler exactly."
    from nag_toolkit.samplers import sample_restart
    from nag_toolkit.core import sample_generators
    gm = get_mixture('gmm32')
    den = lambda x, t: gm.denoise(x, t, 'linear')
    calls = []
    counted = lambda x, t: calls.append(1) or den(x, t)
    x1 = torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gens = sample_generators(0, range(32))
    a = run_sampler('restart', counted, x1, time_grid(8), 'linear', generators=gens, restarts=2, restart_steps=3)
    assert len(calls) == 8 + 2 * 3 and torch.isfinite(a).all()
    euler = sample_euler(den, x1, time_grid(8), 'linear')
    assert torch.equal(sample_restart(den, x1, time_grid(8), 'linear', restarts=0), euler)
    assert torch.equal(sample_restart(den, x1, time_grid(8), 'linear', t_min=0.5, t_max=0.2), euler)
    with pytest.raises(ConfigError, match='restart_steps=0 is out of range'):
        sample_restart(den, x1, time_grid(8), 'linear', restart_steps=0)

def test_restart_noise_is_per_sample():
    "Sample i's restart noise comes from generator i: the first 4 samples of a batch of 8 equal a batch of 4."
    from nag_toolkit.core import sample_generators
    gm = get_mixture('ring8')
    den = lambda x, t: gm.denoise(x, t, 'linear')
    x1 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    big = run_sampler('restart', den, x1, time_grid(6), 'linear', generators=sample_generators(4, range(8)))
    small = run_sampler('restart', den, x1[:4], time_grid(6), 'linear', generators=sample_generators(4, range(4)))
    assert torch.allclose(big[:4], small, atol=1e-12)
