"""CIFAR-shaped synthetic images (3x32x32, 10 classes) and a ResNet-18-sized model (no download).

The point of this task is a model of realistic size: at the default width (64)
the ResNet has 11,173,962 float32 parameters, 44.7 MB per encoded version or
delta, so the history archive, the claim checks and the aggregation are
benchmarked with real workers on the sizes a real job moves.

Each class is a smooth random colour pattern (a 4x4 grid of random colours,
upsampled bilinearly); an example is its class's pattern shifted by up to
MAX_SHIFT pixels plus Gaussian noise, so a convolutional model learns it well
above chance but not in one step. Each partition draws its class shares from
Dirichlet(alpha) (non-IID, alpha=0.5 by default) and its examples from its own
random stream: a worker generates only its own partition, whatever
num_partitions is. The test set is class-balanced and drawn from another stream.

Measured on one CPU core (torch.set_num_threads(1)) at the defaults, one local
training task (64 examples, one epoch of batches of 32: the default
TrainSettings) takes 0.61 s (median of 3; the first of a process, warming up,
1.6 s); the coordinator's evaluation of a version (500 test images) takes 1.4 s.
Under synchronous FedAvg over all 10 partitions at the default TrainSettings,
test accuracy passed 0.6 in the fifth round (0.14 after the first).
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedq.common.tasks.base import MAX_PARTITIONS, FederatedTask, LocalData, check_parameter

CLASSES = 10
CHANNELS = 3
IMAGE_SIZE = 32
PATTERN_GRID = 4
MAX_SHIFT = 2
# Streams of numpy's SeedSequence, one per kind of data, so that no two draw the same numbers.
PATTERN_STREAM, TEST_STREAM, PARTITION_STREAM = 0, 1, 2
# The convolution channels of the four stages are width times these (ResNet-18: 64-128-256-512).
STAGE_MULTIPLIERS = (1, 2, 4, 8)
BLOCKS_PER_STAGE = 2
# The stem halves the image (32 -> 16), where CIFAR ResNets keep 32x32: a quarter of the
# computation with the same parameters: a local task at the defaults takes 0.6 s on one core
# instead of 2.2 s.
STEM_STRIDE = 2
MAX_GROUPS = 32
# The residual branches start scaled down so that, summed over all blocks, they add about as
# much variance as the input has (1 + blocks x scale^2 = 2), not eight times as much: with the
# branches at full scale, the default width trained on non-IID partitions at learning rate 0.05
# diverged (test loss 34 after one local task); at 0 (Goyal et al. 2017) it learned very slowly.
RESIDUAL_SCALE = 1 / math.sqrt(len(STAGE_MULTIPLIERS) * BLOCKS_PER_STAGE)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm, not BatchNorm: every tensor of the model's state must be a float32 parameter.

    BatchNorm's running statistics are buffers, and ``num_batches_tracked`` is int64:
    workers send float32 deltas (worker/training.py), the coordinator checks each
    delta's dtype against the model's (coordinator/service/validation.py) and
    aggregates in float32, so an int64 tensor would be refused or silently recast.
    Averaging running statistics of non-IID partitions is also wrong in itself;
    GroupNorm is the usual replacement in federated learning (Hsieh et al. 2020).
    """
    return nn.GroupNorm(math.gcd(MAX_GROUPS, channels), channels)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the normalisation that follows has its own.
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (He et al. 2016); a 1x1 convolution when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1, self.norm1 = conv3x3(in_channels, out_channels, stride), group_norm(out_channels)
        self.conv2, self.norm2 = conv3x3(out_channels, out_channels), group_norm(out_channels)
        nn.init.constant_(self.norm2.weight, RESIDUAL_SCALE)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False), group_norm(out_channels)
            )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.norm1(self.conv1(inputs)))
        return F.relu(self.norm2(self.conv2(hidden)) + self.shortcut(inputs))


class ResNet(nn.Module):
    """ResNet-18's layout (four stages of two basic blocks) with stage widths ``width`` x 1, 2, 4, 8."""

    def __init__(self, width: int, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Sequential(conv3x3(CHANNELS, width, STEM_STRIDE), group_norm(width), nn.ReLU())
        blocks, in_channels = [], width
        for stage, multiplier in enumerate(STAGE_MULTIPLIERS):
            out_channels = width * multiplier
            for block in range(BLOCKS_PER_STAGE):
                # Every stage after the first halves the image in its first block.
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride))
                in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(in_channels, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(images))
        return self.classifier(features.mean(dim=(2, 3)))


class SyntheticImagesTask(FederatedTask):
    score_metric = "accuracy"

    def __init__(
        self,
        num_partitions: int = 10,
        alpha: float = 0.5,
        seed: int = 0,
        width: int = 64,
        examples_per_partition: int = 64,
        test_examples: int = 500,
        noise: float = 1.0,
    ):
        check_parameter("num_partitions", num_partitions, 1, MAX_PARTITIONS)
        check_parameter("alpha", alpha, 1e-6, 1e6, integer=False)
        check_parameter("seed", seed, 0, 2**32 - 1)
        check_parameter("width", width, 1, 256)
        check_parameter("examples_per_partition", examples_per_partition, 1, 100_000)
        check_parameter("test_examples", test_examples, 1, 100_000)
        check_parameter("noise", noise, 0, 1e3, integer=False)
        self.num_partitions = num_partitions
        self.alpha = alpha
        self.seed = seed
        self.width = width
        self.examples_per_partition = examples_per_partition
        self.test_examples = test_examples
        self.noise = noise

    @cached_property
    def _patterns(self) -> np.ndarray:
        """One smooth colour pattern per class, standardised to mean 0 and standard deviation 1."""
        rng = np.random.default_rng([self.seed, PATTERN_STREAM])
        grid = torch.from_numpy(rng.normal(0, 1, (CLASSES, CHANNELS, PATTERN_GRID, PATTERN_GRID)).astype(np.float32))
        patterns = F.interpolate(grid, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).numpy()
        centred = patterns - patterns.mean(axis=(1, 2, 3), keepdims=True)
        return centred / centred.std(axis=(1, 2, 3), keepdims=True)

    def _images(self, rng: np.random.Generator, labels: np.ndarray) -> LocalData:
        shifts = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, (len(labels), 2))
        images = np.stack(
            [np.roll(self._patterns[label], tuple(shift), axis=(1, 2)) for label, shift in zip(labels, shifts)]
        )
        images += self.noise * rng.standard_normal(images.shape, dtype=np.float32)
        return LocalData(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))

    def build_model(self) -> nn.Module:
        return ResNet(self.width)

    def local_data(self, partition: int) -> LocalData:
        rng = np.random.default_rng([self.seed, PARTITION_STREAM, partition % self.num_partitions])
        shares = rng.dirichlet(np.full(CLASSES, self.alpha))
        labels = rng.choice(CLASSES, size=self.examples_per_partition, p=shares / shares.sum())
        return self._images(rng, labels)

    @cached_property
    def _test(self) -> LocalData:
        labels = np.arange(self.test_examples) % CLASSES
        return self._images(np.random.default_rng([self.seed, TEST_STREAM]), labels)

    def test_data(self) -> LocalData:
        return self._test

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)
