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
from nag_toolkit.sample import sample_shards
from nag_toolkit.shards import shard_done, shard_record
from nag_toolkit.train import train
from nag_toolkit.checkpoint import load_model

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
    _record('A read-only output folder', 'every command', res['train in'][1], 'nothing is written', tmp_path)

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
        _record('A second writer on the same folder', 'train, sample, study, sweep', err.replace(since, 'SINCE')
                .replace(str(holder.pid), 'PID').replace(socket.gethostname(), 'HOST'), 'the first run, untouched', tmp_path)
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
    _record('A damaged newest checkpoint', 'train (resume)', err, 'the previous intact checkpoint, used with a warning; '
            'the resumed run equals a straight one', tmp_path)
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for part in ('model', 'ema'): assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    for d in (b / 'checkpoints').glob('step_*'): (d / 'optim.safetensors').write_bytes(b'')   # every checkpoint damaged
    code, _, err = _cli(['train', '--out', b, *args, '--steps', '12'], capsys)
    assert code == 2 and err.count('\n') == 1 and "there is no intact checkpoint in" in err
    one = b / 'checkpoints/step_00000012'
    sample = lambda out: _cli(['sample', '--checkpoint', one, '--out', out, '--num-samples', '2', '--steps', '2'], capsys)
    assert sample(tmp_path / 's')[0] == 0                       # sampling reads the weights, never the optimizer state
    _flip(one / 'ema.safetensors')
    code, _, err = sample(tmp_path / 's2')
    assert (code, err) == (2, f"error: checkpoint {one / 'ema.safetensors'} is damaged or truncated (its size or SHA-256 differs "
                              "from state.json); allowed: an intact checkpoint (or its run folder)\n")
    _record('A damaged checkpoint given to sample', 'sample', err, 'nothing is written', tmp_path)

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
    seen = next(l.rsplit('\r', 1)[-1] for l in err.splitlines() if 'shard_000000.npz' in l)    # as asserted above
    _record('Damaged, truncated or unrecorded sample shards', 'sample (rerun)', seen, 'every intact shard; the damaged '
            'ones are written again, identical', tmp_path)

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
    _record('kill -9 during training (random moments, and inside a checkpoint write)', 'train', '(the process dies; '
            'nothing is printed)', 'the last complete checkpoint; the same command resumes bit-identical, each log '
            'row once')

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
    _record('kill -9 during sharded sampling', 'sample', '(the process dies; nothing is printed)', 'every finished '
            'shard; the same command writes the rest, identical to a straight run')

# ---- logs

def test_progress_bars_in_a_log_redraw_every_few_seconds(tmp_path, capsys):
    """stderr is not a terminal here (as in papermill or a batch log): 200 steps give a handful of redraws, not 200."""
    t0 = time.perf_counter()
    code, _, err = _cli(['train', '--out', tmp_path, *TRAIN, '--steps', '200', '--log-every', '1', '--ckpt-every', '1000'], capsys)
    redraws_allowed = 3 + (time.perf_counter() - t0) / 5                 # the first, the last, and one per 5 s
    assert code == 0 and 'train: 100%' in err and err.count('\r') <= redraws_allowed, err.count('\r')

# ---- the reliability chapter's table (nbs/15e_reliability.ipynb shows it)

FAULTS = Path(__file__).resolve().parent.parent / 'nbs' / 'reliability_faults.json'

def _record(fault:str, command:str, sees:str, kept:str, tmp:Path|None=None):
    "Add or refresh one row of the chapter's table: the fault tried, the command, what the user sees, what is kept."
    if tmp is not None: sees = sees.replace(str(tmp), 'OUT')            # no temporary paths in the docs
    # the lines a user reads, without progress bars; an interrupt's counts depend on when it came: N
    lines = [l for part in sees.splitlines() for l in part.split('\r') if l.strip() and not BAR.match(l)]
    sees = '\n'.join(re.sub(r'\d+', 'N', l) if 'interrupted' in l.lower() else l for l in lines)
    rows = json.loads(FAULTS.read_text()) if FAULTS.exists() else {}
    rows[fault] = {'command': command, 'sees': sees.strip(), 'kept': kept}
    FAULTS.write_text(json.dumps(rows, indent=1, sort_keys=True, ensure_ascii=False) + '\n')

# ---- Ctrl-C through the real command line: a subprocess sent SIGINT once it has made progress

import re, signal
ROOT = Path(__file__).resolve().parent.parent
BAR = re.compile(r'^[\w ()/.-]+: *\d+%\|')

def _ctrl_c(argv:list, ready, env:dict|None=None, timeout:float=180)->tuple:
    "Run `python -m nag_toolkit.cli argv`, send SIGINT once `ready()` holds; (exit status, stdout, stderr)."
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT), **(env or {})}
    p = subprocess.Popen([sys.executable, '-m', 'nag_toolkit.cli', *map(str, argv)], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not ready() and p.poll() is None and time.time() < deadline: time.sleep(0.005)
    assert p.poll() is None, f"it ended before it was interrupted: {p.communicate()}"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err

def _one_line(err:str)->str:
    "The one line stderr holds besides progress bars and Jupyter kernels' own notices (asserted: one, no traceback)."
    lines = [l.rsplit('\r', 1)[-1] for l in err.splitlines()]
    other = [l for l in lines if l.strip() and not BAR.match(l) and not l.startswith('[IPKernelApp]')]
    assert len(other) == 1 and 'Traceback' not in err, err
    return other[0]

def _no_temps(d:Path)->list:
    "Temporary files or folders left anywhere under `d`."
    return [str(p) for p in d.rglob('*') if '.tmp' in p.name]

def test_ctrl_c_in_training_checkpoints_and_the_resumed_run_is_bit_identical(fork, tmp_path):
    argv = lambda out: ['train', '--out', out, *TRAIN, '--steps', '400', '--ckpt-every', '1000', '--log-every', '1']
    assert _run(fork, argv(tmp_path / 'ref')) == 0
    out = tmp_path / 'cut'
    code, _, err = _ctrl_c(argv(out), lambda: (out / 'metrics.csv').exists())
    line = _one_line(err)
    step = int(re.fullmatch(r'interrupted at step (\d+); checkpoint saved; the same command resumes', line)[1])
    assert code == 130 and 0 < step < 400
    assert (out / 'checkpoints/latest').read_text() == f'step_{step:08d}' and load_checkpoint(out)['state']['step'] == step
    assert not _no_temps(out) and (out / LOCK_NAME).read_text() == ''
    _record('Ctrl-C during training', 'train', line, 'a checkpoint at the step reached; the same command resumes '
            'and ends bit-identical to a straight run')
    assert _run(fork, argv(out)) == 0                                            # the same command again
    ref, got = _checkpoint_tensors(tmp_path / 'ref'), _checkpoint_tensors(out)
    assert got['step'] == 400 and all(torch.equal(ref[k], got[k]) for k in ref if k != 'step')
    assert _log_rows(out) == _log_rows(tmp_path / 'ref')

def test_ctrl_c_in_estimator_training_checkpoints_and_resumes_bit_identical(tmp_path, capsys):
    argv = lambda out: ['estimator', '--out', out, '--dataset', 'ring8', '--steps', '300', '--batch-size', '8',
                        '--width', '16', '--depth', '1', '--bins', '10', '--log-every', '1', '--n-per-bin', '8',
                        '--device', 'cpu']
    assert _cli(argv(tmp_path / 'ref'), capsys)[0] == 0
    out = tmp_path / 'cut'
    code, _, err = _ctrl_c(argv(out), lambda: (out / 'metrics.csv').exists())
    line = _one_line(err)
    step = int(re.fullmatch(r'interrupted at step (\d+); checkpoint saved; the same command resumes', line)[1])
    assert code == 130 and 0 < step < 300 and load_checkpoint(out)['state']['step'] == step
    assert not (out / 'estimator.safetensors').exists() and not _no_temps(out)
    _record('Ctrl-C during estimator training', 'estimator', line, 'a checkpoint at the step reached; the same '
            'command resumes and ends bit-identical to a straight run')
    assert _cli(argv(out), capsys)[0] == 0
    a, b = (load_file(d / 'estimator.safetensors') for d in (tmp_path / 'ref', out))
    assert all(torch.equal(a[k], b[k]) for k in a)

def test_ctrl_c_in_sampling_keeps_the_finished_shards(fork, run, tmp_path):
    argv = lambda out: ['sample', '--checkpoint', run, '--out', out, '--num-samples', '40', '--shard-size', '2',
                        '--steps', '3', '--batch-size', '2']
    assert _run(fork, argv(tmp_path / 'ref')) == 0
    out = tmp_path / 'cut'
    code, _, err = _ctrl_c(argv(out), lambda: (out / 'shard_000001.json').exists(),
                           env={'NAG_TOOLKIT_FAULT_DELAY': '0.1'})           # each shard waits before its rename
    line = _one_line(err)
    m = re.fullmatch(rf"interrupted; the shard being drawn was not kept; (\d+) finished shard\(s\) kept in "
                     rf"{re.escape(str(out))}; the same command resumes", line)
    assert code == 130 and m and not _no_temps(out) and (out / LOCK_NAME).read_text() == ''
    kept = [k for k in range(20) if shard_done(out / f'shard_{k:06d}.npz', 2)]
    assert kept == list(range(int(m[1]))) and 2 <= len(kept) < 20
    _record('Ctrl-C during sampling', 'sample', line, "every finished shard; the partial one's temporary file is "
            'removed; the same command writes the rest, identical to a straight run', tmp_path)
    assert _run(fork, argv(out)) == 0
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.glob('shard_*.npz'))}
    assert files(out) == files(tmp_path / 'ref')

@pytest.fixture(scope='module')
def images(tmp_path_factory):
    "A tiny VAE (diffusers' AutoencoderKL, random weights) and a folder of 24 random 16x16 images in two classes."
    from PIL import Image
    from diffusers import AutoencoderKL
    d = tmp_path_factory.mktemp('img')
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=('DownEncoderBlock2D',) * 2,
                  up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  sample_size=16).save_pretrained(d / 'vae')
    rng = np.random.default_rng(0)
    for i in range(24):
        (d / 'img' / f'c{i % 2}').mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / 'img' / f'c{i % 2}' / f'{i}.png')
    return d

def _latents_argv(images:Path, out:Path, root=None)->list:
    return ['latents', '--dataset', 'folder', '--set', f'dataset_options.root={root or images / "img"}',
            '--vae', images / 'vae', '--shard-size', '2', '--batch-size', '2', '--device', 'cpu', '--out', out]

def test_ctrl_c_in_latents_keeps_the_finished_shards(images, tmp_path):
    out = tmp_path / 'lat'
    code, _, err = _ctrl_c(_latents_argv(images, out), lambda: (out / 'shard_00001.json').exists(),
                           env={'NAG_TOOLKIT_FAULT_DELAY': '0.1', 'DIFFUSERS_VERBOSITY': 'error'})  # no notices
    line = _one_line(err)
    m = re.fullmatch(rf"interrupted; the shard being encoded was not kept; (\d+) finished shard\(s\) kept in "
                     rf"{re.escape(str(out))}; the same command resumes", line)
    shards = sorted(p.name for p in out.glob('*.safetensors') if shard_record(p).exists())   # finished: recorded
    assert code == 130 and m and shards == [f'shard_{k:05d}.safetensors' for k in range(int(m[1]))], (line, shards)
    assert 2 <= int(m[1]) < 12
    _record('Ctrl-C during latent extraction', 'latents', line, "every finished shard; the partial one's temporary "
            'file is removed; the same command encodes the rest', tmp_path)
    r = subprocess.run([sys.executable, '-m', 'nag_toolkit.cli', *map(str, _latents_argv(images, out))], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(ROOT)}, timeout=300)
    assert r.returncode == 0 and f'wrote {12 - int(m[1])} shard(s), {m[1]} already finished, of 12' in r.stdout

def test_ctrl_c_in_a_study_checkpoints_its_training(tmp_path):
    out = tmp_path / 'study'
    code, _, err = _ctrl_c(['study', '--quick', '--no-notebooks', '--out', out],
                           lambda: (out / 'denoiser' / 'metrics.csv').exists())
    line = _one_line(err)
    step = int(re.fullmatch(r'interrupted at step (\d+); checkpoint saved; the same command resumes', line)[1])
    assert code == 130 and load_checkpoint(out / 'denoiser')['state']['step'] == step
    assert not _no_temps(out) and (out / LOCK_NAME).read_text() == ''
    _record('Ctrl-C during a study', 'study', line, "the stage in flight's checkpoint and every finished stage; "
            'the same command resumes')

def test_ctrl_c_in_a_sweep_keeps_the_finished_runs(tmp_path):
    """Papermill kernels take seconds each to start; the runs in flight stop with the command (none finishes later)."""
    grid = tmp_path / 'grid.yaml'
    grid.write_text(yaml.safe_dump({'notebook': str(TOY), 'grid': {'a': [1.0, 2.0, 3.0, 4.0]}}))
    out = tmp_path / 'sw'
    code, _, err = _ctrl_c(['sweep', grid, '--out', out], lambda: any((out / 'runs').glob('*/done')))
    line = _one_line(err)
    m = re.fullmatch(rf"interrupted; (\d) finished run\(s\) of 4 kept in {re.escape(str(out / 'runs'))} "
                     r"\(results.csv\); the same command runs the rest", line)
    assert code == 130 and m and 1 <= int(m[1]) < 4, line
    import pandas as pd
    assert len(pd.read_csv(out / 'results.csv')) == int(m[1]) and not _no_temps(out)
    time.sleep(3)
    assert len(list((out / 'runs').glob('*/done'))) == int(m[1])               # nothing runs on behind its back
    _record('Ctrl-C during a sweep', 'sweep', line, 'every finished run, tabled in results.csv; runs in flight are '
            'stopped (their kernels shut down) and redone by the same command', tmp_path)

# ---- a full disk, for real: a small tmpfs in a private mount namespace (unshare -rm), no mocks

FULL_SCRIPT = '''
import contextlib, io, json, subprocess, sys
from pathlib import Path
from nag_toolkit.cli import main
cfg = json.loads(sys.argv[1]); d = Path(cfg['dir'])
PAGE = 4096
def cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        try: main([str(a) for a in argv]); code = 0
        except SystemExit as e: code = e.code
    return [code, err.getvalue(), out.getvalue()]
def mount(where, size):
    where.mkdir(exist_ok=True)
    subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(where)], check=True)
def grow(where): subprocess.run(['mount', '-o', 'remount,size=64m', str(where)], check=True)
def pages(paths): return sum(-(-p.stat().st_size // PAGE) for p in paths if p.is_file())
def temps(where): return [str(p) for p in where.rglob('*') if '.tmp' in p.name]
res = {}
mount(d / 'big', '64m')                                   # a roomy disk to measure what each write takes
# 1. a checkpoint: room for one and a half
train = lambda out: ['train', '--out', out, *cfg['train'], '--steps', '6', '--ckpt-every', '2']
cli(train(d / 'big' / 'm'))
ck = pages((d / 'big/m/checkpoints/step_00000006').iterdir())
mount(d / 'ck', (ck + ck // 2 + 4) * PAGE)
res['checkpoint'] = [cli(train(d / 'ck' / 'run')), (d / 'ck/run/checkpoints/latest').read_text(), temps(d / 'ck')]
grow(d / 'ck')
res['checkpoint_rerun'] = [cli(train(d / 'ck' / 'run')), (d / 'ck/run/checkpoints/latest').read_text(), temps(d / 'ck')]
# 2. a sample shard: room for two and a half
sample = lambda out: ['sample', '--checkpoint', cfg['run'], '--out', out, '--num-samples', '1000', '--shard-size', '200',
                      '--steps', '2']
cli(sample(d / 'big' / 's'))
sh = pages([d / 'big/s/shard_000000.npz', d / 'big/s/shard_000000.json'])
mount(d / 'sh', (2 + 2 * sh + sh // 2) * PAGE)
res['shard'] = [cli(sample(d / 'sh' / 's')), sorted(p.name for p in (d / 'sh/s').iterdir()), temps(d / 'sh')]
grow(d / 'sh')
res['shard_rerun'] = [cli(sample(d / 'sh' / 's')), temps(d / 'sh'),
                      all((d / 'sh/s' / p.name).read_bytes() == p.read_bytes() for p in (d / 'big/s').glob('shard_*.npz'))]
# 3. a sweep's results.csv: room for the runs, not for the table
sweep = lambda out: ['sweep', cfg['grid'], '--out', out]
cli(sweep(d / 'big' / 'w'))
runs = pages((d / 'big/w').rglob('*')) - pages([d / 'big/w/results.csv'])
mount(d / 'sw', (runs + pages([d / 'big/w/results.csv']) // 2 + 8) * PAGE)
res['results'] = [cli(sweep(d / 'sw' / 'w')), sorted(p.name for p in (d / 'sw/w').iterdir()), temps(d / 'sw')]
grow(d / 'sw')
res['results_rerun'] = [cli(sweep(d / 'sw' / 'w')), temps(d / 'sw'),
                        (d / 'sw/w/results.csv').read_text() == (d / 'big/w/results.csv').read_text().replace(
                            str(d / 'big/w'), str(d / 'sw/w'))]
print(json.dumps(res))
'''

@pytest.mark.skipif(not _read_only_works(), reason='no user namespaces here (unshare -rm fails): a tmpfs cannot be '
                                                   'mounted without root, and a mock would not be a full disk')
def test_a_full_disk_ends_on_one_line_leaves_no_temporary_file_and_the_rerun_completes(run, tmp_path):
    """A checkpoint, a sample shard and a sweep's results.csv each hit a full tmpfs: one line naming the file, the error
    and what is kept; no temporary file; after the disk grows, the same command completes."""
    grid = tmp_path / 'grid.yaml'
    grid.write_text(yaml.safe_dump({'notebook': str(TOY), 'grid': {'a': [1.0, 2.0]}, 'parameters': {'label': 'x' * 60000}}))
    cfg = {'dir': str(tmp_path), 'run': str(run), 'grid': str(grid),
           'train': [*TRAIN[:4], '--set', 'model_options.width=256', '--set', 'model_options.depth=2', '--batch-size', '16']}
    p = subprocess.run(['unshare', '-rm', sys.executable, '-c', FULL_SCRIPT, json.dumps(cfg)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    (code, err, _), latest, temps = res['checkpoint']
    run_dir = tmp_path / 'ck' / 'run'
    assert (code, _one_line(err)) == (1, f"error: cannot write {run_dir}/checkpoints/step_00000004: No space left on "
                                         "device (ENOSPC); the last good checkpoint step_00000002 stays latest; free "
                                         "space (or fix the folder) and run the same command again to resume")
    assert latest == 'step_00000002' and temps == []
    _record('Full disk while writing a checkpoint', 'train', _one_line(err), 'the last good checkpoint (latest); its '
            'temporary folder removed; the same command resumes once there is space', tmp_path)
    (code, err, _), latest, temps = res['checkpoint_rerun']
    assert (code, latest, temps) == (0, 'step_00000006', [])
    (code, err, _), names, temps = res['shard']
    s = tmp_path / 'sh' / 's'
    assert (code, _one_line(err)) == (1, f"error: cannot write {s}/shard_000002.npz: No space left on device (ENOSPC); "
                                         f"2 finished shard(s) kept in {s}; free space (or fix the folder) and run the "
                                         "same command again to resume")
    assert temps == [] and [n for n in names if n.startswith('shard_')] == [f'shard_00000{k}.{e}' for k in (0, 1)
                                                                         for e in ('json', 'npz')]
    _record('Full disk while writing a sample shard', 'sample', _one_line(err), 'every finished shard; the partial '
            "one's temporary file removed; the same command writes the rest", tmp_path)
    (code, _, out), temps, same = res['shard_rerun']
    assert (code, temps, same) == (0, [], True) and 'wrote 3 shard(s), 2 already finished, of 5' in out
    (code, err, _), names, temps = res['results']
    w = tmp_path / 'sw' / 'w'
    assert (code, _one_line(err)) == (1, f"error: cannot write {w}/results.csv: No space left on device (ENOSPC); "
                                         f"2 finished run(s) kept in {w}/runs; free space (or fix the folder) and run "
                                         "the same command again (finished runs are skipped)")
    assert temps == [] and 'results.csv' not in names
    _record("Full disk while writing a sweep's results.csv", 'sweep', _one_line(err), 'every finished run; no '
            'temporary file; the same command skips the runs and writes the table', tmp_path)
    (code, _, out), temps, same = res['results_rerun']
    assert (code, temps, same) == (0, [], True) and '0 run, 2 already done, 0 failed' in out

# ---- damaged inputs: one line naming the file, before any training step where the check is cheap

def _latent_folder(d:Path)->Path:
    "Two latent shards of 1-D latents (an MLP trains on them): a safetensors one and an .npy pair."
    from nag_toolkit.data import save_latent_shard
    g = torch.Generator().manual_seed(0)
    save_latent_shard(d / 'shard_00000', torch.randn(40, 8, generator=g), torch.zeros(40, dtype=torch.long))
    np.save(d / 'shard_00001.npy', torch.randn(40, 8, generator=g).numpy()); np.save(d / 'shard_00001_labels.npy', np.zeros(40, np.int64))
    return d

@pytest.mark.parametrize('damage', ['truncated safetensors', 'truncated npy', 'truncated labels', 'garbage header'])
def test_a_damaged_latent_shard_is_named_on_one_line_before_any_step(damage, tmp_path, capsys):
    d = _latent_folder(tmp_path / 'lat')
    f = {'truncated safetensors': d / 'shard_00000.safetensors', 'truncated npy': d / 'shard_00001.npy',
         'truncated labels': d / 'shard_00001_labels.npy', 'garbage header': d / 'shard_00000.safetensors'}[damage]
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[:size - 100] if damage != 'garbage header' else b'\xff' * 8 + f.read_bytes()[8:])
    code, _, err = _cli(['train', '--out', tmp_path / 'run', '--dataset', 'latents', '--set', f'dataset_options.path={d}',
                         '--steps', '2', '--batch-size', '4'], capsys)
    want = (f"error: shard {f} is truncated: {size - 100} bytes, its header says {size}; allowed: a whole shard file "
            "(copy it again, or remove it)\n" if damage != 'garbage header' else
            f"error: shard {f} cannot be read (")
    assert code == 2 and err.startswith(want) and err.count('\n') == 1, err
    assert not (tmp_path / 'run' / 'checkpoints').exists()                       # no step was taken
    _record(f'A {damage} latent shard' if damage != 'garbage header' else 'A latent shard with a damaged header',
            'train', err, 'nothing is written; the run starts once the file is whole', tmp_path)

def test_a_damaged_image_and_an_unreadable_yaml_are_named_on_one_line(images, tmp_path, capsys):
    import shutil as sh
    sh.copytree(images / 'img', tmp_path / 'img')
    bad = tmp_path / 'img' / 'c1' / '5.png'
    bad.write_bytes(bad.read_bytes()[:60])                                          # a partial copy
    code, _, err = _cli(_latents_argv(images, tmp_path / 'lat', tmp_path / 'img'), capsys)
    assert code == 2 and _one_line(err).startswith(f"error: image {bad} cannot be read (image file is truncated)"), err
    _record('A truncated image', 'latents', _one_line(err), 'the finished shards; the same command resumes once the image is '
            'whole or removed', tmp_path)
    y = tmp_path / 'bad.yaml'; y.write_bytes(b'\xff\xfe\x00steps: 3')
    code, _, err = _cli(['train', '--config', y, '--out', tmp_path / 'run'], capsys)
    assert code == 2 and err.startswith(f"error: config={str(y)!r} cannot be read (") and err.count('\n') == 1, err
    _record('A YAML file that is not text', 'train --config', err, 'nothing is written', tmp_path)

def test_a_partial_pt_checkpoint_and_a_diffusers_folder_without_its_config_are_one_line(run, tmp_path, capsys):
    "Peer formats: a .pt lacking weights, a diffusers folder without config.json; named before any training step."
    from safetensors.torch import save_file
    from nag_toolkit.models import NULL_T_KEY
    model, _ = load_model(run)
    keys = [k for k in model.state_dict() if k != NULL_T_KEY]
    torch.save({k: v for k, v in model.state_dict().items() if k not in (NULL_T_KEY, keys[-1])}, tmp_path / 'cut.pt')
    code, _, err = _cli(['train', '--finetune-from', tmp_path / 'cut.pt', *TRAIN, '--steps', '1',
                         '--out', tmp_path / 'a'], capsys)
    assert code == 2 and err.count('\n') == 1 and f"lacks 1 of the model's weights ({keys[-1]})" in err, err
    assert 'cut.pt' in err and not (tmp_path / 'a' / 'checkpoints').exists()
    _record('An official-format .pt that lacks weights', 'train --finetune-from', err, 'nothing is written', tmp_path)
    folder = tmp_path / 'unet'
    folder.mkdir()
    save_file({'w': torch.zeros(2)}, folder / 'diffusion_pytorch_model.safetensors')
    code, _, err = _cli(['train', '--finetune-from', folder, *TRAIN, '--steps', '1', '--out', tmp_path / 'b'], capsys)
    assert code == 2 and err.count('\n') == 1 and 'holds diffusers weights but no config.json' in err, err
    _record('A diffusers folder without its config.json', 'train --finetune-from', err, 'nothing is written', tmp_path)

def test_jupyters_interrupt_in_train_raises_interrupted_and_keeps_the_checkpoint(tmp_path):
    "JupyterLab's interrupt button (SIGINT to the kernel): `train` checkpoints, then raises `Interrupted`, one line."
    from jupyter_client.manager import start_new_kernel
    out = tmp_path / 'nb'
    cfg = {**TINY, 'steps': 100000, 'log_every': 1, 'ckpt_every': 100000, 'out': str(out)}
    km, kc = start_new_kernel(kernel_name='python3', cwd=str(ROOT), env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        msg_id = kc.execute(f"from nag_toolkit.train import train\ntrain({cfg!r})")
        deadline = time.time() + 120
        while not (out / 'metrics.csv').exists() and time.time() < deadline: time.sleep(0.05)
        time.sleep(0.5)                                                          # a few steps in
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=120)
        while reply['parent_header'].get('msg_id') != msg_id: reply = kc.get_shell_msg(timeout=120)
    finally:
        kc.stop_channels(); km.shutdown_kernel(now=True)
    c = reply['content']
    assert c['status'] == 'error' and c['ename'] == 'Interrupted', c
    step = int(re.fullmatch(r'interrupted at step (\d+); checkpoint saved; the same command resumes', c['evalue'])[1])
    assert (out / 'checkpoints/latest').read_text() == f'step_{step:08d}' and not _no_temps(out)
    _record("JupyterLab's interrupt during train()", 'train (library call in a kernel)',
            f"Interrupted: {c['evalue']}", 'a checkpoint at the step reached; the same call resumes')
