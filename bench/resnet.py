"""ResNet-50 for the end-to-end benchmark and for the ``resnet50`` shape suite.

torchvision's model is used when torchvision is installed; otherwise this file's definition, which
has the same architecture (ResNet v1.5: the stride sits on the 3x3 convolution of a bottleneck),
the same module names and therefore the same batch-norm shapes. The shape suite always uses the
local definition so that it does not depend on what is installed.
"""

from __future__ import annotations

from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """He et al. 2016, 50 layers, with torchvision's layout and initialisation."""

    stages = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride)

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for index, (width, blocks, stride) in enumerate(self.stages, start=1):
            layer, in_channels = self._stage(in_channels, width, blocks, stride)
            setattr(self, f"layer{index}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_channels: int, width: int, blocks: int, stride: int):
        out_channels = width * Bottleneck.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))
        layers = [Bottleneck(in_channels, width, stride, downsample)]
        layers += [Bottleneck(out_channels, width) for _ in range(blocks - 1)]
        return nn.Sequential(*layers), out_channels

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet50(num_classes: int = 1000) -> tuple[nn.Module, str]:
    """A freshly initialised ResNet-50 and where its definition came from."""
    try:
        from torchvision.models import resnet50 as torchvision_resnet50
    except Exception:  # not installed, or installed without a matching torch build
        return ResNet50(num_classes), "dbn_kernels.benchmark.resnet"
    return torchvision_resnet50(weights=None, num_classes=num_classes), "torchvision"
