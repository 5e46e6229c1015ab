"""Sampling shards: the ADM layout, independence of batch size and world size, resume, PNG, guidance, one-line errors, the CLI."""
import os, re, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from nag_toolkit.core import ConfigError
from nag_toolkit.sample import sample_shards
from nag_toolkit.train import train

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A tiny digits U-Net trained for 3 steps (its samples are noise; these tests are about the files)."""
    out = tmp_path_factory.mktemp('digits') / 'run'
    train({'dataset': 'digits', 'dataset_options': {}, 'model': 'digits', 'model_options': {'channels': 8},
           'steps': 3, 'batch_size': 16, 'out': str(out)})
    return out

@pytest.fixture(scope='module')
def mlp_run(tmp_path_factory):
    """A tiny unconditional MLP on the 32-dimensional mixture."""
    out = tmp_path_factory.mktemp('mlp') / 'run'
    train({'dataset': 'gmm32', 'dataset_options': {'n': 500}, 'model_options': {'width': 32, 'depth': 1}, 'steps': 3, 'batch_size': 16, 'out': str(out)})
    return out

def _cfg(run, out, **kw):
    return {'checkpoint': str(run), 'out': str(out), 'num_samples': 11, 'shard_size': 4, 'steps': 3, 'batch_size': 3, **kw}

def _npz(folder):
    """{shard name: (arr_0, labels)} of a folder of npz shards."""
    return {p.name: (np.load(p)['arr_0'], np.load(p)['labels']) for p in sorted(Path(folder).glob('*.npz'))}

def _same(a, b):
    assert list(a) == list(b)
    for k in a: assert a[k][0].tobytes() == b[k][0].tobytes() and a[k][0].shape == b[k][0].shape and np.array_equal(a[k][1], b[k][1]), k

@pytest.fixture(scope='module')
def ref(run, tmp_path_factory):
    """The reference run: one process, batch size 3."""
    out = tmp_path_factory.mktemp('ref') / 'a'
    sample_shards(_cfg(run, out))
    return _npz(out)

def test_npz_shards_in_adm_layout(ref, run):
    assert list(ref) == ['shard_000000.npz', 'shard_000001.npz', 'shard_000002.npz']
    assert [len(x) for x, _ in ref.values()] == [4, 4, 3]                  # the last shard is partial
    for x, y in ref.values():
        assert x.dtype == np.uint8 and x.shape[1:] == (8, 8, 1)            # NHWC
        assert y.dtype == np.int64 and ((0 <= y) & (y < 10)).all()
    assert len({int(v) for _, y in ref.values() for v in y}) > 1           # 'random' labels

@pytest.mark.parametrize('batch_size', [1, 7])
def test_batch_size_does_not_change_the_samples(ref, run, tmp_path, batch_size):
    sample_shards(_cfg(run, tmp_path, batch_size=batch_size))
    _same(_npz(tmp_path), ref)

def test_world_size_does_not_change_the_samples(ref, run, tmp_path, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    for rank, mine in ((1, [1]), (0, [0, 2])):
        monkeypatch.setenv('RANK', str(rank))
        res = sample_shards(_cfg(run, tmp_path))
        assert res['written'] == mine and (res['rank'], res['world']) == (rank, 2)
    _same(_npz(tmp_path), ref)

def test_resume_rewrites_only_missing_shards(ref, run, tmp_path):
    sample_shards(_cfg(run, tmp_path))
    (tmp_path / 'shard_000001.npz').unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob('*.npz')}
    res = sample_shards(_cfg(run, tmp_path))
    assert res['written'] == [1] and res['skipped'] == [0, 2]
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in kept} == kept
    assert not list(tmp_path.glob('*.tmp*'))
    _same(_npz(tmp_path), ref)

def test_more_samples_extend_the_run(ref, run, tmp_path):
    """A run of 6 samples, then the same command with 11: shard 1 (partial before) is rewritten, shard 0 kept."""
    sample_shards(_cfg(run, tmp_path, num_samples=6))
    res = sample_shards(_cfg(run, tmp_path))
    assert res['written'] == [1, 2] and res['skipped'] == [0]
    _same(_npz(tmp_path), ref)

def test_png_shards(ref, run, tmp_path):
    sample_shards(_cfg(run, tmp_path, format='png'))
    from PIL import Image
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.lock', 'sampling.json', *(f'shard_00000{k}{e}' for k in range(3) for e in ('', '.json'))]
    files = sorted(tmp_path.rglob('*.png'))
    assert [f.relative_to(tmp_path).as_posix() for f in files[:2]] == ['shard_000000/000000000.png', 'shard_000000/000000001.png']
    assert files[-1].name == '000000010.png'
    img = np.asarray(Image.open(tmp_path / 'shard_000002' / '000000009.png'))
    assert np.array_equal(img, ref['shard_000002.npz'][0][1, ..., 0])     # the same pixels as the npz
    assert np.array_equal(np.load(tmp_path / 'shard_000002' / 'labels.npy'), ref['shard_000002.npz'][1])

def test_guidance_changes_the_samples_not_the_labels(ref, run, tmp_path):
    sample_shards(_cfg(run, tmp_path / 'nag', w_nag=1.0))
    sample_shards(_cfg(run, tmp_path / 'both', w_nag=1.0, w_cfg=1.5, t_lo=0.2, t_hi=0.9, sampler='ddpm'))
    nag = _npz(tmp_path / 'nag')
    assert any((nag[k][0] != ref[k][0]).any() for k in ref)
    assert all(np.array_equal(nag[k][1], ref[k][1]) for k in ref)
    assert sum(len(x) for x, _ in _npz(tmp_path / 'both').values()) == 11

def test_fixed_label(run, tmp_path):
    sample_shards(_cfg(run, tmp_path, label=7, num_samples=5))
    assert {int(v) for _, y in _npz(tmp_path).values() for v in y} == {7}

def test_vector_data_are_float32(mlp_run, tmp_path):
    sample_shards(_cfg(mlp_run, tmp_path, num_samples=5, sampler='euler_maruyama'))
    z = np.load(tmp_path / 'shard_000000.npz')
    assert z['arr_0'].dtype == np.float32 and z['arr_0'].shape == (4, 32) and np.isfinite(z['arr_0']).all()
    assert (z['labels'] == -1).all()

@pytest.mark.parametrize('bad,match', [
    ({'checkpoint': '/nonexistent/run'}, "checkpoint='/nonexistent/run' does not exist"),
    ({'sampler': 'rk4'}, "sampler='rk4' is not allowed; choose one of: euler, heun, ddpm, ddim, euler_maruyama, dpmpp_2m"),
    ({'num_samples': 0}, 'num_samples=0 is out of range'), ({'format': 'jpg'}, "format='jpg' is not allowed"),
    ({'grid': 'log'}, "grid='log' is not allowed"), ({'t_lo': 0.9, 't_hi': 0.1}, 't_lo=0.9 > t_hi=0.1'),
    ({'label': 'cat'}, "label='cat' is not allowed"), ({'label': 10}, "label='10' is out of range; allowed: 'random' or 0..9"),
    ({'sampler_options': {'eta': 1.0}}, "sampler_options has 'eta', which sampler='euler' does not take"),
    ({'steps': 'many'}, "steps='many' has the wrong type"), ({'w_nag': 'x'}, "w_nag='x' has the wrong type"),
    ({'temperature': 1.0}, "'temperature' is not a sampling option"), ({'grid': 'ddpm'}, "grid='ddpm' needs a discrete path"),
    ({'sampler': 'euler_maruyama', 'steps': 1}, 'steps=1 is out of range')])
def test_bad_config_is_one_line_and_writes_nothing(run, tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[')) as e:
        sample_shards({**_cfg(run, tmp_path / 'out'), **bad})
    assert '\n' not in str(e.value)
    assert not (tmp_path / 'out').exists()

@pytest.mark.parametrize('bad,match', [({'w_cfg': 1.0}, 'w_cfg=1.0 needs a class-conditional model'),
                                       ({'format': 'png'}, "format='png' cannot hold vector samples")])
def test_options_the_model_cannot_take(mlp_run, tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match): sample_shards({**_cfg(mlp_run, tmp_path / 'out'), **bad})
    assert not (tmp_path / 'out').exists()

def test_other_settings_in_the_same_folder_are_refused(run, tmp_path):
    sample_shards(_cfg(run, tmp_path, num_samples=4))
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(ConfigError, match=r"holds samples made with other settings \(w_nag: 0.0 != 0.5\)"):
        sample_shards(_cfg(run, tmp_path, w_nag=0.5))
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before

def _cli(*args):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    env.pop('RANK', None); env.pop('WORLD_SIZE', None)
    return subprocess.run([sys.executable, '-m', 'nag_toolkit.cli', *args], capture_output=True, text=True, env=env, timeout=120)

def test_cli_sample(ref, run, tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('shard_size: 4\nsteps: 3\nbatch_size: 5\n')
    p = _cli('sample', '--checkpoint', str(run), '--out', str(tmp_path / 's'), '--num-samples', '11', '--config', str(cfg), '--set', 'seed=0')
    assert p.returncode == 0, p.stderr
    assert 'wrote 3 shard(s), 0 already finished, of 3' in p.stdout
    _same(_npz(tmp_path / 's'), ref)
    bad = _cli('sample', '--checkpoint', str(run), '--out', str(tmp_path / 'bad'), '--sampler', 'rk4')
    assert bad.returncode == 2 and bad.stderr.strip().count('\n') == 0
    assert bad.stderr.startswith("error: sampler='rk4' is not allowed") and not (tmp_path / 'bad').exists()
    missing = _cli('sample', '--checkpoint', str(tmp_path / 'nope'), '--out', str(tmp_path / 'bad'))
    assert missing.returncode == 2 and 'does not exist' in missing.stderr and missing.stderr.strip().count('\n') == 0

def test_cli_non_finite_state_stops_on_one_line_and_keeps_finished_shards(mlp_run, tmp_path):
    """`--w-nag 1e30` drives the state to NaN: exit 1, one `error:` line naming the step, t and the guidance, no
    traceback, no shard holding a non-finite value, and the shards finished before (2 of 3 here) kept."""
    sample_shards(_cfg(mlp_run, tmp_path / 'ok', num_samples=8))               # two finished float32 shards ...
    out, finished = tmp_path / 's', [f'shard_00000{k}{e}' for k in (0, 1) for e in ('.npz', '.json')]
    out.mkdir()
    for f in finished: (out / f).write_bytes((tmp_path / 'ok' / f).read_bytes())  # ... in place before the run
    before = {f: (out / f).read_bytes() for f in finished}
    p = _cli('sample', '--checkpoint', str(mlp_run), '--out', str(out), '--num-samples', '11', '--shard-size', '4',
             '--steps', '3', '--batch-size', '3', '--w-nag', '1e30')
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = [s for s in re.split(r'[\r\n]', p.stderr) if s.strip() and not s.startswith('sample:')]  # no progress bar
    assert len(lines) == 1 and p.stderr.endswith(lines[0] + '\n') and 'Traceback' not in p.stderr, p.stderr
    want = (r"error: non-finite state at step [1-3] of 3 \(t=[0-9.e+-]+\) with guidance cf-nag:w=1e\+30 in shard 2; "
            rf"no shard holding it was written; 2 finished shard\(s\) kept in {re.escape(str(out))}")
    assert re.fullmatch(want, lines[0]), lines[0]
    assert sorted(p.name for p in out.glob('shard_*')) == sorted(finished)     # shard 2 not written, nothing temporary
    assert {f: (out / f).read_bytes() for f in finished} == before
    assert all(np.isfinite(x).all() for x, _ in _npz(out).values())

# --- loading reads only what sampling needs -------------------------------------------------------------------------

def test_importing_sample_does_not_import_training():
    code = "import nag_toolkit.sample, sys; assert 'nag_toolkit.train' not in sys.modules, 'train imported'"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr[-2000:]

def test_a_run_whose_optimizer_file_is_deleted_samples_the_same(ref, run, tmp_path):
    "The tiny run, copied, its optimizer state deleted: `sample_shards` works and writes the same samples as before."
    import shutil
    shutil.copytree(run, tmp_path / 'run')
    deleted = list((tmp_path / 'run' / 'checkpoints').glob('step_*/optim.safetensors'))
    for f in deleted: f.unlink()
    assert deleted
    sample_shards(_cfg(tmp_path / 'run', tmp_path / 'out'))
    _same(_npz(tmp_path / 'out'), ref)

def test_load_model_never_opens_the_optimizer_file(run, tmp_path, monkeypatch):
    """Garbage where the optimizer state was: `load_model` gives the checkpoint's EMA weights with no warning and opens
    no optimizer file (neither to hash it nor to read it), while `load_checkpoint`, which a resumed run uses, refuses."""
    import builtins, shutil, warnings
    import torch
    from safetensors.torch import load_file
    from nag_toolkit.checkpoint import load_model, load_checkpoint
    shutil.copytree(run, tmp_path / 'run')
    ck = sorted((tmp_path / 'run' / 'checkpoints').glob('step_*'))[-1]
    (ck / 'optim.safetensors').write_bytes(b'garbage, not a safetensors file')
    opened, real_open = [], builtins.open
    monkeypatch.setattr(builtins, 'open', lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                          # a fallback would warn
        model, state = load_model(tmp_path / 'run')
    monkeypatch.undo()
    assert state['step'] == 3 and any(f.endswith('ema.safetensors') for f in opened)       # its digest was checked
    assert not [f for f in opened if 'optim' in f], opened
    ema = load_file(ck / 'ema.safetensors')
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match='optim.safetensors is damaged or truncated'): load_checkpoint(tmp_path / 'run')
