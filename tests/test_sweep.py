"""`nag-toolkit sweep`: a grid of papermill runs of the toy pipeline, in a local pool and through submitit."""
import contextlib, io, json, subprocess, sys
from pathlib import Path
import nbformat, pandas as pd, pytest, yaml
from nag_toolkit.core import ConfigError
from nag_toolkit.sweep import read_grid, run_sweep, execute_run
from nag_toolkit.cli import main

TOY = Path(__file__).resolve().parent.parent / 'nbs' / 'pipelines' / 'toy.ipynb'
WEIRD = 'it\'s "quoted"\nsecond line\\n; import os; os.remove("x") #'

def _have_kernel():
    r = subprocess.run([sys.executable, '-m', 'jupyter', 'kernelspec', 'list', '--json'], capture_output=True, text=True)
    return r.returncode == 0 and 'nag-toolkit' in json.loads(r.stdout)['kernelspecs']

needs_kernel = pytest.mark.skipif(not _have_kernel(), reason="the nag-toolkit kernel is registered by `make install`")

def _grid(folder:Path, name='grid.yaml', **d)->Path:
    "Write a grid file for the toy notebook into `folder`, its sweep folder `folder/sweep`."
    p = folder / name
    p.write_text(yaml.safe_dump({'notebook': str(TOY), 'out': str(folder / 'sweep'), **d}))
    return p

def _files(folder)->dict:
    "Every file under `folder` with its modification time and content."
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(folder).rglob('*') if p.is_file()}

@needs_kernel
def test_local_pool_runs_the_grid_collects_one_row_each_and_skips_finished_runs(tmp_path):
    g = _grid(tmp_path, parameters={'label': 'toy'}, grid={'a': [0.5, 1.0], 'b': [2, 3]}, workers=2)
    rep = run_sweep(g)
    assert rep.ok and len(rep.ran) == 4 and rep.skipped == []
    res = pd.read_csv(tmp_path / 'sweep' / 'results.csv')
    assert sorted(zip(res.a, res.b, res.value)) == [(0.5, 2, 1.0), (0.5, 3, 1.5), (1.0, 2, 2.0), (1.0, 3, 3.0)]
    for run in res.run:
        assert {'run.ipynb', 'params.json', 'result.json', 'done'} <= {p.name for p in (tmp_path / 'sweep' / 'runs' / run).iterdir()}
    before = _files(tmp_path / 'sweep' / 'runs')
    again = run_sweep(g)
    assert again.ran == [] and sorted(again.skipped) == sorted(res.run) and len(again.results) == 4
    assert _files(tmp_path / 'sweep' / 'runs') == before

@pytest.fixture(scope='module')
def failed_sweep(tmp_path_factory):
    "A two-run sweep through the command line: fail=False finishes, fail=True fails; label holds quotes and newlines."
    d = tmp_path_factory.mktemp('failing')
    g = _grid(d, parameters={'a': 2.0, 'b': 3}, grid={'fail': [False, True], 'label': [WEIRD]}, workers=2)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as ex: main(['sweep', str(g)])
    runs = {json.loads((p / 'params.json').read_text())['fail']: p for p in (d / 'sweep' / 'runs').iterdir()}
    return {'grid': g, 'out': d / 'sweep', 'status': ex.value.code, 'stderr': err.getvalue(), 'ok_run': runs[False], 'bad_run': runs[True], 'ok_files': _files(runs[False])}

@needs_kernel
def test_a_failed_run_is_reported_with_its_notebook_and_error_while_the_other_finishes(failed_sweep):
    out, bad = failed_sweep['out'], failed_sweep['bad_run']
    assert failed_sweep['status'] == 1, failed_sweep['stderr'][-2000:]
    fails = pd.read_csv(out / 'failures.csv')
    assert fails.run.tolist() == [bad.name] and fails.notebook.tolist() == [str(bad / 'run.ipynb')]
    assert fails.error.tolist() == ['RuntimeError: toy run failed on purpose (fail=True, a=2.0, b=3)']
    assert f"failed: {bad.name} ({bad / 'run.ipynb'}): RuntimeError: toy run failed on purpose" in failed_sweep['stderr']
    assert (bad / 'run.ipynb').is_file() and not (bad / 'done').exists()
    assert (failed_sweep['ok_run'] / 'done').exists() and len(pd.read_csv(out / 'results.csv')) == 1

@needs_kernel
def test_strings_with_quotes_and_newlines_pass_through_unchanged(failed_sweep):
    assert json.loads((failed_sweep['ok_run'] / 'result.json').read_text()) == {'value': 6.0, 'label': WEIRD}
    assert pd.read_csv(failed_sweep['out'] / 'results.csv').label.tolist() == [WEIRD]
    assert '\n' not in failed_sweep['ok_run'].name and '"' not in failed_sweep['ok_run'].name

@needs_kernel
def test_rerun_skips_the_finished_run_and_retries_the_failed_one(failed_sweep):
    rep = run_sweep(failed_sweep['grid'])
    assert rep.ran == [failed_sweep['bad_run'].name] and rep.skipped == [failed_sweep['ok_run'].name] and not rep.ok
    assert _files(failed_sweep['ok_run']) == failed_sweep['ok_files']

def _error_cell(nb_path:Path)->str:
    "The source of the cell that raised, after checking it is the first code cell after the injected parameters and that no later cell ran."
    cells = [c for c in nbformat.read(nb_path, as_version=4).cells if c.cell_type == 'code']
    i = next(i for i, c in enumerate(cells) if any(o.output_type == 'error' for o in c.outputs))
    assert 'injected-parameters' in cells[i - 1].metadata.get('tags', [])
    assert all(c.execution_count is None for c in cells[i + 1:])
    return cells[i].source

@needs_kernel
def test_bad_parameters_stop_in_the_validation_cell_keep_the_notebook_and_lose_nothing(failed_sweep):
    runs = failed_sweep['out'] / 'runs'
    nb = runs / 'unknown' / 'run.ipynb'                                            # an unknown name, through papermill's command
    nb.parent.mkdir()
    proc = subprocess.Popen([sys.executable, '-m', 'papermill', str(TOY), str(nb), '-k', 'nag-toolkit', '-p', 'out', str(nb.parent), '-p', 'c', '1'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = execute_run(str(TOY), str(runs / 'wrong-type'), {'b': 'many'})         # meanwhile a wrong type, as the sweep runs it
    assert err == "ConfigError: b='many' has the wrong type; allowed: int"
    assert 'collect_parameters(' in _error_cell(runs / 'wrong-type' / 'run.ipynb')
    assert not (runs / 'wrong-type' / 'done').exists() and not (runs / 'wrong-type' / 'result.json').exists()
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode != 0 and "ConfigError: parameter 'c' is not a parameter of this notebook; allowed: out, a, b, label, fail" in stderr
    assert 'collect_parameters(' in _error_cell(nb) and not (nb.parent / 'result.json').exists()
    assert _files(failed_sweep['ok_run']) == failed_sweep['ok_files']

@needs_kernel
def test_submitit_local_executor_runs_a_grid(tmp_path):
    rep = run_sweep(_grid(tmp_path, grid={'a': [1.0, 2.0]}, parameters={'b': 5}, executor='submitit', slurm={'timeout_min': 10}))
    assert rep.ok and len(rep.ran) == 2
    assert sorted(rep.results.value) == [5.0, 10.0]
    assert (tmp_path / 'sweep' / 'submitit').is_dir()

BAD = {'notebook: missing.ipynb\ngrid: {a: [1]}\n': "notebook='missing.ipynb' does not exist",
       'grid: {a: [1]}\n': "has no 'notebook'",
       f'notebook: {TOY}\ngrid: {{}}\n': 'grid is empty',
       f'notebook: {TOY}\ngrid: {{a: 1.0}}\n': 'grid a=1.0 is not a non-empty list of values',
       f'notebook: {TOY}\ngrid: {{a: []}}\n': 'grid a=[] is not a non-empty list of values',
       f'notebook: {TOY}\ngrid: {{a: [1]}}\ntypo: 1\n': "'typo' is not a grid file key; allowed: notebook, grid, out, parameters",
       f'notebook: {TOY}\ngrid: {{a: [1]}}\nparameters: {{cc: 1}}\n': "'cc' is not a parameter of toy.ipynb; allowed: out, a, b, label, fail",
       f'notebook: {TOY}\ngrid: {{a: [1]}}\nparameters: {{a: 2}}\n': "'a' is both in parameters and in grid",
       f'notebook: {TOY}\ngrid: {{a: [1]}}\nworkers: many\n': "workers='many' has the wrong type; allowed: int",
       f'notebook: {TOY}\ngrid: {{a: [1]}}\nexecutor: submitit\nslurm: {{partitoin: gpu}}\n': "slurm option 'partitoin' is unknown",
       'notebook: [unclosed\n': 'is not valid YAML'}

@pytest.mark.parametrize('text,msg', list(BAD.items()), ids=range(len(BAD)))
def test_bad_grid_files_give_one_line_errors_before_any_run(tmp_path, capsys, text, msg):
    (tmp_path / 'g.yaml').write_text(text.replace('sweep_out', str(tmp_path / 'sweep')))
    with pytest.raises(ConfigError, match=None) as e: read_grid(tmp_path / 'g.yaml')
    assert msg in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(SystemExit) as ex: main(['sweep', str(tmp_path / 'g.yaml'), '--out', str(tmp_path / 'sweep')])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err.startswith('error: ') and err.count('\n') == 1
    assert not (tmp_path / 'sweep').exists()

def test_dry_run_lists_the_runs_and_runs_nothing(tmp_path, capsys):
    main(['sweep', str(_grid(tmp_path, grid={'a': [0.5, 1.0], 'b': [2, 3]})), '--dry-run'])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(' todo ' in l for l in lines[1:]) and 'a=0.5_b=2-' in lines[1]
    assert not (tmp_path / 'sweep').exists()

def test_a_guiders_option_is_a_grid_axis_of_the_fid_pipeline(tmp_path, capsys):
    "configs/sweeps/guidance.yaml: `guidance.w` over `guidance: cf-nag` gives each run the spec {name, w}."
    from nag_toolkit.sweep import expand
    from nag_toolkit.guidance import get_guider
    grid = Path(__file__).resolve().parent.parent / 'configs' / 'sweeps' / 'guidance.yaml'
    sw = read_grid(grid, out=str(tmp_path / 'sweep'))
    specs = [r.params['guidance'] for r in expand(sw)]
    assert specs == [{'name': 'cf-nag', 'w': w} for w in (0.0, 0.5, 1.0, 2.0)]
    assert [get_guider(s).spec for s in specs] == ['cf-nag:w=0', 'cf-nag:w=0.5', 'cf-nag:w=1', 'cf-nag:w=2']
    main(['sweep', str(grid), '--out', str(tmp_path / 'sweep'), '--dry-run'])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and 'guidance.w=0.5-' in lines[2]
    # a dotted name whose head is not a parameter of the notebook is refused on one line
    bad = tmp_path / 'bad.yaml'
    bad.write_text(yaml.safe_dump({**yaml.safe_load(grid.read_text()), 'notebook': str(grid.parent.parent.parent
                                   / 'nbs' / 'pipelines' / 'fid.ipynb'), 'grid': {'guider.w': [1, 2]}}))
    with pytest.raises(ConfigError, match="'guider' is not a parameter of fid.ipynb"): read_grid(bad)
