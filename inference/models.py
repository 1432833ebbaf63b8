"""The small torch modules fedgate ships: a CT-slice classifier CNN and a toy lesion segmenter.

Both take (N, 1, 64, 64) windowed slices in [0, 1]; the classifier returns (N, 2) probabilities
(no lesion / lesion), the segmenter (N, 1, 64, 64) lesion probabilities.  Exported as TorchScript.
"""

from __future__ import annotations

import torch
from torch import nn


class SliceClassifier(nn.Module):
    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(1),
        )
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.features(x).flatten(1)), dim=1)


class ToySegmenter(nn.Module):
    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(8, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


REGISTRY: dict[str, type[nn.Module]] = {"ct_lesion_classifier": SliceClassifier, "ct_lesion_segmenter": ToySegmenter}
