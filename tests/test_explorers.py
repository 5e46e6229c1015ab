"""Explorers without a browser: set a control's value, check that the figure (PNG and axes data) and the numbers change;
caching is checked by counting network calls; the NAG explorer's re-render time on ring8 is printed, not asserted."""
import time
import numpy as np, pytest, torch
from nag_toolkit.explorers import (PathsExplorer, PosteriorExplorer, NAGExplorer, DropoutExplorer, settings_key, fig_png,
                                   SAMPLERS)
from nag_toolkit.interpolants import get_interpolant
from nag_toolkit.train import train

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "Two tiny ring8 runs, without and with noise-condition dropout."
    root = tmp_path_factory.mktemp('runs')
    for p in (0.0, 0.3):
        train({'dataset': 'ring8', 'steps': 120, 'batch_size': 64, 'p_drop': p, 'log_every': 20, 'ckpt_every': 120, 'out': str(root / f'p{p}')})
    return [root / 'p0.0', root / 'p0.3']

def test_paths_explorer_draws_x_t_of_the_chosen_path():
    ex = PathsExplorer('moons', n=400)
    png = ex.image.value
    ex.controls['t'].value = 0.55
    assert ex.image.value != png and ex.renders == 2
    for name in ('linear', 'vp'):
        ex.controls['path'].value = name
        p, t = get_interpolant(name), torch.tensor(0.55)
        np.testing.assert_allclose(ex.fig.axes[0].collections[0].get_offsets(), (p.alpha(t) * ex.x0 + p.sigma(t) * ex.eps).numpy(), atol=1e-5)
    assert 'vp' in ex.info.value and 'sigma = ' in ex.info.value

def test_paths_explorer_projects_a_mixture_in_32_dimensions():
    ex = PathsExplorer('gmm32', n=200)
    assert ex.fig.axes[0].collections[0].get_offsets().shape == (200, 2)

def test_posterior_explorer_step_slider_moves_the_marker():
    ex = PosteriorExplorer('gmm32', steps=6, n=64)
    pngs = set()
    for step in (1, 3, 5):              # 6 steps: 5 states with t > 0
        ex.controls['step'].value = step
        pngs.add(ex.image.value)
        assert ex.fig.axes[0].lines[2].get_xdata()[0] == pytest.approx(ex.rec.ts[step - 1])   # the scheduled-t line
        assert ex.fig.axes[1].lines[-1].get_ydata()[0] == step                                 # the heatmap marker
    assert len(pngs) == 3
    assert 'excess shift' in ex.info.value

def test_posterior_explorer_with_an_estimator_adds_g():
    from nag_toolkit.estimator import build_estimator
    est = build_estimator((32,), bins=20, width=32, depth=1)
    ex = PosteriorExplorer('gmm32', steps=4, n=32, estimator=est)
    assert len(ex.fig.axes) >= 3 and "g's" in [l.get_label() for l in ex.fig.axes[0].lines][2]

def test_nag_explorer_every_control_redraws_and_caching_skips_the_network():
    ex = NAGExplorer('ring8', n=200, n_shift=64)
    seen = {ex.image.value}
    for name, value in [('w_nag', 0.5), ('steps', 8), ('sampler', 'heun'), ('seed', 3), ('interval', (0.2, 0.8)), ('label', 'drawn'), ('w_cfg', 2.0)]:
        ex.controls[name].value = value
        assert ex.image.value not in seen, name
        seen.add(ex.image.value)
    calls = ex.model.calls
    ex.controls['w_nag'].value = 1.0; ex.controls['w_nag'].value = 0.5     # back to a setting already drawn
    after_new = ex.model.calls
    assert after_new > calls
    ex.controls['w_nag'].value = 1.0; ex.controls['w_nag'].value = 0.5
    assert ex.model.calls == after_new                                      # both settings cached: no network call

def test_nag_explorer_metrics_and_shift_follow_the_weight():
    ex = NAGExplorer('ring8', n=400, n_shift=64, steps=8)
    base = ex.run(settings_key(**ex.values))
    ex.controls['w_nag'].value = 0.25
    cur = ex.run(settings_key(**ex.values))
    assert cur['metrics']['nll_gap'] < base['metrics']['nll_gap'] - 0.1     # NAG sharpens the ring's samples (0.08 -> -0.25)
    assert 'w_nag = 0.25' in ex.info.value and 'nll_gap' in ex.info.value
    labels = [t.get_text() for t in ex.fig.axes[2].get_legend().get_texts()]
    assert labels == ['w_nag = 0', 'w_nag = 0.25']
    ys = [l.get_ydata() for l in ex.fig.axes[2].lines if l.get_label().startswith('w_nag')]
    np.testing.assert_allclose(ys[1], cur['shift'].excess_shift.values)

def test_nag_explorer_class_setting_enables_cfg():
    ex = NAGExplorer('ring8', n=200, n_shift=32, steps=6)
    assert ex.controls['w_cfg'].disabled
    ex.set(label='2', w_cfg=1.0)
    assert not ex.controls['w_cfg'].disabled
    assert ex.run(settings_key(**ex.values))['metrics']['modes_missed'] == 7

def test_every_sampler_runs():
    ex = NAGExplorer('ring8', n=100, n_shift=16, steps=4)
    for s in SAMPLERS:
        ex.set(sampler=s, w_nag=0.25)
        assert ex.error is None and np.isfinite(ex.run(settings_key(**ex.values))['metrics']['nll'])

def test_nag_explorer_rerender_time_on_ring8(capsys):
    ex = NAGExplorer('ring8')           # the defaults a user gets: n = 1000, 16 steps
    times = []
    for w in (0.25, 0.5, 0.75):
        t0 = time.perf_counter(); ex.controls['w_nag'].value = w; times.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); ex.controls['w_nag'].value = 0.25; cached = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nNAGExplorer ring8 (n=1000, 16 euler steps): new setting {np.mean(times):.2f} s (max {max(times):.2f}), cached setting {cached:.2f} s")

def test_widget_bundle_has_the_live_view_and_a_png_fallback():
    ex = PathsExplorer('ring8', n=100)
    b = ex._repr_mimebundle_()
    assert 'application/vnd.jupyter.widget-view+json' in b and b['image/png'] and b['text/plain'].startswith('PathsExplorer(')

def test_an_error_in_a_callback_is_shown_and_raised():
    ex = PathsExplorer('ring8', n=100)
    ex.draw = lambda fig, **v: 1 / 0
    with pytest.raises(ZeroDivisionError): ex.controls['t'].value = 0.9
    assert 'ZeroDivisionError' in ex.info.value and 'Traceback' in ex.error

def test_dropout_explorer_compares_runs_and_nag_takes_a_trained_run(runs):
    ex = DropoutExplorer(runs, t_bins=4, n_per_bin=32)
    names = list(ex.runs)
    assert names == ['p0.0 (p_drop=0)', 'p0.3 (p_drop=0.3)']
    assert len(ex.fig.axes[1].lines) == 2
    png = ex.image.value
    ex.set(runs=(names[1],), branch='both')
    assert ex.image.value != png and len(ex.fig.axes[1].lines) == 2 and len(ex.fig.axes[0].lines) == 2
    nag = NAGExplorer.from_run(runs[1], n=100, n_shift=16, steps=4)
    png = nag.image.value
    nag.controls['w_nag'].value = 0.5
    assert nag.image.value != png and nag.controls['label'].options == ('none',)

def test_fig_png_is_a_png():
    from matplotlib.figure import Figure
    assert fig_png(Figure(figsize=(1, 1)))[:4] == b'\x89PNG'
