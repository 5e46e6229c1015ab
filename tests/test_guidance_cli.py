"""Guidance as one layer: every guider of the registry from the command line, one set of samples from every entry."""
import os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest, torch
from nag_toolkit.cli import main
from nag_toolkit.guidance import GUIDERS

def _cli(*args):
    "The real console entry point in a subprocess: (exit code, stdout, stderr)."
    env = {**os.environ, 'COLUMNS': '400'}                                # argparse wraps help at hyphens otherwise
    r = subprocess.run([sys.executable, '-m', 'nag_toolkit.cli', *map(str, args)], capture_output=True, text=True,
                       env=env)
    return r.returncode, r.stdout, r.stderr

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "A tiny MLP on the 32-D mixture (null-t token trained), a weaker one and an estimator, all made by the CLI."
    d = tmp_path_factory.mktemp('guidance')
    common = ['--dataset', 'gmm32', '--set', 'dataset_options.n=500', '--set', 'model_options.width=32',
              '--set', 'model_options.depth=1', '--batch-size', '32']
    for name, steps in (('good', 40), ('weak', 5)):
        main(['train', *common, '--steps', str(steps), '--out', str(d / name)])
    code, _, err = _cli('estimator', '--dataset', 'gmm32', '--set', 'dataset_options.n=500', '--steps', 20,
                        '--batch-size', 32, '--out', d / 'est')
    assert code == 0, err
    return d

SPECS = {'none': 'none', 'cfg': 'cfg', 'cf-nag': 'cf-nag', 'eps-scaling': 'eps-scaling', 'time-shift': 'time-shift',
         'self-guidance': 'self-guidance', 'cb-nag': 'cb-nag:estimator={est}',
         'autoguidance': 'autoguidance:weak={weak}', 'nlc': 'nlc:estimator={est}', 'null-t': 'null-t'}

def _sample(runs, out, *guidance, sampler='euler', extra=()):
    "Shards of 6 samples from the good model with the given --guidance specs; arr_0 of all shards."
    flags = [f for g in guidance for f in ('--guidance', g.format(est=runs / 'est', weak=runs / 'weak'))]
    main(['sample', '--checkpoint', str(runs / 'good'), '--out', str(out), '--num-samples', '6', '--shard-size', '3',
          '--steps', '6', '--sampler', sampler, '--batch-size', '6', *flags, *extra])
    return np.concatenate([np.load(p)['arr_0'] for p in sorted(Path(out).glob('shard_*.npz'))])

def test_specs_cover_the_registry():
    assert sorted(SPECS) == sorted(GUIDERS)

def _with_w(name:str, w)->str: return SPECS[name] + (',' if ':' in SPECS[name] else ':') + f'w={w}'

@pytest.mark.parametrize('name', [n for n in SPECS if n != 'none'])
def test_every_guider_at_w0_is_no_guidance_bit_for_bit_and_guides_at_w1(runs, tmp_path, name):
    base = _sample(runs, tmp_path / 'none', 'none')
    assert _sample(runs, tmp_path / 'w0', _with_w(name, 0)).tobytes() == base.tobytes()
    if name == 'cfg': return                     # the mixture model has no classes: CFG at w=1 on the digits below
    at1 = _sample(runs, tmp_path / 'w1', _with_w(name, 1))
    assert np.isfinite(at1).all() and at1.tobytes() != base.tobytes()

def test_cfg_guides_a_class_conditional_model_from_the_command_line(tmp_path):
    "CFG at w=1 on a tiny class-conditional digits model: the samples move; at w=0 they are the unguided ones."
    main(['train', '--dataset', 'digits', '--model', 'digits', '--set', 'model_options.channels=8', '--steps', '3',
          '--batch-size', '16', '--out', str(tmp_path / 'run')])
    shards = {}
    for spec in ('none', 'cfg:w=0', 'cfg:w=1,channels=1'):
        main(['sample', '--checkpoint', str(tmp_path / 'run'), '--out', str(tmp_path / spec), '--num-samples', '4',
              '--steps', '3', '--guidance', spec, '--format', 'npz'])
        shards[spec] = np.load(tmp_path / spec / 'shard_000000.npz')['arr_0']
    assert shards['cfg:w=0'].tobytes() == shards['none'].tobytes()
    assert shards['cfg:w=1,channels=1'].tobytes() != shards['none'].tobytes()

def test_sg_prev_and_a_composition_run_from_the_command_line(runs, tmp_path):
    base = _sample(runs, tmp_path / 'none', 'none', sampler='heun')
    prev = _sample(runs, tmp_path / 'prev', 'self-guidance:w=1,prev=true', sampler='heun')
    both = _sample(runs, tmp_path / 'both', 'cf-nag:w=1', 'self-guidance:w=0.5', sampler='heun')
    assert np.isfinite(prev).all() and prev.tobytes() != base.tobytes() and np.isfinite(both).all()

def test_cfg_on_an_unconditional_model_and_bad_specs_are_one_line_errors(runs, tmp_path):
    for spec, msg in (('cfg:w=1', "needs a class-conditional model"),
                      ('pag', "guidance='pag' is not allowed; choose one of: none, cfg, cf-nag"),
                      ('cf-nag:scale=2', "guidance 'cf-nag' has no option 'scale'; allowed: w, t_lo, t_hi"),
                      ('cb-nag:w=1', "cb-nag needs a noise-level posterior"),
                      ('cb-nag:estimator=' + str(tmp_path / 'nowhere'), "estimator")):
        code, _, err = _cli('sample', '--checkpoint', runs / 'good', '--out', tmp_path / 'x', '--guidance', spec)
        assert code == 2 and err.startswith('error: ') and err.count('\n') == 1 and msg in err, (spec, err)
        assert not list((tmp_path / 'x').glob('shard_*')) if (tmp_path / 'x').exists() else True

def test_help_names_the_guiders():
    code, out, _ = _cli('sample', '--help')
    assert code == 0 and '--guidance' in out and all(n in out for n in GUIDERS)

@pytest.mark.parametrize('sampler', ['euler', 'euler_maruyama'])
def test_sample_the_study_and_the_explorer_draw_the_same_samples(runs, tmp_path, sampler):
    "The same checkpoint, spec, sampler, grid, steps and seed: the same samples from the three entry points."
    from nag_toolkit.checkpoint import load_model
    from nag_toolkit.guidance import Denoiser
    from nag_toolkit.study import StudyConfig, start_noise, method, build_method, sample_method
    from nag_toolkit.explorers import NAGExplorer, settings_key
    from types import SimpleNamespace
    # one batch of 6 everywhere: a batched float kernel may round differently at another batch size
    x_cli = _sample(runs, tmp_path / 's', 'cf-nag:w=1', sampler=sampler,
                    extra=['--grid', 'uniform', '--seed', '3', '--shard-size', '6'])
    model, state = load_model(runs / 'good')
    cfg = StudyConfig(seed=3, path=state['config']['path'])
    ctx = SimpleNamespace(cfg=cfg, den=Denoiser(model, cfg.path), est=None, gm=None, path=cfg.path, data_var=1.0)
    den = build_method(method('cf-nag:w=1'), ctx)
    x_study = sample_method(cfg, den, sampler, 6, start_noise(cfg, 6, (32,)))
    ex = NAGExplorer.from_run(runs / 'good', n=6, n_shift=6, n_traj=2)
    x_explorer = ex.run(settings_key(1.0, 0.0, 6, sampler, 3, (0.0, 1.0), 'none', 'cf-nag'))['x0']
    assert torch.equal(x_study.float(), torch.from_numpy(x_cli)) and torch.equal(x_explorer.float(), x_study.float())
