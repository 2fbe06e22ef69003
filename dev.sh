#!/usr/bin/env bash
# The two everyday commands; each installs what it needs on first use.
#
#   ./dev.sh quickstart [ARGS...]   2-process DDP training of mnist_ddp.py on CPU (gloo), ARGS passed on
#   ./dev.sh test [PYTEST ARGS...]  the whole test suite (this is what .ci/run calls); as root it also
#                                   installs Slurm (for the tests' own 2-node cluster) and shellcheck with apt
#   ./dev.sh test-oldest [ARGS...]  the same suite in .venv-oldest, with the oldest supported releases
#                                   (requirements-oldest.txt: torch 2.8, Lightning 2.5, DeepSpeed 0.19.8)
#
# Overrides: VENV (default .venv), PYTHON (default python3), DATA_DIR (default: ../shared/data when it
# holds MNIST, as on the project's own machines, else ./data, where the script downloads MNIST).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }

ensure_venv() {
  # everything (requirements-dev.txt: every script's needs, the optional parts, the tests' tools); reinstalled only
  # when a requirements file changed since the last install
  local reqs=(requirements.txt requirements-deepspeed.txt requirements-mpi.txt requirements-wandb.txt
              requirements-dev.txt)
  if [ -x "$VENV/bin/python" ] && cat "${reqs[@]}" | cmp -s - "$VENV/.installed-requirements.txt"; then
    return
  fi
  echo "== setting up $VENV (first run: about 90 s) =="
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r requirements-dev.txt
  cat "${reqs[@]}" > "$VENV/.installed-requirements.txt"
}

ensure_oldest_venv() {
  # torch first: DeepSpeed's setup.py imports it (--no-build-isolation: against this torch, not a newer one)
  if [ -x "$VENV/bin/python" ] && cmp -s requirements-oldest.txt "$VENV/.installed-requirements.txt"; then
    return
  fi
  echo "== setting up $VENV with the oldest supported releases (about 3 min) =="
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check setuptools wheel \
    "$(grep '^torch==' requirements-oldest.txt)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-build-isolation -r requirements-oldest.txt
  cp requirements-oldest.txt "$VENV/.installed-requirements.txt"
}

ensure_apt_tools() {
  # the Slurm cluster tests need Debian's slurm and munge packages, and root; without them they skip, saying why.
  # The lint test runs Debian's shellcheck on every shell script; the --compile tests need g++ (inductor on CPU).
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munge >/dev/null && command -v ip >/dev/null && command -v shellcheck >/dev/null \
     && command -v g++ >/dev/null; then
    return
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing Slurm, munge, iproute2, shellcheck and g++ (apt, about 15 s) =="
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge iproute2 shellcheck g++ >/dev/null
  elif [ "${CI:-}" = true ]; then
    echo "ERROR: CI needs root and apt-get to install Slurm (for the cluster tests) and shellcheck" >&2
    exit 1
  else
    echo "NOTE: no Slurm or shellcheck here and no root apt-get to install them: their tests will skip" >&2
  fi
}

default_data_dir() {
  if [ -d ../shared/data/MNIST/raw ]; then echo ../shared/data; else echo ./data; fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  quickstart)
    ensure_venv
    export DATA_DIR=${DATA_DIR:-$(default_data_dir)}
    echo "== 2-process DDP on CPU, data from $DATA_DIR =="
    exec "$VENV/bin/torchrun" --standalone --nproc_per_node=2 mnist_ddp.py --device=cpu --epochs=2 "$@"
    ;;
  test | test-oldest)
    if [ "$cmd" = test-oldest ]; then
      VENV=${VENV_OLDEST:-.venv-oldest}
      ensure_oldest_venv
    else
      ensure_venv
    fi
    ensure_apt_tools
    export PATH="$PWD/$VENV/bin:$PATH"
    # DeepSpeed JIT-builds one C++ op for CPU runs (~60 s once): build it now, not inside a timed test
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/$VENV/torch_extensions}
    DS_ACCELERATOR=cpu python -c "from deepspeed.accelerator import get_accelerator as g
g().create_op_builder('ShareMemCommBuilder').load()" >/dev/null
    # two workers, each taking whole test files (pytest-xdist): the Slurm cluster's tests, which mostly wait on their
    # jobs, run beside the others. TEST_WORKERS=0 runs everything in this one process
    exec python -m pytest tests -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
    ;;
  *)
    usage >&2
    exit 2
    ;;
esac
