"""Real-data paths of `nag_toolkit.data` on small data made in the test: image folders, latent shards, VAE encoding, errors."""
import sys
from types import SimpleNamespace
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from nag_toolkit.core import ConfigError
from nag_toolkit.data import get_dataset, save_latent_shard, extract_latents, write_latents, folder_dataset, center_crop_arr


@pytest.fixture(scope='module')
def digit_folder(tmp_path_factory):
    "An ImageFolder of 8x8 PNGs made from the sklearn digits: classes 0, 1, 2 with 4 images each."
    root, d = tmp_path_factory.mktemp('digits'), load_digits()
    picked = [i for c in range(3) for i in np.flatnonzero(d.target == c)[:4]]
    for i in picked:
        (root / str(d.target[i])).mkdir(exist_ok=True)
        Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8), mode='L').save(root / str(d.target[i]) / f'{i:04d}.png')
    return root, d.images[picked], d.target[picked]


def test_folder_shapes_range_labels(digit_folder):
    root, images, labels = digit_folder
    ds = get_dataset('folder', root=root, image_size=8)
    assert len(ds) == 12 and ds.num_classes == 3 and ds.meta['classes'] == ['0', '1', '2']
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    x, y = torch.stack(xs), torch.stack(ys)
    assert x.shape == (12, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    assert y.tolist() == labels.tolist()                 # files are read class by class, in name order
    expected = torch.tensor(images, dtype=torch.float32) / 8 - 1   # the same map as the embedded digits
    assert torch.allclose(x[:, 0], expected, atol=2 / 255 + 1e-6)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])   # gray PNGs come back as RGB


def test_folder_resizes(digit_folder):
    ds = get_dataset('folder', root=digit_folder[0], image_size=4)
    assert ds.shape == (3, 4, 4)


def test_latent_shards_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(9, 4, 2, 2, generator=g), torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5])
    assert save_latent_shard(tmp_path / 'shard_00000', z[:3], y[:3]).name == 'shard_00000.safetensors'
    np.save(tmp_path / 'shard_00001.npy', z[3:7].numpy())
    np.save(tmp_path / 'shard_00001_labels.npy', y[3:7].numpy())
    save_latent_shard(tmp_path / 'shard_00002.safetensors', z[7:].half(), y[7:])
    ds = get_dataset('latents', path=tmp_path)
    assert ds.meta['shards'] == ['shard_00000.safetensors', 'shard_00001.npy', 'shard_00002.safetensors']
    x, yy = ds.read(range(9))
    assert x.dtype == torch.float32 and ds.shape == (4, 2, 2) and ds.num_classes == 10 and len(ds) == 9
    assert torch.equal(x[:7], z[:7]) and torch.equal(x[7:], z[7:].half().float())
    assert torch.equal(yy, y)
    x3, y3 = ds[3]
    assert torch.equal(x3, z[3]) and y3.item() == 1
    perm = torch.randperm(9, generator=g)                       # any order, repeats, rows of several shards
    idx = torch.cat([perm, perm[:4]])
    xr, yr = ds.read(idx)
    assert torch.equal(xr, x[idx]) and torch.equal(yr, y[idx])


def test_latent_shards_keep_the_stored_dtype_and_read_bfloat16(tmp_path):
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    save_latent_shard(tmp_path / 'a', z.bfloat16(), torch.arange(6), metadata={'num_classes': 1000})
    ds = get_dataset('latents', path=tmp_path)
    assert ds.meta['dtype'] == 'bfloat16' and ds.num_classes == 1000       # num_classes from the file's metadata
    x, y = ds.read([5, 0])
    assert x.dtype == torch.float32 and torch.equal(x, z[[5, 0]].bfloat16().float()) and y.tolist() == [5, 0]


def test_latent_shards_pickle_without_their_mapping(tmp_path):
    import pickle
    save_latent_shard(tmp_path / 'a', torch.arange(8.).reshape(4, 2), torch.arange(4))
    ds = get_dataset('latents', path=tmp_path)
    ds.read([1])                                                 # maps the file
    blob = pickle.dumps(ds)
    assert len(blob) < 4000 and torch.equal(pickle.loads(blob).read([3])[0], torch.tensor([[6., 7.]]))


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc/self/status')
def test_latent_reads_keep_resident_memory_flat(tmp_path):
    """500 batches of 256 random rows from a 128 MiB shard: the process's file-backed resident memory grows by
    less than 8 MiB (it would reach about the file's size if the read pages stayed mapped)."""
    n = 1 << 17
    save_latent_shard(tmp_path / 'big', torch.zeros(n, 256), torch.zeros(n, dtype=torch.long))
    ds, g = get_dataset('latents', path=tmp_path, num_classes=1), torch.Generator().manual_seed(0)
    rss = lambda: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssFile')) / 1024
    before = rss()
    for _ in range(500): ds.read(torch.randint(n, (256,), generator=g))
    assert rss() - before < 8


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc/self')
def test_latent_reads_keep_the_peak_bounded_for_large_batches(tmp_path):
    """A page fault may map a whole page-cache folio (MBs); reading a batch of 1024 random rows of a 128 MiB shard
    raises the peak resident memory (VmHWM) by less than 48 MiB, as the pages are released every 8 rows (read in
    one go, the batch would map about the whole file)."""
    n = 1 << 17
    save_latent_shard(tmp_path / 'big', torch.ones(n, 256), torch.zeros(n, dtype=torch.long))
    ds, g = get_dataset('latents', path=tmp_path, num_classes=1), torch.Generator().manual_seed(0)
    status = lambda key: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) / 1024
    open('/proc/self/clear_refs', 'w').write('5')                # reset the peak mark
    before = status('VmRSS:')
    x, _ = ds.read(torch.randint(n, (1024,), generator=g))
    assert status('VmHWM:') - before < 48 and torch.equal(x, torch.ones(1024, 256))


def test_latent_errors(tmp_path):
    with pytest.raises(ConfigError, match='holds no latent shards'): get_dataset('latents', path=tmp_path)
    np.save(tmp_path / 'a.npy', np.zeros((2, 4)))
    with pytest.raises(ConfigError, match='shard a.npy has no labels file a_labels.npy'): get_dataset('latents', path=tmp_path)
    save_latent_shard(tmp_path / 'a_labels', np.zeros((2, 3)), [0, 1])      # shapes must agree across shards
    np.save(tmp_path / 'a_labels.npy', np.zeros(2))
    with pytest.raises(ConfigError, match=r'shard a_labels.safetensors has latents of shape \(3,\); allowed: \(4,\) as in a.npy'):
        get_dataset('latents', path=tmp_path)
    with pytest.raises(ConfigError, match=r'labels has shape \(3,\); allowed: \(2,\)'):
        save_latent_shard(tmp_path / 'b', torch.zeros(2, 4), torch.zeros(3))


class FakeVAE(torch.nn.Module):
    "Stands in for AutoencoderKL: the latent mean is 2x2 average pooling of the first 2 channels, doubled."
    def __init__(self):
        super().__init__()
        self.w, self.calls = torch.nn.Parameter(torch.tensor(2.0)), []
    def encode(self, x):
        self.calls.append(len(x))
        m = torch.nn.functional.avg_pool2d(x[:, :2], 2) * self.w
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=m, sample=lambda generator=None: m + torch.randn(m.shape, generator=generator)))


def test_extract_latents_fake_vae():
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    vae = FakeVAE()
    z = extract_latents(images, vae=vae, batch_size=2)
    assert vae.calls == [2, 2, 1] and z.shape == (5, 2, 4, 4) and not z.requires_grad
    assert torch.allclose(z, torch.nn.functional.avg_pool2d(images[:, :2], 2) * 2 * 0.18215)
    assert torch.allclose(extract_latents(images, vae=vae, scale=1.0), z / 0.18215, atol=1e-6)
    s1, s2 = (extract_latents(images, vae=vae, mode='sample', generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(s1, s2) and not torch.allclose(s1, z)


def test_extract_latents_without_diffusers(monkeypatch):
    monkeypatch.setitem(sys.modules, 'diffusers', None)      # import diffusers -> ImportError
    with pytest.raises(ConfigError) as e: extract_latents(torch.zeros(1, 3, 8, 8))
    assert 'pip install -e ".[latents]"' in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('call, field', [
    (lambda: get_dataset('gmm32', foo=1), "option 'foo' is not allowed for dataset 'gmm32'; allowed: n, seed"),
    (lambda: get_dataset('imagenet'), "dataset='imagenet' is not allowed; choose one of: ring8, gmm32"),
    (lambda: get_dataset('folder', size=8, root='.'), "option 'size' is not allowed for dataset 'folder'; allowed: root, image_size"),
    (lambda: get_dataset('folder', root='/no/such/dir'), "root='/no/such/dir' is not a folder"),
    (lambda: get_dataset('folder', root='.', image_size=0), "image_size=0 is out of range"),
    (lambda: get_dataset('latents'), "dataset 'latents' needs option 'path'"),
    (lambda: get_dataset('moons', n=-5), "n=-5 is out of range"),
    (lambda: get_dataset('torchvision', name='MNIST', root='/no/such/dir'), "root='/no/such/dir' does not exist; pass download=True"),
    (lambda: get_dataset('torchvision', name='Mnist', root='.'), "name='Mnist' is not allowed; choose one of:"),
    (lambda: extract_latents(torch.zeros(3, 8, 8), vae=FakeVAE()), "images has shape (3, 8, 8); allowed: [N, C, H, W]"),
])
def test_errors_are_one_line(call, field):
    with pytest.raises(ConfigError) as e: call()
    assert field in str(e.value) and '\n' not in str(e.value)


def test_torchvision_existing_root_without_files(tmp_path):
    with pytest.raises(ConfigError) as e: get_dataset('torchvision', name='MNIST', root=tmp_path)
    assert 'MNIST could not be read' in str(e.value) and '\n' not in str(e.value)


def test_torchvision_fakedata_is_lazy_and_in_range():
    ds = get_dataset('torchvision', name='FakeData', image_size=8)
    x, y = ds[3]
    assert len(ds) == 1000 and x.shape == (3, 8, 8) and -1 <= x.min() < x.max() <= 1 and 0 <= y.item() < 10


def test_folder_crops_as_dit(tmp_path):
    """A 40x24 RGB image cropped to 8 by the folder loader equals DiT's `center_crop_arr` written out: box-halve
    (24 >= 16) to 20x12, bicubic to 13x8, middle 8 columns."""
    a = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    (tmp_path / 'c').mkdir(); Image.fromarray(a).save(tmp_path / 'c' / 'x.png')
    half = Image.fromarray(a).resize((20, 12), resample=Image.BOX).resize((13, 8), resample=Image.BICUBIC)
    want = torch.tensor(np.array(half)[:, 2:10]).permute(2, 0, 1).float() / 127.5 - 1
    x, _ = get_dataset('folder', root=tmp_path, image_size=8)[0]
    assert torch.allclose(x, want, atol=1e-6)


def test_image_datasets_read_batches_in_order(digit_folder):
    ds = get_dataset('folder', root=digit_folder[0])
    x, y = ds.read([11, 0, 5])
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [2, 0, 1]
    assert torch.equal(x[1], ds[0][0]) and torch.equal(x[0], ds[11][0])
    fake = get_dataset('torchvision', name='FakeData', image_size=8)
    xf, yf = fake.read([7, 2])
    assert torch.equal(xf[0], fake[7][0]) and yf[1].item() == fake[2][1].item()


def _tiny_vae(path):
    "A randomly initialised AutoencoderKL (43 K parameters, 2x downsampling) saved with save_pretrained."
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
                  layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16).save_pretrained(path)
    return AutoencoderKL.from_pretrained(path).eval()


def test_write_latents_splits_resumes_and_matches_the_vae(tmp_path, monkeypatch):
    """5 images in shards of 2, split over 2 'ranks' (RANK/WORLD_SIZE as torchrun sets them): rank 1 writes shard 1,
    rank 0 shards 0 and 2; a rerun writes nothing. mode='sample' draws one seeded noise per image, so the rows are
    mean + std * noise with the noise of `sample_generators(seed, index)`; the stored float16 is that, rounded."""
    from nag_toolkit.core import sample_generators, randn_per_sample
    vae = _tiny_vae(tmp_path / 'vae')
    imgs = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    for i, a in enumerate(imgs):
        (tmp_path / 'img' / 'k').mkdir(parents=True, exist_ok=True); Image.fromarray(a).save(tmp_path / 'img' / 'k' / f'{i}.png')
    opts = {'dataset_options': {'root': str(tmp_path / 'img')}, 'vae': str(tmp_path / 'vae'), 'out': str(tmp_path / 'lat'),
            'shard_size': 2, 'batch_size': 2, 'mode': 'sample', 'seed': 7, 'dtype': 'float16', 'device': 'cpu'}
    monkeypatch.setenv('RANK', '1'); monkeypatch.setenv('WORLD_SIZE', '2')
    assert write_latents(opts)['written'] == [1]
    assert sorted(p.name for p in (tmp_path / 'lat').iterdir()) == ['shard_00001.json', 'shard_00001.safetensors']
    monkeypatch.setenv('RANK', '0')
    assert write_latents(opts)['written'] == [0, 2] and write_latents(opts)['written'] == []
    x, _ = folder_dataset(tmp_path / 'img').read(range(5))
    with torch.no_grad(): dist = vae.encode(x).latent_dist
    want = (dist.mean + dist.std * randn_per_sample((4, 8, 8), sample_generators(7, range(5)))) * 0.18215
    z, _ = get_dataset('latents', path=tmp_path / 'lat').read(range(5))
    assert (z - want).abs().max() < 1e-3                           # float16's rounding (batches of 2 vs 5 round alike)
    assert (z - dist.mean * 0.18215).abs().max() > 0.05           # and a sample, not the mean


def test_latents_cli_and_errors(tmp_path, digit_folder, capsys):
    import subprocess
    _tiny_vae(tmp_path / 'vae')
    r = subprocess.run([sys.executable, '-m', 'nag_toolkit.cli', 'latents', '--dataset', 'folder', '--set', f'dataset_options.root={digit_folder[0]}',
                        '--vae', str(tmp_path / 'vae'), '--shard-size', '5', '--flip', 'true', '--device', 'cpu', '--out', str(tmp_path / 'lat')],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'wrote 3 shard(s), 0 already finished, of 3' in r.stdout
    ds = get_dataset('latents', path=tmp_path / 'lat')
    assert len(ds) == 24 and ds.shape == (4, 4, 4) and ds.num_classes == 3     # 12 images and their flipped copies
    assert ds.read(range(10))[1].tolist() == [0, 0, 0, 0, 1] * 2                # shard 0: 5 images, then their mirrors
    from nag_toolkit.cli import main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e: main(['latents', '--mode', 'median', '--out', str(tmp_path / 'x')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and "mode='median' is not allowed" in err
