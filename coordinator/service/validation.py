"""Every check an update must pass before it may touch the global model, behind one entry point.

:func:`validate_update` turns a message body into a :class:`ValidatedUpdate`
or raises :class:`Rejected` with a stable reason label (the dead-letter reason
header and the rejection counter). The checks, in order: the message's size, schema, job,
the sender's identity (once the job has enrolled identities: the worker id is the one enrolled
for the RabbitMQ user that published it, and not revoked), duplicate (skipped quietly, not
dead-lettered), an open task of this job answered from the
version it was issued at, staleness, the delta's size
(before a claimed blob is read), the delta itself (inline or claim check,
verified against its sha256), tensor names/shapes/dtypes, finite values, and
the delta's L2 norm against what the job has accepted (:class:`NormGuard`).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import redis

from fedq.common.records import AppliedUpdate
from fedq.common.store import TRANSIENT_REDIS_ERRORS, ModelStore
from fedq.common.store.identities import Identity, IdentityCache, IdentityRegistry, identity_of
from fedq.common.wire import codec, compression
from fedq.common.wire.limits import max_update_message_bytes
from fedq.common.wire.messages import ClaimCheck, MessageError, ModelUpdate, TaskRefusal, parse_worker_message
from fedq.coordinator.algorithms.aggregation import BufferedUpdate


class Rejected(MessageError):
    """An update that will not be applied; ``task_id`` is known once the message parsed.

    ``duplicate`` means its task was already applied or is buffered: ack it and
    move on, it is not hostile (a redelivery after a crash).
    """

    def __init__(
        self, error: MessageError, task_id: str | None, *, worker_id: str | None = None, duplicate: bool = False
    ):
        super().__init__(error.reason, error.detail)
        self.task_id = task_id
        self.worker_id = worker_id
        self.duplicate = duplicate


@dataclass(frozen=True)
class Expectations:
    """What an update is checked against: the coordinator's state when it arrives."""

    job: str
    head: int
    max_staleness: int | None  # None: no bound in versions
    tensor_specs: dict[str, tuple[tuple[int, ...], str]]
    abandoned: frozenset[int] = frozenset()
    # No delta matching tensor_specs is larger (codec.max_encoded_size): a bigger payload is refused unread.
    max_delta_bytes: int | None = None
    # A delta with a larger L2 norm is refused as norm_outlier (NormGuard.bound); None: no bound.
    max_delta_norm: float | None = None
    # Workers whose own history allows more (NormGuard.worker_bounds).
    worker_norm_bounds: Mapping[str, float] = field(default_factory=dict)
    # Identities are checked even before the job has enrolled any (--require-identity).
    require_identity: bool = False
    # Adaptive staleness: each worker's expected staleness (from its measured speed), and how
    # many times that an update may exceed (None: the fixed cut alone).
    expected_staleness: Mapping[str, float] = field(default_factory=dict)
    staleness_tolerance: float | None = None
    # The job's update encoding (common/wire/compression.py): every update must be sent in it.
    encoding: str = compression.LOSSLESS


@dataclass(frozen=True)
class ValidatedUpdate:
    update: BufferedUpdate
    worker_id: str
    digest: str
    blob_key: str
    inline_payload: bytes | None  # written to blob_key at commit; claim checks are already there
    norm: float = 0.0  # L2 norm of the delta, over all tensors
    train_seconds: float = 0.0  # how long its worker says training took
    sender: str | None = None  # the RabbitMQ user that published it (checked again at commit)

    def applied(self, weight: float) -> AppliedUpdate:
        """Its record in the history once a server step applied it with ``weight``."""
        update = self.update
        return AppliedUpdate(
            task_id=update.task_id,
            worker_id=update.worker_id,
            base_version=update.base_version,
            staleness=update.staleness,
            weight=weight,
            num_examples=update.num_examples,
            digest=self.digest,
            blob_key=self.blob_key,
            norm=self.norm,
            expected_staleness=update.expected_staleness,
            data_share=update.data_share,
            update_interval=update.update_interval,
            local_steps=update.local_steps,
        )


@dataclass(frozen=True)
class ValidatedRefusal:
    """A worker's refusal of an open task of this job: the task can be closed and replaced."""

    refusal: TaskRefusal
    version: int  # the version the task was issued at


def validate_update(
    body: bytes,
    expected: Expectations,
    store: ModelStore,
    already_taken: Callable[[str], bool],
    issued_version: Callable[[str], int | None],
    sender: str | None = None,
    read_ahead: Future[tuple[bytes, str]] | None = None,
    identities: IdentityRegistry | IdentityCache | None = None,
) -> ValidatedUpdate | ValidatedRefusal:
    """The update in ``body``, validated; raises :class:`Rejected` with the reason it is not usable.

    A worker's refusal of a task is checked the same way (this job's, an open task) and
    returned as a :class:`ValidatedRefusal`.

    ``already_taken(task_id)`` says whether the task's update is buffered or applied;
    ``issued_version(task_id)`` is the version an open task was issued at (None: no such
    open task: never issued by this job's coordinator, or closed). ``sender`` is the RabbitMQ
    user that published the message, as the broker validated it (its ``user_id``).
    ``read_ahead`` is the claim-checked delta's read, begun before (see coordinator/service/readahead.py).
    ``identities`` are the job's enrolled identities (the coordinator's copy; default: read from ``store``).
    """
    if expected.max_delta_bytes is not None and len(body) > max_update_message_bytes(expected.max_delta_bytes):
        raise Rejected(
            MessageError(
                "too_large",
                f"the message has {len(body)} bytes; no update of this model has "
                f"more than {max_update_message_bytes(expected.max_delta_bytes)}",
            ),
            None,
        )
    try:
        update = parse_worker_message(body)
    except MessageError as error:
        raise Rejected(error, None) from None
    if update.job != expected.job:
        raise Rejected(MessageError("unknown_job", f"update is for job {update.job!r}, not {expected.job!r}"), None)
    try:
        check_identity(update.worker_id, sender, identities or store.identities, expected.require_identity)
    except MessageError as error:
        raise Rejected(error, None, worker_id=update.worker_id) from None
    if isinstance(update, TaskRefusal):
        version = issued_version(update.task_id)
        if version is None or already_taken(update.task_id):
            raise Rejected(
                MessageError("unknown_task", f"refused task {update.task_id[:64]!r} is not an open task of this job"),
                None,
                worker_id=update.worker_id,
            )
        return ValidatedRefusal(update, version)
    if already_taken(update.task_id):
        raise Rejected(
            MessageError("duplicate", f"task {update.task_id} was already applied"),
            update.task_id,
            worker_id=update.worker_id,
            duplicate=True,
        )
    try:
        check_issued(update, issued_version(update.task_id))
        predicted = expected.expected_staleness.get(update.worker_id)
        staleness = check_staleness(
            update, expected.head, expected.max_staleness, expected.abandoned, predicted, expected.staleness_tolerance
        )
        if update.encoding != expected.encoding:
            raise MessageError(
                "wrong_encoding",
                f"the update is encoded as {update.encoding!r}, but this job takes {expected.encoding!r} "
                "(its tasks say so; is the worker's fedq older than the coordinator's?)",
            )
        digest, payload, delta = load_delta(update, store, expected.max_delta_bytes, expected.tensor_specs, read_ahead)
        norm = check_tensors(delta, expected.tensor_specs)
        bound = expected.worker_norm_bounds.get(update.worker_id, expected.max_delta_norm)
        if bound is not None and norm > bound:
            raise MessageError("norm_outlier", f"the delta's L2 norm {norm:.4g} exceeds this job's bound {bound:.4g}")
    except MessageError as error:
        raise Rejected(error, update.task_id, worker_id=update.worker_id) from None
    except TRANSIENT_REDIS_ERRORS:
        raise  # Redis is away, not this update's fault: the caller reconnects and it comes back
    except Exception as error:  # noqa: BLE001 - a Redis refusal or a bug: it ends this update, not the service
        raise Rejected(
            MessageError("unusable", f"{type(error).__name__}: {error}"), update.task_id, worker_id=update.worker_id
        ) from error
    return ValidatedUpdate(
        BufferedUpdate(
            task_id=update.task_id,
            worker_id=update.worker_id,
            base_version=update.base_version,
            staleness=staleness,
            num_examples=update.num_examples,
            delta=delta,
            expected_staleness=predicted,
            local_steps=update.local_steps,
        ),
        worker_id=update.worker_id,
        digest=digest,
        blob_key=store.blobs.verified_key(update.task_id, update.worker_id),
        inline_payload=None if isinstance(update.delta, ClaimCheck) else payload,
        norm=norm,
        train_seconds=update.train_seconds,
        sender=sender,
    )


def check_identity(
    worker_id: str, sender: str | None, identities: IdentityRegistry | IdentityCache, required: bool
) -> None:
    """Once a job has enrolled identities (``fedq admin enroll``), or ``required``, an update or
    refusal must come from the RabbitMQ user enrolled for the worker id it names (or for the site
    a replica's id ``<site>.<replica>`` names), not revoked.

    With an :class:`IdentityCache`, a sender its copy accepts is accepted without a round trip;
    anything else is judged on the entry Redis holds now. The commit script checks the senders of
    the updates it applies again (common/store/versions.py), so a revocation keeps every update of
    the revoked worker not yet applied out of the model.
    """
    name = identity_of(worker_id)
    if isinstance(identities, IdentityCache):
        if identity_refusal(worker_id, sender, *identities.cached(name), required) is None:
            return
        identities = identities.registry
    refusal = identity_refusal(worker_id, sender, *identities.lookup(name), required)
    if refusal is not None:
        raise refusal


def identity_refusal(
    worker_id: str, sender: str | None, enrolled_any: bool, identity: Identity | None, required: bool
) -> MessageError | None:
    """Why ``sender`` may not speak for ``worker_id``, given the job's entry for it (None: it may)."""
    if not (required or enrolled_any):
        return None
    if identity is None:
        return MessageError("unknown_worker", f"worker {worker_id[:64]!r} is not enrolled in this job")
    if identity.revoked:
        return MessageError("revoked_worker", f"worker {worker_id[:64]!r} was revoked")
    if sender != identity.user:
        return MessageError(
            "impersonation",
            f"the message names worker {worker_id[:64]!r} but was published by "
            f"{'an unnamed user' if sender is None else repr(sender[:64])}",
        )
    return None


def l2_norm(weights: codec.Weights) -> float:
    """The L2 norm over all tensors together, accumulated in float64 (no float32 overflow)."""
    return math.sqrt(sum(_squared_norm(array) for array in weights.values()))


def _squared_norm(values: np.ndarray) -> float:
    # einsum casts to float64 in small blocks as it sums: converting whole tensors first (two
    # fresh 8 MB buffers per 1M values, page faults included) took a quarter of a 1M-parameter step.
    return float(np.einsum("i,i->", values.ravel(), values.ravel(), dtype=np.float64))


def l2_distance(weights: codec.Weights, other: codec.Weights) -> float:
    """The L2 norm of ``weights - other`` over all tensors (the difference in their dtype, summed in float64)."""
    return math.sqrt(sum(_squared_norm(array - other[name]) for name, array in weights.items()))


class NormGuard:
    """Bounds the L2 norm of an update by what the job has accepted, so that finite poison
    (a delta filled with 1e30, or an honest one scaled up) is refused as ``norm_outlier``.

    Once ``warmup`` updates were accepted, the bound is ``factor`` times the median norm of
    the last ``window`` of them; before, ``factor`` times the model's own norm, which bounds
    the very first updates when nothing else is known. The model's norm is no floor after
    the warm-up: honest steps are typically a few percent of it, so a bound of ten model
    norms let updates boosted a hundredfold through (bench/poisoning.py measured 63 of 65
    applied). Honest update norms of one job stayed within 6.1 times their running median
    over 2,514 updates (bench/README.md), so ``factor = 10`` keeps them while refusing
    anything an order of magnitude off; the median moves only once most of the window is
    poisoned, and only by what got through.

    The window is the last updates, so fast workers fill it: once the model has learnt their
    data their deltas shrink, while a slow worker that alone holds some classes keeps sending
    larger ones, which a job-wide bound then refused (bench/heterogeneous.py: 23 of a slow
    group's updates, and the model forgot its classes). So a worker with ``worker_warmup`` accepted
    updates of its own (few: a slow worker sends few) is also bounded by ``factor`` times its own
    median, which may itself be at most ``factor`` times the job's: a worker whose data differs keeps its own
    scale, and no update ever exceeds ``factor``^2 times the job's median (one that ramps up window by window
    gets no further).
    """

    def __init__(
        self, factor: float, window: int = 100, warmup: int = 20, worker_window: int = 20, worker_warmup: int = 5
    ):
        self.factor = factor
        self.warmup = warmup
        self.worker_warmup = worker_warmup
        self.window = window
        self.norms: deque[float] = deque(maxlen=window)
        self.worker_window = worker_window
        self.by_worker: dict[str, deque[float]] = {}
        # worker_bounds is asked for every update and changes only when norms are accepted (at a
        # commit): kept, with the model norm it was computed for, until then.
        self._worker_bounds: tuple[float, dict[str, float]] | None = None
        # The norm an honest update has at least, when the job says (local differential privacy:
        # the noise's); the bound never falls below factor times it.
        self.floor = 0.0

    def bound(self, model_norm: float) -> float | None:
        """The largest acceptable update norm now; None when there is nothing to compare with yet."""
        typical = statistics.median(self.norms) if len(self.norms) >= self.warmup else model_norm
        typical = max(typical, self.floor)
        return self.factor * typical if self.factor and typical > 0 else None

    def worker_bounds(self, model_norm: float) -> dict[str, float]:
        """Per worker with a history of its own: the bound its own scale gives it, where that is
        above the job's (see the class's docstring)."""
        if self._worker_bounds is not None and self._worker_bounds[0] == model_norm:
            return self._worker_bounds[1]
        self._worker_bounds = (model_norm, self._compute_worker_bounds(model_norm))
        return self._worker_bounds[1]

    def _compute_worker_bounds(self, model_norm: float) -> dict[str, float]:
        job_bound = self.bound(model_norm)
        if job_bound is None or len(self.norms) < self.warmup:
            return {}
        bounds = {}
        for worker, norms in self.by_worker.items():
            if len(norms) >= self.worker_warmup:
                own = self.factor * min(statistics.median(norms), job_bound)
                if own > job_bound:
                    bounds[worker] = own
        return bounds

    def step_bound(self, model_norm: float) -> float | None:
        """The largest plausible server step: no more than the model's own scale or one acceptable update.

        A step of buffered updates that each passed :meth:`bound` can still exceed it (a server
        learning rate above 1, an adaptive optimizer), but not by orders of magnitude.
        """
        if not self.factor:
            return None
        return max(self.factor * model_norm, self.bound(model_norm) or 0.0) or None

    def accepted(self, norms: list[tuple[str, float | None]]) -> None:
        """Remember the (worker id, norm) of applied updates (None: a record from before norms were kept)."""
        self._worker_bounds = None
        for worker, norm in norms:
            if norm is not None:
                self.norms.append(norm)
                self.by_worker.setdefault(worker, deque(maxlen=self.worker_window)).append(norm)


def read_claimed_delta(update: ModelUpdate, store: ModelStore, max_bytes: int | None) -> tuple[bytes, str]:
    """The claim-checked delta of ``update`` as (safetensors bytes, sha256), verified against its claim.

    A blob is read only when its claimed size is acceptable, and no further than that size.
    Reading it moves it to the update's verified key (see common/store/blobs.py), which the
    history then names. Pure I/O and hashing: the read-ahead runs it in a thread.
    """
    assert isinstance(update.delta, ClaimCheck), "an inline delta has nothing to read"
    claim = update.delta
    if claim.key != store.blobs.key(update.task_id, update.worker_id):
        # An update may only claim its own blob, never another job's, worker's or update's.
        raise MessageError("bad_claim", f"claim key {claim.key!r} is not this update's blob key")
    _check_size(claim.nbytes, max_bytes, f"claim-checked blob {claim.key!r}")
    try:
        # Never more than the claimed size (and one byte to tell a longer blob): a blob of
        # hundreds of MB under a small claim costs this read nothing.
        payload = store.blobs.take(update.task_id, update.worker_id, claim.nbytes)
    except redis.ResponseError:  # WRONGTYPE: someone put a hash or list there
        raise MessageError("bad_claim", f"claim key {claim.key!r} does not hold a blob") from None
    if not payload:
        raise MessageError("missing_blob", f"claim-checked blob {claim.key!r} is gone (expired or never written)")
    if len(payload) != claim.nbytes:
        raise MessageError("bad_digest", f"blob {claim.key!r} does not match its sha256/size")
    digest = codec.digest(payload)
    if digest != claim.sha256:
        raise MessageError("bad_digest", f"blob {claim.key!r} does not match its sha256/size")
    return payload, digest


def load_delta(
    update: ModelUpdate,
    store: ModelStore,
    max_bytes: int | None,
    specs: Mapping[str, tuple[tuple[int, ...], str]],
    read_ahead: Future[tuple[bytes, str]] | None = None,
) -> tuple[str, bytes, codec.Weights]:
    """The update's delta as (sha256, safetensors bytes, arrays), from the message or its Redis
    claim check (:func:`read_claimed_delta`, or ``read_ahead``: the same, begun in a thread
    while earlier updates were handled), decoded from the encoding the message names (which the
    payload must name too) into tensors of ``specs``. A payload over ``max_bytes`` is refused as
    ``too_large``.
    """
    if isinstance(update.delta, ClaimCheck):
        if read_ahead is not None:
            payload, digest = read_ahead.result()
        else:
            payload, digest = read_claimed_delta(update, store, max_bytes)
    else:
        payload = update.delta.payload
        _check_size(len(payload), max_bytes, "the inline delta")
        digest = codec.digest(payload)
    try:
        encoding, delta = compression.decode(payload, specs)
    except codec.CodecError as error:
        raise MessageError("bad_tensor", str(error)) from None
    if encoding != update.encoding:
        raise MessageError("wrong_encoding", f"the message says {update.encoding!r}, its payload is {encoding!r}")
    return digest, payload, delta


def _check_size(nbytes: int, max_bytes: int | None, what: str) -> None:
    if max_bytes is not None and nbytes > max_bytes:
        raise MessageError("too_large", f"{what} has {nbytes} bytes; no delta of this model has more than {max_bytes}")


def check_tensors(delta: codec.Weights, expected: dict[str, tuple[tuple[int, ...], str]]) -> float:
    """Names, shapes and dtypes must match the model's; every value must be finite. Returns the
    delta's L2 norm (as ``l2_norm``)."""
    if delta.keys() != expected.keys():
        missing = sorted(expected.keys() - delta.keys())
        extra = sorted(delta.keys() - expected.keys())
        raise MessageError("wrong_tensors", f"tensor names differ from the model's (missing {missing}, extra {extra})")
    for name, array in delta.items():
        shape, dtype = expected[name]
        if tuple(array.shape) != shape:
            raise MessageError("wrong_shape", f"tensor {name!r} has shape {tuple(array.shape)}, model has {shape}")
        if array.dtype.name != dtype:
            raise MessageError("wrong_dtype", f"tensor {name!r} has dtype {array.dtype.name}, model has {dtype}")
    squares = {name: _squared_norm(array) for name, array in delta.items()}
    for name, square in squares.items():
        # A NaN or an infinity makes the sum of squares NaN or infinite; finite float32 values
        # cannot overflow it in float64. So the values are looked at again only when the sum is
        # not finite (float64 squares can overflow): one pass over 4 MB instead of two.
        if not math.isfinite(square) and not np.isfinite(delta[name]).all():
            raise MessageError("not_finite", f"tensor {name!r} contains NaN or infinity")
    return math.sqrt(sum(squares.values()))


def check_issued(update: ModelUpdate, issued_version: int | None) -> None:
    """An update answers one open task, from the version that task named: a task id made up,
    reused or already closed answers nothing, and a base version claimed fresher than the
    task's would buy an undeserved staleness weight."""
    if issued_version is None:
        raise MessageError("unknown_task", f"task {update.task_id[:64]!r} is not an open task of this job")
    if update.base_version != issued_version:
        raise MessageError(
            "wrong_base_version",
            f"task {update.task_id} was issued at version {issued_version}, "
            f"the update claims base version {update.base_version}",
        )


def check_staleness(
    update: ModelUpdate,
    head: int,
    max_staleness: int | None,
    abandoned: frozenset[int] = frozenset(),
    expected: float | None = None,
    tolerance: float | None = None,
) -> int:
    """The update's staleness (head - base_version), if it is acceptable.

    ``max_staleness`` is a hard bound in versions (None: none). ``tolerance`` (adaptive
    staleness) bounds it by the worker's own norm as well: (1 + tau) may be at most
    ``tolerance`` times (1 + ``expected``), the staleness its measured speed predicts, so a slow
    worker is never cut off for being slow, only for being far slower than it usually is.
    """
    if update.base_version in abandoned:
        raise MessageError("rolled_back", f"base version {update.base_version} was abandoned by a rollback")
    if update.base_version > head:
        raise MessageError("future_version", f"base version {update.base_version} is ahead of head {head}")
    staleness = head - update.base_version
    if max_staleness is not None and staleness > max_staleness:
        raise MessageError("too_stale", f"staleness {staleness} exceeds max_staleness {max_staleness}")
    if tolerance is not None and expected is not None and 1 + staleness > tolerance * (1 + expected):
        raise MessageError(
            "too_stale",
            f"staleness {staleness} is more than {tolerance:g} times what worker "
            f"{update.worker_id}'s measured speed predicts ({expected:.1f})",
        )
    return staleness
