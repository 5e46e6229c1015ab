"""Training benchmarks, printed as ratios measured in one run (medians of interleaved repeats).

1. Noise-condition dropout: training throughput with p_drop = 0.1 over p_drop = 0 (goal >= 0.98), for the mixture
   MLP and the digits U-Net on CPU.
2. CPU throughput (steps/s, samples/s) of the mixture and digits trainings.
3. With a GPU (or --gpu): the DiT-XL/2 training step (bf16 autocast, precomputed 32x32x4 latents) as a fraction of
   the card's dense bf16 peak; model FLOPs counted analytically (3x the forward).

    python bench/bench_train.py [--repeats 5] [--steps 20] [--gpu] [--dit DiT-XL/2 --batch 64]
"""
import argparse, statistics, tempfile, time
import torch
from nag_toolkit.train import TrainConfig, setup, train_step, draw_batch, _to

def _time_steps(run, net, steps, start):
    "Seconds per step over `steps` training steps (after the run's first step)."
    dev = run['device']
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' else (lambda: None)
    batches = [_to(draw_batch(run['ds'], start + i, run['cfg']), dev) for i in range(steps)]
    sync(); t0 = time.perf_counter()
    for b in batches: train_step(run, net, b)
    sync()
    return (time.perf_counter() - t0) / steps

def dropout_ratio(dataset, model, batch, steps, repeats, **opts):
    "Median steps/s with p_drop=0.1 over p_drop=0, interleaved; also the raw throughputs."
    runs = {}
    for p in (0.0, 0.1):
        d = tempfile.mkdtemp()
        runs[p] = setup(TrainConfig(dataset=dataset, model=model, batch_size=batch, p_drop=p, out=d, **opts))
        _time_steps(runs[p], runs[p]['model'], 3, 0)     # warm-up
    times = {0.0: [], 0.1: []}
    for r in range(repeats):
        for p in (0.0, 0.1): times[p].append(_time_steps(runs[p], runs[p]['model'], steps, 100 * (r + 1)))
    med = {p: statistics.median(v) for p, v in times.items()}
    return med[0.0] / med[0.1], med

def dit_flops_per_image(depth, hidden, tokens, patch_out):
    "Forward FLOPs of a DiT on one image (2 x multiply-adds): attention, MLP, adaLN and embeddings."
    per_block = tokens * (12 * hidden**2 + 2 * tokens * hidden) + 6 * hidden**2
    return 2 * (depth * per_block + tokens * hidden * patch_out * 2)

PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L40S': 362e12, 'A10': 125e12}

def gpu_dit(name, batch, steps, repeats):
    "DiT training step on the GPU: seconds per step, images/s, achieved TFLOP/s and the fraction of the bf16 peak."
    from nag_toolkit.data import save_latent_shard
    d, shards = tempfile.mkdtemp(), tempfile.mkdtemp()
    save_latent_shard(f'{shards}/000', torch.randn(4 * batch, 4, 32, 32), torch.randint(1000, (4 * batch,)))  # stand-in latents
    run = setup(TrainConfig(dataset='latents', dataset_options={'path': shards}, model=name, batch_size=batch, out=d, bf16=True,
                            model_options={'input_size': 32, 'num_classes': 1000}))
    t = statistics.median(_time_steps(run, run['model'], steps, 10 * r) for r in range(repeats))
    m = run['model']; depth, hidden = len(m.blocks), m.pos_embed.shape[-1]
    flops = 3 * dit_flops_per_image(depth, hidden, m.pos_embed.shape[1], m.x_embedder.proj.weight[0].numel())
    name_gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name_gpu), None)
    achieved = flops * batch / t
    return {'gpu': name_gpu, 'sec_per_step': t, 'images_per_s': batch / t, 'tflops': achieved / 1e12,
            'fraction_of_peak': None if peak is None else achieved / peak}

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--repeats', type=int, default=5); ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--gpu', action='store_true'); ap.add_argument('--dit', default='DiT-XL/2'); ap.add_argument('--batch', type=int, default=64)
    a = ap.parse_args()
    print(f"machine: {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    for dataset, model, batch in (('gmm32', 'mlp', 256), ('digits', 'digits', 128)):
        ratio, med = dropout_ratio(dataset, model, batch, a.steps, a.repeats, device='cpu')
        print(f"{dataset}/{model}: {1 / med[0.1]:.1f} steps/s ({batch / med[0.1]:.0f} samples/s) with p_drop=0.1; "
              f"throughput ratio with/without noise-condition dropout = {ratio:.3f} (goal >= 0.98)")
    if a.gpu or torch.cuda.is_available():
        print('GPU:', gpu_dit(a.dit, a.batch, a.steps, a.repeats))
    else: print('GPU: none available; the DiT-XL/2 step was not measured')

if __name__ == '__main__': main()
