"""GPU benchmarks (run where a CUDA GPU is available; `run_all.py` adds these rows there).

1. DiT-XL/2 training step (bf16 autocast, TF32, precomputed 32x32x4 latents): achieved model FLOP/s as a fraction
   of the card's dense bf16 peak; model FLOPs counted analytically (training = 3x the forward).
2. Guided sampling (CFG + NAG, three branches in one forward, Euler): images/s, the time over the floor of
   `steps` batched forwards measured in the same run (goal <= 1.05), and the fraction of the bf16 peak the forwards
   reach (3 branches x FLOPs per image x steps).
3. No host-device synchronisation inside the guided sampling loop: the loop runs under
   `torch.cuda.set_sync_debug_mode('error')`, which raises on any synchronising call (goal: 0 syncs).

    python bench/bench_gpu.py [--dit DiT-XL/2] [--batch 64] [--sample-batch 32] [--steps 20] [--quick]
"""
import argparse, statistics, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from common import row, machine, print_rows

PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'GH200': 989e12, 'A100': 312e12, 'L40S': 362e12, 'A10': 125e12}

def dit_flops_per_image(depth, hidden, tokens, patch_out):
    "Forward FLOPs of a DiT on one image (2 x multiply-adds): attention, MLP, adaLN and embeddings."
    per_block = tokens * (12 * hidden**2 + 2 * tokens * hidden) + 6 * hidden**2
    return 2 * (depth * per_block + tokens * hidden * patch_out * 2)

def model_flops(m)->float:
    "Forward FLOPs per image of a toolkit DiT."
    return dit_flops_per_image(len(m.blocks), m.pos_embed.shape[-1], m.pos_embed.shape[1], m.x_embedder.proj.weight[0].numel())

def peak():
    "The card's dense bf16 peak in FLOP/s (None for an unknown card) and its name."
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None), name

def cuda_time(fn, repeats:int)->float:
    "Median seconds of `fn()` on the GPU (synchronised around each call)."
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

def train_rows(name, batch, steps, repeats)->list:
    "The training step's fraction of the bf16 peak."
    from nag_toolkit.data import save_latent_shard
    from nag_toolkit.train import TrainConfig, setup, train_step, draw_batch, _to
    d, shards = tempfile.mkdtemp(), tempfile.mkdtemp()
    save_latent_shard(f'{shards}/000', torch.randn(4 * batch, 4, 32, 32), torch.randint(1000, (4 * batch,)))  # stand-in latents
    run = setup(TrainConfig(dataset='latents', dataset_options={'path': shards}, model=name, batch_size=batch, out=d, bf16=True,
                            model_options={'input_size': 32, 'num_classes': 1000}))
    batches = [_to(draw_batch(run['ds'], i, run['cfg']), run['device']) for i in range(steps)]
    def go():
        for b in batches: train_step(run, run['model'], b)
    t = cuda_time(go, repeats) / steps
    pk, gpu = peak()
    achieved = 3 * model_flops(run['model']) * batch / t
    return [row(f'GPU: {name} training step, achieved / dense bf16 peak', achieved / pk if pk else float('nan'),
                detail=f'{gpu}; batch {batch}; {t * 1e3:.1f} ms/step, {batch / t:.0f} images/s, {achieved / 1e12:.0f} TFLOP/s')]

def sampling_rows(name, batch, steps, repeats)->list:
    "Guided sampling throughput against the floor of its forwards, and the sync check."
    from nag_toolkit.models import build_model
    from nag_toolkit.guidance import Denoiser, GuidedDenoiser
    from nag_toolkit.samplers import sample_euler, time_grid
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    net = build_model(name, input_size=32, num_classes=1000, t_embed='sit').cuda().eval()
    guided = GuidedDenoiser(Denoiser(net, 'linear', pred='v'), w_cfg=1.5, w_nag=1.0)
    x, y = torch.randn(batch, 4, 32, 32, device='cuda'), torch.randint(1000, (batch,), device='cuda')
    ts = time_grid(steps, t_max=1.0)
    x3, y3, t3 = x.repeat(3, 1, 1, 1), y.repeat(3), torch.full((), 0.5, device='cuda').expand(3 * batch)
    off = torch.zeros(batch, dtype=torch.bool, device='cuda')
    masks = {'null_y': torch.cat([off, ~off, off]), 'null_t': torch.cat([off, off, ~off])}
    out = []
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        fwd = cuda_time(lambda: net(x3, t3, y=y3, **masks), repeats)
        run = cuda_time(lambda: sample_euler(guided, x, ts, 'linear', extra_args={'y': y}), repeats)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
        try: sample_euler(guided, x, ts, 'linear', extra_args={'y': y}); syncs, err = 0, ''
        except RuntimeError as e: syncs, err = 1, str(e).splitlines()[0][:120]
        finally: torch.cuda.set_sync_debug_mode('default')
    pk, gpu = peak()
    flop_floor = steps * 3 * model_flops(net) * batch / pk if pk else float('nan')
    out += [row(f'GPU: guided sampling time / ({steps} x batched 3-branch forward), {name}', run / (steps * fwd), '<= 1.05',
                detail=f'{gpu}; {batch} images per branch; {batch / run:.1f} images/s ({steps} Euler steps, bf16 autocast)'),
            row(f'GPU: guided sampling, forward FLOPs / (time x dense bf16 peak), {name}', flop_floor / run,
                detail=f'FLOP floor {flop_floor * 1e3:.1f} ms vs {run * 1e3:.1f} ms'),
            row('GPU: host-device syncs inside the guided sampling loop', syncs, '<= 0', unit='syncs',
                detail=err or "torch.cuda.set_sync_debug_mode('error') raised nothing")]
    return out

def rows(quick:bool=False, dit:str='DiT-XL/2', batch:int=64, sample_batch:int=32, steps:int=20, repeats:int=5)->list:
    "All GPU rows (none without a GPU)."
    if not torch.cuda.is_available(): return []
    if quick: dit, batch, sample_batch, steps, repeats = 'DiT-S/2', 16, 8, 5, 3
    return train_rows(dit, batch, steps, repeats) + sampling_rows(dit, sample_batch, steps, repeats)

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--dit', default='DiT-XL/2'); ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--sample-batch', type=int, default=32); ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--repeats', type=int, default=5); ap.add_argument('--quick', action='store_true')
    a = ap.parse_args()
    print(machine())
    if not torch.cuda.is_available(): print('no GPU here: nothing measured'); return
    print_rows(rows(a.quick, a.dit, a.batch, a.sample_batch, a.steps, a.repeats))

if __name__ == '__main__': main()
