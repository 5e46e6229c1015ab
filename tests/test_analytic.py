"""The exact Gaussian-mixture oracle against autograd, quadrature, Monte Carlo and its own float64 evaluation."""
import math
import pytest, torch
from nag_toolkit.core import ConfigError
from nag_toolkit.analytic import GaussianMixture
from nag_toolkit.interpolants import INTERPOLANTS, get_interpolant

PATHS = list(INTERPOLANTS)

def _gm(D, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GaussianMixture(torch.randn(K, D, generator=g) * 1.5, torch.rand(K, generator=g) * 0.5 + 0.2, torch.rand(K, generator=g) + 0.2)

@pytest.mark.parametrize('name', PATHS)
def test_score_is_the_gradient_of_log_prob(name):
    gm, g = _gm(8), torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g, dtype=torch.float64).mul(2).requires_grad_()
    t = torch.rand(32, generator=g, dtype=torch.float64) * 0.98 + 0.01     # one t per sample
    auto = torch.autograd.grad(gm.log_prob(x, t, name).sum(), x)[0]
    torch.testing.assert_close(gm.score(x, t, name), auto, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gm.eps_hat(x, t, name), -get_interpolant(name).sigma(t)[:, None] * auto, rtol=1e-7, atol=1e-9)

@pytest.mark.parametrize('name', PATHS)
@pytest.mark.parametrize('t', [0.0, 0.3, 0.9])
def test_log_prob_integrates_to_one_in_1d_and_2d(name, t):
    gm1 = _gm(1, K=3)
    xs = torch.linspace(-12, 12, 24001, dtype=torch.float64)[:, None]
    assert abs(torch.trapezoid(gm1.log_prob(xs, t, name).exp(), xs[:, 0]).item() - 1) < 1e-6
    gm2 = _gm(2, K=3)
    u = torch.linspace(-9, 9, 601, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(u, u, indexing='ij'), -1).reshape(-1, 2)
    mass = gm2.log_prob(grid, t, name).exp().sum().item() * (u[1] - u[0]).item() ** 2
    assert abs(mass - 1) < 1e-3, mass

@pytest.mark.parametrize('t0', [0.2, 0.5, 0.8])
def test_posterior_mean_recovers_the_true_t_in_64d(t0):
    """Forward states at t0 in D = 64: the mean over samples of E[t | x] lies within 0.01 of t0 (the
    posterior's std here is about 0.01 per sample; 512 samples)."""
    gm, g = _gm(64, K=8), torch.Generator().manual_seed(2)
    grid = torch.linspace(0.0025, 0.9975, 200)
    x = gm.sample_xt(512, t0, 'linear', generator=g)[0]
    post = gm.posterior_t(x, grid, 'linear')
    torch.testing.assert_close(post.sum(1), torch.ones(512), rtol=0, atol=1e-5)
    assert abs((post @ grid).mean().item() - t0) < 0.01

def test_denoise_matches_monte_carlo():
    """E[x0 | x_t] by self-normalised importance sampling from the prior (400k draws) agrees within 5
    standard errors (per coordinate, estimated from the weights) plus 1e-3."""
    gm, g = _gm(2, K=4), torch.Generator().manual_seed(3)
    path, t = get_interpolant('gvp'), 0.6
    a, s = path.alpha(torch.tensor(t, dtype=torch.float64)), path.sigma(torch.tensor(t, dtype=torch.float64))
    x0 = gm.sample(400_000, generator=g).double()
    xt = gm.sample_xt(5, t, path, generator=g)[0].double()
    for x in xt:
        logw = -((x - a * x0) ** 2).sum(1) / (2 * s**2)
        w = torch.softmax(logw, 0)
        mc = (w[:, None] * x0).sum(0)
        se = ((w[:, None] ** 2) * (x0 - mc) ** 2).sum(0).sqrt()
        exact = gm.denoise(x[None], t, path)[0]
        assert ((exact - mc).abs() <= 5 * se + 1e-3).all(), (exact, mc, se)

@pytest.mark.parametrize('name', PATHS)
@pytest.mark.parametrize('t', [1e-4, 0.5, 1 - 1e-4, 1.0])
def test_float32_is_stable_in_256_dimensions_near_both_ends(name, t):
    gm, g = _gm(256, K=8), torch.Generator().manual_seed(4)
    x32 = gm.sample_xt(64, t, name, generator=g)[0]
    x64 = x32.double()
    for f in ('log_prob', 'score', 'denoise', 'velocity', 'eps_hat'):
        out32, out64 = getattr(gm, f)(x32, t, name), getattr(gm, f)(x64, t, name)
        assert out32.dtype == torch.float32 and torch.isfinite(out32).all(), f
        torch.testing.assert_close(out32, out64.float(), rtol=1e-4, atol=1e-4)
    post = gm.posterior_t(x32, torch.linspace(0, 1, 101), name)
    assert torch.isfinite(post).all() and torch.allclose(post.sum(1), torch.ones(64), atol=1e-5)

def test_chunking_does_not_change_results():
    gm, g = _gm(16), torch.Generator().manual_seed(5)
    x, grid = torch.randn(300, 16, generator=g), torch.linspace(0.01, 0.99, 50)
    small = GaussianMixture(gm.means, gm.stds, gm.weights, max_elements=97)
    torch.testing.assert_close(small.posterior_t(x, grid, 'vp'), gm.posterior_t(x, grid, 'vp'))
    torch.testing.assert_close(small.denoise(x, 0.3, 'vp'), gm.denoise(x, 0.3, 'vp'))

def test_velocity_is_the_converted_denoiser():
    gm, g = _gm(4), torch.Generator().manual_seed(6)
    x, t, p = torch.randn(20, 4, generator=g, dtype=torch.float64), 0.37, get_interpolant('linear')
    torch.testing.assert_close(gm.velocity(x, t, p), p.convert(gm.denoise(x, t, p), x, t, 'x0', 'v'))

def test_bad_inputs_give_one_line_errors():
    with pytest.raises(ConfigError, match=r'means has shape \(3,\)'): GaussianMixture(torch.zeros(3), 1.0)
    with pytest.raises(ConfigError, match='weights'): GaussianMixture(torch.zeros(2, 3), 1.0, [1.0, -1.0])
    with pytest.raises(ConfigError, match='D=3'): GaussianMixture(torch.zeros(2, 3), 1.0).log_prob(torch.zeros(4, 5), 0.5, 'linear')
    with pytest.raises(ConfigError, match="path='edm'"): _gm(2).score(torch.zeros(1, 2), 0.5, 'edm')
