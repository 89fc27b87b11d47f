"""Reconstruction and codebook metrics (the report had none beyond training loss)."""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import structural_similarity_index_measure


class ReconstructionMeter:
    """Accumulates MSE, PSNR, SSIM and the code histogram over validation batches."""

    def __init__(self, codebook_size: int) -> None:
        self.counts = torch.zeros(codebook_size, dtype=torch.float64)
        self.sq_err = self.psnr = self.ssim = 0.0
        self.images = 0

    @torch.no_grad()
    def update(self, target: torch.Tensor, recon: torch.Tensor, codes: torch.Tensor) -> None:
        target, recon = target.float().cpu(), recon.float().cpu().clamp(0, 1)
        mse = (recon - target).pow(2).flatten(1).mean(1)  # per image
        self.sq_err += mse.sum().item()
        # PSNR per image with data range 1, then averaged (the usual convention).
        self.psnr += (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).sum().item()
        ssim = structural_similarity_index_measure(recon, target, data_range=1.0, reduction="none")
        self.ssim += ssim.sum().item()
        self.counts += torch.bincount(codes.flatten().cpu(), minlength=self.counts.numel()).double()
        self.images += target.shape[0]

    def result(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {"mse": self.sq_err / n, "psnr": self.psnr / n, "ssim": self.ssim / n, **codebook_usage(self.counts)}


def codebook_usage(counts: torch.Tensor) -> dict[str, float]:
    """Perplexity of the code histogram (K = all codes used evenly), fraction used, dead codes."""
    total = counts.sum().item()
    if total == 0:
        return {"perplexity": 0.0, "code_usage": 0.0, "dead_codes": float(counts.numel())}
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum().item())
    return {"perplexity": math.exp(entropy), "code_usage": used / counts.numel(),
            "dead_codes": float(counts.numel() - used)}
