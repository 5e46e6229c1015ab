"""Denoisers: official DiT/SiT state-dict layout, checkpoint loading, time inputs, null masks, registry and errors."""
import json, os
from pathlib import Path
import numpy as np
import pytest, torch
from safetensors.torch import save_file
from nag_toolkit.core import ConfigError
from nag_toolkit.models import (DiT, MLPDenoiser, DigitsUNet, NULL_T_KEY, build_model, load_pretrained,
                                dit_config_from_state_dict, split_learned_sigma)

# The official layouts (names, shapes, order), generated from facebookresearch/DiT and willisma/SiT.
# The official DiT/SiT state-dict layouts (names, shapes, order), copied from the project's shared reference.
REF = Path(os.environ.get('NAG_TOOLKIT_DIT_REFERENCE', Path(__file__).resolve().parent / 'data' / 'dit'))
needs_ref = pytest.mark.skipif(not REF.is_dir(), reason=f"reference layouts not found at {REF} (set NAG_TOOLKIT_DIT_REFERENCE)")

def _ref(name):
    return json.loads((REF / f"{name.replace('/', '-')}.json").read_text())

def _perturb(model, scale=0.02):
    "Give the zero-initialised layers (adaLN-Zero, output) random weights, so that signal and gradients flow."
    zeroed = [b.adaLN_modulation[1] for b in model.blocks] + [model.final_layer.adaLN_modulation[1], model.final_layer.linear]
    for m in zeroed: m.weight.data.normal_(0, scale); m.bias.data.normal_(0, scale)

def _layout(sd):
    return [[k, list(v.shape)] for k, v in sd.items()]

@pytest.fixture(scope='module')
def dit_s2():
    torch.manual_seed(0)
    return DiT('DiT-S/2', input_size=32, num_classes=1000, learn_sigma=True)

@pytest.fixture(scope='module')
def official_sd():
    "A state dict laid out like the official DiT-S/2 file, random values, built from the reference JSON."
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) for k, shape, _ in _ref('DiT-S/2')['state_dict']}

# (a) state-dict layout
def _check_layout(model, ref):
    sd = model.state_dict()
    assert [k for k in sd if k not in {e[0] for e in ref['state_dict']}] == [NULL_T_KEY]
    assert _layout({k: v for k, v in sd.items() if k != NULL_T_KEY}) == [[k, s] for k, s, _ in ref['state_dict']]
    assert list(sd[NULL_T_KEY].shape) == [ref['config']['hidden_size']]
    frozen = [k for k, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ref['non_trainable'] and not list(model.buffers())
    assert sum(v.numel() for v in sd.values()) == ref['total_state_dict_numel'] + ref['config']['hidden_size']

@needs_ref
@pytest.mark.parametrize('ref_name', ['DiT-S/2', 'SiT-S/2'])
def test_dit_s2_state_dict_matches_official(dit_s2, ref_name):
    _check_layout(dit_s2, _ref(ref_name))

@needs_ref
@pytest.mark.parametrize('ref_name', ['DiT-XL/2', 'SiT-XL/2'])
def test_dit_xl2_state_dict_matches_official_on_meta(ref_name):
    with torch.device('meta'): model = build_model('DiT-XL/2', input_size=32, num_classes=1000, learn_sigma=True)
    _check_layout(model, _ref(ref_name))

@needs_ref
def test_config_is_read_back_from_shapes():
    with torch.device('meta'):
        sd = {k: torch.empty(s) for k, s, _ in _ref('DiT-XL/2')['state_dict']}
    assert dit_config_from_state_dict(sd) == dict(name='DiT-XL/2', input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)

# (b) loading official-style files
def _check_loaded(res, sd):
    model, missing, unexpected = res
    assert missing == [NULL_T_KEY] and unexpected == []
    assert model.config['name'] == 'DiT-S/2' and model.config['input_size'] == 32 and model.learn_sigma
    own = model.state_dict()
    for k in ('pos_embed', 'blocks.11.attn.qkv.weight', 'final_layer.linear.bias', 'y_embedder.embedding_table.weight'):
        assert torch.equal(own[k], sd[k])

@needs_ref
def test_load_pretrained_pt(tmp_path, official_sd, capsys):
    torch.save(official_sd, tmp_path / 'DiT-S-2.pt')
    _check_loaded(load_pretrained(tmp_path / 'DiT-S-2.pt'), official_sd)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f'missing keys: {NULL_T_KEY} (expected') and lines[1] == 'unexpected keys: none'

@needs_ref
def test_load_pretrained_wrapped_ema(tmp_path, official_sd):
    torch.save({'model': {'pos_embed': torch.zeros(1)}, 'ema': official_sd, 'steps': 10}, tmp_path / 'train.pt')
    _check_loaded(load_pretrained(tmp_path / 'train.pt'), official_sd)   # the EMA weights win, as in DiT's sampler

@needs_ref
def test_load_pretrained_safetensors(tmp_path, official_sd):
    save_file({k: v.contiguous() for k, v in official_sd.items()}, str(tmp_path / 'DiT-S-2.safetensors'))
    _check_loaded(load_pretrained(tmp_path / 'DiT-S-2.safetensors'), official_sd)

@needs_ref
def test_load_pretrained_sit_reports_unexpected_and_rejects_shapes(tmp_path, official_sd, capsys):
    torch.save({**official_sd, 'extra.weight': torch.zeros(3)}, tmp_path / 'SiT.pt')
    model, missing, unexpected = load_pretrained(tmp_path / 'SiT.pt', t_embed='sit')
    assert (model.t_embed, model.pred, missing, unexpected) == ('sit', 'v', [NULL_T_KEY], ['extra.weight'])
    assert 'unexpected keys: extra.weight' in capsys.readouterr().out
    with pytest.raises(ConfigError, match="t_embed='dit' does not match the given model's t_embed='sit'"):
        load_pretrained(tmp_path / 'SiT.pt', model=model, t_embed='dit')
    with torch.device('meta'): small = DiT('DiT-S/2', input_size=16)
    with pytest.raises(ConfigError, match=r"pos_embed has shape \(1, 256, 384\) in the checkpoint but \(1, 64, 384\)"):
        load_pretrained(tmp_path / 'SiT.pt', model=small)

# (c) forward and backward
def test_dit_forward_backward_reaches_inputs_and_null_t():
    torch.manual_seed(0)
    model = DiT('DiT-S/2', input_size=16, num_classes=10)
    _perturb(model)
    x = torch.randn(2, 4, 16, 16)
    out = model(x, torch.tensor([0.1, 0.7]), torch.tensor([3, 9]), null_t=torch.tensor([True, False]), null_y=torch.tensor([False, True]))
    assert out.shape == (2, 8, 16, 16)
    out.square().mean().backward()
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0
    assert model.null_t_embedding.grad.abs().sum() > 0
    assert model.pos_embed.grad is None

def test_untrained_dit_outputs_zero_and_null_t_unused_without_mask():
    torch.manual_seed(0)
    model = DiT('DiT-S/8', input_size=16, num_classes=0, learn_sigma=False)
    x = torch.randn(2, 4, 16, 16)
    out = model(x, 0.5)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    out.sum().backward()
    assert model.null_t_embedding.grad is None or model.null_t_embedding.grad.abs().sum() == 0

# (d) time inputs and SiT's sign
def test_timestep_input_dit_and_sit():
    with torch.device('meta'):
        dit, sit = DiT('DiT-S/8', input_size=16), DiT('DiT-S/8', input_size=16, t_embed='sit')
    k = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(dit.timestep_input((k + 1) / 1000), k, rtol=0, atol=1e-9)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(sit.timestep_input(t), 1 - t)
    assert (dit.pred, sit.pred) == ('eps', 'v')

def test_embedder_sees_the_mapped_time():
    model, seen = DiT('DiT-S/8', input_size=16), []
    model.t_embedder.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    k = torch.tensor([0.0, 249.0, 999.0])
    model(torch.zeros(3, 4, 16, 16), (k + 1) / 1000, torch.tensor([1, 2, 3]))
    torch.testing.assert_close(seen[0], k, rtol=0, atol=1e-4)

def test_sit_velocity_is_negated_in_prediction_channels_only():
    torch.manual_seed(0)
    v = DiT('DiT-S/8', input_size=16, num_classes=10, t_embed='sit')
    _perturb(v)
    raw = DiT('DiT-S/8', input_size=16, num_classes=10, t_embed='sit', pred='eps')  # same net, no flip
    raw.load_state_dict(v.state_dict())
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 0.8]), torch.tensor([1, 2])
    with torch.no_grad(): a, b = v(x, t, y), raw(x, t, y)
    assert a.abs().max() > 0
    torch.testing.assert_close(split_learned_sigma(a, 4)[0], -split_learned_sigma(b, 4)[0])
    torch.testing.assert_close(split_learned_sigma(a, 4)[1], split_learned_sigma(b, 4)[1])

# (e) positional table
def _mae_table(dim, grid):
    "Independent float64 table per the reference README: row-major tokens; [sin(col w), cos(col w), sin(row w), cos(row w)]."
    q = dim // 4
    w = 10000.0 ** (-np.arange(q, dtype=np.float64) / q)
    out = np.zeros((grid * grid, dim))
    for r in range(grid):
        for c in range(grid):
            out[r * grid + c] = np.concatenate([np.sin(c * w), np.cos(c * w), np.sin(r * w), np.cos(r * w)])
    return out

def test_pos_embed_is_the_fixed_sincos_table(dit_s2):  # computed here from the README's description, not the module's code
    expected = torch.from_numpy(_mae_table(384, 16)).float()[None]
    assert torch.equal(dit_s2.pos_embed.data, expected)
    assert not dit_s2.pos_embed.requires_grad and dit_s2.pos_embed.dtype == torch.float32

# (f) small nets: masks per row, config round trip
@pytest.mark.parametrize('name,x', [('mlp', torch.randn(6, 5)), ('digits', torch.randn(6, 1, 8, 8))])
def test_null_masks_act_per_row(name, x):
    torch.manual_seed(0)
    model = build_model(name, **({'dim': 5, 'num_classes': 4} if name == 'mlp' else {}))
    t, y = torch.rand(6), torch.tensor([0, 1, 2, 3, 0, 1])
    mask = torch.tensor([True, False, False, True, False, False])
    with torch.no_grad():
        base = model(x, t, y)
        assert base.shape == x.shape
        for kw in ('null_t', 'null_y'):
            changed = (model(x, t, y, **{kw: mask}) != base).flatten(1).any(1)
            assert torch.equal(changed, mask), kw
        torch.testing.assert_close(model(x, t, y, null_y=torch.ones(6, dtype=torch.bool)), model(x, t))

@pytest.mark.parametrize('name,options', [('mlp', dict(dim=3, width=32, depth=2, num_classes=5, pred='eps')),
                                          ('digits', dict(channels=16, num_classes=0)),
                                          ('DiT-S/8', dict(input_size=16, in_channels=3, num_classes=0, learn_sigma=False, t_embed='sit'))])
def test_build_model_round_trips_config(name, options):
    model = build_model(name, **options)
    again = build_model(**model.config)
    assert type(again) is type(model) and again.config == model.config
    assert _layout(again.state_dict()) == _layout(model.state_dict())
    assert again.pred in ('eps', 'v', 'x0') and again.num_classes == options.get('num_classes', 10)

def test_default_predictions():
    assert [build_model(n).pred for n in ('mlp', 'digits')] == ['v', 'v']
    with torch.device('meta'): assert build_model('DiT-B/4').pred == 'eps' and build_model('DiT-B/4', t_embed='sit').pred == 'v'

# (g) errors are one line
@pytest.mark.parametrize('call,text', [
    (lambda: build_model('unet'), "model='unet' is not allowed; choose one of: mlp, digits, DiT-S/2"),
    (lambda: build_model('mlp', widht=3), "option 'widht' is not allowed for model 'mlp'; choose from: dim, width"),
    (lambda: build_model('DiT-S/2', depth=3), "option 'depth' is not allowed for model 'DiT-S/2'"),
    (lambda: build_model('DiT-S/2', t_embed='edm'), "t_embed='edm' is not allowed; choose one of: dit, sit"),
    (lambda: build_model('DiT-S/8', input_size=12), "input_size=12 is not allowed for DiT-S/8; allowed: a multiple of 8"),
    (lambda: build_model('mlp', pred='noise'), "pred='noise' is not allowed"),
    (lambda: build_model('mlp', num_classes=-1), "num_classes=-1 is out of range"),
    (lambda: load_pretrained('/no/such/ckpt.pt'), "checkpoint '/no/such/ckpt.pt' not found"),
    (lambda: build_model('mlp', dim=2)(torch.zeros(3, 4), 0.5), "x has shape (3, 4); allowed: [N, 2]"),
    (lambda: build_model('mlp')(torch.zeros(3, 2), 0.5, null_t=torch.zeros(2, dtype=torch.bool)), "null_t has shape (2,)"),
    (lambda: dit_config_from_state_dict({'a': torch.zeros(1)}), "not a DiT/SiT state dict"),
])
def test_errors_are_one_line(call, text):
    with pytest.raises(ConfigError) as e: call()
    msg = str(e.value)
    assert text in msg and '\n' not in msg

def test_unreadable_checkpoint_is_one_line(tmp_path):
    (tmp_path / 'bad.pt').write_bytes(b'not a torch file')
    with pytest.raises(ConfigError) as e: load_pretrained(tmp_path / 'bad.pt')
    assert 'weights-only torch file' in str(e.value) and '\n' not in str(e.value)
