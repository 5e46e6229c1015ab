"""The scenario YAML files in configs/ parse into valid configurations (they are run on GPU nodes, not here)."""
from pathlib import Path
import pytest, yaml
from nag_toolkit.train import TrainConfig
from nag_toolkit.models import model_options

CONFIGS = Path(__file__).resolve().parent.parent / 'configs'
TRAIN = sorted(p for p in CONFIGS.glob('*.yaml') if 'model' in yaml.safe_load(p.read_text()))

@pytest.mark.parametrize('path', TRAIN, ids=lambda p: p.name)
def test_training_scenarios_are_valid(path):
    cfg = TrainConfig.from_dict(yaml.safe_load(path.read_text()))
    assert set(cfg.model_options) <= set(model_options(cfg.model))
    assert len(TRAIN) >= 3

SAMPLE = sorted(p for p in CONFIGS.glob('*.yaml') if 'checkpoint' in yaml.safe_load(p.read_text()))

@pytest.mark.parametrize('path', SAMPLE, ids=lambda p: p.name)
def test_sampling_scenarios_are_valid(path):
    from nag_toolkit.sample import SampleConfig, guidance_specs
    from nag_toolkit.guidance import get_guider
    cfg = SampleConfig.from_dict(yaml.safe_load(path.read_text()))
    guiders = [get_guider(s) for s in guidance_specs(cfg)]        # every spec names a guider with valid options
    assert len(SAMPLE) >= 1
    if path.name == 'dit_xl2_peers.yaml': assert [g.spec for g in guiders] == ['cb-nag:w=2,estimator=runs/dit_xl2_estimator']

# --- every command's options: one config pattern, a generated command line, --help without torch ---------------------
import ast, subprocess, sys
from nag_toolkit import config as C

def test_config_names_equal_the_registries():
    "The names the configs (and --help) list without torch are exactly the registries' keys, in order."
    from nag_toolkit.samplers import SAMPLERS, GRID_KINDS
    from nag_toolkit.guidance import GUIDERS
    from nag_toolkit.data import DATASETS, MIXTURES
    from nag_toolkit.models import MODELS
    from nag_toolkit.interpolants import INTERPOLANTS, PRED_KINDS
    assert C.SAMPLER_NAMES == tuple(SAMPLERS) and C.GUIDER_NAMES == tuple(GUIDERS)
    assert C.DATASET_NAMES == tuple(DATASETS) and C.MIXTURE_NAMES == tuple(MIXTURES)
    assert C.MODEL_NAMES == tuple(MODELS) and C.PRED_NAMES == PRED_KINDS
    # the paths: the built-in ones first; a diffusers folder loaded earlier in this process registers its own after
    assert tuple(INTERPOLANTS)[:len(C.PATH_NAMES)] == C.PATH_NAMES
    assert all(p.startswith('diffusers-') for p in tuple(INTERPOLANTS)[len(C.PATH_NAMES):])
    assert C.GRID_NAMES == ('auto', *GRID_KINDS, 'sde')

def _help(*argv)->str:
    r = subprocess.run([sys.executable, '-m', 'nag_toolkit.cli', *argv, '--help'], capture_output=True, text=True,
                       env={**__import__('os').environ, 'COLUMNS': '100'})
    assert r.returncode == 0, r.stderr
    return ' '.join(r.stdout.split())

def test_every_help_describes_every_option_and_lists_every_allowed_value():
    "Each command's --help, run as a user runs it: every option has a description, every closed one its values."
    from nag_toolkit.cli import COMMANDS
    assert set(COMMANDS) == {'train', 'estimator', 'sample', 'study', 'findings', 'demo', 'sweep', 'latents', 'eval'}
    for name, command in COMMANDS.items():
        text = _help(name)
        for o in (o for cls in command.options for o in cls.options()):
            assert o['doc'] and len(o['doc']) > 8, (name, o['name'])
            flag = o['name'] if o['positional'] else '--' + o['name'].replace('_', '-')
            if o['type'].startswith('dict'): flag = f"{o['name']}.KEY ({o['doc']})"    # listed under --set
            assert flag in text, (name, flag)
            doc_words = ' '.join(o['doc'].split())                    # the flag's own line: flag, placeholder, doc
            at = [i for i in range(len(text)) if text.startswith(flag, i)
                  and doc_words in text[i:i + len(flag) + 40 + len(doc_words)]]
            assert at, (name, o['name'])
            after = text[at[0]:]
            for v in (o['choices'] or o['names'] or o['known'] or ()):
                assert any(f" {v}{end}" in after for end in (',', ';', ']')), (name, o['name'], v)
        if command.yaml: assert '--config FILE' in text and '--set KEY=VALUE' in text, name

def test_help_imports_no_torch():
    "`python -X importtime -m nag_toolkit.cli --help` (and a subcommand's) never imports torch."
    for argv in ([], ['sample'], ['study']):
        r = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'nag_toolkit.cli', *argv, '--help'],
                           capture_output=True, text=True)
        assert r.returncode == 0 and 'usage: nag-toolkit' in r.stdout, r.stderr[-2000:]
        imported = [line.split('|')[-1].strip() for line in r.stderr.splitlines() if line.startswith('import time:')]
        assert 'nag_toolkit.config' in imported and not [m for m in imported if m.split('.')[0] == 'torch'], argv

def test_a_flag_is_typed_and_checked_where_it_is_read(tmp_path):
    "A bad flag value is one line naming the field and what is allowed, the same words a YAML file gets."
    for argv, words in ((['sample', '--sampler', 'rk4'], "sampler='rk4' is not allowed; choose one of: euler, heun"),
                        (['train', '--steps', '0'], "steps=0 is out of range; allowed: [1, inf]"),
                        (['study', '--samplers', 'euler', '--samplers', 'rk4'], "samplers='rk4' is not allowed"),
                        (['sample', '--guidance', 'pag:w=1'], "guidance='pag' is not allowed; choose one of: none")):
        r = subprocess.run([sys.executable, '-m', 'nag_toolkit.cli', *argv, '--out', str(tmp_path / 'o')],
                           capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr == f"error: {words}" + r.stderr[len(words) + 7:], r.stderr
        assert r.stderr.count('\n') == 1 and not (tmp_path / 'o').exists(), r.stderr
    yaml_file = tmp_path / 'c.yaml'
    yaml_file.write_text('sampler: rk4\ncheckpoint: .\n')
    with pytest.raises(Exception, match="sampler='rk4' is not allowed; choose one of: euler, heun"):
        from nag_toolkit.sample import check_config
        check_config(C.SampleConfig.from_dict(yaml.safe_load(yaml_file.read_text())))

def test_every_preset_is_a_valid_study_config():
    for name, preset in C.PRESETS.items(): C.StudyConfig.from_dict(preset)
