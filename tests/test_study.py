"""The end-to-end study: quick runs through the CLI (in-process and through the papermill notebooks), the digits
variant, and one-line errors for bad options."""
import json, subprocess, sys
from pathlib import Path
import pandas as pd, pytest
from nag_toolkit.study import run_study, QUICK

def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'nag_toolkit.cli', 'study', *args], capture_output=True, text=True, timeout=900)

def _check_report(out:Path, methods:set):
    for f in ('results.csv', 'shift.csv', 'shift_by_tbin.csv', 'summary.md', 'summary.html', 'shift_vs_steps.png', 'posterior_heatmaps.png'):
        assert (out / f).stat().st_size > 0, f
    res = pd.read_csv(out / 'results.csv')
    assert methods <= set(res.method)
    # every method of a (sampler, steps) cell started from the same noise: one row each
    assert (res.groupby(['sampler', 'steps']).method.nunique() == res.groupby(['sampler', 'steps']).size()).all()
    assert '| method |' in (out / 'summary.md').read_text()
    return res

def test_quick_study_through_the_papermill_notebooks(tmp_path):
    r = _cli('--quick', '--out', str(tmp_path / 'study'))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / 'study'
    _check_report(out, {'none', 'exact score', 'cf-NAG w=1', 'cb-NAG w=1', 'eps scaling', 'time shift'})
    assert sorted(p.name for p in (out / 'notebooks').iterdir()) == ['estimator.ipynb', 'evaluate.ipynb', 'train.ipynb']
    assert json.loads((out / 'timing.json').read_text())['notebooks'] is True

def test_quick_study_on_digits_in_process(tmp_path):
    run_study({**QUICK, 'dataset': 'digits', 'n_samples': 200, 'out': str(tmp_path), 'notebooks': False})
    res = _check_report(tmp_path, {'none', 'cf-NAG w=1', 'cb-NAG w=1'})
    assert {'fid', 'kid_mean', 'precision', 'recall'} <= set(res.columns) and res.fid.notna().all()

@pytest.mark.parametrize('args,match', [(['--set', 'dataset=imagenet'], "dataset='imagenet' is not allowed"),
                                        (['--set', 'n_sample=3'], "'n_sample' is not a study option"),
                                        (['--set', 'p_drop=1.5'], 'p_drop=1.5 is out of range')])
def test_bad_study_options_fail_on_one_line(tmp_path, args, match):
    r = _cli('--quick', '--out', str(tmp_path / 's'), *args)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and match in r.stderr, r.stderr
    assert not (tmp_path / 's').exists()
