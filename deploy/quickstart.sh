#!/usr/bin/env bash
# Set everything up, then run a real federated training demo: one coordinator and
# four worker processes that talk only through RabbitMQ and Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec .venv/bin/fedq demo "$@"
