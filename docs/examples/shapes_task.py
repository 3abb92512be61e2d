"""An example fedq task plugin: a small CNN that tells squares, discs and crosses apart.

Each site keeps its images in a folder of its own (``images.npy``, uint8, N x 16 x 16, and
``labels.npy``, int, N) and starts its worker with ``--data FOLDER``: the plugin reads that
folder itself (``local_data_at``), which is the part a real plugin changes for its own format.
Without ``--data``, a worker trains on a partition that the plugin generates (``local_data``),
as the built-in tasks do, so the same plugin also runs without any files.

Make a site's folder, start a job, start workers (every process imports this module, so the
folder holding it must be on each one's PYTHONPATH; see docs/tasks.md):

    export PYTHONPATH=docs/examples
    python docs/examples/shapes_task.py make-data /tmp/site-a --partition 0
    python docs/examples/shapes_task.py make-data /tmp/site-b --partition 1
    fedq coordinator --job shapes --task shapes_task:ShapesTask --task-params '{"noise": 0.3}' \\
        --algorithm fedbuff --buffer-size 2 --concurrency 2 --learning-rate 0.1 --local-epochs 2 \\
        --batch-size 16 --target 0.8 --archive none &
    fedq worker --job shapes --task shapes_task:ShapesTask --data /tmp/site-a &
    fedq worker --job shapes --task shapes_task:ShapesTask --data /tmp/site-b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedq.common.tasks import FederatedTask, LocalData, TaskPluginError

SIZE = 16
CLASSES = ("square", "disc", "cross")
TEST_SEED = 10_000  # the test set's random stream: apart from every partition's (0, 1, 2, ...)


def draw(shape: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """One 16x16 image of ``CLASSES[shape]`` at a random place and size, with Gaussian noise."""
    radius = int(rng.integers(3, 6))
    cy, cx = (int(value) for value in rng.integers(radius, SIZE - radius, size=2))
    y, x = np.mgrid[:SIZE, :SIZE]
    if shape == 0:
        mask = (abs(y - cy) <= radius) & (abs(x - cx) <= radius)
    elif shape == 1:
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    else:
        mask = ((abs(y - cy) <= 1) & (abs(x - cx) <= radius)) | ((abs(x - cx) <= 1) & (abs(y - cy) <= radius))
    image = mask.astype(np.float32) + rng.normal(0.0, noise, (SIZE, SIZE)).astype(np.float32)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def make_images(count: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), count)
    return np.stack([draw(int(label), rng, noise) for label in labels]), labels


def as_local_data(images: np.ndarray, labels: np.ndarray) -> LocalData:
    features = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)  # N x 1 x 16 x 16
    return LocalData(features, torch.from_numpy(labels.astype(np.int64)))


class ShapesTask(FederatedTask):
    """``--task-params`` arrive here as keyword arguments (the coordinator records them in the job,
    and workers build the same task from them): keep them JSON-simple and check them."""

    score_metric = "accuracy"  # what --target and the plateau rule read from evaluate()

    def __init__(self, num_partitions: int = 4, examples: int = 200, noise: float = 0.3):
        if not 1 <= num_partitions <= 1000 or not 10 <= examples <= 100_000 or not 0 <= noise <= 2:
            raise ValueError("num_partitions must be 1-1000, examples 10-100000 and noise 0-2")
        # Partitions a worker without --data may be leased (0 .. num_partitions - 1).
        self.num_partitions = num_partitions
        self.examples, self.noise = examples, noise

    def build_model(self) -> nn.Module:
        # Only float32 parameters: no BatchNorm (its running statistics are buffers, one of them int64).
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 x 8 x 8
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 x 4 x 4
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, len(CLASSES)),
        )

    def local_data(self, partition: int) -> LocalData:
        return as_local_data(*make_images(self.examples, partition, self.noise))

    def local_data_at(self, location: str) -> LocalData:
        folder = Path(location)
        try:
            images, labels = np.load(folder / "images.npy"), np.load(folder / "labels.npy")
        except (OSError, ValueError) as error:
            raise TaskPluginError(
                f"cannot read the shapes in {location}: a folder with images.npy and labels.npy is expected ({error})"
            ) from None
        if images.shape[1:] != (SIZE, SIZE) or len(images) != len(labels) or not len(labels):
            raise TaskPluginError(f"{location} must hold N images of {SIZE}x{SIZE} and N labels, N > 0")
        return as_local_data(images, labels)

    def test_data(self) -> LocalData:
        return as_local_data(*make_images(300, TEST_SEED, self.noise))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write one site's shapes to a folder (images.npy, labels.npy).")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-data")
    make.add_argument("folder")
    make.add_argument("--partition", type=int, default=0, help="which site: each draws its own images")
    make.add_argument("--examples", type=int, default=200)
    make.add_argument("--noise", type=float, default=0.3)
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = make_images(args.examples, args.partition, args.noise)
    np.save(folder / "images.npy", images)
    np.save(folder / "labels.npy", labels)
    print(f"wrote {len(labels)} images to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
