"""Paths: derivatives, conversions, drifts, ddpm respacing, and ODE transport with the exact mixture score."""
import math
import pytest, torch
from nag_toolkit.core import ConfigError
from nag_toolkit.interpolants import INTERPOLANTS, PRED_KINDS, get_interpolant, respace, DDPMSchedule
from nag_toolkit.analytic import GaussianMixture
from nag_toolkit.samplers import sample_heun, sample_euler, time_grid

PATHS = list(INTERPOLANTS)

@pytest.mark.parametrize('name', PATHS)
def test_derivatives_match_finite_differences(name):
    p = get_interpolant(name)
    t = (torch.arange(1, 100, dtype=torch.float64) + 0.37) / 100   # off the ddpm knots at multiples of 1/1000
    h = 1e-7
    a1, s1, _, _ = p.coefs(t + h); a0, s0, _, _ = p.coefs(t - h)
    _, _, da, ds = p.coefs(t)
    torch.testing.assert_close(da, (a1 - a0) / (2 * h), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds, (s1 - s0) / (2 * h), rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize('name', PATHS)
def test_paths_start_at_data_and_end_near_noise(name):
    p = get_interpolant(name)
    a, s = p.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64)), p.sigma(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert a[0] == 1 and s[0] == 0
    assert a[1] < 0.01 and s[1] > 0.9999
    t = torch.linspace(0.001, 0.999, 500, dtype=torch.float64)
    assert (p.log_snr(t).diff() < 0).all()   # the signal-to-noise ratio falls along every path

@pytest.mark.parametrize('name', PATHS)
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_conversions_round_trip(name, dtype, tol):
    p, g = get_interpolant(name), torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 5, generator=g, dtype=dtype), torch.randn(64, 5, generator=g, dtype=dtype)
    t = torch.rand(64, generator=g, dtype=dtype) * 0.9 + 0.05
    x = p.add_noise(x0, t, eps)
    for k in PRED_KINDS:
        x0_k, eps_k = p.to_x0_eps(p.from_x0_eps(x0, eps, x, t, k), x, t, k)
        torch.testing.assert_close(x0_k, x0, rtol=tol, atol=tol); torch.testing.assert_close(eps_k, eps, rtol=tol, atol=tol)

def test_velocity_is_time_derivative_of_the_forward_state():
    p, g = get_interpolant('vp'), torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    t, h = torch.full((8,), 0.4, dtype=torch.float64), 1e-6
    fd = (p.add_noise(x0, t + h, eps) - p.add_noise(x0, t - h, eps)) / (2 * h)
    x = p.add_noise(x0, t, eps)
    torch.testing.assert_close(p.convert(x0, x, t, 'x0', 'v'), fd, rtol=1e-6, atol=1e-8)

def test_sde_drift_with_zero_diffusion_is_the_ode_drift():
    p, g = get_interpolant('gvp'), torch.Generator().manual_seed(2)
    x, x0 = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(p.sde_drift(x0, x, 0.3, 0.0, 'x0'), p.ode_drift(x0, x, 0.3, 'x0'))

def test_sbdm_diffusion_closed_form_on_linear_path():
    p, t = get_interpolant('linear'), torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    torch.testing.assert_close(p.diffusion_coef(t, 'sbdm'), t / (1 - t))   # SiT's D = g^2 / 2, g^2 = 2t + 2t^2/(1-t)
    torch.testing.assert_close(p.diffusion_coef(t, 'sigma', norm=2.0), 2 * t)

def test_unknown_names_give_one_line_errors():
    with pytest.raises(ConfigError) as e: get_interpolant('cosine')
    assert '\n' not in str(e.value) and 'linear, gvp, vp, ddpm' in str(e.value)
    with pytest.raises(ConfigError, match="src='noise'"): get_interpolant('linear').convert(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, 'noise', 'x0')
    with pytest.raises(ConfigError, match='diffusion_form'): get_interpolant('linear').diffusion_coef(0.5, 'cubic')

def _dit_space_timesteps(T, n):
    "DiT's rule for one section: start at 0, step (T-1)/(n-1), rounding an accumulated float."
    stride, cur, out = (T - 1) / (n - 1), 0.0, []
    for _ in range(n): out.append(round(cur)); cur += stride
    return out

@pytest.mark.parametrize('n', [2, 10, 25, 50, 100, 250, 1000])
def test_respacing_matches_dits_rule_and_keeps_abar(n):
    sched = DDPMSchedule()
    ks, betas = respace(sched, n)
    assert ks.tolist() == _dit_space_timesteps(1000, n)
    if n == 25: assert ks[4] == 166   # 166.5 rounds half to even, as in DiT
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), sched.abar[ks])
    with pytest.raises(ConfigError, match='steps=1'): respace(sched, 1)

def test_ddpm_path_hits_the_discrete_schedule_at_its_steps():
    p = get_interpolant('ddpm'); k = torch.arange(1000)
    torch.testing.assert_close(p.alpha(p.schedule.step_to_t(k)) ** 2, p.schedule.abar, rtol=1e-12, atol=1e-14)
    # DiT's first beta is 1e-4 and its abar at step 999 is about 4.04e-5
    assert abs(p.schedule.abar[-1].item() - 4.04e-5) < 1e-6

def _ring():
    ang = torch.arange(8) * math.pi / 4
    return GaussianMixture(torch.stack([2 * ang.cos(), 2 * ang.sin()], 1), 0.2, weights=torch.arange(1, 9).float())

@pytest.mark.parametrize('name', PATHS)
def test_probability_flow_ode_with_exact_score_carries_noise_to_data(name):
    """Start from exact samples of p_1, integrate the PF-ODE with the exact denoiser; compare with the data.
    Tolerances: with n = 4000 the Monte Carlo std of a mean NLL is about 0.02 nats and of a component share
    about 0.006, so |NLL gap| < 0.08 and per-component |share - weight| < 0.03 hold with a wide margin."""
    gm, g = _ring(), torch.Generator().manual_seed(0)
    x1 = gm.sample_xt(4000, 1.0, name, generator=g)[0]
    out = sample_heun(lambda x, t: gm.denoise(x, t, name), x1, time_grid(64), name)
    ref = gm.sample(4000, generator=g)
    gap = (-gm.log_prob(out, 0.0, name).mean() + gm.log_prob(ref, 0.0, name).mean()).item()
    share = torch.bincount(gm.responsibilities(out, 0.0, name).argmax(1), minlength=8) / 4000.0
    assert abs(gap) < 0.08, gap
    assert (share - gm.weights.float()).abs().max() < 0.03, share

def test_heun_error_falls_faster_than_euler():
    """The same trajectories (fixed starting points): the distance to a 512-step Heun reference falls ~4x per
    doubling of steps for Heun (second order) and ~2x for Euler (first order)."""
    gm, g = _ring(), torch.Generator().manual_seed(1)
    x1 = gm.sample_xt(500, 1.0, 'linear', generator=g)[0].double()
    den = lambda x, t: gm.denoise(x, t, 'linear')
    ref = sample_heun(den, x1, time_grid(512), 'linear')
    err = lambda f, n: (f(den, x1, time_grid(n), 'linear') - ref).norm(dim=1).mean().item()
    e_ratio = err(sample_euler, 32) / err(sample_euler, 64)
    h_ratio = err(sample_heun, 32) / err(sample_heun, 64)
    assert 1.6 < e_ratio < 2.6, e_ratio
    assert h_ratio > 3.0, h_ratio
