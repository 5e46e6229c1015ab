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

# --- `nag-toolkit estimator`: the real command line, resume, faults, one-line errors, torchrun -----------------------
import os, subprocess, sys
import pandas as pd
from safetensors.torch import load_file
from nag_toolkit.core import RunWarning
from nag_toolkit.checkpoint import latest_checkpoint
from nag_toolkit.estimator import load_estimator

TINY = ['--dataset', 'ring8', '--set', 'dataset_options.n=2000', '--bins', '20', '--width', '32', '--depth', '2',
        '--steps', '12', '--batch-size', '64', '--lr', '0.01', '--ckpt-every', '3', '--log-every', '3',
        '--t-bins', '4', '--n-per-bin', '64', '--device', 'cpu']

def _estimator_cli(*args, env=None, torchrun=False):
    torchrun_args = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    launch = [sys.executable, *(torchrun_args if torchrun else [])]
    return subprocess.run([*launch, '-m', 'nag_toolkit.cli', 'estimator', *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})

def _same_tensors(a, b):
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """One uninterrupted 12-step run through the command line: the reference of the resume tests."""
    out = tmp_path_factory.mktemp('estimator') / 'straight'
    r = _estimator_cli(*TINY, '--out', str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"trained g(t | x) into {out} (estimator.safetensors, calibration.csv)\n"
    return out

def test_cli_writes_the_estimator_and_its_calibration(straight):
    cal = pd.read_csv(straight / 'calibration.csv')
    assert list(cal.columns) == ['t_lo', 't_hi', 'mean_abs_gap', 'kl', 'exact_mean_shift'] and len(cal) == 4
    assert cal.mean_abs_gap.notna().all() and (cal.kl >= 0).all()
    est = load_estimator(straight)                      # the run folder is what `cb-nag:estimator=DIR` reads
    assert est.bins == 20 and not est.training
    assert pd.read_csv(straight / 'metrics.csv').step.tolist() == [3, 6, 9, 12]
    assert latest_checkpoint(straight).name == 'step_00000012'

def test_rerun_of_a_finished_run_resumes_at_its_end_and_changes_nothing(straight, tmp_path):
    import shutil
    out = tmp_path / 'again'
    shutil.copytree(straight, out)
    before = {p.name: p.read_bytes() for p in (out / 'checkpoints').rglob('*') if p.is_file()}
    r = _estimator_cli(*TINY, '--out', str(out))
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in (out / 'checkpoints').rglob('*') if p.is_file()} == before   # no step taken
    assert _same_tensors(out / 'estimator.safetensors', straight / 'estimator.safetensors')
    assert (out / 'calibration.csv').read_text() == (straight / 'calibration.csv').read_text()

@pytest.mark.parametrize('fault,resumes_at', [('checkpoint.rename@2', 3),   # killed before the 2nd checkpoint's rename
                                              ('checkpoint.write@5', 6)])   # killed inside the 3rd checkpoint
def test_a_killed_run_run_again_ends_bit_identical_to_a_straight_run(straight, tmp_path, fault, resumes_at):
    out = tmp_path / 'killed'
    r = _estimator_cli(*TINY, '--out', str(out), env={'NAG_TOOLKIT_FAULT': fault})
    assert r.returncode == -9 and not (out / 'estimator.json').exists()
    assert latest_checkpoint(out).name == f'step_{resumes_at:08d}'
    with pytest.warns(RunWarning, match=f'unfinished run \\(step {resumes_at} of 12\\)'):
        assert load_estimator(out).bins == 20                          # an unfinished run: its newest checkpoint
    r = _estimator_cli(*TINY, '--out', str(out))                       # the same command again
    assert r.returncode == 0, r.stderr
    assert _same_tensors(out / 'estimator.safetensors', straight / 'estimator.safetensors')
    ck = 'checkpoints/step_00000012'
    for f in ('model.safetensors', 'optim.safetensors'): assert _same_tensors(out / ck / f, straight / ck / f), f
    assert (out / 'calibration.csv').read_text() == (straight / 'calibration.csv').read_text()
    assert pd.read_csv(out / 'metrics.csv').step.tolist() == [3, 6, 9, 12]           # each step logged once

def test_a_bad_option_is_one_error_line_with_exit_status_2_and_no_folder(tmp_path, capsys):
    r = _estimator_cli('--dataset', 'ring8', '--bins', '1', '--out', str(tmp_path / 'run'))
    assert (r.returncode, r.stderr) == (2, 'error: bins=1 is out of range; allowed: [2, inf]\n')
    from nag_toolkit.cli import main                                  # more of them, in this process
    for args, message in [(['--dataset', 'imagenet'], "dataset='imagenet' is not allowed"),
                          (['--set', 'dataset_options.nn=3'], "option 'nn' is not allowed for dataset 'ring8'"),
                          (['--channels', '12'], 'channels=12 is not allowed'),
                          (['--stepz', '3'], 'unrecognized arguments: --stepz 3')]:
        with pytest.raises(SystemExit) as e:
            main(['estimator', '--dataset', 'ring8', *args, '--out', str(tmp_path / 'run')])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err.splitlines()[-1], err
    assert not (tmp_path / 'run').exists()

def test_other_settings_on_an_existing_run_are_refused_on_one_line(straight, tmp_path):
    import shutil
    shutil.copytree(straight, tmp_path / 'run')
    r = _estimator_cli(*TINY, '--lr', '0.5', '--out', str(tmp_path / 'run'))
    assert r.returncode == 2 and r.stderr.count('\n') == 1
    assert 'holds a run with other settings (lr: 0.01 != 0.5)' in r.stderr

def test_torchrun_on_two_cpu_processes_matches_one_process(tmp_path):
    """torchrun with 2 gloo processes and the same global batch: each reads half of every batch, and the weights after
    6 steps agree with one process to 1e-5 (only the order of the float32 gradient reduction differs)."""
    args = [*TINY, '--steps', '6', '--lr', '0.001']
    r = _estimator_cli(*args, '--out', str(tmp_path / 'ddp'), torchrun=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count('trained g(t | x) into') == 1                # rank 0 finishes the run
    r1 = _estimator_cli(*args, '--out', str(tmp_path / 'one'))
    assert r1.returncode == 0, r1.stderr
    a, b = load_file(tmp_path / 'ddp' / 'estimator.safetensors'), load_file(tmp_path / 'one' / 'estimator.safetensors')
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    assert (tmp_path / 'ddp' / 'calibration.csv').exists()
