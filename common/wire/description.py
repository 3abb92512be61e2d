"""The job description: what a job trains, published by its coordinator, signed, data only.

Workers never import anything named here. A worker's task plugin comes from its
own configuration (or, left unset, one of fedq's built-in tasks by name); the
description lets the worker check that its plugin, parameters and model are the
job's, and carries the job's public key, which verifies every round task.
Signed with that key, so a worker that pins the key's fingerprint notices a
rewritten description.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from fedq.common.wire.signing import SignatureError, SigningKey, VerifyKey, canonical

DESCRIPTION_SCHEMA = "fedq.job/1"

TensorSpecs = dict[str, tuple[tuple[int, ...], str]]


class DescriptionError(ValueError):
    """A stored job description that cannot be used; one sentence."""


@dataclass(frozen=True)
class JobDescription:
    job: str
    task: str  # the task's name: a built-in name or module:object, never imported from here
    task_params: dict[str, Any]
    seed: int  # of the initial model
    tensors: TensorSpecs  # name -> (shape, dtype) of the model's state
    public_key: str  # base64 Ed25519 key that verifies the job's tasks and this description
    signature: str = ""

    @property
    def digest(self) -> str:
        """sha256 of what is trained: task, parameters, seed and model tensors (not the key)."""
        trained = {
            "task": self.task,
            "task_params": self.task_params,
            "seed": self.seed,
            "tensors": _tensors_json(self.tensors),
        }
        return hashlib.sha256(canonical(trained)).hexdigest()

    @property
    def verify_key(self) -> VerifyKey:
        return VerifyKey.from_text(self.public_key)

    def signed_document(self) -> dict[str, Any]:
        document = {
            "schema": DESCRIPTION_SCHEMA,
            **asdict(self),
            "tensors": _tensors_json(self.tensors),
            "digest": self.digest,
        }
        del document["signature"]
        return document

    def signed(self, key: SigningKey) -> JobDescription:
        return JobDescription(**{**self.__dict__, "signature": key.sign(self.signed_document())})

    def to_json(self) -> str:
        return json.dumps({**self.signed_document(), "signature": self.signature}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> JobDescription:
        """Parse and check the description's own signature (against its own key: integrity, not
        authenticity; a pinned fingerprint gives authenticity, see :meth:`verify`)."""
        try:
            document = json.loads(text)
            if document.get("schema") != DESCRIPTION_SCHEMA:
                raise DescriptionError(
                    f"the job description has schema {document.get('schema')!r}, "
                    f"not {DESCRIPTION_SCHEMA} (was the job started by an older fedq?)"
                )
            tensors = {
                str(name): (tuple(int(size) for size in shape), str(dtype))
                for name, (shape, dtype) in document["tensors"].items()
            }
            description = cls(
                job=str(document["job"]),
                task=str(document["task"]),
                task_params=dict(document["task_params"]),
                seed=int(document["seed"]),
                tensors=tensors,
                public_key=str(document["public_key"]),
                signature=str(document["signature"]),
            )
        except DescriptionError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise DescriptionError(f"the job description is not readable: {error!r}") from None
        if document.get("digest") != description.digest:
            raise DescriptionError("the job description's digest does not match its content")
        description.verify(None)
        return description

    def verify(self, pinned_fingerprint: str | None) -> None:
        """Raise :class:`DescriptionError` unless the description is signed by its key and, when
        ``pinned_fingerprint`` is given, that key is the pinned one."""
        try:
            key = self.verify_key
            if pinned_fingerprint is not None and key.fingerprint != pinned_fingerprint:
                raise DescriptionError(
                    f"job {self.job!r} is published with coordinator key {key.fingerprint}, not the pinned "
                    f"{pinned_fingerprint}: the job description was replaced, or the pin is wrong"
                )
            key.verify(self.signed_document(), self.signature)
        except SignatureError as error:
            raise DescriptionError(
                f"the description of job {self.job!r} is not signed by its coordinator: {error}"
            ) from None


def _tensors_json(tensors: TensorSpecs) -> dict[str, list[Any]]:
    return {name: [list(shape), dtype] for name, (shape, dtype) in sorted(tensors.items())}
