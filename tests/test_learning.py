"""A lite IC-MoE learns: it overfits the labelled slices of one real MSD hippocampus MRI."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from ic_moe_monai.networks import ICMoE
from ic_moe_monai.training.losses import ICMoELoss

SIZE = 64


def _slice_stack(image_path, label_path, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` labelled axial slices, each with its true neighbours as channels (2.5D), padded to 64²."""
    image = nib.load(image_path).get_fdata(dtype=np.float32)
    label = np.asarray(nib.load(label_path).dataobj).astype(np.int64)
    lo, hi = np.percentile(image, [0.5, 99.5])
    image = np.clip((image - lo) / (hi - lo), 0.0, 1.0)
    labelled = [z for z in range(image.shape[2]) if label[..., z].any()]
    chosen = labelled[:: max(1, len(labelled) // count)][:count]
    last = image.shape[2] - 1
    x = np.stack([np.stack([image[..., max(z - 1, 0)], image[..., z], image[..., min(z + 1, last)]]) for z in chosen])
    y = np.stack([label[..., z] for z in chosen])[:, None]
    pad = [(0, 0), (0, 0), (0, SIZE - x.shape[2]), (0, SIZE - x.shape[3])]
    return torch.from_numpy(np.pad(x, pad)).float(), torch.from_numpy(np.pad(y, pad))


def _dice(pred: torch.Tensor, target: torch.Tensor, cls: int) -> float:
    p, t = pred == cls, target == cls
    return float(2 * (p & t).sum() / (p.sum() + t.sum()))


@pytest.mark.slow
def test_lite_overfits_one_hippocampus_case(hippocampus_dir):
    torch.manual_seed(0)
    x, y = _slice_stack(
        hippocampus_dir / "imagesTr" / "hippocampus_003.nii.gz",
        hippocampus_dir / "labelsTr" / "hippocampus_003.nii.gz",
        4,
    )
    assert set(y.unique().tolist()) == {0, 1, 2}
    model = ICMoE(num_classes=2, img_size=SIZE, encoder="lite", freeze_encoder=False)
    loss_fn = ICMoELoss(num_classes=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    best = 0.0
    for step in range(400):
        model.train()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        if step % 20 == 19:
            model.eval()
            with torch.no_grad():
                pred = model(x).argmax(1, keepdim=True)
            best = max(best, min(_dice(pred, y, 1), _dice(pred, y, 2)))
            if best >= 0.9:
                break
    assert best >= 0.9, f"lite IC-MoE reached only Dice {best:.3f} on its own training slices"
