#!/usr/bin/env bash
# Make this checkout ready to run fedq: a virtual environment in .venv with fedq
# and its test tools installed, and RabbitMQ and Redis answering on localhost.
# Uses servers already listening; otherwise starts (and, as root, installs) the
# Debian packages; otherwise says exactly what to install. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
AMQP_PORT=${FEDQ_AMQP_PORT:-5672}
REDIS_PORT=${FEDQ_REDIS_PORT:-6379}

say() { printf 'fedq setup: %s\n' "$*"; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
as_root() { [ "$(id -u)" -eq 0 ]; }

wait_for_port() {  # port, name, seconds
  for _ in $(seq "$3"); do listening "$1" && return 0; sleep 1; done
  say "$2 did not start listening on port $1 within $3 s"; return 1
}

install_packages() {
  if ! as_root; then
    say "RabbitMQ or Redis is missing. Install them, then run this again:"
    say "  sudo apt-get install -y rabbitmq-server redis-server"
    exit 1
  fi
  say "installing $* (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_redis() {
  listening "$REDIS_PORT" && return 0
  command -v redis-server >/dev/null || install_packages redis-server
  say "starting redis-server on port $REDIS_PORT"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no >/dev/null
  wait_for_port "$REDIS_PORT" Redis 30
}

ensure_rabbitmq() {
  if ! listening "$AMQP_PORT"; then
    command -v rabbitmq-server >/dev/null || install_packages rabbitmq-server
    say "starting rabbitmq-server (takes a few seconds)"
    if as_root || [ -w /var/lib/rabbitmq ]; then
      rabbitmq-server -detached
    else
      say "cannot start RabbitMQ as $(id -un); start it with: sudo systemctl start rabbitmq-server"
      exit 1
    fi
    wait_for_port "$AMQP_PORT" RabbitMQ 90
  fi
  # The management API reports unacknowledged messages (busy workers) as well as
  # ready ones; fedq status uses it when present. Best effort: needs rights.
  if command -v rabbitmq-plugins >/dev/null && (as_root || [ -w /etc/rabbitmq ]); then
    rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null 2>&1 || true
  fi
}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    say "fedq needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1)"; exit 1; }
  say "creating .venv"
  "$PYTHON" -m venv .venv
fi
say "installing fedq and its test tools into .venv (torch is pinned to 2.13.0)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

ensure_redis
ensure_rabbitmq
say "ready: RabbitMQ on 127.0.0.1:$AMQP_PORT, Redis on 127.0.0.1:$REDIS_PORT, fedq in .venv/bin/fedq"
