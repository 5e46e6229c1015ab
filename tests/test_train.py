"""Training: exact resume, preemption, non-finite steps, one-line config errors, the CLI, and DDP on 2 CPU processes."""
import os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch, yaml
from safetensors.torch import load_file
import nag_toolkit.train as T
from nag_toolkit.core import ConfigError
from nag_toolkit.checkpoint import latest_checkpoint, load_checkpoint, load_model

SMALL = {'dataset': 'gmm32', 'dataset_options': {'n': 2000}, 'model_options': {'width': 64, 'depth': 2},
         'batch_size': 32, 'log_every': 2, 'ckpt_every': 1000}

def _weights(out):
    ck = load_checkpoint(out)
    return ck['model'], ck['ema'], ck['state']['step']

def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, '-m', 'nag_toolkit.cli', *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

def test_resume_is_exact(tmp_path):
    """20 steps straight, and 8 steps + resume to 20, give bit-identical weights, EMA and optimizer state."""
    T.train({**SMALL, 'steps': 20, 'out': str(tmp_path / 'a')})
    T.train({**SMALL, 'steps': 8, 'out': str(tmp_path / 'b')})
    T.train({**SMALL, 'steps': 20, 'out': str(tmp_path / 'b')})
    (ma, ea, sa), (mb, eb, sb) = _weights(tmp_path / 'a'), _weights(tmp_path / 'b')
    assert sa == sb == 20
    for k in ma: assert torch.equal(ma[k], mb[k]) and torch.equal(ea[k], eb[k]), k
    oa, ob = load_file(tmp_path / 'a/checkpoints/step_00000020/optim.safetensors'), load_file(tmp_path / 'b/checkpoints/step_00000020/optim.safetensors')
    assert all(torch.equal(oa[k], ob[k]) for k in oa)

def test_resume_refuses_other_settings_and_keeps_the_run(tmp_path):
    T.train({**SMALL, 'steps': 4, 'out': str(tmp_path)})
    before = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
    with pytest.raises(ConfigError, match='holds a run with other settings .*lr'):
        T.train({**SMALL, 'steps': 8, 'lr': 0.5, 'out': str(tmp_path)})
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == before

@pytest.mark.parametrize('bad,match', [
    ({'model': 'unet9'}, "model='unet9'"), ({'p_drop': 1.0}, r'p_drop=1.0 is out of range; allowed: \[0, 1\)'),
    ({'dataset': 'digits', 'dataset_options': {}, 'model': 'mlp'}, "dataset='digits' gives samples of shape"), ({'dataset': 'imagenet'}, "dataset='imagenet'"),
    ({'finetune_from': '/nonexistent/ckpt'}, "finetune_from='/nonexistent/ckpt' does not exist"), ({'batchsize': 3}, "'batchsize' is not a training option"),
    ({'hflip': True}, r"hflip=True flips images \[C, H, W\]; dataset='gmm32' gives samples of shape \(32,\)"),
    ({'num_workers': -1}, r"num_workers=-1 is out of range")])
def test_bad_config_fails_on_one_line_before_any_work(tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match) as e: T.train({**SMALL, 'steps': 2, 'out': str(tmp_path / 'run'), **bad})
    assert '\n' not in str(e.value)
    assert not (tmp_path / 'run').exists()

def test_batch_not_divisible_by_world_size():
    with pytest.raises(ConfigError, match='batch_size=10 is not divisible by the world size 4'): T.resolve(T.TrainConfig(batch_size=10), world_size=4)

def test_non_finite_steps_are_skipped_then_stop_training(tmp_path, monkeypatch):
    """Steps 3 and 4 give NaN: skipped and counted. From step 7 on every loss is NaN: with max_bad_steps=3 training
    stops with TrainingDiverged and the last good checkpoint (step 6) is left intact."""
    real, calls = T.batch_loss, {'n': 0}
    def flaky(*a, **k):
        calls['n'] += 1
        out = real(*a, **k)
        return out * float('nan') if calls['n'] in (3, 4) or calls['n'] >= 7 else out
    monkeypatch.setattr(T, 'batch_loss', flaky)
    with pytest.raises(T.TrainingDiverged, match='4 non-finite steps in a row'):
        T.train({**SMALL, 'steps': 50, 'ckpt_every': 3, 'max_bad_steps': 3, 'out': str(tmp_path)})
    m, e, step = _weights(tmp_path)
    assert step == 9 and all(torch.isfinite(v).all() for v in m.values())   # steps 7-9 skipped, checkpoint at 9 holds step-6 weights
    assert load_checkpoint(tmp_path)['state']['skipped'] == 5

def test_sigterm_checkpoints_exits_zero_and_the_same_command_resumes(tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(yaml.safe_dump({**SMALL, 'steps': 100000}))
    out = tmp_path / 'run'
    p = _cli('train', '--config', str(cfg), '--out', str(out))
    deadline = time.time() + 120
    while not (out / 'metrics.csv').exists() and time.time() < deadline: time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert 'received SIGTERM: checkpointed at step' in stdout
    k = _weights(out)[2]
    assert k > 0
    r = subprocess.run([sys.executable, '-m', 'nag_toolkit.cli', 'train', '--config', str(cfg), '--out', str(out), '--steps', str(k + 5)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    T.train({**SMALL, 'steps': k + 5, 'out': str(tmp_path / 'straight')})
    (m1, _, s1), (m2, _, s2) = _weights(out), _weights(tmp_path / 'straight')
    assert s1 == s2 == k + 5 and all(torch.equal(m1[n], m2[n]) for n in m1)

def test_cli_yaml_and_flags_and_one_line_errors(tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(yaml.safe_dump({**SMALL, 'steps': 3, 'p_drop': 0.3}))
    r = subprocess.run([sys.executable, '-m', 'nag_toolkit.cli', 'train', '--config', str(cfg), '--steps', '4', '--set', 'model_options.width=32', '--out', str(tmp_path / 'r')], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    st = load_checkpoint(tmp_path / 'r')['state']
    assert st['step'] == 4 and st['config']['p_drop'] == 0.3 and st['config']['model_options']['width'] == 32
    cfg.write_text('p_dropp: 0.1\n')
    r = subprocess.run([sys.executable, '-m', 'nag_toolkit.cli', 'train', '--config', str(cfg), '--out', str(tmp_path / 'bad')], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and "'p_dropp' is not a training option" in r.stderr
    assert not (tmp_path / 'bad').exists()

def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    """torchrun with 2 gloo processes and the same global batch: the weights after 6 steps agree with one process
    to 1e-5 (only the order of the float32 gradient reduction differs)."""
    args = ['train', '--dataset', 'gmm32', '--set', 'dataset_options.n=2000', '--set', 'model_options.width=64', '--set', 'model_options.depth=2',
            '--batch-size', '32', '--steps', '6', '--device', 'cpu']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'nag_toolkit.cli', *args, '--out', str(tmp_path / 'ddp')],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r1 = subprocess.run([sys.executable, '-m', 'nag_toolkit.cli', *args, '--out', str(tmp_path / 'one')], capture_output=True, text=True, timeout=300, env=env)
    assert r1.returncode == 0, r1.stderr
    (m2, _, _), (m1, _, _) = _weights(tmp_path / 'ddp'), _weights(tmp_path / 'one')
    for k in m1: torch.testing.assert_close(m2[k], m1[k], rtol=1e-5, atol=1e-5)

def test_finetune_from_a_run_starts_from_its_ema_with_the_papers_defaults(tmp_path):
    T.train({**SMALL, 'steps': 6, 'out': str(tmp_path / 'base')})
    run = T.setup(T.TrainConfig.from_dict({**SMALL, 'steps': 4, 'finetune_from': str(tmp_path / 'base'), 'out': str(tmp_path / 'ft')}))
    assert run['cfg'].lr == 1e-5 and run['cfg'].p_drop == 0.2          # the paper's fine-tuning recipe
    ema = load_checkpoint(tmp_path / 'base')['ema']
    assert all(torch.equal(v, ema[k]) for k, v in run['model'].state_dict().items())

def test_finetune_from_an_official_layout_dit_file(tmp_path):
    """A DiT weights file as the official repos write it (a plain state dict, .pt, no null-t key) initialises a DiT
    fine-tuning run on latent shards; the null-t embedding keeps its fresh initialisation."""
    from nag_toolkit.models import build_model, NULL_T_KEY
    from nag_toolkit.data import save_latent_shard
    opts = {'input_size': 8, 'num_classes': 10}
    src = build_model('DiT-S/8', **opts)
    torch.save({k: v for k, v in src.state_dict().items() if k != NULL_T_KEY}, tmp_path / 'DiT-S-8.pt')
    save_latent_shard(tmp_path / 'lat' / '000', torch.randn(32, 4, 8, 8), torch.randint(10, (32,)))
    cfg = {'dataset': 'latents', 'dataset_options': {'path': str(tmp_path / 'lat')}, 'model': 'DiT-S/8', 'model_options': opts,
           'batch_size': 8, 'steps': 2, 'finetune_from': str(tmp_path / 'DiT-S-8.pt'), 'out': str(tmp_path / 'ft')}
    run = T.setup(T.TrainConfig.from_dict(cfg))
    sd = run['model'].state_dict()
    assert all(torch.equal(sd[k], v) for k, v in src.state_dict().items() if k != NULL_T_KEY)
    T.train(cfg)
    assert _weights(tmp_path / 'ft')[2] == 2
    assert load_checkpoint(tmp_path / 'ft')['state']['null_t_steps'] == 2     # the run folder records it
    assert load_model(tmp_path / 'ft')[0].null_t_steps == 2

def test_import_pretrained_makes_a_run_folder_that_sampling_reads(tmp_path):
    """Official-layout weights become a nag_toolkit run (step 0, EMA = the weights) that load_model rebuilds."""
    from nag_toolkit.models import build_model, NULL_T_KEY
    src = build_model('DiT-S/8', input_size=8, num_classes=10)
    torch.save({k: v for k, v in src.state_dict().items() if k != NULL_T_KEY}, tmp_path / 'w.pt')
    from nag_toolkit.trained import import_pretrained
    import_pretrained(tmp_path / 'w.pt', tmp_path / 'run')
    model, state = load_model(tmp_path / 'run')
    assert state['step'] == 0 and state['pred'] == 'eps' and state['config']['path'] == 'ddpm'
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in src.state_dict().items() if k != NULL_T_KEY)
    assert state['null_t_steps'] == 0 and model.null_t_steps == 0


# --- real datasets: image folders, torchvision sets, memory-mapped latent shards ------------------------------------

def _png_folder(root, n=12, size=8):
    "An ImageFolder of `n` random RGB PNGs in two classes."
    from PIL import Image
    import numpy as np
    a = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        (root / f'c{i % 2}').mkdir(parents=True, exist_ok=True); Image.fromarray(a[i]).save(root / f'c{i % 2}' / f'{i:03d}.png')
    return root

def _latent_folder(root, n=(40, 24), shape=(4, 8, 8), dtype=torch.float16):
    "Latent shards of `n` rows each, latents of `shape` in `dtype`, labels in 0..4."
    from nag_toolkit.data import save_latent_shard
    g = torch.Generator().manual_seed(0)
    for k, m in enumerate(n): save_latent_shard(root / f'shard_{k:05d}', torch.randn(m, *shape, generator=g).to(dtype), torch.randint(5, (m,), generator=g))
    return root

TINY_UNET = {'model': 'digits', 'model_options': {'channels': 8}, 'batch_size': 8, 'log_every': 1, 'ckpt_every': 1000}

def test_trains_from_an_image_folder_on_the_command_line(tmp_path, capsys):
    from nag_toolkit.cli import main
    root = _png_folder(tmp_path / 'imgs')
    main(['train', '--dataset', 'folder', '--set', f'dataset_options.root={root}', '--model', 'digits', '--set', 'model_options.in_channels=3',
          '--set', 'model_options.channels=8', '--batch-size', '8', '--steps', '3', '--hflip', 'true', '--device', 'cpu', '--out', str(tmp_path / 'run')])
    assert 'trained to step 3' in capsys.readouterr().out
    ck = load_checkpoint(tmp_path / 'run')
    assert ck['state']['model_config']['num_classes'] == 2 and all(torch.isfinite(v).all() for v in ck['model'].values())

def test_trains_from_a_torchvision_dataset(tmp_path):
    res = T.train({**TINY_UNET, 'dataset': 'torchvision', 'dataset_options': {'name': 'FakeData', 'image_size': 8},
                   'model_options': {'channels': 8, 'in_channels': 3}, 'steps': 3, 'device': 'cpu', 'out': str(tmp_path)})
    assert res['step'] == 3 and res['run']['model'].num_classes == 10

def test_latent_folder_resume_is_exact_with_dataloader_workers(tmp_path):
    """On float16 latent shards, with the flip on: 8 straight steps (batches read in the loop) and 3 steps with one
    DataLoader worker + a resume to 8 with two workers give bit-identical weights, EMA and optimizer state."""
    lat = _latent_folder(tmp_path / 'lat')
    cfg = {**TINY_UNET, 'dataset': 'latents', 'dataset_options': {'path': str(lat)}, 'model_options': {'channels': 8, 'in_channels': 4},
           'hflip': True, 'device': 'cpu'}
    T.train({**cfg, 'steps': 8, 'out': str(tmp_path / 'a')})
    T.train({**cfg, 'steps': 3, 'num_workers': 1, 'out': str(tmp_path / 'b')})
    T.train({**cfg, 'steps': 8, 'num_workers': 2, 'out': str(tmp_path / 'b')})
    (ma, ea, sa), (mb, eb, sb) = _weights(tmp_path / 'a'), _weights(tmp_path / 'b')
    assert sa == sb == 8 and all(torch.equal(ma[k], mb[k]) and torch.equal(ea[k], eb[k]) for k in ma)
    oa, ob = (load_file(tmp_path / r / 'checkpoints/step_00000008/optim.safetensors') for r in 'ab')
    assert all(torch.equal(oa[k], ob[k]) for k in oa)

def test_a_run_from_before_new_fields_resumes(tmp_path):
    """A checkpoint whose config lacks fields added since (hflip, num_workers) resumes when they keep their defaults."""
    import json
    T.train({**SMALL, 'steps': 2, 'out': str(tmp_path)})
    st = latest_checkpoint(tmp_path) / 'state.json'
    d = json.loads(st.read_text()); del d['config']['hflip'], d['config']['num_workers']; st.write_text(json.dumps(d))
    assert T.train({**SMALL, 'steps': 3, 'out': str(tmp_path)})['step'] == 3
    # a field that is recorded is still compared: a run recorded with flips is not resumed without them
    st = latest_checkpoint(tmp_path) / 'state.json'
    d = json.loads(st.read_text()); d['config']['hflip'] = True; st.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match='hflip: True != False'): T.train({**SMALL, 'steps': 4, 'out': str(tmp_path)})

def test_ddp_on_latent_shards_with_workers_matches_one_process(tmp_path):
    """torchrun, 2 gloo processes, each reading only its half of every batch from memory-mapped float16 shards through
    one DataLoader worker, stopped at step 3 and resumed to 6: the weights agree with one straight process to 1e-5.
    (The MLP, as in the test above: a network with biases just before a GroupNorm gets ~0 gradients there, which Adam
    turns into lr-sized steps of rounding noise, so its two runs differ by ~1e-4 whatever the data path.)"""
    lat = _latent_folder(tmp_path / 'lat', shape=(32,))
    args = ['train', '--dataset', 'latents', '--set', f'dataset_options.path={lat}', '--set', 'model_options.width=64',
            '--set', 'model_options.depth=2', '--batch-size', '16', '--steps', '6', '--device', 'cpu']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    for steps in ('3', '6'):                                  # the same command again resumes
        r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'nag_toolkit.cli',
                            *args, '--steps', steps, '--num-workers', '1', '--out', str(tmp_path / 'ddp')], capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / 'ddp' / 'checkpoints').glob('step_*')) == ['step_00000003', 'step_00000006']
    from nag_toolkit.cli import main
    main([*args, '--out', str(tmp_path / 'one')])
    (m2, _, s2), (m1, _, s1) = _weights(tmp_path / 'ddp'), _weights(tmp_path / 'one')
    assert s1 == s2 == 6
    for k in m1: torch.testing.assert_close(m2[k], m1[k], rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize('source', ['folder', 'torchvision'])
def test_ddp_on_images_trains_like_one_process(tmp_path, source):
    """torchrun, 2 gloo processes, on an image folder and on a torchvision dataset (FakeData): both ranks train and
    the weights land where one process's do, up to 5% of how far the two steps moved them (the digits U-Net's
    rounding-noise steps, explained above, allow no element-wise 1e-5 bound)."""
    opts = ([f'dataset_options.root={_png_folder(tmp_path / "imgs")}'] if source == 'folder'
            else ['dataset_options.name=FakeData', 'dataset_options.image_size=8'])
    args = ['train', '--dataset', source, *[a for o in opts for a in ('--set', o)], '--model', 'digits',
            '--set', 'model_options.in_channels=3', '--set', 'model_options.channels=8', '--batch-size', '8',
            '--steps', '2', '--device', 'cpu']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        '-m', 'nag_toolkit.cli', *args, '--out', str(tmp_path / 'ddp')],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    from nag_toolkit.cli import main
    main([*args, '--out', str(tmp_path / 'one')])
    (m2, _, s2), (m1, _, s1) = _weights(tmp_path / 'ddp'), _weights(tmp_path / 'one')
    assert s1 == s2 == 2
    import yaml
    cfg = {'dataset': source, 'dataset_options': {o.split('=')[0][len('dataset_options.'):]: yaml.safe_load(o.split('=')[1])
                                                  for o in opts},
           'model': 'digits', 'model_options': {'in_channels': 3, 'channels': 8}, 'out': str(tmp_path / 'init')}
    m0 = T.setup(T.TrainConfig.from_dict(cfg))['model'].state_dict()
    moved = sum((m1[k] - m0[k]).norm()**2 for k in m1).sqrt()        # how far two steps took the weights
    gap = sum((m2[k] - m1[k]).norm()**2 for k in m1).sqrt()          # how far the two-process run is from one process
    print(f'{source}: moved {moved:.3g}, gap {gap:.3g}')
    assert gap < 0.05 * moved

def test_nag_through_an_untrained_null_t_token_is_refused_on_one_line(tmp_path):
    "Official weights (no null-t token): NAG is refused, naming the recipe; CFG is not; once fine-tuned, allowed."
    from nag_toolkit.models import build_model, NULL_T_KEY, load_pretrained
    from nag_toolkit.guidance import Denoiser, GuidedDenoiser
    src = build_model('DiT-S/8', input_size=8, num_classes=10)
    torch.save({k: v for k, v in src.state_dict().items() if k != NULL_T_KEY}, tmp_path / 'w.pt')
    m = load_pretrained(tmp_path / 'w.pt').model
    with pytest.raises(ConfigError, match='cf-nag w=2 needs a trained null-t token') as e:
        GuidedDenoiser(Denoiser(m, 'ddpm'), w_nag=2.0)
    assert '\n' not in str(e.value) and 'p_drop 0.2' in str(e.value) and 'lr 1e-5' in str(e.value)
    GuidedDenoiser(Denoiser(m, 'ddpm'), w_cfg=1.5)                            # CFG needs no null-t token
    m.null_t_steps = 300
    GuidedDenoiser(Denoiser(m, 'ddpm'), w_nag=2.0)
    T.train({**SMALL, 'steps': 3, 'p_drop': 0.0, 'out': str(tmp_path / 'nodrop')})
    assert load_model(tmp_path / 'nodrop')[0].null_t_steps == 0           # trained without dropout: refused too
