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
