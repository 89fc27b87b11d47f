"""The course report's VQ-VAE training loop, written the way the report describes it: the baseline.

* Data: a plain ``torch.utils.data.Dataset`` over a folder of original-size JPEGs (class
  sub-folders), the report's transforms — Resize, RandomRotation(30), both flips, ToTensor and
  ImageNet ``Normalize`` — and a shuffling ``DataLoader`` with batch 16.
* Model: the same seed encoder/decoder layers as ``vqvae.blocks`` and the report's VQ layer
  (nn.Embedding codebook, distances, one-hot encodings @ codebook, q_latent + 0.25·e_latent loss,
  straight-through gradient); the latent's 256 channels are split into 4 vectors of 64.
* Loop: ``model.train()``, ``zero_grad``, forward, MSE against the (normalised) input + VQ loss,
  ``backward``, ``step``, ``total_loss += loss.item()``.

The Normalize-then-sigmoid target mismatch is the report's bug; it is kept because it costs no time.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from runtime.config import CLASSES
from shards.images import open_image
from vqvae.blocks import seed_decoder, seed_encoder

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SEED_CHANNELS = [32, 64, 128, 256, 256]


def report_transform(size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize((size, size)), transforms.RandomRotation(degrees=30),
        transforms.RandomHorizontalFlip(p=0.5), transforms.RandomVerticalFlip(p=0.5),
        transforms.ToTensor(), transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


class LesionFolder(Dataset):
    """Every ``*.jpg`` under ``root/<CLASS>/``, labelled by its class folder."""

    def __init__(self, root: Path, transform: transforms.Compose) -> None:
        self.paths = sorted(Path(root).glob("*/*.jpg"))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = self.paths[index]
        return self.transform(open_image(path.read_bytes(), str(path)).convert("RGB")), CLASSES.index(path.parent.name)


class VectorQuantizer(nn.Module):
    def __init__(self, num_embeddings: int = 512, embedding_dim: int = 64, commitment_cost: float = 0.25) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.data.uniform_(-1 / num_embeddings, 1 / num_embeddings)
        self.commitment_cost = commitment_cost

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        inputs = inputs.permute(0, 2, 3, 1).contiguous()
        flat = inputs.view(-1, self.embedding.embedding_dim)
        weight = self.embedding.weight
        distances = flat.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1) - 2 * flat @ weight.t()
        indices = distances.argmin(1).unsqueeze(1)
        encodings = torch.zeros(indices.shape[0], self.embedding.num_embeddings, device=inputs.device)
        encodings.scatter_(1, indices, 1)
        quantized = (encodings @ weight).view(inputs.shape)
        q_latent_loss = F.mse_loss(quantized, inputs.detach())
        e_latent_loss = F.mse_loss(quantized.detach(), inputs)
        loss = q_latent_loss + self.commitment_cost * e_latent_loss
        quantized = inputs + (quantized - inputs).detach()
        return quantized.permute(0, 3, 1, 2).contiguous(), loss


class ReportVQVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = seed_encoder(SEED_CHANNELS)
        self.vq = VectorQuantizer()
        self.decoder = seed_decoder(SEED_CHANNELS)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        quantized, vq_loss = self.vq(self.encoder(x))
        return self.decoder(quantized), vq_loss


def train_images_per_s(folder: Path, *, size: int, batch: int, warmup: int, steps: int, workers: int,
                       device: torch.device) -> float:
    """Training images/s over ``steps`` steps after ``warmup`` steps (data waits included)."""
    torch.manual_seed(0)
    loader = DataLoader(LesionFolder(folder, report_transform(size)), batch_size=batch, shuffle=True,
                        num_workers=workers, drop_last=True)
    if len(loader) < warmup + steps:
        raise ValueError(f"{folder}: {len(loader)} batches, need {warmup + steps}")
    model = ReportVQVAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.MSELoss()
    model.train()
    total_loss, start = 0.0, 0.0
    for i, (data, _) in enumerate(loader):
        data = data.to(device)
        optimizer.zero_grad()
        recon, vq_loss = model(data)
        loss = criterion(recon, data) + vq_loss
        loss.backward()
        optimizer.step()
        total_loss += loss.item()
        if i + 1 == warmup:
            start = time.perf_counter()
        if i + 1 == warmup + steps:
            break
    return steps * batch / (time.perf_counter() - start)
