"""The trunk cache: a bank of augmented slices with their frozen-trunk tokens, refreshed by a share each epoch."""

from __future__ import annotations

import pytest
import torch

from ic_moe_monai.errors import ConfigError
from ic_moe_monai.networks import ICMoE
from ic_moe_monai.training.trunk_cache import TrunkCacheLoader, trunk_cached


class CountingLoader:
    """A slice loader by the DeviceSliceLoader protocol; each drawn slice's image is filled with its draw number."""

    def __init__(self, steps: int = 3, batch_size: int = 4, size: int = 32) -> None:
        self.steps, self.batch_size, self.size = steps, batch_size, size
        self.device = torch.device("cpu")
        self.drawn = 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        pass

    def epoch_generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(epoch)

    def sample(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids = torch.arange(self.drawn, self.drawn + self.batch_size, dtype=torch.float32)
        self.drawn += self.batch_size
        image = (ids / 1000)[:, None, None, None].expand(-1, 3, self.size, self.size).clone()
        return {"image": image, "label": torch.ones(self.batch_size, 1, self.size, self.size)}


@pytest.fixture(scope="module")
def network() -> ICMoE:
    return ICMoE(num_classes=2, img_size=32, encoder="medsam_lite", moe_blocks=[9]).train()


def test_bank_fills_once_then_renews_its_oldest_share(network):
    loader = CountingLoader(steps=3, batch_size=4)
    cache = TrunkCacheLoader(loader, network, bank_size=16, refresh=0.25, chunk=8)
    assert cache.bank_size == 16 and len(cache) == 3 and cache.batch_size == 4
    first = list(cache)
    assert loader.drawn == 16 and len(first) == 3  # the whole bank is drawn in the first epoch only
    assert set(first[0]) == {"image", "label", "trunk"} and first[0]["label"].dtype == torch.uint8
    assert first[0]["trunk"].dtype == torch.float16
    list(cache)
    assert loader.drawn == 20  # then a quarter each epoch
    ids = sorted(round(v * 1000) for v in cache._bank["image"][:, 0, 0, 0].tolist())
    assert ids == list(range(4, 20))  # the oldest four were replaced
    # each bank entry's tokens are the network's trunk of its own image
    with torch.no_grad():
        network.eval()
        expected = network.trunk(network.preprocess(cache._bank["image"][:2]))
        network.train()
    torch.testing.assert_close(cache._bank["trunk"][:2].float(), expected, atol=2e-3, rtol=2e-3)
    assert network.training  # the cache ran the trunk in eval mode and gave the network back in train mode


def test_bank_is_at_most_two_epochs_and_refuses_what_cannot_work(network):
    assert TrunkCacheLoader(CountingLoader(steps=2, batch_size=4), network, bank_size=4096).bank_size == 16
    assert TrunkCacheLoader(CountingLoader(steps=2, batch_size=4), network).bank_size == 16
    with pytest.raises(ConfigError, match="refresh"):
        TrunkCacheLoader(CountingLoader(), network, refresh=1.5)
    with pytest.raises(ConfigError, match="below a batch"):
        TrunkCacheLoader(CountingLoader(), network, bank_size=2)
    scratch = ICMoE(num_classes=2, img_size=32, encoder="lite", freeze_encoder=False)
    with pytest.raises(ConfigError, match="no frozen trunk"):
        TrunkCacheLoader(CountingLoader(), scratch)
    plain = CountingLoader()
    assert trunk_cached(plain, scratch, enabled="false") is plain
