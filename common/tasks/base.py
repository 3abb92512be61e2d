"""The contract between fedq and a task plugin."""

from __future__ import annotations

import io
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from fedq.common.wire.codec import Weights
from fedq.common.wire.messages import TrainSettings


class TaskPluginError(ValueError):
    """A task plugin, or the data it is given, that a worker or coordinator cannot use (one sentence)."""


# The metric a plugin's train() reports its number of minibatch steps under (the worker moves it
# into the update's local_steps; aggregation may weigh by the work done).
LOCAL_STEPS = "local_steps"
# A bound on the partitions a built-in task splits its data into (Dirichlet draws per class).
MAX_PARTITIONS = 100_000


@dataclass(frozen=True)
class LocalData:
    features: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


class FederatedTask(ABC):
    """A model, a data set split into partitions, local training and evaluation.

    Subclasses must be deterministic given their parameters and the seeds they
    are handed: the coordinator and every worker build the same model and the
    same split independently.
    """

    #: name of the evaluation metric the stopping target applies to (higher is better)
    score_metric = "accuracy"
    #: how many data partitions exist; a worker's partition is taken modulo this
    num_partitions: int = 10

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A freshly initialised model; called under ``torch.manual_seed``."""

    @abstractmethod
    def local_data(self, partition: int) -> LocalData:
        """The training data of one partition (one worker's private data)."""

    def local_data_at(self, location: str) -> LocalData:
        """A worker's own data, read from ``location`` (its ``--data``) instead of a partition.

        The default reads an ``.npz`` file (a local path or any fsspec URL) holding two arrays,
        ``features`` and ``targets`` (``numpy.savez(path, features=..., targets=...)``); no pickles
        are loaded. Plugins for other formats override it.
        """
        import fsspec  # the archive's dependency already; only workers with --data need it

        try:
            with fsspec.open(location, "rb") as file:
                arrays = np.load(io.BytesIO(file.read()), allow_pickle=False)
                features, targets = arrays["features"], arrays["targets"]
        except (OSError, ValueError, KeyError) as error:
            raise TaskPluginError(
                f"cannot read --data {location}: an .npz file with arrays 'features' and "
                f"'targets' is expected ({type(error).__name__}: {error})"
            ) from None
        if len(features) != len(targets) or len(targets) == 0:
            raise TaskPluginError(
                f"--data {location} holds {len(features)} feature rows and {len(targets)} "
                "targets; they must be as many, and more than none"
            )
        targets = torch.from_numpy(
            targets.astype(np.int64) if targets.dtype.kind in "iub" else targets.astype(np.float32)
        )
        return LocalData(torch.from_numpy(features.astype(np.float32)), targets)

    @abstractmethod
    def test_data(self) -> LocalData:
        """Held-out data on which the coordinator evaluates global versions."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training loss; classification losses take logits."""

    def initial_weights(self, seed: int) -> Weights:
        torch.manual_seed(seed)
        return weights_of(self.build_model())

    def train(self, model: torch.nn.Module, data: LocalData, settings: TrainSettings) -> dict[str, float]:
        """Plain minibatch SGD for ``settings.epochs`` epochs, or with a time budget
        (``settings.seconds``) as many steps as fit in it, at most that many epochs and at least
        one step. Returns the mean training loss and ``local_steps``, the steps taken."""
        generator = torch.Generator().manual_seed(settings.seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate)
        model.train()
        deadline = time.monotonic() + settings.seconds if settings.seconds else None
        total_loss, batches = 0.0, 0
        for _ in range(settings.epochs):
            order = torch.randperm(len(data), generator=generator)
            for start in range(0, len(data), settings.batch_size):
                if deadline is not None and batches and time.monotonic() >= deadline:
                    return {"train_loss": total_loss / batches, LOCAL_STEPS: batches}
                batch = order[start : start + settings.batch_size]
                optimizer.zero_grad()
                loss = self.loss(model(data.features[batch]), data.targets[batch])
                loss.backward()
                optimizer.step()
                total_loss += loss.item()
                batches += 1
        return {"train_loss": total_loss / max(batches, 1), LOCAL_STEPS: batches}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Loss and accuracy on the test data (regression tasks override)."""
        model.eval()
        data = self.test_data()
        outputs = model(data.features)
        accuracy = float((outputs.argmax(dim=1) == data.targets).float().mean())
        return {"accuracy": accuracy, "loss": float(self.loss(outputs, data.targets))}


def check_parameter(name: str, value: object, low: float, high: float, *, integer: bool = True) -> None:
    """Refuse a task parameter outside [low, high] (or of the wrong type) with one sentence.

    Built-in tasks bound every size they are given: a worker adopts a job's parameters
    from its description, and a size of 10^9 must be an error, not an allocation.
    """
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        raise ValueError(
            f"{name} must be {'an integer' if integer else 'a number'} from {low:g} to {high:g}, not {value!r}"
        )


def weights_of(model: torch.nn.Module) -> Weights:
    """The model's state as named float32 numpy arrays (copies)."""
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()}


def load_weights_into(model: torch.nn.Module, weights: Weights) -> torch.nn.Module:
    model.load_state_dict({name: torch.from_numpy(np.array(array)) for name, array in weights.items()})
    return model


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Non-IID label split: for each class, shares across partitions drawn from Dir(alpha).

    Redraws until every partition holds at least ``min_size`` examples, as is
    usual (Hsu et al. 2019), so no worker is left with nothing to train on.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for label in classes:
            indices = np.flatnonzero(labels == label)
            rng.shuffle(indices)
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            # Rounded, not floored (flooring hands every remainder to the last partition),
            # and dealt to the partitions in a fresh random order per class, so that no
            # partition is systematically the one that rounding shortchanges.
            cuts = np.round(np.cumsum(shares) * len(indices)).astype(int)[:-1]
            for part_index, chunk in zip(rng.permutation(num_partitions), np.split(indices, cuts)):
                parts[part_index].extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_size:
            return [np.sort(np.array(part, dtype=np.int64)) for part in parts]
    raise ValueError(f"cannot split {len(labels)} examples into {num_partitions} partitions of >= {min_size}")
