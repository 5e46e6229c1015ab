"""The oracle demo from the command line: files written, one-line errors for bad options."""
import subprocess, sys
import pandas as pd

def _run(*args):
    return subprocess.run([sys.executable, '-m', 'nag_toolkit.demo', *args], capture_output=True, text=True, timeout=300)

def test_demo_writes_figures_and_table(tmp_path):
    r = _run('--out', str(tmp_path / 'demo'), '--steps', '4,16', '--n', '500')
    assert r.returncode == 0, r.stderr
    for f in ('samples.png', 'solver_error.png', 'results.csv'): assert (tmp_path / 'demo' / f).stat().st_size > 0
    df = pd.read_csv(tmp_path / 'demo' / 'results.csv')
    assert set(df.solver) == {'euler', 'heun'} and sorted(set(df.steps)) == [4, 16]
    h = df[df.solver == 'heun'].set_index('steps')
    assert abs(h.loc[16, 'nll_gap']) < abs(h.loc[4, 'nll_gap'])   # more steps, closer to the data

def test_demo_bad_option_is_one_line_and_writes_nothing(tmp_path):
    r = _run('--out', str(tmp_path / 'demo'), '--path', 'cosine')
    assert r.returncode == 2
    assert r.stderr.strip().count('\n') == 0 and "path='cosine'" in r.stderr and 'linear, gvp, vp, ddpm' in r.stderr
    assert not (tmp_path / 'demo').exists()
