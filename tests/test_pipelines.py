"""The training pipeline notebook run headlessly by papermill, with good and bad parameters."""
import json, subprocess, sys
from pathlib import Path
import pytest

NB = Path(__file__).resolve().parent.parent / 'nbs' / 'pipelines' / 'train.ipynb'

def _papermill(out_nb, *params):
    args = [sys.executable, '-m', 'papermill', str(NB), str(out_nb), '-k', 'nag-toolkit', '--cwd', str(out_nb.parent)]
    for k, v in params: args += ['-p', k, str(v)]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)

def _have_kernel():
    r = subprocess.run([sys.executable, '-m', 'jupyter', 'kernelspec', 'list', '--json'], capture_output=True, text=True)
    return r.returncode == 0 and 'nag-toolkit' in json.loads(r.stdout)['kernelspecs']

pytestmark = pytest.mark.skipif(not _have_kernel(), reason="the nag-toolkit kernel is registered by `make install`")

def test_papermill_trains_and_reports(tmp_path):
    r = _papermill(tmp_path / 'train.ipynb', ('out', tmp_path / 'run'), ('steps', 8), ('batch_size', 64))
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ('metrics.csv', 'loss.png', 'oracle_gap.csv', 'oracle_gap.png'): assert (tmp_path / 'run' / f).exists(), f
    assert (tmp_path / 'run' / 'checkpoints' / 'step_00000008').is_dir()

def test_unknown_parameter_stops_in_the_validation_cell_and_keeps_the_notebook(tmp_path):
    r = _papermill(tmp_path / 'bad.ipynb', ('out', tmp_path / 'run'), ('stepz', 8))
    assert r.returncode != 0
    assert "parameter 'stepz' is not a parameter of this notebook" in r.stderr
    assert (tmp_path / 'bad.ipynb').exists() and not (tmp_path / 'run').exists()

def test_wrong_type_stops_with_one_line(tmp_path):
    r = _papermill(tmp_path / 'bad.ipynb', ('out', tmp_path / 'run'), ('steps', 'many'))
    assert r.returncode != 0 and "steps='many' has the wrong type; allowed: int" in r.stderr
    assert not (tmp_path / 'run').exists()

def test_string_with_quotes_and_newlines_passes_through_unchanged(tmp_path):
    """A path holding quotes and a newline reaches the config unchanged and executes nothing."""
    weird = tmp_path / 'we\'ird "dir"\nx'
    r = _papermill(tmp_path / 'q.ipynb', ('out', weird), ('steps', 2), ('batch_size', 16))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (weird / 'metrics.csv').exists()

def test_papermill_trains_from_latent_shards(tmp_path):
    """`-p dataset latents -y 'dataset_options: {path: DIR}'` trains through the notebook, with a DataLoader worker
    (an image folder goes the same way with `-p dataset folder -y 'dataset_options: {root: DIR}'`)."""
    import torch
    from nag_toolkit.data import save_latent_shard
    save_latent_shard(tmp_path / 'lat' / 'shard_00000', torch.randn(64, 32).half(), torch.randint(3, (64,)))
    args = [sys.executable, '-m', 'papermill', str(NB), str(tmp_path / 'lat.ipynb'), '-k', 'nag-toolkit', '--cwd', str(tmp_path),
            '-p', 'out', str(tmp_path / 'run'), '-p', 'steps', '3', '-p', 'batch_size', '8', '-p', 'dataset', 'latents',
            '-y', f"dataset_options: {{path: '{tmp_path / 'lat'}'}}", '-y', 'options: {num_workers: 1}']
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / 'run' / 'checkpoints' / 'step_00000003' / 'state.json').read_text())['config']
    assert (cfg['dataset'], cfg['dataset_options'], cfg['num_workers']) == ('latents', {'path': str(tmp_path / 'lat')}, 1)
    assert (tmp_path / 'run' / 'loss.png').exists()

EST_NB = NB.parent / 'estimator.ipynb'

def _papermill_estimator(out_nb, yaml_param):
    args = [sys.executable, '-m', 'papermill', str(EST_NB), str(out_nb), '-k', 'nag-toolkit',
            '--cwd', str(out_nb.parent), '-y', yaml_param]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)

def test_estimator_pipeline_runs_run_estimator_alone_and_for_the_study(tmp_path):
    """Alone, `options` picks the data (the digits: the convolutional backbone and the forward check); with `study`,
    the estimator trains on the study's mixture into out/estimator and is calibrated against the exact posterior."""
    import pandas as pd
    alone, study = tmp_path / 'alone', tmp_path / 'study'
    opts = (f"options: {{dataset: digits, steps: 3, batch_size: 16, bins: 10, channels: 8, t_bins: 2, n_per_bin: 8, "
            f"out: '{alone}'}}")
    r = _papermill_estimator(tmp_path / 'alone.ipynb', opts)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(pd.read_csv(alone / 'calibration.csv').columns) == ['t_lo', 't_hi', 'mean_abs_gap', 'kl']
    assert (alone / 'checkpoints' / 'step_00000003').is_dir()
    r = _papermill_estimator(tmp_path / 'study.ipynb', f"study: {{out: '{study}', dataset: ring8, estimator_steps: 3}}")
    assert r.returncode == 0, r.stderr[-2000:]
    cal = pd.read_csv(study / 'estimator' / 'calibration.csv')
    assert 'exact_mean_shift' in cal.columns and len(cal) == 10
    st = json.loads((study / 'estimator' / 'checkpoints' / 'step_00000003' / 'state.json').read_text())
    assert (st['kind'], st['config']['dataset'], st['config']['steps']) == ('estimator', 'ring8', 3)
