"""Small ResNet-style CNN: conv stem, residual blocks with BatchNorm, global pooling, linear head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class ResidualBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCNN(nn.Module):
    """``stem`` conv, one residual stage per entry of ``channels`` (stride 2 after the first), head.

    Works for any input of shape (C, H, W); the pooling adapts to the spatial size.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64),
                 blocks_per_stage: int = 1) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs images shaped (C, H, W); got input_shape={tuple(input_shape)!r}")
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], channels[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU())
        stages: list[nn.Module] = []
        in_ch = channels[0]
        for i, ch in enumerate(channels):
            for b in range(blocks_per_stage):
                stages.append(ResidualBlock(in_ch, ch, stride=2 if (i > 0 and b == 0) else 1))
                in_ch = ch
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.stages(self.stem(x))))
