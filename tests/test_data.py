"""Real-data paths of `nag_toolkit.data` on small data made in the test: image folders, latent shards, VAE encoding, errors."""
import sys
from types import SimpleNamespace
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from nag_toolkit.core import ConfigError
from nag_toolkit.data import get_dataset, save_latent_shard, extract_latents


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
    assert ds.x.dtype == torch.float32 and ds.shape == (4, 2, 2) and ds.num_classes == 10
    assert torch.equal(ds.x[:7], z[:7]) and torch.allclose(ds.x[7:], z[7:], atol=1e-2)
    assert torch.equal(ds.y, y)
    x3, y3 = ds[3]
    assert torch.equal(x3, z[3]) and y3.item() == 1


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
