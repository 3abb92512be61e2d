"""``throughput.py --profile``: where the coordinator's wall-clock time goes, from a raw py-spy profile."""

from __future__ import annotations

import collections
from pathlib import Path

# (label, substrings that must all occur in a sample's stack): the first matching
# entry names the sample's bucket, so the more specific entries come first.
PROFILE_BUCKETS = [
    ("Redis SET of the new weights blob (commit)", ("VersionStore.commit (", "BasicKeyCommands.set (")),
    ("Redis SET of the new weights blob (commit)", ("VersionStore.commit (", "Pipeline.execute (")),
    ("retention: VersionStore.prune", ("VersionStore.prune (",)),
    ("Redis Lua commit script", ("VersionStore.commit (", "Script.__call__ (")),
    ("sha256 (claim check + version digest)", ("digest (common/wire/codec.py",)),
    ("safetensors encode of the new version", ("encode (common/wire/codec.py",)),
    ("Redis read of a claim-checked delta (moved to its verified key)", ("UpdateBlobs.take (",)),
    ("waiting for a delta read ahead", ("load_delta (", "Future.result (")),
    ("safetensors decode of a delta", ("decode (common/wire/codec.py",)),
    ("finiteness check and L2 norm of a delta", ("check_tensors (",)),
    ("aggregation step", ("step (coordinator/algorithms/aggregation.py",)),
    ("server optimizer", ("apply (coordinator/algorithms/server_optimizers.py",)),
    ("json, weights copy, rest of store.commit", ("VersionStore.commit (",)),
    ("publish a task + wait for its confirm", ("publish (broker/publisher.py",)),
    ("Redis HSET open task (dispatch)", ("TaskLedger.open (",)),
    ("Redis HDEL open task (close)", ("TaskLedger.close (",)),
    ("Redis HGET applied (duplicate check)", ("applied_version (",)),
    ("basic_ack of updates", ("basic_ack (",)),
    ("parse update (JSON, base64)", ("parse_worker_message (",)),
    ("identity lookup (Redis, every message)", ("check_identity (",)),
    ("logging", ("(logging/",)),
    ("idle: waiting for the next update", ("consume (",)),
]


def summarise_profile(path: Path, top: int = 14) -> list[str]:
    """Share of the coordinator's main-thread wall-clock samples per activity, inside the serve loop."""
    if not path.exists():
        return ["(no profile written)"]
    buckets: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if "_serve (coordinator/service/loop.py" not in stack:
            continue  # start-up (imports, model build, version 0) and other threads
        count = int(count_text)
        total += count
        label = next((name for name, needles in PROFILE_BUCKETS if all(needle in stack for needle in needles)), None)
        buckets[label or "other: " + stack.split(";")[-1].split(" (")[0]] += count
    if not total:
        return ["(no samples inside Coordinator._serve)"]
    lines = [f"  {count / total:6.1%}  {label}" for label, count in buckets.most_common(top)]
    return [f"coordinator serve loop, wall-clock share by activity ({total} py-spy samples):"] + lines
