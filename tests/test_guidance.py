"""Guidance wrappers: exact identities (weights 0, neutral peer fixes), the CFG + NAG composition in one forward,
guidance intervals, cfg_channels, and classifier-free NAG = classifier-based NAG with the exact p(t | x)."""
import math
import pytest, torch
from nag_toolkit.core import ConfigError, sample_generators, randn_per_sample
from nag_toolkit.interpolants import get_interpolant, PRED_KINDS
from nag_toolkit.analytic import GaussianMixture
from nag_toolkit.samplers import sample_euler, sample_ddim, time_grid
from nag_toolkit.guidance import (nag_mix, Denoiser, GuidedDenoiser, ClassifierNAG, EpsScaling, TimeShift, Autoguidance,
                                  MixtureModel, t_marginal_prediction, interp_log_posterior, in_interval)

class FakeNet(torch.nn.Module):
    """A network with the toolkit's interface, elementwise per sample (its rows cannot depend on the batch), with a
    class embedding (null class = num_classes), a null-t embedding, and a call counter."""
    def __init__(self, pred='eps', num_classes=5, channels=4, scale=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.pred, self.num_classes, self.calls, self.batches = pred, num_classes, 0, []
        self.y_emb = torch.nn.Parameter(torch.randn(num_classes + 1, channels, generator=g) * scale)
        self.null_t = torch.nn.Parameter(torch.tensor(0.37))

    def forward(self, x, t, y=None, null_t=None, null_y=None):
        self.calls += 1; self.batches.append(len(x))
        y = torch.zeros(len(x), dtype=torch.long) if y is None else y
        if null_y is not None: y = torch.where(null_y, self.num_classes, y)
        te = t if null_t is None else torch.where(null_t, self.null_t.to(t.dtype), t)
        return torch.tanh(x * (1 + te[:, None, None, None]) + self.y_emb[y].to(x.dtype)[:, :, None, None])

def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 2, 2, generator=g), torch.rand(n, generator=g) * 0.8 + 0.1, torch.randint(0, 5, (n,), generator=g))

def test_nag_mix():
    c, u = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    torch.testing.assert_close(nag_mix(c, u, 2.0), 3 * c - 2 * u)
    assert torch.equal(nag_mix(c, u, 0.0), c)

def test_denoiser_adapter_converts_the_native_output():
    net, (x, t, y) = FakeNet(pred='eps'), _batch()
    den = Denoiser(net, 'ddpm')
    with torch.no_grad():
        x0, eps = den(x, t, y=y), net(x, t, y=y)
        torch.testing.assert_close(get_interpolant('ddpm').add_noise(x0, t, eps), x, rtol=1e-5, atol=1e-5)
        assert torch.equal(den.to_x0(den.native(x, t, y=y), x, t), x0)
    assert Denoiser(net, 'linear', pred='v').pred == 'v'
    sigma_net = lambda x, t, **k: torch.cat([net(x, t, **k), torch.full_like(x, 7.0)], 1)   # learned-sigma layout
    sigma_net.pred, sigma_net.pred_channels = 'eps', 4
    with torch.no_grad(): assert torch.equal(Denoiser(sigma_net, 'ddpm')(x, t, y=y), x0)
    with pytest.raises(ConfigError, match="pred=None"): Denoiser(lambda x, t: x, 'linear')

@torch.no_grad()
def test_zero_weights_reproduce_the_unguided_denoiser_exactly():
    net, (x, t, y) = FakeNet(), _batch()
    den = Denoiser(net, 'ddpm')
    base = den(x, t, y=y)
    net.calls = 0
    assert torch.equal(GuidedDenoiser(den)(x, t, y=y), base)
    assert torch.equal(GuidedDenoiser(den, w_cfg=0.0, w_nag=0.0, interval=(0.2, 0.7))(x, t, y=y), base)
    assert net.calls == 2 and net.batches[-1] == len(x)            # no extra branch evaluated

@torch.no_grad()
def test_cfg_plus_nag_is_the_composition_in_one_forward():
    net, (x, t, y) = FakeNet(), _batch()
    x, t = x.double(), t.double()                                      # x0 = (x - sigma eps) / alpha amplifies rounding
    den = Denoiser(net, 'ddpm')
    on = torch.ones(len(x), dtype=torch.bool)
    f_c, f_y, f_t = net(x, t, y=y), net(x, t, y=y, null_y=on), net(x, t, y=y, null_t=on)
    net.calls, net.batches = 0, []
    g = GuidedDenoiser(den, w_cfg=1.5, w_nag=0.75)
    rec = g.denoise(x, t, y=y)
    out = rec.x0
    assert net.calls == 1 and net.batches == [3 * len(x)]             # one batched forward for three branches
    torch.testing.assert_close(out, den.to_x0(f_c + 1.5 * (f_c - f_y) + 0.75 * (f_c - f_t), x, t), rtol=1e-6, atol=1e-6)
    assert torch.equal(rec.branches['cond'], f_c) and torch.equal(rec.branches['null_t'], f_t)
    assert torch.equal(g(x, t, y=y), out)                              # calling the wrapper gives the record's x0
    # each guidance alone: two branches, one forward
    net.calls, net.batches = 0, []
    torch.testing.assert_close(GuidedDenoiser(den, w_cfg=2.0)(x, t, y=y), den.to_x0(nag_mix(f_c, f_y, 2.0), x, t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(GuidedDenoiser(den, w_nag=2.0)(x, t, y=y), den.to_x0(nag_mix(f_c, f_t, 2.0), x, t), rtol=1e-6, atol=1e-6)
    assert net.calls == 2 and net.batches == [2 * len(x)] * 2

def test_one_forward_per_sampler_step_and_branches_reach_the_callback():
    net = FakeNet(pred='v')
    g = GuidedDenoiser(Denoiser(net, 'linear'), w_cfg=1.0, w_nag=0.5)
    x, _, y = _batch(8)
    seen = []
    sample_euler(g, x, time_grid(5), 'linear', extra_args={'y': y}, callback=seen.append)
    assert net.calls == 5 and set(net.batches) == {24}
    assert set(seen[0]['branches']) == {'cond', 'null_y', 'null_t', 'guided'}

def test_guided_sampling_with_zero_weights_is_unguided_sampling():
    net, (x, _, y) = FakeNet(pred='v'), _batch(8)
    den = Denoiser(net, 'linear')
    a = sample_euler(den, x, time_grid(6), 'linear', extra_args={'y': y})
    b = sample_euler(GuidedDenoiser(den), x, time_grid(6), 'linear', extra_args={'y': y})
    assert torch.equal(a, b)

@torch.no_grad()
def test_guidance_interval_is_per_sample():
    net, (x, _, y) = FakeNet(), _batch(6)
    den = Denoiser(net, 'ddpm')
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.3])
    out, base = GuidedDenoiser(den, w_cfg=1.0, w_nag=1.0, interval=(0.3, 0.7))(x, t, y=y), den(x, t, y=y)
    inside = in_interval(t, (0.3, 0.7))
    assert inside.tolist() == [False, True, True, True, False, True]
    assert torch.equal(out[~inside], base[~inside])                 # outside: the unguided estimate, bit for bit
    assert (out[inside] != base[inside]).flatten(1).any(1).all()
    net.batches = []
    GuidedDenoiser(den, w_nag=1.0, interval=(0.95, 1.0))(x, t, y=y)   # nobody inside: no extra branch
    assert net.batches == [6]

@torch.no_grad()
def test_cfg_channels_guides_only_the_first_channels():
    net, (x, t, y) = FakeNet(), _batch()
    den = Denoiser(net, 'ddpm')
    full, three, none = (GuidedDenoiser(den, w_cfg=3.0, w_nag=0.5, cfg_channels=c)(x, t, y=y) for c in (None, 3, 0))
    assert torch.equal(three[:, :3], full[:, :3])
    assert torch.equal(three[:, 3:], none[:, 3:])                     # channel 3: NAG only, no CFG
    assert not torch.equal(three[:, 3:], full[:, 3:])

def test_guided_denoiser_needs_a_denoiser():
    with pytest.raises(ConfigError, match='Denoiser'): GuidedDenoiser(FakeNet(), w_cfg=1.0)

# ---- the exact oracle: classifier-free NAG == classifier-based NAG ----

def _ring():
    ang = torch.arange(8) * math.pi / 4
    return GaussianMixture(torch.stack([2 * ang.cos(), 2 * ang.sin()], 1), 0.2, weights=torch.arange(1, 9).float())

GRID = torch.linspace(0.0025, 0.9975, 200, dtype=torch.float64)

@pytest.mark.parametrize('path', ['linear', 'vp'])
def test_t_marginal_prediction_is_the_posterior_average(path):
    gm, p = _ring(), get_interpolant(path)
    x = gm.sample_xt(5, 0.5, path, generator=torch.Generator().manual_seed(3))[0].double()
    post = gm.posterior_t(x, GRID, path)
    for kind in PRED_KINDS:
        slow = sum(post[:, j:j + 1] * p.from_x0_eps(gm.denoise(x, tj, path), gm.eps_hat(x, tj, path), x, tj, kind) for j, tj in enumerate(GRID))
        torch.testing.assert_close(t_marginal_prediction(gm, x, GRID, path, kind), slow, rtol=1e-9, atol=1e-10)

@pytest.mark.parametrize('path', ['linear', 'gvp', 'ddpm'])
@pytest.mark.parametrize('w', [0.5, 2.0])
def test_classifier_free_nag_equals_classifier_based_nag_with_the_exact_posterior(path, w):
    """grad_x log p(t | x) = s_t(x) - E_{p(t'|x)}[s_t'(x)] on a grid with a uniform prior, so the score network's
    classifier-free NAG equals classifier-based NAG with the exact posterior (autograd through posterior_t), to
    float64 rounding. Each sample sits at its own grid time."""
    gm = _ring()
    g = torch.Generator().manual_seed(5)
    t = GRID[torch.randint(20, 180, (64,), generator=g)]
    x = gm.sample_xt(64, t, path, generator=g)[0].double() + 0.1 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    cf = GuidedDenoiser(Denoiser(MixtureModel(gm, path, pred='score', t_grid=GRID), path), w_nag=w)
    cb = ClassifierNAG(lambda x, t: gm.denoise(x, t, path), w, g=lambda x, tg: gm.posterior_t(x, tg, path), t_grid=GRID, path=path)
    with torch.no_grad(): a, b = cf(x, t), cb(x, t)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert (a - gm.denoise(x, t, path)).abs().max() > 1e-2            # and the guidance does something
    # the same in score space, directly
    s_c, s_m = gm.score(x, t, path), t_marginal_prediction(gm, x, GRID, path, 'score')
    torch.testing.assert_close(s_c + w * (s_c - s_m), s_c + w * cb.grad(x, t), rtol=1e-9, atol=1e-9)

def test_classifier_nag_with_log_g_and_its_neutral_settings():
    gm, path = _ring(), 'linear'
    x = gm.sample_xt(16, 0.4, path, generator=torch.Generator().manual_seed(6))[0].double()
    t = torch.full((16,), GRID[79].item(), dtype=torch.float64)
    den = lambda x, t: gm.denoise(x, t, path)
    log_g = lambda x, t: interp_log_posterior(torch.log_softmax(gm.log_prob_grid(x, GRID, path), -1), GRID, t)
    a = ClassifierNAG(den, 1.0, log_g=log_g, path=path)(x, t)
    b = ClassifierNAG(den, 1.0, g=lambda x, tg: gm.posterior_t(x, tg, path), t_grid=GRID, path=path)(x, t)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert torch.equal(ClassifierNAG(den, 0.0, log_g=log_g, path=path)(x, t), den(x, t))
    assert torch.equal(ClassifierNAG(den, 1.0, log_g=log_g, path=path, interval=(0.6, 0.9))(x, t), den(x, t))
    with pytest.raises(ConfigError, match='either g'): ClassifierNAG(den, 1.0, path=path)

def test_oracle_model_classes_and_null_tokens():
    gm, path = _ring(), 'gvp'
    m = MixtureModel(gm, path, pred='eps', t_grid=GRID)
    x = gm.sample_xt(10, 0.3, path, generator=torch.Generator().manual_seed(7))[0].double()
    y = torch.arange(10) % 8
    torch.testing.assert_close(m(x, 0.3), gm.eps_hat(x, 0.3, path))
    torch.testing.assert_close(m(x, 0.3, y=y, null_y=torch.ones(10, dtype=torch.bool)), gm.eps_hat(x, 0.3, path))
    torch.testing.assert_close(m(x, 0.3, y=y)[3:4], m.parts[3].eps_hat(x[3:4], 0.3, path))
    torch.testing.assert_close(m(x, 0.3, null_t=torch.ones(10, dtype=torch.bool)), t_marginal_prediction(gm, x, GRID, path, 'eps'))

# ---- peer fixes ----

@torch.no_grad()
def test_eps_scaling():
    net, (x, t, y) = FakeNet(pred='eps'), _batch()
    den = Denoiser(net, 'ddpm')
    assert torch.equal(EpsScaling(den, k=0.0, b=1.0)(x, t, y=y), den(x, t, y=y))
    out = EpsScaling(den, k=0.01, b=1.005)(x, t, y=y)
    lam = (0.01 * t + 1.005)[:, None, None, None]
    x64, t64 = x.double(), t.double()
    torch.testing.assert_close(out.double(), Denoiser(lambda *a, **k: net(*a, **k).double() / lam.double(), 'ddpm', pred='eps')(x64, t64, y=y), rtol=1e-4, atol=1e-4)

@torch.no_grad()
def test_autoguidance():
    good, weak, (x, t, y) = FakeNet(), FakeNet(scale=0.5), _batch()
    dg, dw = Denoiser(good, 'ddpm'), Denoiser(weak, 'ddpm')
    assert torch.equal(Autoguidance(dg, dg, w=2.0)(x, t, y=y), dg(x, t, y=y))     # the same model twice: unguided
    assert torch.equal(Autoguidance(dg, dw, w=0.0)(x, t, y=y), dg(x, t, y=y))
    f_g, f_w = good(x, t, y=y), weak(x, t, y=y)
    torch.testing.assert_close(Autoguidance(dg, dw, w=1.5)(x, t, y=y), dg.to_x0(f_g + 1.5 * (f_g - f_w), x, t))
    # a weak model of another kind is converted to the good one's kind at the same (x, t)
    dw_v = Denoiser(lambda x, t, **k: get_interpolant('ddpm').convert(weak(x, t, **k), x, t, 'eps', 'v'), 'ddpm', pred='v')
    torch.testing.assert_close(Autoguidance(dg, dw_v, w=1.5)(x, t, y=y), Autoguidance(dg, dw, w=1.5)(x, t, y=y), rtol=1e-4, atol=1e-4)

@torch.no_grad()
def test_time_shift():
    """In D = 4096 (a 64 x 64 image) the mean square |x|^2 / D of a state pins its noise level: on the gvp path with data of mean square
    m = 0.25, a state at t = 0.5 plus extra noise of std 0.2 has the mean square of the t' solving
    m cos^2 + sin^2 = v (t' = 0.534), which the shift finds within its window. The estimate's relative std is
    sqrt(2 / D) = 0.022, about 0.012 in t here: each sample within 0.04 (three std), their mean within 0.01."""
    D, n, p, m = 4096, 32, get_interpolant('gvp'), 0.25
    g = torch.Generator().manual_seed(9)
    x0, eps = 0.5 * torch.randn(n, D, generator=g, dtype=torch.float64), torch.randn(n, D, generator=g, dtype=torch.float64)
    xt = p.add_noise(x0, 0.5, eps) + 0.2 * torch.randn(n, D, generator=g, dtype=torch.float64)
    v = m * 0.5 + 0.5 + 0.04
    t_star = 2 / math.pi * math.acos(math.sqrt((1 - v) / (1 - m)))
    seen = []
    den = lambda x, t: seen.append(t) or x
    TimeShift(den, p, data_var=m, window=0.1, n_candidates=201)(xt, 0.5)
    assert (seen[-1] - t_star).abs().max() < 0.04 and abs(seen[-1].mean() - t_star) < 0.01, (seen[-1], t_star)
    assert torch.equal(TimeShift(den, p, data_var=m, window=0.0)(xt, 0.5), xt) and (seen[-1] == 0.5).all()
    TimeShift(den, p, data_var=m, window=0.1, cutoff=0.6)(xt, torch.tensor([0.5] * 16 + [0.7] * 16, dtype=torch.float64))
    assert (seen[-1][:16] == 0.5).all() and (seen[-1][16:] != 0.7).all()

def test_guided_step_reads_nothing_back_from_the_device_without_an_interval(monkeypatch):
    """No host-device synchronisation in a guided step: with no guidance interval, neither the wrapper nor the
    toolkit's MLP asks a tensor for a Python bool or number (each would block on a GPU)."""
    from nag_toolkit.models import build_model
    from nag_toolkit.guidance import Denoiser, GuidedDenoiser
    net = build_model('mlp', dim=4, width=16, depth=1, num_classes=3).eval()
    g = GuidedDenoiser(Denoiser(net, 'linear'), w_cfg=1.0, w_nag=0.5)
    x, t, y = torch.randn(5, 4), torch.full((5,), 0.5), torch.tensor([0, 1, 2, 0, 1])
    g(x, t, y=y)                                               # warm-up (lazy initialisation may read values)
    def refuse(*a): raise AssertionError('a tensor was read back to the host')
    for name in ('__bool__', 'item', '__float__', '__int__'): monkeypatch.setattr(torch.Tensor, name, refuse)
    with torch.no_grad(): g(x, t, y=y)

@torch.no_grad()
def test_variance_values_reach_the_record_and_come_from_the_conditional_branch():
    """A learned-sigma network's extra channels come back as `var_values`; under CFG + NAG they are the conditional
    branch's (as in DiT's forward_with_cfg), not a mix, and DDPM's learned variance uses them."""
    from nag_toolkit.samplers import sample_ddpm
    net, (x, t, y) = FakeNet(pred='eps'), _batch()
    sigma_net = lambda x, t, **k: torch.cat([net(x, t, **k), 0.5 * net(x, t, **k)], 1)   # v differs per branch
    sigma_net.pred, sigma_net.pred_channels = 'eps', 4
    cond = Denoiser(sigma_net, 'ddpm').denoise(x, t, y=y)
    torch.testing.assert_close(cond.var_values, 0.5 * net(x, t, y=y))
    guided = GuidedDenoiser(Denoiser(sigma_net, 'ddpm'), w_cfg=1.0, w_nag=0.5).denoise(x, t, y=y)
    torch.testing.assert_close(guided.var_values, cond.var_values)
    assert not torch.allclose(guided.x0, cond.x0)
    ts = time_grid(5, 'ddpm')
    run = lambda var: sample_ddpm(Denoiser(sigma_net, 'ddpm'), x, ts, extra_args={'y': y}, variance=var)
    torch.manual_seed(0); a = run('learned')
    torch.manual_seed(0); b = run('beta_tilde')
    assert torch.isfinite(a).all() and not torch.allclose(a, b)
