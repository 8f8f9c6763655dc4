#!/usr/bin/env bash
# Writes infra/mlflow/.env from .env.example with every secret generated (32 random bytes, hex), readable by you only,
# then checks it (check_secrets.py, as the compose stack's preflight does). Refuses to overwrite an existing .env.
#
#   infra/mlflow/setup.sh            # then: docker compose -f infra/mlflow/docker-compose.yaml up -d --build
#
# The MLflow admin password is printed once and stays in .env (MLFLOW_AUTH_ADMIN_PASSWORD): the server creates the
# admin account with it on first start. Give Ray nodes and people users of their own (README.md, Authentication).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENV_FILE="${1:-$HERE/.env}"
PYTHON="$(command -v python3 || command -v python)"

[[ ! -e "$ENV_FILE" ]] || { echo "setup: $ENV_FILE exists; delete it first to generate new secrets" >&2; exit 2; }

umask 077
"$PYTHON" - "$HERE/.env.example" "$ENV_FILE" "$HERE/check_secrets.py" <<'PY'
import importlib.util
import secrets
import sys

example, target, checker = sys.argv[1:]
spec = importlib.util.spec_from_file_location("check_secrets", checker)
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)
lines = []
for line in open(example, encoding="utf-8"):
    key = line.split("=", 1)[0].strip()
    if key in check.SECRETS:
        line = f"{key}={secrets.token_hex(32)}\n"
    lines.append(line)
with open(target, "x", encoding="utf-8") as handle:
    handle.writelines(lines)
PY
"$PYTHON" "$HERE/check_secrets.py" "$ENV_FILE" >/dev/null
echo "wrote $ENV_FILE (mode 600) with generated secrets"
echo "MLflow login: admin / $(sed -n 's/^MLFLOW_AUTH_ADMIN_PASSWORD=//p' "$ENV_FILE")"
