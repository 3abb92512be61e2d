"""``python -m bench.python_packer coordinator ...``: the fedq CLI with redis-py's pure-Python
command packer instead of ``hiredis.pack_command`` (an experiment for ``throughput.py --python-packer``).

hiredis 3.x packs a command by copying every argument into a new buffer at under
1 GB/s, so one SET of a 4 MB blob costs ~5-10 ms of CPU in the client. redis-py's
``PythonRespSerializer`` hands large arguments to ``sendall`` without copying. After
import, redis-py reads ``HIREDIS_AVAILABLE`` only to choose the packer of each new
connection, so replies are still parsed by hiredis.
"""

from __future__ import annotations

import sys

import redis.connection


def use_python_packer() -> None:
    redis.connection.HIREDIS_AVAILABLE = False


if __name__ == "__main__":
    use_python_packer()
    from fedq.common.cli import main

    sys.exit(main())
