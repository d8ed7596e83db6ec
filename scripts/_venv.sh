# Shared by scripts/demo and scripts/check: create .venv (Python 3.11+) and install medsecure
# with the extras named in $1 (demo: cli; check: dev, i.e. every runtime extra, the test tools and
# the linters, pinned in pyproject.toml). Reinstalls when pyproject.toml is newer than the stamp.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "medsecure needs Python 3.11 or newer (found: $("$PY" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.medsecure-installed-$1"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$1]"
  touch "$stamp"
fi
