"""Reliability through the real command line: outputs that cannot be written and non-finite numbers end on one line,
one writer per run folder, damaged checkpoints and shards are detected, and kill -9 at random moments (training,
checkpoint writes, sharded sampling) loses nothing: the same command run again ends as an uninterrupted run."""
import contextlib, io, json, multiprocessing as mp, os, random, shutil, socket, subprocess, sys, time
from pathlib import Path
import numpy as np, pytest, torch, yaml
from safetensors.torch import load_file
from nag_toolkit.cli import main, COMMANDS
from nag_toolkit.core import RunLock, LOCK_NAME
from nag_toolkit.checkpoint import load_checkpoint, checkpoint_damage
from nag_toolkit.sample import sample_shards, shard_done, shard_record
from nag_toolkit.train import train

TOY = Path(__file__).resolve().parent.parent / 'nbs' / 'pipelines' / 'toy.ipynb'
TINY = {'dataset': 'gmm32', 'dataset_options': {'n': 200}, 'model_options': {'width': 16, 'depth': 1}, 'batch_size': 16}
TRAIN = ['--dataset', 'gmm32', '--set', 'dataset_options.n=200', '--set', 'model_options.width=16',
         '--set', 'model_options.depth=1', '--batch-size', '16']

def _cli(argv, capsys)->tuple:
    "Run `nag-toolkit argv` in this process: (exit status, stdout, stderr)."
    try: main([str(a) for a in argv]); code = 0
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A tiny trained MLP run (3 steps) to sample from."
    out = tmp_path_factory.mktemp('rel') / 'run'
    train({**TINY, 'steps': 3, 'out': str(out)})
    return out

def _commands(tmp:Path, run:Path, out)->dict:
    "One command line per subcommand, writing into `out`."
    grid = tmp / 'grid.yaml'
    grid.write_text(yaml.safe_dump({'notebook': str(TOY), 'grid': {'a': [1.0]}}))
    return {'train': ['train', '--out', out, *TRAIN, '--steps', '2'],
            'estimator': ['estimator', '--out', out, '--dataset', 'ring8', '--steps', '2', '--batch-size', '8'],
            'sample': ['sample', '--checkpoint', run, '--out', out, '--num-samples', '2', '--steps', '2'],
            'study': ['study', '--quick', '--no-notebooks', '--out', out], 'sweep': ['sweep', grid, '--out', out],
            'findings': ['findings', tmp, '--out', Path(out) / 'findings.md'], 'demo': ['demo', '--out', out], 'latents': ['latents', '--out', out], 'eval': ['eval', '--samples', tmp, '--out', out]}

def test_every_subcommand_is_covered(run, tmp_path):
    assert set(_commands(tmp_path, run, tmp_path / 'x')) == set(COMMANDS)

# ---- outputs that cannot be written

def test_findings_refuses_a_file_path_through_a_file(tmp_path, capsys):
    f = tmp_path / 'FILE'; f.write_text('x')
    code, _, err = _cli(['findings', tmp_path, '--out', f / 'sub' / 'findings.md'], capsys)
    assert (code, err) == (2, f"error: out={str(f / 'sub')!r} runs through {str(f)!r}, which is not a folder; "
                              "allowed: a folder that can be created and written\n")

@pytest.mark.parametrize('case', ['through a file', 'a file'])
@pytest.mark.parametrize('cmd', ['train', 'estimator', 'sample', 'study', 'sweep', 'demo', 'latents', 'eval'])
def test_an_output_that_cannot_be_a_folder_is_one_line(cmd, case, run, tmp_path, capsys):
    f = tmp_path / 'FILE'; f.write_text('x')
    out = f / 'run' if case == 'through a file' else f
    code, _, err = _cli(_commands(tmp_path, run, out)[cmd], capsys)
    why = f"runs through {str(f)!r}, which is not a folder" if case == 'through a file' else 'is a file'
    assert (code, err) == (2, f"error: out={str(out)!r} {why}; allowed: a folder that can be created and written\n")
    assert f.read_text() == 'x'

RO_SCRIPT = '''
import contextlib, io, json, sys
from nag_toolkit.cli import main
res = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try: main(argv); code = 0
        except SystemExit as e: code = e.code
    res[name] = [code, err.getvalue()]
print(json.dumps(res))
'''

def _read_only_works()->bool:
    "Whether this machine lets us make a user+mount namespace (a read-only bind mount that binds root too)."
    return shutil.which('unshare') is not None and subprocess.run(['unshare', '-rm', 'true'], capture_output=True).returncode == 0

@pytest.mark.skipif(not _read_only_works(), reason='no user namespaces here: root ignores permission bits, and only a '
                                                   'read-only mount (unshare -rm) binds root too')
def test_a_read_only_output_is_one_line_for_every_command(run, tmp_path):
    """A read-only bind mount in a private mount namespace: refused even for root, for the folder and below it."""
    ro = tmp_path / 'ro'; ro.mkdir()
    cases = {f'{cmd} {where}': [str(a) for a in argv] for where, out in (('in', ro / 'run'), ('at', ro))
             for cmd, argv in _commands(tmp_path, run, out).items() if cmd != 'findings'}
    sh = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" && exec "$2" -c "$3" "$4"'
    p = subprocess.run(['unshare', '-rm', 'sh', '-c', sh, 'sh', str(ro), sys.executable, RO_SCRIPT, json.dumps(cases)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for name, (code, err) in res.items():
        out = ro / 'run' if name.endswith(' in') else ro
        why = f"cannot be created: {str(ro)!r} is not writable (Read-only file system)" if name.endswith(' in') else \
              'is not writable (Read-only file system)'
        assert (code, err) == (2, f"error: out={str(out)!r} {why}; allowed: a folder that can be created and written\n"), name
    assert list(ro.iterdir()) == []

# ---- numbers

NON_FINITE = [('train', ['--lr', 'nan'], 'lr=nan'), ('train', ['--t-max', 'inf'], 't_max=inf'),
              ('train', ['--set', 'ema_decay=.nan'], 'ema_decay=nan'), ('train', ['--grad-clip=-inf'], 'grad_clip=-inf'),
              ('train', ['--set', 'model_options.width=.inf'], 'model_options.width=inf'),
              ('sample', ['--w-nag', 'nan'], 'w_nag=nan'), ('sample', ['--w-cfg=-Infinity'], 'w_cfg=-inf'),
              ('sample', ['--t-lo', 'nan'], 't_lo=nan'), ('sample', ['--t-max', 'inf'], 't_max=inf'),
              ('sample', ['--vae-scale', 'nan'], 'vae_scale=nan'),
              ('sample', ['--sampler', 'ddim', '--set', 'sampler_options.eta=nan'], "sampler_options.eta='nan'"),
              ('study', ['--set', 'w_nag=[0.5, .nan]'], 'w_nag=nan'), ('study', ['--set', 'p_drop=.inf'], 'p_drop=inf'),
              ('study', ['--set', 'eps_b=nan'], 'eps_b=nan')]

@pytest.mark.parametrize('cmd,extra,named', NON_FINITE)
def test_nan_and_infinity_are_refused_on_one_line_naming_the_option(cmd, extra, named, run, tmp_path, capsys):
    code, _, err = _cli([*_commands(tmp_path, run, tmp_path / 'out')[cmd], *extra], capsys)
    assert (code, err) == (2, f"error: {named} is not a finite number; allowed: finite values\n")
    assert not (tmp_path / 'out').exists()

@pytest.mark.parametrize('cmd,extra,named', [('train', ['--steps', 'inf'], "steps='inf'"), ('sample', ['--num-samples', 'nan'], "num_samples='nan'"),
                                             ('study', ['--set', 'n_samples=.inf'], 'n_samples=inf')])
def test_non_finite_sizes_are_not_integers(cmd, extra, named, run, tmp_path, capsys):
    code, _, err = _cli([*_commands(tmp_path, run, tmp_path / 'out')[cmd], *extra], capsys)
    assert code == 2 and err.startswith(f"error: {named} has the wrong type") and err.count('\n') == 1

@pytest.mark.parametrize('key,value,named', [('grid', {'a': [1.0, float('nan')]}, 'grid.a=nan'), ('parameters', {'b': float('inf')}, 'parameters.b=inf')])
def test_sweep_grid_values_must_be_finite(key, value, named, tmp_path, capsys):
    g = tmp_path / 'g.yaml'
    g.write_text(yaml.safe_dump({'notebook': str(TOY), 'grid': {'a': [1.0]}, key: value}))
    code, _, err = _cli(['sweep', g, '--out', tmp_path / 'out'], capsys)
    assert (code, err) == (2, f"error: {named} is not a finite number; allowed: finite values\n")

# ---- one writer per run folder

def _hold(folder:str):
    "Hold `folder`'s run lock for two minutes (a forked process)."
    RunLock(folder).__enter__(); time.sleep(120)

def test_a_second_writer_is_refused_naming_the_holder(fork, run, tmp_path, capsys):
    """Another process holds the folder: train, sample, study and sweep each end on one line naming it, writing nothing."""
    out = tmp_path / 'out'; out.mkdir()
    holder = fork.Process(target=_hold, args=(str(out),)); holder.start()
    try:
        while not ((out / LOCK_NAME).exists() and (out / LOCK_NAME).read_text()): time.sleep(0.01)
        since = json.loads((out / LOCK_NAME).read_text())['since']
        for cmd in ('train', 'sample', 'study', 'sweep'):
            code, _, err = _cli(_commands(tmp_path, run, out)[cmd], capsys)
            assert (code, err) == (2, f"error: out={str(out)!r} is in use by pid {holder.pid} on host {socket.gethostname()} (since {since}); "
                                      "allowed: wait for that run to end, or another out\n"), cmd
            assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME], cmd    # nothing written
    finally: holder.kill(); holder.join()

def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    dead = subprocess.Popen(['true']); dead.wait()
    out = tmp_path / 'out'; out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({'pid': dead.pid, 'host': socket.gethostname(), 'since': 'earlier'}))
    code, _, err = _cli(['train', '--out', out, *TRAIN, '--steps', '2'], capsys)
    assert code == 0 and err.startswith(f"warning: out={str(out)!r} was held by pid {dead.pid} on host {socket.gethostname()}, "
                                        "which is gone; taking it over\n")
    assert (out / LOCK_NAME).read_text() == ''                                # released at the end

# ---- damaged files

def _flip(f:Path, at:int=-1):
    b = bytearray(f.read_bytes()); b[at] ^= 1; f.write_bytes(bytes(b))

def test_a_damaged_checkpoint_falls_back_then_fails_on_one_line(tmp_path, capsys):
    a, b = tmp_path / 'a', tmp_path / 'b'
    args = [*TRAIN, '--ckpt-every', '4']
    assert _cli(['train', '--out', a, *args, '--steps', '12'], capsys)[0] == 0
    assert _cli(['train', '--out', b, *args, '--steps', '8'], capsys)[0] == 0
    newest = b / 'checkpoints/step_00000008/model.safetensors'; _flip(newest)
    code, _, err = _cli(['train', '--out', b, *args, '--steps', '12'], capsys)
    assert code == 0 and err.startswith(f"warning: checkpoint {newest} is damaged or truncated (its size or SHA-256 differs "
                                        "from state.json); using the previous intact one, step_00000004\n")
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for part in ('model', 'ema'): assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    for d in (b / 'checkpoints').glob('step_*'): (d / 'optim.safetensors').write_bytes(b'')   # every checkpoint damaged
    code, _, err = _cli(['train', '--out', b, *args, '--steps', '12'], capsys)
    assert code == 2 and err.count('\n') == 1 and "there is no intact checkpoint in" in err
    one = b / 'checkpoints/step_00000012'
    code, _, err = _cli(['sample', '--checkpoint', one, '--out', tmp_path / 's', '--num-samples', '2', '--steps', '2'], capsys)
    assert (code, err) == (2, f"error: checkpoint {one / 'optim.safetensors'} is damaged or truncated (its size or SHA-256 differs "
                              "from state.json); allowed: an intact checkpoint (or its run folder)\n")

def test_resume_redoes_damaged_truncated_and_unrecorded_shards(run, tmp_path, capsys):
    args = ['sample', '--checkpoint', run, '--out', tmp_path, '--num-samples', '10', '--shard-size', '2', '--steps', '2']
    assert _cli(args, capsys)[0] == 0
    ref = {p.name: p.read_bytes() for p in tmp_path.glob('shard_*.npz')}
    _flip(tmp_path / 'shard_000000.npz', 100)                                     # damaged
    (tmp_path / 'shard_000001.npz').write_bytes(ref['shard_000001.npz'][:-9])     # truncated
    (tmp_path / 'shard_000002.json').unlink()                                     # killed before its record
    (tmp_path / 'shard_000003.json').write_text('{"samp')                         # a damaged record
    code, out, err = _cli(args, capsys)
    assert code == 0 and 'wrote 4 shard(s), 1 already finished, of 5' in out
    for k in (0, 1):    # each on its own line, above the progress bar
        assert f"\rwarning: {tmp_path / f'shard_00000{k}.npz'} is damaged or truncated (its size or SHA-256 differs " \
               f"from shard_00000{k}.json); writing it again\n" in err
    assert {p.name: p.read_bytes() for p in tmp_path.glob('shard_*.npz')} == ref

# ---- kill -9 at random moments, then the same command again

def _child(argv:list, env:dict):
    "A forked `nag-toolkit argv` with extra environment (the fault hooks)."
    os.environ.update(env); torch.set_num_threads(1)
    main([str(a) for a in argv])

@pytest.fixture(scope='module')
def fork():
    """Processes forked from a server that has imported the toolkit once: each trial costs milliseconds, not an import."""
    ctx = mp.get_context('forkserver')
    ctx.set_forkserver_preload(['torch', 'torch._dynamo', 'nag_toolkit.cli', 'nag_toolkit.train', 'nag_toolkit.sample'])
    return ctx

def _run(fork, argv, env=None)->int:
    p = fork.Process(target=_child, args=(argv, env or {})); p.start(); p.join(300)
    return p.exitcode

def _kill_at_random(fork, argv, out:Path, rng, window:float, env)->tuple:
    "Start the command, wait until it holds `out`, kill -9 it after a random delay; (delay, exit code)."
    p = fork.Process(target=_child, args=(argv, env)); p.start()
    deadline = time.time() + 120
    while not ((out / LOCK_NAME).exists() and (out / LOCK_NAME).read_text()) and time.time() < deadline and p.is_alive(): time.sleep(0.005)
    delay = rng.uniform(0, window); time.sleep(delay)
    p.kill(); p.join()
    return delay, p.exitcode

def _check_kills(seen:list):
    "Every fault-point trial died by SIGKILL; so did most random kills (a late one may find the run already finished)."
    assert all(code == -9 for kind, _, code in seen if kind != 'random'), seen
    random_codes = [code for kind, _, code in seen if kind == 'random']
    assert sum(code == -9 for code in random_codes) >= len(random_codes) // 2, seen

def _log_rows(out:Path)->list:
    "The rows of a run's metrics.csv, without the wall-clock columns."
    import csv
    with open(out / 'metrics.csv', newline='') as f:
        return [{k: v for k, v in r.items() if k not in ('seconds', 'data_wait')} for r in csv.DictReader(f)]

def _checkpoint_tensors(out:Path)->dict:
    ck = load_checkpoint(out)
    return {'step': ck['state']['step'], **{f'{part}.{k}': v for part in ('model', 'ema') for k, v in ck[part].items()},
            **{f'optim.{k}': v for k, v in load_file(ck['path'] / 'optim.safetensors').items()}}

def test_training_killed_at_random_moments_resumes_bit_identical(fork, tmp_path):
    argv = lambda out: ['train', '--out', out, *TRAIN, '--steps', '24', '--ckpt-every', '3', '--log-every', '2']
    assert _run(fork, argv(tmp_path / 'ref')) == 0
    ref, rng, seen = _checkpoint_tensors(tmp_path / 'ref'), random.Random(15), []
    ref_log = _log_rows(tmp_path / 'ref')
    assert [r['step'] for r in ref_log] == [str(s) for s in range(2, 25, 2)]
    trials = [('random', {'NAG_TOOLKIT_FAULT_DELAY': '0.02'})] * 3 + [
        ('checkpoint.write@2', {'NAG_TOOLKIT_FAULT': 'checkpoint.write@2'}),   # between two tensor files of the 1st checkpoint
        ('checkpoint.rename@3', {'NAG_TOOLKIT_FAULT': 'checkpoint.rename@3'}), # all files written, before the rename
        ('checkpoint.latest@2', {'NAG_TOOLKIT_FAULT': 'checkpoint.latest@2'})] # renamed, before the `latest` pointer
    for i, (kind, env) in enumerate(trials):
        out = tmp_path / f'trial{i}'
        if kind == 'random':
            for _ in range(2): seen.append((kind, *_kill_at_random(fork, argv(out), out, rng, 0.8, env)))
        else: seen.append((kind, None, _run(fork, argv(out), env)))
        assert _run(fork, argv(out)) == 0, seen                                  # the same command again
        got = _checkpoint_tensors(out)
        assert got['step'] == 24 and all(torch.equal(ref[k], got[k]) for k in ref if k != 'step'), (kind, seen)
        assert _log_rows(out) == ref_log, (kind, seen)                           # the log: each step once, no half rows
        assert not list((out / 'checkpoints').glob('.step_*')) and (out / LOCK_NAME).read_text() == ''
    print(seen); _check_kills(seen)

def test_sharded_sampling_killed_at_random_moments_ends_with_the_same_shards(fork, run, tmp_path):
    argv = lambda out: ['sample', '--checkpoint', run, '--out', out, '--num-samples', '24', '--shard-size', '2', '--steps', '3', '--batch-size', '2']
    assert _run(fork, argv(tmp_path / 'ref')) == 0
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.glob('shard_*.npz'))}
    ref, rng, seen = files(tmp_path / 'ref'), random.Random(16), []
    assert len(ref) == 12
    trials = [('random', {'NAG_TOOLKIT_FAULT_DELAY': '0.03'})] * 3 + [
        ('shard.write@3', {'NAG_TOOLKIT_FAULT': 'shard.write@3'}),     # the 3rd shard written, not yet renamed
        ('shard.record@2', {'NAG_TOOLKIT_FAULT': 'shard.record@2'})]   # the 2nd shard renamed, its record not written
    for i, (kind, env) in enumerate(trials):
        out = tmp_path / f'trial{i}'
        if kind == 'random':
            for _ in range(2): seen.append((kind, *_kill_at_random(fork, argv(out), out, rng, 0.8, env)))
        else: seen.append((kind, None, _run(fork, argv(out), env)))
        assert _run(fork, argv(out)) == 0, seen
        assert files(out) == ref, (kind, seen)
        assert all(shard_done(out / f'shard_{k:06d}.npz', 2) for k in range(12)) and not list(out.glob('*.tmp*'))
    print(seen); _check_kills(seen)

# ---- logs

def test_progress_bars_in_a_log_redraw_every_few_seconds(tmp_path, capsys):
    """stderr is not a terminal here (as in papermill or a batch log): 200 steps give a handful of redraws, not 200."""
    t0 = time.perf_counter()
    code, _, err = _cli(['train', '--out', tmp_path, *TRAIN, '--steps', '200', '--log-every', '1', '--ckpt-every', '1000'], capsys)
    redraws_allowed = 3 + (time.perf_counter() - t0) / 5                 # the first, the last, and one per 5 s
    assert code == 0 and 'train: 100%' in err and err.count('\r') <= redraws_allowed, err.count('\r')
