"""The noise-level estimator: calibration against the exact oracle on gmm32, log g(t|x), backbones."""
import torch, pytest
from nag_toolkit.estimator import build_estimator, train_estimator, calibration, NoiseLevelEstimator, DiTFeatureHead, exact_bin_posterior
from nag_toolkit.data import get_dataset, get_mixture
from nag_toolkit.core import ConfigError

@pytest.fixture(scope='module')
def trained():
    torch.manual_seed(0)
    ds = get_dataset('gmm32', n=20000)
    est = build_estimator(ds.shape, bins=100, width=256, depth=3)
    train_estimator(est, ds, 'linear', steps=1000, batch_size=512, progress=False)
    return est

def test_calibration_against_the_exact_posterior_on_gmm32(trained):
    """After 1000 steps (about 5 s on 2 cores) the estimator's posterior mean is within 0.04 of the exact one in every
    t-bin (mean over 256 forward states; measured 0.011-0.023) and KL(exact || g) stays below 0.1 nats (measured 0.02-0.06)."""
    cal = calibration(trained, get_mixture('gmm32'), 'linear', t_bins=10, n_per_bin=256)
    assert cal.mean_abs_gap.max() < 0.04, cal
    assert cal.kl.max() < 0.1, cal

def test_posterior_mean_and_map_track_the_true_t(trained):
    gm, g = get_mixture('gmm32'), torch.Generator().manual_seed(5)
    for t in (0.2, 0.5, 0.8):
        x = gm.sample_xt(512, t, 'linear', generator=g)[0]
        with torch.no_grad(): assert abs(trained.mean(x).mean().item() - t) < 0.03 and abs(trained.map(x).mean().item() - t) < 0.05

def test_log_prob_t_interpolates_bin_log_probabilities_and_has_a_gradient(trained):
    gm = get_mixture('gmm32')
    x = gm.sample_xt(8, 0.4, 'linear', generator=torch.Generator().manual_seed(1))[0].requires_grad_()
    c, width = trained.centers, trained.edges[1] - trained.edges[0]
    lp_bins = torch.log_softmax(trained.logits(x), -1)
    torch.testing.assert_close(trained.log_prob_t(x, c[40]), lp_bins[:, 40] - torch.log(width))
    mid = (c[40] + c[41]) / 2
    torch.testing.assert_close(trained.log_prob_t(x, mid), (lp_bins[:, 40] + lp_bins[:, 41]) / 2 - torch.log(width))
    # gradient in x against central finite differences (float64 copy of the network)
    est64 = trained.double()
    xd, v = x.detach().double(), torch.randn(8, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xd.requires_grad_()
    gr = torch.autograd.grad(est64.log_prob_t(xd, 0.4).sum(), xd)[0]
    h = 1e-6
    fd = (est64.log_prob_t(xd + h * v, 0.4) - est64.log_prob_t(xd - h * v, 0.4)) / (2 * h)
    torch.testing.assert_close((gr * v).sum(1), fd.detach(), rtol=1e-5, atol=1e-6)
    trained.float()

def test_exact_bin_posterior_rows_sum_to_one():
    est = build_estimator((32,), bins=20)
    p = exact_bin_posterior(get_mixture('gmm32'), torch.randn(5, 32), est, 'linear')
    torch.testing.assert_close(p.sum(1), torch.ones(5, dtype=torch.float64))

def test_backbones_for_images_and_a_dit():
    est = build_estimator((1, 8, 8), bins=10, channels=16)
    assert est.posterior(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    from nag_toolkit.models import build_model
    dit = build_model('DiT-S/2', input_size=8, num_classes=10)
    head = NoiseLevelEstimator(DiTFeatureHead(dit), bins=10)
    out = head.posterior(torch.randn(2, 4, 8, 8))
    assert out.shape == (2, 10) and not any(p.requires_grad for p in dit.parameters())
    with pytest.raises(ConfigError, match='sample_shape'): build_estimator((4, 4))
