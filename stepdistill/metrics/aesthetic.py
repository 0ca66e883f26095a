"""LAION's improved aesthetic predictor head, shared by the ReFL reward (methods/reward.py) and the preference
metric of the evaluation harness (eval/preference.py)."""

from __future__ import annotations

import torch

AESTHETIC_WEIGHTS = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(torch.nn.Module):
    """LAION improved aesthetic predictor head: normalised CLIP ViT-L/14 image embedding (768) -> score."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.nn.functional.normalize(emb.float(), dim=-1)).squeeze(-1)
