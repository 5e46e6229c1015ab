"""The diffusers bridge against ground truth: schedulers as paths, the samplers against diffusers' own DDPM, DDIM and
flow-matching loops from the same noise, a DiT both ways (to float32 precision, and the shift-1 embedding measurably
apart), the null-t hook, NoiseAwarenessGuidance driven like diffusers' denoise loops against ClassifierFreeGuidance and
the toolkit's cf-NAG, fine-tuning a diffusers folder through the CLI, and `import nag_toolkit` without diffusers."""
import json, subprocess, sys, warnings
from pathlib import Path
import numpy as np
import pytest, torch

diffusers = pytest.importorskip('diffusers')
from diffusers import (UNet2DModel, DDPMScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler,
                       DiTTransformer2DModel)
from diffusers.guiders import ClassifierFreeGuidance as DiffusersCFG
from diffusers.utils import logging as diffusers_logging
from nag_toolkit.core import ConfigError
from nag_toolkit.interpolants import get_interpolant
from nag_toolkit.models import build_model
from nag_toolkit.samplers import sample_ddpm, sample_ddim, sample_euler
from nag_toolkit.guidance import guide, GuidedDenoiser
from nag_toolkit import bridge
from nag_toolkit.bridge import (from_diffusers, scheduler_path, scheduler_grid, add_null_t, null_t_token, load_null_t,
                                save_diffusers, to_diffusers, to_toolkit_dit, time_shift, NoiseAwarenessGuidance)

diffusers_logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parent.parent

def rel(a, b): return ((a - b).norm() / b.norm()).item()

def tiny_unet(channels=1, out=None, classes=None, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=out or channels, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=('DownBlock2D', 'DownBlock2D'),
                       up_block_types=('UpBlock2D', 'UpBlock2D'), norm_num_groups=8,
                       num_class_embeds=classes).eval()

def noise(n=4, c=1, seed=1): return torch.randn(n, c, 8, 8, generator=torch.Generator().manual_seed(seed))

def diffusers_loop(unet, scheduler, x, steps, seed=0, **step_options):
    "diffusers' own loop: set_timesteps, then the model and scheduler.step at every timestep."
    scheduler.set_timesteps(steps)
    torch.manual_seed(seed)
    with torch.no_grad():
        for k in scheduler.timesteps:
            x = scheduler.step(unet(x, k).sample, k, x, **step_options).prev_sample
    return x

# --- schedulers as paths -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kw', [{}, {'beta_schedule': 'scaled_linear', 'beta_start': 0.00085, 'beta_end': 0.012},
                                {'beta_schedule': 'squaredcos_cap_v2'}, {'num_train_timesteps': 100}])
def test_path_is_the_schedulers_alphas_cumprod(kw):
    sched = DDPMScheduler(**kw)
    path, T = scheduler_path(sched), sched.config.num_train_timesteps
    t = (torch.arange(T, dtype=torch.float64) + 1) / T
    torch.testing.assert_close(path.alpha(t) ** 2, sched.alphas_cumprod.double(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path.alpha(t) ** 2 + path.sigma(t) ** 2, torch.ones_like(t))
    assert get_interpolant(path.name) is path                          # registered by name

def test_default_scheduler_is_dits_ddpm_path_to_float32():
    t = torch.linspace(0.001, 1, 1000, dtype=torch.float64)
    d = (scheduler_path(DDPMScheduler()).alpha(t) - get_interpolant('ddpm').alpha(t)).abs().max().item()
    assert 0 < d < 1e-6                                               # float32 cumprod vs float64: close, not equal

def test_bad_scheduler_settings_one_line():
    with pytest.raises(ConfigError, match=r"beta_schedule='sigmoid' is not allowed; choose one of: linear, "
                                          r"scaled_linear, squaredcos_cap_v2$"):
        from_diffusers(tiny_unet(), DDPMScheduler(beta_schedule='sigmoid'))
    with pytest.raises(ConfigError, match=r"prediction_type='flow_prediction' is not allowed; choose one of: epsilon, "
                                          r"v_prediction, sample$"):
        from_diffusers(tiny_unet(), DDPMScheduler(prediction_type='flow_prediction'))
    with pytest.raises(ConfigError, match='rescale_betas_zero_snr=True is not supported'):
        from_diffusers(tiny_unet(), DDIMScheduler(rescale_betas_zero_snr=True))

def test_grid_follows_the_scheduler():
    torch.testing.assert_close(scheduler_grid(DDPMScheduler(), 4),
                               torch.tensor([0.751, 0.501, 0.251, 0.001, 0.0], dtype=torch.float64))
    ts = scheduler_grid(DDIMScheduler(set_alpha_to_one=False, steps_offset=1, timestep_spacing='trailing'), 4)
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.001], dtype=torch.float64))
    with pytest.raises(ConfigError, match="timestep_spacing='linspace' with steps=7: step .* not to the next"):
        scheduler_grid(DDIMScheduler(timestep_spacing='linspace'), 7)

# --- same samples as diffusers' own loops --------------------------------------------------------------------------

@pytest.mark.parametrize('kw', [{}, {'beta_schedule': 'squaredcos_cap_v2', 'prediction_type': 'v_prediction'},
                                {'beta_schedule': 'scaled_linear', 'beta_start': 0.00085, 'beta_end': 0.012,
                                 'prediction_type': 'sample', 'variance_type': 'fixed_large'}])
def test_ddpm_matches_diffusers_loop(kw):
    unet, sched, x = tiny_unet(), DDPMScheduler(clip_sample=False, **kw), noise()
    den = from_diffusers(unet, sched)
    ref = diffusers_loop(unet, sched, x, 12)
    torch.manual_seed(0)                                             # the same global stream as diffusers draws
    var = 'beta' if kw.get('variance_type') == 'fixed_large' else 'beta_tilde'
    ours = sample_ddpm(den, x, scheduler_grid(sched, 12), den.path, variance=var)
    assert rel(ours, ref) < 1e-5

def test_ddpm_learned_range_matches_diffusers_loop():
    "Twice the channels: eps then the variance values, read by variance='learned' as diffusers' learned_range."
    unet, sched, x = tiny_unet(out=2), DDPMScheduler(clip_sample=False, variance_type='learned_range'), noise()
    den = from_diffusers(unet, sched)
    assert den.model.learn_sigma and den.model.pred_channels == 1
    ref = diffusers_loop(unet, sched, x, 12)
    torch.manual_seed(0)
    assert rel(sample_ddpm(den, x, scheduler_grid(sched, 12), den.path, variance='learned'), ref) < 1e-5

@pytest.mark.parametrize('eta', [0.0, 1.0])
def test_ddim_matches_diffusers_loop(eta):
    unet, sched, x = tiny_unet(), DDIMScheduler(clip_sample=False, beta_schedule='scaled_linear', beta_start=0.00085,
                                                beta_end=0.012, prediction_type='v_prediction'), noise()
    den = from_diffusers(unet, sched)
    ref = diffusers_loop(unet, sched, x, 10, eta=eta)
    torch.manual_seed(0)
    assert rel(sample_ddim(den, x, scheduler_grid(sched, 10), den.path, eta=eta), ref) < 1e-5

def test_flow_matching_euler_matches_diffusers_loop():
    unet, sched, x = tiny_unet(), FlowMatchEulerDiscreteScheduler(shift=3.0), noise()
    den = from_diffusers(unet, sched)
    assert den.path.name == 'linear' and den.pred == 'v'
    ref = diffusers_loop(unet, sched, x, 8)
    assert rel(sample_euler(den, x, scheduler_grid(sched, 8), den.path), ref) < 1e-5

# --- a DiT both ways -----------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def dit():
    torch.manual_seed(0)
    m = build_model('DiT-S/2', input_size=8, in_channels=4, num_classes=10).eval()
    for z in [b.adaLN_modulation[-1] for b in m.blocks] + [m.final_layer.adaLN_modulation[-1], m.final_layer.linear]:
        z.weight.data.normal_(0, 0.02); z.bias.data.normal_(0, 0.02)  # DiT zeroes these: any two nets would agree
    m.null_t_embedding.data.normal_(0, 0.5)
    return m

def test_to_diffusers_same_forward(dit):
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0.981, 0.5, 0.2, 0.013]), torch.tensor([0, 3, 9, 10])
    k, drop = (t * 1000 - 1).round(), torch.tensor([True, False, True, False])
    with torch.no_grad():
        ref, ref_null = dit(x, t, y), dit(x, t, y, null_t=drop)
        faithful, default = to_diffusers(dit), to_diffusers(dit, faithful=False)
        assert time_shift(faithful) == 0 and time_shift(default) == 1
        assert rel(faithful(x, k, y).sample, ref) <= 1e-5
        assert rel(default(x, k, y).sample, ref) > 5e-3             # diffusers' embedding: percents apart
        with null_t_token(faithful).dropped(drop): assert rel(faithful(x, k, y).sample, ref_null) <= 1e-5
        den = from_diffusers(faithful, DDPMScheduler())               # and through the denoiser, t in our time
        assert rel(den.model(x, t, y), ref) <= 1e-5
    names = null_t_token(faithful).names
    assert len(names) == 12 and all(n.endswith('norm1.emb.timestep_embedder') for n in names)   # one token, 12 hooks

def test_to_toolkit_dit_round_trip(dit):
    back = to_toolkit_dit(to_diffusers(dit)).state_dict()
    assert set(back) == set(dit.state_dict())
    assert all(torch.equal(v, back[k]) for k, v in dit.state_dict().items())
    with pytest.warns(UserWarning, match='downscale_freq_shift=1'):
        to_toolkit_dit(to_diffusers(dit, faithful=False))

def test_from_diffusers_says_which_time_embedding():
    torch.manual_seed(0)
    hub_like = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                     sample_size=4, num_embeds_ada_norm=3)
    with pytest.warns(UserWarning, match='downscale_freq_shift=1'): from_diffusers(hub_like, DDPMScheduler())
    bridge.set_time_shift(hub_like, 0)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        from_diffusers(hub_like, DDPMScheduler())

# --- the null-t token ----------------------------------------------------------------------------------------------

def test_null_t_hook_hides_t_only_where_asked(tmp_path):
    unet = tiny_unet(classes=4)
    x, y = noise(2), torch.tensor([1, 2])
    with torch.no_grad():
        plain = unet(x, torch.tensor([5., 700.]), class_labels=y).sample
        tok = add_null_t(unet)
        assert torch.equal(unet(x, torch.tensor([5., 700.]), class_labels=y).sample, plain)
        with tok.dropped(torch.tensor([False, True])):
            out = unet(x, torch.tensor([5., 700.]), class_labels=y).sample
            out2 = unet(x, torch.tensor([5., 3.]), class_labels=y).sample
        assert torch.equal(out[0], plain[0]) and not torch.equal(out[1], plain[1])
        assert torch.equal(out[1], out2[1])                              # row 1 does not see its t
        tok.embedding.data.normal_(); tok.null_t_steps = 7
        with tok.dropped(): want = unet(x, torch.tensor([5., 700.]), class_labels=y).sample
        save_diffusers(unet, tmp_path, DDPMScheduler())
        back = UNet2DModel.from_pretrained(tmp_path)
        assert set(back.state_dict()) == set(unet.state_dict())         # the token is beside the weights
        tok2 = load_null_t(back, tmp_path)
        assert tok2.null_t_steps == 7
        with tok2.dropped(): assert torch.equal(back(x, torch.tensor([5., 700.]), class_labels=y).sample, want)

def test_null_t_without_token_is_refused():
    den = from_diffusers(tiny_unet(), DDPMScheduler())
    with pytest.raises(ConfigError, match='null_t needs a null noise-level token'):
        den.model(noise(2), torch.tensor([0.5, 0.5]), null_t=torch.tensor([True, False]))
    add_null_t(den.model.net)                                          # added, never trained
    with pytest.raises(ConfigError, match='cf-nag w=1 needs a trained null-t token'):
        guide(den, 'cf-nag:w=1')

# --- NoiseAwarenessGuidance in a diffusers-style loop --------------------------------------------------------------

def guided_loop(unet, scheduler, guider, x, y, steps):
    "A modular pipeline's denoise loop reduced to its guider calls."
    scheduler.set_timesteps(steps)
    null = torch.full_like(y, unet.config.num_class_embeds - 1)
    with torch.no_grad():
        for i, k in enumerate(scheduler.timesteps):
            guider.set_state(step=i, num_inference_steps=steps, timestep=k)
            batches = guider.prepare_inputs({'class_labels': (y, null)})
            for b in batches:
                guider.prepare_models(unet)
                b.noise_pred = unet(x, k, class_labels=b.class_labels).sample
                guider.cleanup_models(unet)
            x = scheduler.step(guider(batches)[0], k, x).prev_sample
    return x

@pytest.fixture(scope='module')
def cond_unet():
    unet = tiny_unet(classes=6)
    tok = add_null_t(unet)
    tok.embedding.data.normal_(0, 1, generator=torch.Generator().manual_seed(3))
    tok.null_t_steps = 100                                              # declared trained
    return unet

def test_guider_at_zero_is_classifier_free_guidance(cond_unet):
    sched, x, y = DDIMScheduler(clip_sample=False), noise(), torch.tensor([0, 1, 2, 4])
    for s in (1.0, 3.0):
        ref = guided_loop(cond_unet, sched, DiffusersCFG(guidance_scale=s), x, y, 8)
        assert torch.equal(guided_loop(cond_unet, sched, NoiseAwarenessGuidance(0.0, guidance_scale=s), x, y, 8), ref)

@pytest.mark.parametrize('w,s', [(0.5, 1.0), (1.5, 3.0)])
def test_guider_is_the_toolkits_cf_nag(cond_unet, w, s):
    sched, x, y = DDIMScheduler(clip_sample=False), noise(), torch.tensor([0, 1, 2, 4])
    theirs = guided_loop(cond_unet, sched, NoiseAwarenessGuidance(w, guidance_scale=s), x, y, 8)
    den = from_diffusers(cond_unet, sched)
    ours = sample_ddim(GuidedDenoiser(den, w_cfg=s - 1, w_nag=w), x, scheduler_grid(sched, 8), den.path,
                       extra_args={'y': y})
    plain = guided_loop(cond_unet, sched, DiffusersCFG(guidance_scale=s), x, y, 8)
    assert rel(theirs, ours) < 1e-5 and rel(theirs, plain) > 1e-3
    assert null_t_token(cond_unet).mask is None                         # cleaned up after every null-t branch

def test_guider_window_and_refusals(cond_unet):
    g = NoiseAwarenessGuidance(1.0, guidance_scale=2.0, start=0.2, stop=0.6)
    counts = []
    for i in range(10):
        g.set_state(step=i, num_inference_steps=10, timestep=None)
        counts.append(g.num_conditions)
    assert counts == [1, 1, 3, 3, 3, 3, 1, 1, 1, 1]
    g = NoiseAwarenessGuidance(1.0)
    g.set_state(step=0, num_inference_steps=4, timestep=None)
    assert [name for _, name in zip(*g._branches())] == ['pred_cond', 'pred_cond_null_t']
    g.prepare_models(cond_unet)
    with pytest.raises(ConfigError, match='needs a null noise-level token on the UNet2DModel'):
        g.prepare_models(tiny_unet())
    g2 = NoiseAwarenessGuidance(1.0)
    g2.set_state(step=0, num_inference_steps=4, timestep=None)
    untrained = tiny_unet(); add_null_t(untrained)
    g2.prepare_models(untrained)
    with pytest.raises(ConfigError, match='needs a trained null-t token'): g2.prepare_models(untrained)

# --- fine-tuning a diffusers folder through the CLI ---------------------------------------------------------------

def test_finetune_from_diffusers_folder_then_sample(tmp_path):
    from nag_toolkit.cli import main
    from nag_toolkit.checkpoint import load_model
    unet, sched = tiny_unet(), DDPMScheduler()
    unet.save_pretrained(tmp_path / 'model'); sched.save_pretrained(tmp_path / 'model')
    run = tmp_path / 'run'
    main(['train', '--finetune-from', str(tmp_path / 'model'), '--dataset', 'digits', '--steps', '3',
          '--batch-size', '8', '--ckpt-every', '3', '--out', str(run), '--device', 'cpu'])
    state = json.loads(sorted((run / 'checkpoints').glob('step_*'))[-1].joinpath('state.json').read_text())
    assert state['config']['model'] == 'diffusers' and state['config']['lr'] == 1e-5
    assert state['config']['p_drop'] == 0.2 and state['config']['path'] == scheduler_path(sched).name
    assert state['null_t_steps'] == 3
    # the result reloads with from_pretrained plus the null token, and equals the run's EMA
    back = UNet2DModel.from_pretrained(run / 'diffusers')
    tok = load_null_t(back, run / 'diffusers')
    assert tok.null_t_steps == 3
    net, _ = load_model(run)
    x, t, nt = noise(2), torch.tensor([0.3, 0.9]), torch.tensor([True, False])
    with torch.no_grad():
        a = net(x, t, null_t=nt)
        b = from_diffusers(back, DDPMScheduler.from_pretrained(run / 'diffusers')).model(x, t, null_t=nt)
    assert torch.equal(a, b)
    assert not torch.allclose(net.null_token.embedding, add_null_t(tiny_unet()).embedding)   # the token trained
    # sample --checkpoint takes the run and the diffusers folder, guided by the trained token
    for src, out in ((run, tmp_path / 's1'), (run / 'diffusers', tmp_path / 's2')):
        main(['sample', '--checkpoint', str(src), '--out', str(out), '--num-samples', '3', '--shard-size', '3',
              '--sampler', 'ddim', '--steps', '4', '--w-nag', '0.5', '--device', 'cpu'])
    s1, s2 = np.load(tmp_path / 's1' / 'shard_000000.npz'), np.load(tmp_path / 's2' / 'shard_000000.npz')
    assert s1['arr_0'].shape == (3, 8, 8, 1) and np.array_equal(s1['arr_0'], s2['arr_0'])

def test_not_a_diffusers_folder(tmp_path):
    with pytest.raises(ConfigError, match='is not a diffusers folder'): bridge.load_diffusers(tmp_path)
    tiny_unet().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match='has no scheduler'): bridge.load_diffusers(tmp_path)

# --- importing the toolkit does not need diffusers ----------------------------------------------------------------

def test_import_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import nag_toolkit, nag_toolkit.train, nag_toolkit.sample, nag_toolkit.bridge as b\n"
            "from nag_toolkit.core import ConfigError\n"
            "try: from nag_toolkit.bridge import NoiseAwarenessGuidance\n"
            "except ConfigError as e: print(e)\n")
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 'pip install nag_toolkit[diffusers]' in out.stdout
