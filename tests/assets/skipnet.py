"""A user model with residual additions and a channel concatenation, for `file.py:factory` tests."""

import torch
from torch import nn


class SkipNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch_a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        joined = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)  # channel concatenation
        x = torch.relu(self.mix(joined) + joined)  # residual across the concatenation
        x = self.down(x)
        x = torch.relu(self.res(x) + x)  # residual
        return self.head(x.mean(dim=(2, 3)))


def build(num_classes: int = 10) -> nn.Module:
    return SkipNet(num_classes)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: neither fx nor export can follow it
            y = y * 2
        return self.fc(y.mean(dim=(2, 3)))


def untraceable() -> nn.Module:
    return Untraceable()
