"""Metrics: Fréchet distance closed forms, mixture metrics (collapse, mode dropping), MMD and sliced W2 (`metrics`); the
offline digits feature network through torch-fidelity and the content-keyed reference cache (`image_metrics`); FID from
npz shards and `nag-toolkit eval` (`eval_samples`); and one-line errors."""
import urllib.error
import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from torch_fidelity.metric_fid import fid_statistics_to_metric
import nag_toolkit.image_metrics as IM
from nag_toolkit.metrics import frechet_distance, gaussian_stats, mixture_metrics, mmd_rbf, sliced_w2
from nag_toolkit.image_metrics import (train_digits_features, digits_split, digits_accuracy, image_metrics, reference_features,
                                       load_feature_extractor, as_images, to_uint8, UInt8Images)
from nag_toolkit.eval_samples import fid_from_npz
from nag_toolkit.analytic import GaussianMixture
from nag_toolkit.core import ConfigError
from nag_toolkit.data import get_mixture, get_dataset


def _rand_spd(d, g, rank=None):
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T + (0 if rank else 0.1 * torch.eye(d, dtype=torch.float64))


# --- Fréchet distance -------------------------------------------------------------------------------------------

def test_frechet_commuting_closed_form_and_self_distance():
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)
    a, b = f64([2., 0.5, 3., 1e-8]), f64([0.5, 0.5, 0., 4.])                 # with a zero and a near-zero variance
    mu1, mu2 = f64([1., -2., 0., 3.]), f64([0., 0., 0.5, 3.])
    want = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(want.item(), rel=1e-12)
    # commuting but not diagonal: rotate both covariances by one orthogonal matrix
    q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    got = frechet_distance(q @ mu1, q @ torch.diag(a) @ q.T, q @ mu2, q @ torch.diag(b) @ q.T)
    assert got == pytest.approx(want.item(), rel=1e-9)
    g = torch.Generator().manual_seed(1)
    for cov in (_rand_spd(8, g), _rand_spd(8, g, rank=2)):              # full rank and singular
        assert frechet_distance(torch.ones(8), cov, torch.ones(8), cov) == pytest.approx(0.0, abs=1e-9)


def test_frechet_matches_scipy_sqrtm_on_non_commuting_pair():
    g = torch.Generator().manual_seed(2)
    c1, c2 = _rand_spd(10, g), _rand_spd(10, g)
    assert not torch.allclose(c1 @ c2, c2 @ c1)
    mu1, mu2 = torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    covmean = scipy.linalg.sqrtm(c1.numpy() @ c2.numpy())
    want = ((mu1 - mu2) ** 2).sum().item() + np.trace(c1.numpy()) + np.trace(c2.numpy()) - 2 * np.trace(covmean).real
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(mu2.numpy(), c2.numpy(), mu1.numpy(), c1.numpy()) == pytest.approx(want, rel=1e-9)   # symmetric, numpy in
    with pytest.raises(ConfigError, match=r"allowed: \[D\], \[D, D\]"): frechet_distance(mu1[:3], c1, mu2, c2)


def test_fid_of_gaussian_feature_sets_via_stats_equals_closed_form_and_torch_fidelity():
    g = torch.Generator().manual_seed(3)
    a, b = torch.tensor([1.0, 2.0, 0.5, 1.5]), torch.tensor([0.5, 2.0, 1.0, 3.0])
    mu1, mu2 = torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([0.5, 0.0, 0.0, 0.0])
    f1 = mu1 + a.sqrt() * torch.randn(40_000, 4, generator=g, dtype=torch.float64)
    f2 = mu2 + b.sqrt() * torch.randn(40_000, 4, generator=g, dtype=torch.float64)
    s1, s2 = gaussian_stats(f1), gaussian_stats(f2)
    closed = ((mu1 - mu2) ** 2).sum().item() + ((a.sqrt() - b.sqrt()) ** 2).sum().item()
    assert frechet_distance(*s1, *s2) == pytest.approx(closed, abs=0.03)
    tf = fid_statistics_to_metric({'mu': s1[0].numpy(), 'sigma': s1[1].numpy()}, {'mu': s2[0].numpy(), 'sigma': s2[1].numpy()}, False)
    assert frechet_distance(*s1, *s2) == pytest.approx(tf['frechet_inception_distance'], rel=1e-9)


# --- two-sided sample distances ----------------------------------------------------------------------------------

def test_mmd_zero_for_same_distribution_and_grows_with_mean_shift():
    g = torch.Generator().manual_seed(4)
    ref, same = torch.randn(800, 3, generator=g), torch.randn(800, 3, generator=g)
    shift = torch.tensor([1.0, 0, 0])
    vals = [mmd_rbf(same + s * shift, ref) for s in (0.0, 0.25, 0.5, 1.0)]
    assert abs(vals[0]) < 3e-3
    assert vals[0] < vals[1] < vals[2] < vals[3]
    assert abs(mmd_rbf(same, ref, bandwidth=1.0)) < 3e-3 < mmd_rbf(same + shift, ref, bandwidth=1.0)
    with pytest.raises(ConfigError, match="bandwidth=0"): mmd_rbf(same, ref, bandwidth=0)


@pytest.mark.parametrize('m', [0.0, 0.3, 1.0, -2.5])
def test_sliced_w2_in_1d_is_the_mean_shift(m):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(5000, 1, generator=g), torch.randn(4000, 1, generator=g) + m
    assert sliced_w2(x, y) == pytest.approx(abs(m), abs=0.05)
    assert sliced_w2(x, y, seed=3) == sliced_w2(x, y, seed=3)


# --- mixture metrics ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def gmm():
    gm, g = get_mixture('gmm32'), torch.Generator().manual_seed(6)
    true = gm.sample(1500, generator=g)
    k = torch.multinomial(gm.weights.float(), 1500, replacement=True, generator=g)
    return gm, true, gm.means[k].float(), gm.sample(1500, generator=g)


def test_collapse_lowers_nll_but_two_sided_metrics_see_it(gmm):
    gm, true, collapsed, ref = gmm
    t, c = mixture_metrics(gm, true, ref), mixture_metrics(gm, collapsed, ref)
    assert c['nll'] < t['nll'] - 10 and c['nll_gap'] < -10 < t['nll_gap'] < 1
    assert c['fd'] > 10 * t['fd'] and c['fd'] > 3
    assert c['sw2'] > 3 * t['sw2'] and c['mmd2'] > 10 * abs(t['mmd2']) + 1e-3
    assert c['coverage_tv'] < 0.06 and c['modes_missed'] == 0 and t['modes_missed'] == 0
    default_ref = mixture_metrics(gm, true)                              # fresh samples: nll_ref estimates the entropy
    assert default_ref['nll_ref'] == pytest.approx(t['nll_ref'], abs=0.5)


def test_mode_dropping_raises_coverage_tv_and_modes_missed(gmm):
    gm, true, _, ref = gmm
    keep = torch.ones(gm.K, dtype=torch.float64); keep[[0, 7]] = 0
    dropped = GaussianMixture(gm.means, gm.stds, gm.weights * keep).sample(1500, generator=torch.Generator().manual_seed(7))
    t, d = mixture_metrics(gm, true, ref), mixture_metrics(gm, dropped, ref)
    assert d['modes_missed'] == 2 and t['modes_missed'] == 0
    assert d['coverage_tv'] == pytest.approx(gm.weights[[0, 7]].sum().item(), abs=0.04) and d['coverage_tv'] > 5 * t['coverage_tv']


# --- the digits feature network and image metrics ----------------------------------------------------------------

@pytest.fixture(scope='module')
def net(tmp_path_factory):
    return train_digits_features(cache_dir=tmp_path_factory.mktemp('featnet'))


@pytest.fixture(scope='module')
def digits():
    return get_dataset('digits').x


def test_digits_feature_net_accuracy_and_its_cache(net):
    _, _, xte, yte = digits_split()
    assert digits_accuracy(net, xte, yte) > 0.9 and net.test_accuracy > 0.9
    mtime = net.path.stat().st_mtime_ns
    again = train_digits_features(cache_dir=net.path.parent)            # loaded, not retrained
    assert again.path == net.path and net.path.stat().st_mtime_ns == mtime
    assert train_digits_features(steps=5, cache_dir=net.path.parent).path != net.path   # other settings, other file


def test_image_metrics_small_between_halves_large_against_noise(net, digits, tmp_path):
    kw = dict(feature_net_path=net.path, cache_dir=tmp_path, device='cpu', kid_subsets=10)
    first, second = digits[0::2], digits[1::2]
    same = image_metrics(second, first, **kw)
    noise = image_metrics(torch.rand(second.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1, first, **kw)
    assert set(same) >= {'fid', 'kid_mean', 'kid_std', 'precision', 'recall', 'isc_mean', 'isc_std'}
    assert same['fid'] < 0.05 * noise['fid'] and same['kid_mean'] < 0.05 * noise['kid_mean']
    assert same['precision'] > 0.8 > 0.1 > noise['precision'] and same['recall'] > 0.8 and same['isc_mean'] > 8


def test_registered_extractor_works_inside_torch_fidelity(net, digits):
    a, b = digits[:400], digits[400:800]
    tf = torch_fidelity.calculate_metrics(input1=UInt8Images(a), input2=UInt8Images(b), feature_extractor='nag-digits',
                                          feature_extractor_weights_path=str(net.path), fid=True, cuda=False, cache=False,
                                          save_cpu_ram=True, verbose=False)
    fe = load_feature_extractor('nag-digits', feature_net_path=net.path, device='cpu')
    fa, fb = (IM.extract_features(fe, as_images(x))['features'] for x in (a, b))
    assert frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb)) == pytest.approx(tf['frechet_inception_distance'], rel=1e-4)


def test_reference_cache_hits_on_same_content_and_misses_on_one_pixel(net, digits, tmp_path, monkeypatch):
    calls = []
    real = IM.extract_features
    monkeypatch.setattr(IM, 'extract_features', lambda fe, images, *a, **k: calls.append(len(images)) or real(fe, images, *a, **k))
    kw = dict(feature_net_path=net.path, cache_dir=tmp_path, device='cpu', kid_subsets=2)
    ref, samples = digits[:300], digits[300:500]
    first = image_metrics(samples, ref, **kw)
    assert calls == [200, 300] or calls == [300, 200]                  # samples and reference
    calls.clear(); again = image_metrics(samples, ref.clone(), **kw)
    assert calls == [200] and again == first                            # reference read from the cache
    npz = tmp_path / 'ref.npz'; np.savez(npz, to_uint8(ref).permute(0, 2, 3, 1).numpy())
    calls.clear(); image_metrics(samples, npz, **kw)
    assert calls == [200]                                               # same pixels as an npz: same entry
    changed = ref.clone(); changed[17, 0, 3, 4] = -changed[17, 0, 3, 4] if changed[17, 0, 3, 4] != 0 else 1.0
    calls.clear(); image_metrics(samples, changed, **kw)
    assert sorted(calls) == [200, 300]                                  # one changed pixel: a miss
    assert len(list((tmp_path / 'reference').glob('*.safetensors'))) == 2


def test_reference_cache_key_includes_the_feature_weights(net, digits, tmp_path):
    other = train_digits_features(steps=50, cache_dir=net.path.parent)
    fe1 = load_feature_extractor('nag-digits', feature_net_path=net.path, device='cpu')
    fe2 = load_feature_extractor('nag-digits', feature_net_path=other.path, device='cpu')
    r1, r2 = reference_features(digits[:100], fe1, tmp_path), reference_features(digits[:100], fe2, tmp_path)
    assert len(list((tmp_path / 'reference').iterdir())) == 2 and not torch.equal(r1['features'], r2['features'])


# --- FID from npz shards ----------------------------------------------------------------------------------------

def test_fid_from_npz_shards_against_images_and_precomputed_stats(net, digits, tmp_path):
    first, second = digits[0::2], digits[1::2]
    nhwc = lambda x: to_uint8(x).permute(0, 2, 3, 1).numpy()
    (tmp_path / 'samples').mkdir()
    np.savez(tmp_path / 'samples' / 'shard_00000.npz', nhwc(second[:400]), np.arange(400))   # arr_1 (labels) ignored
    np.savez_compressed(tmp_path / 'samples' / 'shard_00001.npz', nhwc(second[400:]))
    np.savez(tmp_path / 'ref.npz', nhwc(first))
    kw = dict(feature_extractor='nag-digits', feature_net_path=net.path, cache_dir=tmp_path / 'cache', device='cpu')
    want = image_metrics(second, first, kid_subsets=2, **kw)['fid']
    got = fid_from_npz(tmp_path / 'samples', tmp_path / 'ref.npz', num_samples=None, **kw)
    assert got['fid'] == pytest.approx(want, rel=1e-5) and (got['n_samples'], got['n_reference']) == (len(second), len(first))
    fe = load_feature_extractor('nag-digits', ['features'], feature_net_path=net.path, device='cpu')
    mu, sigma = gaussian_stats(IM.extract_features(fe, as_images(first))['features'])
    np.savez(tmp_path / 'stats.npz', mu=mu.numpy(), sigma=sigma.numpy())
    assert fid_from_npz(tmp_path / 'samples', tmp_path / 'stats.npz', num_samples=len(second), **kw)['fid'] == pytest.approx(want, rel=1e-5)
    head = fid_from_npz(tmp_path / 'samples', tmp_path / 'ref.npz', num_samples=500, **kw)   # crosses the shard boundary
    assert head['n_samples'] == 500 and head['fid'] == pytest.approx(image_metrics(second[:500], first, kid_subsets=2, **kw)['fid'], rel=1e-5)


def test_fid_from_npz_errors(net, tmp_path):
    np.savez(tmp_path / 's.npz', np.zeros((10, 8, 8, 1), np.uint8))
    np.savez(tmp_path / 'big.npz', mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(tmp_path / 'float.npz', np.zeros((10, 8, 8, 1), np.float32))
    kw = dict(feature_extractor='nag-digits', feature_net_path=net.path, cache_dir=tmp_path, device='cpu')
    cases = [(lambda: fid_from_npz(tmp_path / 's.npz', tmp_path / 'big.npz', **kw), "num_samples=50000 needs as many (pass num_samples=10"),
             (lambda: fid_from_npz(tmp_path / 's.npz', tmp_path / 'big.npz', num_samples=None, **kw), "use the feature network that made it"),
             (lambda: fid_from_npz(tmp_path / 'float.npz', tmp_path / 's.npz', num_samples=None, **kw), "allowed: uint8 [N, H, W, C]"),
             (lambda: fid_from_npz(tmp_path / 'big.npz', tmp_path / 's.npz', num_samples=None, **kw), "has no array 'arr_0'"),
             (lambda: fid_from_npz(tmp_path / 'none', tmp_path / 's.npz', num_samples=None, **kw), "not found")]
    for f, msg in cases:
        with pytest.raises(ConfigError) as e: f()
        assert msg in str(e.value) and '\n' not in str(e.value)


# --- one-line configuration errors ------------------------------------------------------------------------------

def test_bad_feature_extractor_name_is_one_line(digits, tmp_path):
    with pytest.raises(ConfigError) as e: image_metrics(digits[:10], digits[10:20], feature_extractor='inception', cache_dir=tmp_path)
    msg = str(e.value)
    assert "feature_extractor='inception' is not allowed; choose one of:" in msg and 'nag-digits' in msg and '\n' not in msg


def test_missing_inception_weights_offline_say_how_to_provide_them(digits, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))            # an empty torch hub cache
    def offline(*a, **k): raise urllib.error.URLError('no network')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)     # nothing may reach the network
    x = digits[:10].expand(-1, 3, -1, -1)
    for kw in (dict(download=False), dict(download=True), dict(inception_weights=tmp_path / 'missing.pth')):
        with pytest.raises(ConfigError) as e: image_metrics(x, x, feature_extractor='inception-v3-compat', cache_dir=tmp_path, **kw)
        msg = str(e.value)
        assert 'pass inception_weights=PATH' in msg and 'weights-inception-2015-12-05-6726825d.pth' in msg and '\n' not in msg
    np.savez(tmp_path / 's.npz', np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ConfigError, match='pass inception_weights=PATH'):          # fid_from_npz defaults to Inception
        fid_from_npz(tmp_path / 's.npz', tmp_path / 's.npz', num_samples=None, download=False, cache_dir=tmp_path)


# --- nag-toolkit eval ----------------------------------------------------------------------------------------------

def test_eval_matches_torch_fidelity_and_writes_one_json(net, digits, tmp_path):
    """`evaluate` on two npz sample shards against the digits dataset gives torch-fidelity's own FID, precision,
    recall and Inception Score (calculate_metrics on the same uint8 images, same extractor and seed)."""
    import json
    from nag_toolkit.eval_samples import evaluate
    samples, nhwc = digits[1::2], lambda x: to_uint8(x).permute(0, 2, 3, 1).numpy()
    (tmp_path / 's').mkdir()
    np.savez(tmp_path / 's' / 'shard_00000.npz', nhwc(samples[:300])); np.savez(tmp_path / 's' / 'shard_00001.npz', nhwc(samples[300:]))
    res = evaluate({'samples': str(tmp_path / 's'), 'reference_dataset': 'digits', 'feature_extractor': 'nag-digits',
                    'feature_net_path': str(net.path), 'cache_dir': str(tmp_path / 'cache'), 'device': 'cpu', 'kid_subsets': 10})
    tf = torch_fidelity.calculate_metrics(input1=UInt8Images(samples), input2=UInt8Images(digits), feature_extractor='nag-digits',
                                          feature_extractor_weights_path=str(net.path), fid=True, isc=True, prc=True, cuda=False,
                                          cache=False, save_cpu_ram=True, verbose=False)
    assert res['fid'] == pytest.approx(tf['frechet_inception_distance'], rel=1e-4)
    assert (res['precision'], res['recall']) == pytest.approx((tf['precision'], tf['recall']), abs=1e-6)
    assert res['isc_mean'] == pytest.approx(tf['inception_score_mean'], rel=1e-4)
    assert (res['n_samples'], res['n_reference'], res['fid_reference']) == (len(samples), len(digits), 'reference features')
    assert json.loads((tmp_path / 's' / 'eval.json').read_text())['fid'] == res['fid']


def test_eval_command_against_an_adm_style_npz_and_its_errors(net, digits, tmp_path, capsys):
    """`nag-toolkit eval --reference REF.npz` with ADM's layout (arr_0 images plus mu/sigma): the FID comes from mu/sigma
    (here those of other images, so it differs from the FID against arr_0's features), precision/recall from arr_0."""
    import json
    from nag_toolkit.cli import main
    nhwc = lambda x: to_uint8(x).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / 'samples.npz', nhwc(digits[:500]))
    fe = load_feature_extractor('nag-digits', ['features'], net.path, device='cpu')
    mu, sigma = gaussian_stats(IM.extract_features(fe, as_images(digits[1000:]))['features'])
    np.savez(tmp_path / 'ref.npz', nhwc(digits[500:1000]), mu=mu.numpy(), sigma=sigma.numpy())
    common = ['--feature-extractor', 'nag-digits', '--feature-net-path', str(net.path), '--cache-dir', str(tmp_path / 'c'), '--device', 'cpu']
    main(['eval', '--samples', str(tmp_path / 'samples.npz'), '--reference', str(tmp_path / 'ref.npz'), '--out', str(tmp_path / 'e'), *common])
    assert 'fid ' in capsys.readouterr().out
    res = json.loads((tmp_path / 'e' / 'eval.json').read_text())
    f = IM.extract_features(fe, as_images(digits[:500]))['features']
    assert res['fid'] == pytest.approx(frechet_distance(*gaussian_stats(f), mu, sigma), rel=1e-6) and res['fid_reference'] == 'npz mu/sigma'
    assert 0 < res['precision'] <= 1 and res['n_reference'] == 500
    with pytest.raises(SystemExit) as e: main(['eval', '--samples', str(tmp_path / 'samples.npz'), *common])
    assert e.value.code == 2 and 'give one of reference (a path) or reference_dataset' in capsys.readouterr().err
