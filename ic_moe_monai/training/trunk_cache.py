"""Training with a frozen encoder trunk computed once and reused across epochs.

With a frozen pretrained encoder, every block before the first IC-MoE layer (:attr:`ICMoE.trunk_end
<ic_moe_monai.networks.ICMoE.trunk_end>`) computes a fixed function of the input: for LiteMedSAM, that is the
stem and the full-resolution convolutional stage, most of the network's cost. Recomputing it every step spends most
of a CPU's time on a result that does not learn. :class:`TrunkCacheLoader` keeps a bank of augmented training
slices with their trunk tokens, computed without autograd; each epoch replaces a share of the bank with freshly
drawn and augmented slices (so augmentation keeps adding variety at a bounded cost), and every training step draws
its batch from the bank and hands the tokens to the network's ``trunk`` argument, which starts the encoder where
the trunk ended. The trained function is the same as without the bank (tested): only which augmented samples a
step sees differs.

On a GPU, where the trunk is cheap, ``refresh=1.0`` with a bank of one epoch recomputes everything each epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ic_moe_monai.amp import autocast
from ic_moe_monai.errors import ConfigError, config_flag

__all__ = ["TrunkCacheLoader", "trunk_cached"]


class TrunkCacheLoader:
    """A training loader that serves batches of ``loader`` with the network's frozen trunk tokens attached.

    Yields ``{"image", "label", "trunk"}``; :class:`~ic_moe_monai.training.clicks.ClickPromptBatch` with
    ``forward_keys=["trunk"]`` hands the tokens to the network. Each epoch starts by
    refreshing the bank (all of it, the first time): ``refresh × bank_size`` slices, oldest first, are replaced by
    new draws of ``loader`` (its sampling and augmentation), their trunk computed in eval mode without autograd.
    Then ``len(loader)`` steps each draw ``loader.batch_size`` slices uniformly from the bank.

    Args:
        loader: the slice loader (:class:`~ic_moe_monai.training.slice_sampling.DeviceSliceLoader`):
            ``sample(generator)``, ``batch_size``, ``epoch_generator(epoch)``, ``len()``.
        network: the :class:`~ic_moe_monai.networks.ICMoE` being trained (DistributedDataParallel is unwrapped);
            its ``trunk_end`` must be above 0 (a frozen encoder with IC-MoE layers after its first block).
        bank_size: slices in the bank, at most (and by default) two epochs' worth.
        refresh: share of the bank replaced each epoch after the first (0 keeps the first bank, 1 renews it all).
        storage_dtype: dtype the tokens are kept in (float16 halves the memory; the network computes in its own).
        amp, amp_dtype: autocast for the trunk on CUDA (see :mod:`ic_moe_monai.amp`).
        chunk: slices per trunk forward when filling the bank.
    """

    def __init__(
        self,
        loader: Any,
        network: torch.nn.Module,
        bank_size: int | None = None,
        refresh: float = 0.25,
        storage_dtype: str | torch.dtype = "float16",
        amp: bool = False,
        amp_dtype: str | torch.dtype | None = "auto",
        chunk: int = 32,
    ) -> None:
        self.loader = loader
        self.network = network.module if hasattr(network, "module") else network
        if getattr(self.network, "trunk_end", 0) < 1:
            raise ConfigError(
                "trunk cache: the network has no frozen trunk to reuse (freeze_encoder must be on and the first "
                "IC-MoE layer after block 0): set use_trunk_cache to false."
            )
        if not 0.0 <= float(refresh) <= 1.0:
            raise ConfigError(f"trunk cache: refresh must lie in [0, 1], got {refresh}.")
        two_epochs = 2 * len(loader) * loader.batch_size  # more than two epochs draw would be filled for nothing
        self.bank_size = min(int(bank_size), two_epochs) if bank_size else two_epochs
        if self.bank_size < loader.batch_size:
            raise ConfigError(f"trunk cache: bank_size {self.bank_size} is below a batch ({loader.batch_size}).")
        self.refresh = float(refresh)
        self.storage_dtype = getattr(torch, storage_dtype) if isinstance(storage_dtype, str) else storage_dtype
        self.amp, self.amp_dtype = amp, amp_dtype
        self.chunk = int(chunk)
        self.device = loader.device
        self._bank: dict[str, torch.Tensor] | None = None
        self._next = 0  # oldest slice of the bank, next to be replaced
        self._epoch: int | None = None
        self._passes = 0

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self._epoch if self._epoch is not None else self._passes + 1
        self._passes += 1
        self._epoch = None
        generator = self.loader.epoch_generator(epoch)
        self._refresh(generator)
        assert self._bank is not None
        for _ in range(len(self)):
            index = torch.randint(self.bank_size, (self.batch_size,), generator=generator, device=self.device)
            yield {key: value[index] for key, value in self._bank.items()}

    def _refresh(self, generator: torch.Generator) -> None:
        """Fill the bank (first epoch) or replace its oldest ``refresh`` share with new draws."""
        count = self.bank_size if self._bank is None else round(self.refresh * self.bank_size)
        done = 0
        while done < count:
            batch = self.loader.sample(generator)
            take = min(count - done, batch["image"].shape[0])
            trunk = self._trunk(batch["image"][:take])
            entries = {"image": batch["image"][:take], "label": batch["label"][:take].to(torch.uint8), "trunk": trunk}
            if self._bank is None:
                self._bank = {k: v.new_empty((self.bank_size, *v.shape[1:])) for k, v in entries.items()}
            rows = (self._next + torch.arange(take, device=self.device)) % self.bank_size
            for key, value in entries.items():
                self._bank[key][rows] = value
            self._next = (self._next + take) % self.bank_size
            done += take

    @torch.no_grad()
    def _trunk(self, image: torch.Tensor) -> torch.Tensor:
        network = self.network
        was_training = network.training
        network.eval()
        try:
            parts = []
            with autocast(image.device, self.amp, self.amp_dtype):
                for chunk in image.split(self.chunk):
                    parts.append(network.trunk(network.preprocess(chunk)).to(self.storage_dtype))
            return torch.cat(parts)
        finally:
            network.train(was_training)


def trunk_cached(
    loader: Any,
    network: torch.nn.Module,
    enabled: bool | str = True,
    bank_size: int | None = None,
    refresh: float = 0.25,
    amp: bool = False,
    amp_dtype: str | torch.dtype | None = "auto",
) -> Any:
    """``loader`` served through a :class:`TrunkCacheLoader` when ``enabled`` (an on/off word from a command line
    too), else ``loader`` itself: the bundle's ``use_trunk_cache`` switch."""
    if not config_flag(enabled, "use_trunk_cache"):
        return loader
    return TrunkCacheLoader(loader, network, bank_size, refresh, amp=config_flag(amp, "amp"), amp_dtype=amp_dtype)
