"""Refuse to start the MLflow stack on weak secrets: each one must be set, at least 16 characters long, and not a
placeholder (``change-me``, ``password``, the values of old examples). docker-compose.yaml runs this as the
one-shot ``preflight`` service that every other service waits for; ``setup.sh`` runs it on the file it wrote.

    python infra/mlflow/check_secrets.py            # reads the variables from the environment
    python infra/mlflow/check_secrets.py .env       # or from a dotenv file
"""

from __future__ import annotations

import os
import re
import sys

SECRETS = ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_S3_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD",
           "MLFLOW_FLASK_SERVER_SECRET_KEY")
MIN_LENGTH = 16
# Words of templates and defaults; one character repeated (``xxxxxxxxxxxxxxxx``).
PLACEHOLDER = re.compile(r"change.?me|changeit|password|secret|example|placeholder|admin|minio|mlflow|postgres"
                         r"|^(.)\1*$", re.IGNORECASE)


def problems(values: dict[str, str]) -> list[str]:
    """One line per secret that is missing, short, a placeholder or shared with another secret."""
    found = []
    for name in SECRETS:
        value = values.get(name, "")
        if not value:
            found.append(f"{name}: not set")
        elif len(value) < MIN_LENGTH:
            found.append(f"{name}: {len(value)} characters; at least {MIN_LENGTH}")
        elif PLACEHOLDER.search(value):
            found.append(f"{name}: looks like a placeholder ({PLACEHOLDER.search(value).group(0)!r})")
    used: dict[str, str] = {}
    for name in SECRETS:
        value = values.get(name, "")
        if value and value in used:
            found.append(f"{name}: the same value as {used[value]}")
        used.setdefault(value, name)
    return found


def read_dotenv(path: str) -> dict[str, str]:
    values = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip().strip("'\"")
    return values


def main(argv: list[str]) -> int:
    values = read_dotenv(argv[0]) if argv else dict(os.environ)
    found = problems(values)
    for line in found:
        print(f"{argv[0] if argv else 'environment'}: {line}", file=sys.stderr)
    if found:
        print("refusing to start: run infra/mlflow/setup.sh to generate the secrets", file=sys.stderr)
        return 1
    print("secrets: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
