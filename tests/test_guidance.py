"""Guidance: exact identities (strength 0 and neutral settings, bit for bit), the CFG + NAG composition in one forward,
guidance windows, cfg channels, classifier-free NAG = classifier-based NAG with the exact p(t | x), the peer fixes
and Self-Guidance against their direct computation, and the registry's specs and errors."""
import math
import pytest, torch
from nag_toolkit.core import ConfigError
from nag_toolkit.interpolants import get_interpolant, PRED_KINDS
from nag_toolkit.analytic import GaussianMixture
from nag_toolkit.data import get_mixture
from nag_toolkit.models import build_model
from nag_toolkit.samplers import sample_euler, sample_heun, time_grid
from nag_toolkit.guidance import network_rows
from nag_toolkit.guidance import (nag_mix, Denoiser, GuidedDenoiser, ClassifierFreeGuidance, ClassifierFreeNAG,
                                  ClassifierNAG, EpsScaling, TimeShift, Autoguidance, SelfGuidance, GUIDERS,
                                  get_guider, guide, MixtureModel, t_marginal_prediction, interp_log_posterior,
                                  in_interval)

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
    return (torch.randn(n, 4, 2, 2, generator=g), torch.rand(n, generator=g) * 0.8 + 0.1,
            torch.randint(0, 5, (n,), generator=g))

def _close(a, b, tol=1e-6): torch.testing.assert_close(a, b, rtol=tol, atol=tol)

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

def _zero(name, weak):
    "Guider `name` at strength 0, given what it needs beside the network (a posterior, a weaker model)."
    if name == 'none': return GUIDERS[name]()
    extra = {'cb-nag': {'log_g': lambda x, t: x.pow(2).sum(1)}, 'autoguidance': {'weak': weak}}.get(name, {})
    return GUIDERS[name](0.0, **extra)

@pytest.mark.parametrize('name', list(GUIDERS))
@torch.no_grad()
def test_every_guider_at_strength_zero_is_the_unguided_denoiser_bit_for_bit(name):
    """w = 0 turns a guider off: the toolkit's MLP is called once on the plain batch, and the x0 estimate is the
    unguided one bit for bit, for per-sample times, a sampler's host time and a whole Euler run."""
    torch.manual_seed(0)
    net = build_model('mlp', dim=4, width=16, depth=1, num_classes=3).eval()
    den = Denoiser(net, 'linear')
    weak = Denoiser(build_model('mlp', dim=4, width=8, depth=1, num_classes=3).eval(), 'linear')
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    calls = []
    net.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    g = GuidedDenoiser(den, [_zero(name, weak)])
    for t in (torch.tensor([0.1, 0.3, 0.5, 0.7, 1.0]), 0.5):
        base = den(x, t, y=y)
        calls.clear()
        rec = g.denoise(x, t, y=y)
        assert torch.equal(rec.x0, base) and rec.branches is None and calls == [5], (name, t, calls)
    ts = time_grid(4)
    assert torch.equal(sample_euler(g, x, ts, 'linear', extra_args={'y': y}),
                       sample_euler(den, x, ts, 'linear', extra_args={'y': y}))

@torch.no_grad()
def test_cfg_plus_nag_is_the_composition_in_one_forward():
    net, (x, t, y) = FakeNet(), _batch()
    x, t = x.double(), t.double()                                      # x0 = (x - sigma eps) / alpha amplifies rounding
    den = Denoiser(net, 'ddpm')
    on = torch.ones(len(x), dtype=torch.bool)
    f_c, f_y, f_t = net(x, t, y=y), net(x, t, y=y, null_y=on), net(x, t, y=y, null_t=on)
    paper = den.to_x0(f_c + 1.5 * (f_c - f_y) + 0.75 * (f_c - f_t), x, t)   # the paper's "with CFG" formula
    for g in (GuidedDenoiser(den, [ClassifierFreeGuidance(1.5), ClassifierFreeNAG(0.75)]),
              guide(den, 'cfg:w=1.5', 'cf-nag:w=0.75'), GuidedDenoiser(den, w_cfg=1.5, w_nag=0.75)):
        net.calls, net.batches = 0, []
        rec = g.denoise(x, t, y=y)
        assert net.calls == 1 and net.batches == [3 * len(x)]         # one batched forward for three branches
        _close(rec.x0, paper)
        assert torch.equal(rec.branches['cond'], f_c) and torch.equal(rec.branches['null_y'], f_y)
        assert torch.equal(rec.branches['null_t'], f_t)
        assert torch.equal(g(x, t, y=y), rec.x0)                       # calling the wrapper gives the record's x0
    # each guidance alone: two branches, one forward
    net.calls, net.batches = 0, []
    _close(GuidedDenoiser(den, w_cfg=2.0)(x, t, y=y), den.to_x0(nag_mix(f_c, f_y, 2.0), x, t))
    _close(guide(den, 'cf-nag:w=2')(x, t, y=y), den.to_x0(nag_mix(f_c, f_t, 2.0), x, t))
    assert net.calls == 2 and net.batches == [2 * len(x)] * 2

@torch.no_grad()
def test_cfg_nag_and_self_guidance_compose_in_one_forward():
    """Three guiders, four branches ((c, t), (null_c, t), (c, null_t), (c, t + dt)): one forward of the 4N batch,
    and the sum of the three terms."""
    net, (x, t, y) = FakeNet(), _batch()
    x, t = x.double(), t.double()
    den = Denoiser(net, 'ddpm')
    on = torch.ones(len(x), dtype=torch.bool)
    f_c, f_y, f_t = net(x, t, y=y), net(x, t, y=y, null_y=on), net(x, t, y=y, null_t=on)
    f_dt = net(x, (t + 0.1).clamp(max=1.0), y=y)
    net.calls, net.batches = 0, []
    rec = guide(den, 'cfg:w=1.5', 'cf-nag:w=0.75', 'self-guidance:w=0.5,dt=0.1').denoise(x, t, y=y)
    assert net.calls == 1 and net.batches == [4 * len(x)]
    _close(rec.x0, den.to_x0(f_c + 1.5 * (f_c - f_y) + 0.75 * (f_c - f_t) + 0.5 * (f_c - f_dt), x, t))
    assert set(rec.branches) == {'cond', 'null_y', 'null_t', 'self-guidance:main', 'guided'}

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
    # the shorthand's interval is each guider's window
    windowed = GuidedDenoiser(den, [ClassifierFreeGuidance(1.0, t_lo=0.3, t_hi=0.7), 'cf-nag:w=1,t_lo=0.3,t_hi=0.7'])
    assert torch.equal(windowed(x, t, y=y), out)
    net.batches = []
    GuidedDenoiser(den, w_nag=1.0, interval=(0.95, 1.0))(x, t, y=y)   # nobody inside: no extra branch
    guide(den, 'cf-nag:t_lo=0.95')(x, t, y=y)
    guide(den, 'cf-nag:t_lo=0.95')(x, 0.5, y=y)                      # a host time outside: decided on the host
    assert net.batches == [6, 6, 6]

@torch.no_grad()
def test_cfg_channels_guides_only_the_first_channels():
    net, (x, t, y) = FakeNet(), _batch()
    den = Denoiser(net, 'ddpm')
    full, three = (GuidedDenoiser(den, w_cfg=3.0, w_nag=0.5, cfg_channels=c)(x, t, y=y) for c in (None, 3))
    nag_only = GuidedDenoiser(den, w_nag=0.5)(x, t, y=y)
    assert torch.equal(three[:, :3], full[:, :3])
    assert torch.equal(three[:, 3:], nag_only[:, 3:])                 # channel 3: NAG only, no CFG
    assert not torch.equal(three[:, 3:], full[:, 3:])
    assert torch.equal(guide(den, 'cfg:w=3,channels=3', 'cf-nag:w=0.5')(x, t, y=y), three)
    with pytest.raises(ConfigError, match=r'channels=0 is out of range'): ClassifierFreeGuidance(3.0, channels=0)

def test_guided_denoiser_needs_a_denoiser():
    with pytest.raises(ConfigError, match='Denoiser'): GuidedDenoiser(FakeNet(), w_cfg=1.0)
    with pytest.raises(ConfigError, match='Denoiser'): GuidedDenoiser(FakeNet(), ['cf-nag'])

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
        slow = sum(post[:, j:j + 1] * p.from_x0_eps(gm.denoise(x, tj, path), gm.eps_hat(x, tj, path), x, tj, kind)
                   for j, tj in enumerate(GRID))
        torch.testing.assert_close(t_marginal_prediction(gm, x, GRID, path, kind), slow, rtol=1e-9, atol=1e-10)

@pytest.mark.parametrize('path', ['linear', 'gvp', 'ddpm'])
@pytest.mark.parametrize('w', [0.5, 2.0])
def test_classifier_free_nag_equals_classifier_based_nag_with_the_exact_posterior(path, w):
    """grad_x log p(t | x) = s_t(x) - E_{p(t'|x)}[s_t'(x)] on a grid with a uniform prior, so the score network's
    classifier-free NAG equals classifier-based NAG with the exact posterior (autograd through posterior_t), here
    guiding the oracle as an x0 network, to float64 rounding. Each sample sits at its own grid time."""
    gm = _ring()
    g = torch.Generator().manual_seed(5)
    t = GRID[torch.randint(20, 180, (64,), generator=g)]
    x = gm.sample_xt(64, t, path, generator=g)[0].double() + 0.1 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    cf = GuidedDenoiser(Denoiser(MixtureModel(gm, path, pred='score', t_grid=GRID), path), w_nag=w)
    cb_guider = ClassifierNAG(w, g=lambda x, tg: gm.posterior_t(x, tg, path), t_grid=GRID)
    cb = GuidedDenoiser(Denoiser(MixtureModel(gm, path, pred='x0', t_grid=GRID), path), [cb_guider])
    with torch.no_grad(): a, b = cf(x, t), cb(x, t)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert (a - gm.denoise(x, t, path)).abs().max() > 1e-2            # and the guidance does something
    # the same in score space, directly
    s_c, s_m = gm.score(x, t, path), t_marginal_prediction(gm, x, GRID, path, 'score')
    torch.testing.assert_close(s_c + w * (s_c - s_m), s_c + w * cb_guider.grad(x, t), rtol=1e-9, atol=1e-9)

def test_classifier_nag_with_log_g_and_its_neutral_settings():
    gm, path = _ring(), 'linear'
    x = gm.sample_xt(16, 0.4, path, generator=torch.Generator().manual_seed(6))[0].double()
    t = torch.full((16,), GRID[79].item(), dtype=torch.float64)
    den = Denoiser(MixtureModel(gm, path, pred='x0', t_grid=GRID), path)
    log_g = lambda x, t: interp_log_posterior(torch.log_softmax(gm.log_prob_grid(x, GRID, path), -1), GRID, t)
    cb = lambda *a, **k: GuidedDenoiser(den, [ClassifierNAG(*a, **k)])(x, t)
    a = cb(1.0, log_g=log_g)
    b = cb(1.0, g=lambda x, tg: gm.posterior_t(x, tg, path), t_grid=GRID)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # an in-memory estimator: anything with log_prob_t(x, t)
    est = type('Est', (), {'log_prob_t': staticmethod(log_g)})()
    assert torch.equal(GuidedDenoiser(den, [ClassifierNAG(1.0, estimator=est)])(x, t), a)
    assert torch.equal(cb(0.0, log_g=log_g), den(x, t))
    assert torch.equal(cb(1.0, log_g=log_g, t_lo=0.6, t_hi=0.9), den(x, t))      # t = 0.3975: outside the window
    assert not torch.equal(cb(1.0, log_g=log_g, t_lo=0.3, t_hi=0.9), den(x, t))
    for make in (lambda: GuidedDenoiser(den, [ClassifierNAG(1.0)]), lambda: guide(den, 'cb-nag')):
        with pytest.raises(ConfigError, match='cb-nag needs a noise-level posterior'): make()

def test_oracle_model_classes_and_null_tokens():
    gm, path = _ring(), 'gvp'
    m = MixtureModel(gm, path, pred='eps', t_grid=GRID)
    x = gm.sample_xt(10, 0.3, path, generator=torch.Generator().manual_seed(7))[0].double()
    y = torch.arange(10) % 8
    torch.testing.assert_close(m(x, 0.3), gm.eps_hat(x, 0.3, path))
    torch.testing.assert_close(m(x, 0.3, y=y, null_y=torch.ones(10, dtype=torch.bool)), gm.eps_hat(x, 0.3, path))
    torch.testing.assert_close(m(x, 0.3, y=y)[3:4], m.parts[3].eps_hat(x[3:4], 0.3, path))
    torch.testing.assert_close(m(x, 0.3, null_t=torch.ones(10, dtype=torch.bool)),
                               t_marginal_prediction(gm, x, GRID, path, 'eps'))

# ---- peer fixes ----

@torch.no_grad()
def test_eps_scaling():
    """The implied eps divided by lambda_t = 1 + w (k t + b - 1), x0 from the scaled eps: against an eps network
    divided by lambda_t directly; lambda_t = 1 (k = 0, b = 1) and w = 0 are the unguided denoiser bit for bit."""
    net, (x, t, y) = FakeNet(pred='eps'), _batch()
    den = Denoiser(net, 'ddpm')
    assert torch.equal(GuidedDenoiser(den, [EpsScaling(k=0.0, b=1.0)])(x, t, y=y), den(x, t, y=y))
    assert torch.equal(guide(den, 'eps-scaling:w=0,k=0.01')(x, t, y=y), den(x, t, y=y))
    x64, t64 = x.double(), t.double()
    for w in (1.0, 0.5):
        out = GuidedDenoiser(den, [EpsScaling(w, k=0.01, b=1.005)])(x, t, y=y)
        lam = (1 + w * (0.01 * t64 + 1.005 - 1))[:, None, None, None]
        want = Denoiser(lambda *a, **k: net(*a, **k).double() / lam, 'ddpm', pred='eps')(x64, t64, y=y)
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    # inside its window only
    ti = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.3])
    out, base = guide(den, 'eps-scaling:k=0.5,t_lo=0.3,t_hi=0.7')(x, ti, y=y), den(x, ti, y=y)
    inside = in_interval(ti, (0.3, 0.7))
    assert torch.equal(out[~inside], base[~inside]) and (out[inside] != base[inside]).flatten(1).any(1).all()

@torch.no_grad()
def test_autoguidance():
    good, weak, (x, t, y) = FakeNet(), FakeNet(scale=0.5), _batch()
    dg, dw = Denoiser(good, 'ddpm'), Denoiser(weak, 'ddpm')
    auto = lambda w, weak_den, **k: GuidedDenoiser(dg, [Autoguidance(w, weak=weak_den, **k)])(x, t, y=y)
    assert torch.equal(auto(2.0, dg), dg(x, t, y=y))                  # the same model twice: unguided
    assert torch.equal(auto(0.0, dw), dg(x, t, y=y))
    f_g, f_w = good(x, t, y=y), weak(x, t, y=y)
    good.batches, weak.batches = [], []
    torch.testing.assert_close(auto(1.5, dw), dg.to_x0(f_g + 1.5 * (f_g - f_w), x, t))
    assert good.batches == [len(x)] and weak.batches == [len(x)]      # two networks: one forward each
    # a weak model of another kind is converted to the good one's kind at the same (x, t)
    dw_v = Denoiser(lambda x, t, **k: get_interpolant('ddpm').convert(weak(x, t, **k), x, t, 'eps', 'v'), 'ddpm',
                    pred='v')
    torch.testing.assert_close(auto(1.5, dw_v), auto(1.5, dw), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match='autoguidance needs weak=PATH'): guide(dg, 'autoguidance')

@torch.no_grad()
def test_time_shift():
    """In D = 4096 (a 64 x 64 image) the mean square |x|^2 / D of a state pins its noise level: on the gvp path with
    data of mean square m = 0.25, a state at t = 0.5 plus extra noise of std 0.2 has the mean square of the t' solving
    m cos^2 + sin^2 = v (t' = 0.534), which the shift finds within its window. The estimate's relative std is
    sqrt(2 / D) = 0.022, about 0.012 in t here: each sample within 0.04 (three std), their mean within 0.01.
    Strength w feeds t + w (t' - t); the fed times are in the record."""
    D, n, p, m = 4096, 32, get_interpolant('gvp'), 0.25
    g = torch.Generator().manual_seed(9)
    f64 = dict(generator=g, dtype=torch.float64)
    x0, eps = 0.5 * torch.randn(n, D, **f64), torch.randn(n, D, **f64)
    xt = p.add_noise(x0, 0.5, eps) + 0.2 * torch.randn(n, D, **f64)
    v = m * 0.5 + 0.5 + 0.04
    t_star = 2 / math.pi * math.acos(math.sqrt((1 - v) / (1 - m)))
    seen = []
    den = Denoiser(lambda x, t, **k: seen.append(t) or x, p, pred='x0')         # records the time it is fed
    shift = lambda t, **k: GuidedDenoiser(den, [TimeShift(data_var=m, **k)]).denoise(xt, t)
    rec = shift(0.5, window=0.1, n_candidates=201)
    fed = seen[-1]
    assert (fed - t_star).abs().max() < 0.04 and abs(fed.mean() - t_star) < 0.01, (fed, t_star)
    assert torch.equal(rec.branches['t_fed'], fed)
    shift(0.5, w=0.5, window=0.1, n_candidates=201)
    torch.testing.assert_close(seen[-1] - 0.5, 0.5 * (fed - 0.5), rtol=1e-12, atol=1e-12)   # part of the way
    assert torch.equal(shift(0.5, window=0.0).x0, xt) and (seen[-1] == 0.5).all()
    assert torch.equal(shift(0.5, w=0.0, window=0.1).x0, xt) and (seen[-1] == 0.5).all()
    shift(torch.tensor([0.5] * 16 + [0.7] * 16, dtype=torch.float64), window=0.1, cutoff=0.6)
    assert (seen[-1][:16] == 0.5).all() and (seen[-1][16:] != 0.7).all()
    shift(torch.tensor([0.5] * 16 + [0.7] * 16, dtype=torch.float64), window=0.1, t_lo=0.6)   # the window: the same
    assert (seen[-1][:16] == 0.5).all() and (seen[-1][16:] != 0.7).all()

# ---- Self-Guidance and SG-prev on the exact mixture ----

GMM, PATH = get_mixture('gmm32'), get_interpolant('linear')

def _velocity(x, t):
    "The exact velocity of the gmm32 mixture at per-sample times, computed directly from the oracle."
    return PATH.from_x0_eps(GMM.denoise(x, t, PATH), GMM.eps_hat(x, t, PATH), x, t, 'v')

@torch.no_grad()
def test_self_guidance_is_the_model_at_a_noisier_level():
    """Self-Guidance adds w (f(x, t) - f(x, t + dt)), t + dt clipped at 1: against the exact mixture's velocity at
    both levels, computed directly, with both branches in one call of the network."""
    model = MixtureModel(GMM, PATH, pred='v')
    den = Denoiser(model, PATH)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8, 0.97, 0.99, 0.5, 0.3], dtype=torch.float64)
    x = GMM.sample_xt(8, t, PATH, generator=torch.Generator().manual_seed(0))[0].double()
    for w, dt in ((1.5, 0.05), (0.5, 0.2)):
        f, f_noisier = _velocity(x, t), _velocity(x, (t + dt).clamp(max=1.0))
        model.calls = 0
        rec = guide(den, f'self-guidance:w={w},dt={dt}').denoise(x, t)
        assert model.calls == 1
        torch.testing.assert_close(rec.x0, den.to_x0(f + w * (f - f_noisier), x, t), rtol=1e-10, atol=1e-10)
        assert torch.equal(rec.branches['self-guidance:main'], f_noisier)

def _sg_prev_direct(x, ts, w, heun:bool):
    """SG-prev by hand: a call's negative branch is the cond output of the latest earlier call at a strictly noisier
    time. Euler: step i uses step i - 1's output (step 0 is unguided). Heun: the call at (x_i, t_i) uses the one at
    (x_{i-1}, t_{i-1}) (the corrector call in between sits at t_i, not noisier), and the corrector call at t_{i+1}
    uses the one at (x_i, t_i)."""
    prev, n = None, len(x)
    for i in range(len(ts) - 1):
        t, t_next = ts[i].item(), ts[i + 1].item()
        f = _velocity(x, torch.full((n,), t, dtype=torch.float64))
        v = f if prev is None else f + w * (f - prev)
        x_euler = x + (t_next - t) * v
        if heun and t_next > 0:
            f_next = _velocity(x_euler, torch.full((n,), t_next, dtype=torch.float64))
            x = x + (t_next - t) * (v + f_next + w * (f_next - f)) / 2
        else: x = x_euler
        prev = f
    return x

@pytest.mark.parametrize('sampler', [sample_euler, sample_heun])
@torch.no_grad()
def test_sg_prev_uses_the_previous_calls_output_and_no_extra_forward(sampler):
    """SG-prev (self-guidance with prev=true) through a sampler equals the direct computation on the exact mixture,
    calls the network once per denoiser call (Euler: one per step; Heun: two per step, one on the last), and a second
    run starts a new trajectory (same result)."""
    model, w, ts = MixtureModel(GMM, PATH, pred='v'), 0.5, time_grid(6)
    x1 = torch.randn(8, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sg = guide(Denoiser(model, PATH), f'self-guidance:w={w},prev=true')
    runs = [sampler(sg, x1, ts, PATH) for _ in range(2)]
    assert model.calls == 2 * (6 if sampler is sample_euler else 2 * 6 - 1)
    torch.testing.assert_close(runs[0], _sg_prev_direct(x1, ts, w, sampler is sample_heun), rtol=1e-10, atol=1e-10)
    assert torch.equal(runs[0], runs[1])
    plain = sampler(Denoiser(model, PATH), x1, ts, PATH)
    assert (runs[0] - plain).abs().max() > 1e-3                       # and it does something

# ---- the registry ----

SPECS = ['cfg:w=1.5,t_lo=0.2,channels=3', 'cf-nag:w=0.25,t_hi=0.8', 'cb-nag:w=2', 'eps-scaling:w=1,k=0.1,b=1.01',
         'time-shift:w=0.5,data_var=0.25,window=0.1,cutoff=0.2,n_candidates=11', 'autoguidance:w=0.5',
         'self-guidance:w=2,dt=0.1,prev=True', 'nlc:w=0.5,t_lo=0.1', 'null-t:w=1,t_hi=0.9', 'none']
@pytest.mark.parametrize('spec', SPECS)
def test_every_guider_round_trips_through_its_spec(spec):
    "A guider's `spec` is the spec it was built from (w always, other defaults left out), as a string and a mapping."
    name = spec.partition(':')[0]
    bare = name if name == 'none' else f'{name}:w=1'                  # the default strength, shown
    assert get_guider(spec).name == name and get_guider(name).spec == bare and get_guider({'name': name}).spec == bare
    assert get_guider(spec).spec == spec and get_guider(get_guider(spec).spec).spec == spec

def test_spec_values_and_guiders_pass_through():
    assert set(GUIDERS) == {'none', 'cfg', 'cf-nag', 'cb-nag', 'eps-scaling', 'time-shift', 'autoguidance',
                            'self-guidance', 'nlc', 'null-t'}
    assert get_guider({'name': 'self-guidance', 'w': 2, 'prev': 'true'}).prev is True
    assert get_guider('cf-nag:w=1e30').w == 1e30                      # YAML reads 1e30 as a string
    g = SelfGuidance(0.5)
    assert get_guider(g) is g

@pytest.mark.parametrize('spec,message', [
    ('pag', "guidance='pag' is not allowed; choose one of: none, cfg, cf-nag, cb-nag, eps-scaling, time-shift, "
            "autoguidance, self-guidance"),
    ({'w': 1}, "guidance=None is not allowed; choose one of: none, cfg"),
    ('cfg:scale=2', "guidance 'cfg' has no option 'scale'; allowed: w, t_lo, t_hi, channels"),
    ('none:w=1', "guidance 'none' has no option 'w'; allowed: none"),
    ('self-guidance:step=2', "has no option 'step'; allowed: w, t_lo, t_hi, dt, prev"),
    ('cf-nag:w=lots', "guidance 'cf-nag': w='lots' is not allowed; allowed: a finite number"),
    ('cf-nag:w=nan', "not a finite number"),
    ('self-guidance:prev=maybe', "prev='maybe' is not allowed; allowed: true or false"),
    ('time-shift:n_candidates=2.5', "n_candidates=2.5 is not allowed; allowed: an integer >= 1"),
    ('cfg:channels=0', "guidance 'cfg': channels=0 is out of range"),
    ('self-guidance:dt=0', "guidance 'self-guidance': dt=0.0 is out of range"),
    ('cf-nag:t_lo=0.8,t_hi=0.2', "t_lo=0.8 > t_hi=0.2; allowed: t_lo <= t_hi"),
    ('cf-nag:t_hi=1.5', "t_hi=1.5 is out of range"),
    ('cf-nag:w', "'w' is not key=value; allowed: NAME:key=value,..."),
])
def test_bad_specs_are_one_line_errors(spec, message):
    "An unknown name lists the known ones; an unknown option names the allowed ones; a bad value its allowed values."
    with pytest.raises(ConfigError) as e: get_guider(spec)
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)

def test_guided_step_reads_nothing_back_from_the_device_without_an_interval(monkeypatch):
    """No host-device synchronisation in a guided step: with no guidance window, neither the guided denoiser (CFG,
    NAG and Self-Guidance) nor the toolkit's MLP asks a tensor for a Python bool or number (each would block on a
    GPU)."""
    net = build_model('mlp', dim=4, width=16, depth=1, num_classes=3).eval()
    x, t, y = torch.randn(5, 4), torch.full((5,), 0.5), torch.tensor([0, 1, 2, 0, 1])
    guided = [GuidedDenoiser(Denoiser(net, 'linear'), w_cfg=1.0, w_nag=0.5),
              guide(Denoiser(net, 'linear'), 'cfg', 'cf-nag:w=0.5', 'self-guidance:w=0.3')]
    for g in guided: g(x, t, y=y)                              # warm-up (lazy initialisation may read values)
    def refuse(*a): raise AssertionError('a tensor was read back to the host')
    for name in ('__bool__', 'item', '__float__', '__int__'): monkeypatch.setattr(torch.Tensor, name, refuse)
    with torch.no_grad():
        for g in guided: g(x, t, y=y)

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

# ---- the peers on NAG's axis: Noise Level Correction, the noise-unconditional ablation, the counts ----

def test_nlc_with_an_estimator_feeds_its_posterior_mean():
    "NLC reads a learned estimator's posterior mean (`mean`); w = 0 is the unguided call, bit for bit."
    from nag_toolkit.estimator import build_estimator
    gm = get_mixture('gmm32')
    den = Denoiser(MixtureModel(gm, 'linear', pred='v'), 'linear')
    est = build_estimator((32,), bins=20, width=16, depth=1).eval()
    x = gm.sample_xt(16, 0.3, 'linear', generator=torch.Generator().manual_seed(0))[0]
    with torch.no_grad():
        t_hat = est.mean(x).double().clamp(1e-4, 1.0)
        got = GuidedDenoiser(den, [get_guider('nlc', estimator=est)])(x.double(), 0.3)
        assert torch.allclose(got, den(x.double(), t_hat), atol=1e-9)
        assert torch.equal(GuidedDenoiser(den, [get_guider('nlc:w=0', estimator=est)])(x, 0.3), den(x, 0.3))

def test_the_ablation_refuses_an_untrained_null_token():
    "Like cf-NAG, the ablation needs a trained null-t token: a one-line error naming the guider."
    class Untrained(torch.nn.Module):
        pred, null_t_steps = 'v', 0
        def forward(self, x, t, **kw): return x
    with pytest.raises(ConfigError, match="null-t w=1 needs a trained null-t token"):
        GuidedDenoiser(Denoiser(Untrained(), 'linear'), ['null-t'])

def test_nfe_counts_through_a_sampler():
    "Euler at 8 steps: 8 evaluations per sample unguided, 16 with cf-NAG, 24 with CFG + cf-NAG, 8 with SG-prev."
    gm = get_mixture('ring8')
    den = Denoiser(MixtureModel(gm, 'linear', pred='v'), 'linear')
    x1 = torch.randn(6, gm.D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(6, dtype=torch.long)
    for specs, want in (([], 8), (['cf-nag'], 16), (['cfg', 'cf-nag'], 24), (['self-guidance:prev=true'], 8),
                        (['null-t'], 8)):
        gd = GuidedDenoiser(den, specs)
        before = network_rows(gd)
        sample_euler(gd, x1, time_grid(8), 'linear', extra_args={'y': y})
        assert (network_rows(gd) - before) / len(x1) == want, specs
