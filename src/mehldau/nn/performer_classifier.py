"""A piano-roll ResNet that names the pianist of a clip: the project's style judge.

After Cheston, Bance & Harrison (2025, arXiv 2504.05009): a one-channel roll (velocity / 127
over 88 keys x frames at 100 frames/s) through a ResNet (He et al. 2016) whose stem and stages
are the ImageNet ones, global average pooling, then one linear layer over the pianists. They
report 0.944 accuracy per recording over 20 pianists with ResNet-50 and ~0.91 with ResNet-18;
the default here is ResNet-18 (`layers=(2, 2, 2, 2)`, widths 64..512), and a tiny preset for
the CPU. Global pooling over time makes the classifier take a clip of any length; what it
learned is for the clip length it was trained on (`mehldau-compare` says when they differ).

Hand-written, not torchvision's `resnet18`: torchvision is not a dependency of this project
(its wheels are built for one torch release each), and its ImageNet stem expects three
channels; the model is one screen either way.

The loss is cross-entropy weighted per class (`class_weights`, set by the recipe to the
inverse of each class's share of training minutes) so that a pianist with 19 hours and one
with 80 minutes count alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PerformerClassifierConfig:
    num_classes: int = 2
    layers: tuple[int, ...] = (2, 2, 2, 2)  # basic blocks per stage: ResNet-18
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    dropout: float = 0.0  # before the last layer
    class_names: list[str] = field(default_factory=list)
    in_channels: int = 1  # 1: the velocity roll (Cheston et al.); 2: and the onset map

    def __post_init__(self) -> None:
        self.layers, self.widths = tuple(self.layers), tuple(self.widths)
        if len(self.layers) != len(self.widths) or not self.layers:
            raise ValueError(f"layers {self.layers} and widths {self.widths} must have one "
                             "entry per stage")
        if self.num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.num_classes}")
        if self.in_channels not in (1, 2):
            raise ValueError(f"in_channels must be 1 (velocity roll) or 2 (and onsets), got "
                             f"{self.in_channels}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError("class_names must name every class")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"], d["widths"] = list(self.layers), list(self.widths)
        return d


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # (B, K)
    embedding: torch.Tensor  # (B, C) the pooled features the last layer reads
    loss: torch.Tensor | None = None


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class PerformerClassifier(nn.Module):
    def __init__(self, config: PerformerClassifierConfig) -> None:
        super().__init__()
        self.config = c = config
        self.stem = nn.Sequential(  # (B, in_channels, 88, T) -> (B, stem, 22, T/4)
            nn.Conv2d(c.in_channels, c.stem_width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(c.stem_width),
            nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        stages, width = [], c.stem_width
        for i, (n, w) in enumerate(zip(c.layers, c.widths)):
            for j in range(n):  # every stage after the first halves keys and frames
                stages.append(BasicBlock(width, w, 2 if i > 0 and j == 0 else 1))
                width = w
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(width, c.num_classes)
        self.register_buffer("class_weights", torch.ones(c.num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for block in self.stages:  # each residual branch starts near zero: a plain path
            nn.init.zeros_(block.bn2.weight)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, 88, T) rolls -> (B, C) pooled features (the penultimate layer)."""
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        emb = self.embed(x)
        logits = self.head(self.dropout(emb))  # (B, K)
        loss = None
        if labels is not None:
            w = self.class_weights.to(logits.dtype)
            # The weighted mean over the batch (F.cross_entropy's weighted reduction) would
            # make a batch's loss depend on which classes it drew; a plain mean of weighted
            # per-clip losses is what the trainer's micro-batch weighting assumes.
            loss = (F.cross_entropy(logits.float(), labels, reduction="none") * w[labels]).mean()
        return ClassifierOutput(logits, emb, loss)
