"""Models for tests, loaded the way users load theirs: `path/to/models.py:factory`."""

import torch
import torch.fx
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


class ShapeBranchNet(nn.Module):
    """Python control flow on a static shape: torch.fx cannot follow it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.widen = nn.Conv2d(4, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 3:
            x = self.widen(x)
        x = torch.relu(x)
        x = self.conv(x)
        return self.fc(x.mean(dim=(2, 3)))


def halve(x: torch.Tensor) -> torch.Tensor:
    """A function of the model's own code: fx keeps the call (it is wrapped), so the graph cannot ship."""
    return x * 0.5


torch.fx.wrap("halve")


class OwnOpNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = halve(torch.relu(self.mid(x)))
        return self.fc(x.mean(dim=(2, 3)))


def own_op(num_classes: int = 10) -> nn.Module:
    return OwnOpNet(num_classes)
