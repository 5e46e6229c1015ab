"""The end-to-end study: quick runs through the CLI (through the papermill notebooks, and in-process on the digits),
the generated findings checked against the numbers they cite, and one-line errors for bad options."""
import json, subprocess, sys
from pathlib import Path
import pandas as pd, pytest
from nag_toolkit.report import fmt

def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'nag_toolkit.cli', 'study', *args], capture_output=True, text=True, timeout=900)

def _check_report(out:Path, methods:set):
    for f in ('results.csv', 'shift.csv', 'shift_by_tbin.csv', 'summary.md', 'summary.html', 'shift_vs_steps.png', 'posterior_heatmaps.png',
              'findings.json', 'findings.md'):
        assert (out / f).stat().st_size > 0, f
    res = pd.read_csv(out / 'results.csv')
    assert methods | {'floor'} <= set(res.method)
    # every method of a (sampler, steps) cell started from the same noise: one row each
    assert (res.groupby(['sampler', 'steps']).method.nunique() == res.groupby(['sampler', 'steps']).size()).all()
    assert '| method |' in (out / 'summary.md').read_text()
    sh = pd.read_csv(out / 'shift.csv')                           # every step's excess shift carries its interval
    assert ((sh.excess_shift_lo <= sh.excess_shift) & (sh.excess_shift <= sh.excess_shift_hi)).all()
    return res

def _row(res, method, sampler, steps, n):
    r = res[(res.method == method) & (res.sampler == sampler) & (res.steps == steps) & (res.n_samples == n)]
    assert len(r) == 1, (method, sampler, steps)
    return r.iloc[0]

def _check_findings(out:Path):
    "Every generated claim cites the numbers of results.csv, its verdict follows its interval, and the report shows it."
    res, groups = pd.read_csv(out / 'results.csv'), json.loads((out / 'findings.json').read_text())
    summary, n_claims = (out / 'summary.md').read_text(), 0
    assert {g['method'] for g in groups} >= {'floor', 'cf-NAG w=1', 'cb-NAG w=1'}
    for g in groups:
        for c in g['claims']:
            m, r, b = c['metric'], _row(res, c['method'], c['sampler'], c['steps'], c['n_samples']), _row(res, 'none', c['sampler'], c['steps'], c['n_samples'])
            cited = [c[k] for k in ('value', 'lo', 'hi', 'base', 'base_lo', 'base_hi', 'delta', 'delta_lo', 'delta_hi')]
            table = [r[m], r[f'{m}_lo'], r[f'{m}_hi'], b[m], b[f'{m}_lo'], b[f'{m}_hi'], r[f'delta_{m}'], r[f'delta_{m}_lo'], r[f'delta_{m}_hi']]
            assert cited == pytest.approx(table, rel=1e-12, abs=1e-15), c['text']
            assert c['delta'] == pytest.approx(c['value'] - c['base'], abs=1e-12)          # a difference of the two values
            assert c['delta_lo'] <= c['delta'] <= c['delta_hi'] and c['lo'] <= c['value'] <= c['hi']
            excludes_0 = c['delta_lo'] > 0 or c['delta_hi'] < 0
            assert excludes_0 != (c['verdict'] in ('no difference', 'no guidance at the floor')), c['text']
            if excludes_0 and c['method'] != 'floor' and m in ('fd', 'fid', 'coverage_tv'):   # lower is better
                assert c['verdict'] == ('better' if c['delta_hi'] < 0 else 'worse'), c['text']
            for v in (c['base'], c['value']): assert f'{v:.3g}' in c['text']
            assert f"{c['delta']:+.3g}" in c['text']
            if m == g['claims'][0]['metric']:                    # the verdict table shows the main metric's change
                assert fmt(c['delta'], c['delta_lo'], c['delta_hi'], '+') in summary, c['text']
                if c.get('nfe_own'):                             # ... and, for a costlier method, at equal NFE
                    e = [r[f'nfe_delta_{m}'], r[f'nfe_delta_{m}_lo'], r[f'nfe_delta_{m}_hi']]
                    assert [c['nfe_delta'], c['nfe_delta_lo'], c['nfe_delta_hi']] == pytest.approx(e, rel=1e-12)
                    assert fmt(*e, '+') in summary and c['nfe'] == r.nfe and c['nfe_base'] > b.nfe
            n_claims += 1
    return n_claims

def test_quick_study_through_the_papermill_notebooks(tmp_path):
    r = _cli('--quick', '--out', str(tmp_path / 'study'))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / 'study'
    res = _check_report(out, {'none', 'exact score', 'cf-NAG w=1', 'cb-NAG w=1', 'eps scaling', 'time shift'})
    assert sorted(p.name for p in (out / 'notebooks').iterdir()) == ['estimator.ipynb', 'evaluate.ipynb', 'train.ipynb']
    assert json.loads((out / 'timing.json').read_text())['notebooks'] is True
    for m in ('fd', 'sw2', 'mmd2', 'nll_gap', 'coverage_tv', 'excess_shift_low_t'):     # every headline number has its interval
        assert res[[f'{m}_lo', f'{m}_hi', f'delta_{m}', f'delta_{m}_lo', f'delta_{m}_hi']].notna().all().all(), m
    assert (res[res.method == 'none'][['delta_fd', 'delta_fd_lo', 'delta_fd_hi']] == 0).all().all()   # none against itself
    assert _check_findings(out) >= 20
    r = subprocess.run([sys.executable, '-m', 'nag_toolkit.cli', 'findings', str(out), '--out', str(tmp_path / 'f.md')], capture_output=True, text=True)
    text = (tmp_path / 'f.md').read_text()
    assert r.returncode == 0 and '| the floor |' in text and '| cf-NAG w=1 |' in text and 'equal NFE' in text

def test_quick_study_on_digits_in_process(tmp_path):
    r = _cli('--quick', '--dataset', 'digits', '--no-notebooks', '--set', 'n_samples=200', '--set', 'shift_steps=[8]', '--out', str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    res = _check_report(tmp_path, {'none', 'cf-NAG w=1', 'cb-NAG w=1'})
    assert {'fid', 'kid_mean', 'precision', 'recall', 'fid_lo', 'delta_recall_hi'} <= set(res.columns) and res.fid.notna().all()
    for m in ('kid_mean', 'isc_mean'):                            # KID and IS carry intervals too
        assert res[[f'{m}_lo', f'{m}_hi', f'delta_{m}_lo', f'delta_{m}_hi']].notna().all().all(), m
    assert (res.fid_lo >= 0).all() and (res.isc_mean_lo >= 1).all()   # the intervals stay in the metrics' ranges
    fl = res[res.method == 'floor'].iloc[0]
    assert fl.fid < res[res.method == 'none'].fid.min()           # held-out digits sit far below an untrained model
    for f in ('samples_euler_8.png', 'samples_euler_maruyama_8.png'): assert (tmp_path / f).stat().st_size > 0
    _check_findings(tmp_path)

def test_seeds_are_pooled(tmp_path):
    "With seeds: 2, one study per seed and a pooled results.csv: mean estimates, intervals and paired differences."
    from nag_toolkit.study_runs import run_study
    from nag_toolkit.config import QUICK
    run_study({**QUICK, 'seeds': 2, 'samplers': ['euler'], 'shift_steps': [8], 'train_steps': 60, 'estimator_steps': 60, 'n_samples': 200,
               'exact': False, 'baselines': False, 'out': str(tmp_path), 'notebooks': False})
    pooled, a, b = (pd.read_csv(tmp_path / d / 'results.csv') for d in ('.', 'studies/seed=0', 'studies/seed=1'))
    assert list(pooled.method) == list(a.method) == list(b.method)
    assert pooled.fd.tolist() == pytest.approx(((a.fd + b.fd) / 2).tolist(), abs=1e-12)
    assert (pooled.fd_lo <= pooled.fd).all() and (pooled.fd <= pooled.fd_hi).all()
    base = pooled[pooled.method == 'none'].set_index(['steps', 'n_samples']).fd     # no guidance of each cell
    want = [f - base[(k, n)] for f, k, n in zip(pooled.fd, pooled.steps, pooled.n_samples)]
    assert pooled.delta_fd.tolist() == pytest.approx(want, abs=1e-12)
    guided = pooled[(pooled.purpose == 'sweep') & ~pooled.method.isin(['none', 'floor'])]
    assert guided.nfe_delta_fd.notna().all()                                        # pooled at equal NFE too
    _check_findings(tmp_path)

def test_seeds_run_as_a_sweep_of_the_study_notebook(tmp_path):
    "Through a kernel, the studies of several seeds are one `nag-toolkit sweep` of pipelines/study.ipynb, 2 at a time."
    from nag_toolkit.study_runs import run_study
    from nag_toolkit.config import QUICK
    opts = {**QUICK, 'seeds': 2, 'workers': 2, 'samplers': ['euler'], 'shift_steps': [], 'train_steps': 40,
            'estimator_steps': 40, 'n_samples': 150, 'n_shift': 64, 'exact': False, 'baselines': False, 'n_boot': 20}
    run_study({**opts, 'out': str(tmp_path)})
    runs = pd.read_csv(tmp_path / 'studies' / 'results.csv')          # the sweep's table: one row per study
    assert sorted(runs.seed) == [0, 1] and (runs.seconds > 0).all()
    dirs = sorted((tmp_path / 'studies' / 'runs').iterdir())
    seeds = [json.loads((d / 'config.json').read_text())['seed'] for d in dirs]
    assert sorted(seeds) == [0, 1] and all((d / 'run.ipynb').exists() and (d / 'results.csv').exists() for d in dirs)
    pooled = pd.read_csv(tmp_path / 'results.csv')
    a, b = (pd.read_csv(d / 'results.csv') for d in dirs)
    assert pooled.fd.tolist() == pytest.approx(((a.fd + b.fd) / 2).tolist(), abs=1e-12)

@pytest.mark.parametrize('args,match', [(['--set', 'dataset=imagenet'], "dataset='imagenet' is not allowed"),
                                        (['--dataset', 'imagenet'], "dataset='imagenet' is not allowed"),
                                        (['--preset', 'huge'], "preset='huge' is not allowed"),
                                        (['--set', 'n_sample=3'], "'n_sample' is not a study option"),
                                        (['--set', 'n_boot=5'], 'n_boot=5 is out of range'),
                                        (['--set', 'p_drop=1.5'], 'p_drop=1.5 is out of range'),
                                        (['--preset', 'digits-demo', '--set', 'init_from=nope'],
                                         "init_from='nope' does not exist; allowed: a run or checkpoint folder of a 'digits' model on path "
                                         "'linear', or a shipped checkpoint (digits-denoiser)"),
                                        (['--set', 'init_from=digits-denoiser'],
                                         "init_from='digits-denoiser' holds a 'digits' model on path 'linear'; allowed: a run or checkpoint "
                                         "folder of a 'mlp' model on path 'linear'")])
def test_bad_study_options_fail_on_one_line(tmp_path, args, match):
    r = _cli('--quick', '--out', str(tmp_path / 's'), *args)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and match in r.stderr, r.stderr
    assert not (tmp_path / 's').exists()

def test_shipped_digits_checkpoint_loads_digest_checked(tmp_path):
    "The digits denoiser that ships in the package loads through `load_model`, its digest checked, its null-t token trained."
    import shutil
    from nag_toolkit.checkpoint import SHIPPED, checkpoint_source, shipped_checkpoints
    from nag_toolkit.core import ConfigError
    from nag_toolkit.checkpoint import load_model
    from nag_toolkit.study import StudyConfig, DIGITS_DEMO
    assert 'digits-denoiser' in shipped_checkpoints() and StudyConfig.from_dict(DIGITS_DEMO).init_from == 'digits-denoiser'
    model, state = load_model(checkpoint_source('digits-denoiser'))
    assert model.config['name'] == 'digits' and state['config']['path'] == 'linear' and state['config']['p_drop'] == 0.1
    assert model.null_t_steps == state['step'] > 0 and sorted(state['files']) == ['ema.safetensors']
    bad = tmp_path / 'damaged'                                    # one flipped byte: refused on one line
    shutil.copytree(SHIPPED / 'digits-denoiser', bad)
    f = bad / 'ema.safetensors'; b = bytearray(f.read_bytes()); b[-1] ^= 1; f.write_bytes(bytes(b))
    with pytest.raises(ConfigError, match='is damaged or truncated'): load_model(bad)
