#!/usr/bin/env bash
# Submit a job that runs the code of the current git commit, whatever you edit or check out afterwards.
#
#   ./safe-sbatch.sh [SBATCH OPTIONS] WRAPPER SCRIPT.py [ARGS...]
#   e.g. ./safe-sbatch.sh --partition=gpu run-gpu4-dist.sh mnist_ddp.py --epochs=100
#
# It refuses a dirty tree (changed, staged or untracked files: they would not be in the commit), exports
# HEAD once into $SNAPSHOT_DIR/<commit> (default: .snapshots/ in the repository, git-ignored) and submits the
# snapshot's wrapper and script. The job still runs in the current directory, so the log, --output-dir,
# --checkpoint-dir and relative data paths stay where you expect; GIT_COMMIT is exported to the job.
set -euo pipefail

usage="usage: ./safe-sbatch.sh [SBATCH OPTIONS] WRAPPER SCRIPT.py [ARGS...]"
if ! repo=$(git rev-parse --show-toplevel 2>/dev/null); then
  echo "ERROR: $PWD is not inside a git repository. $usage" >&2
  exit 2
fi
if [ -n "$(git -C "$repo" status --porcelain)" ]; then
  echo "ERROR: the git tree has uncommitted or untracked changes; the job would not run what the commit says:" >&2
  git -C "$repo" status --short >&2
  echo "HINT: commit them (or git stash -u), then submit again" >&2
  exit 1
fi

# split: sbatch options (start with -) | wrapper | script | script arguments
sbatch_opts=()
while [ $# -gt 0 ] && [[ $1 == -* ]]; do sbatch_opts+=("$1"); shift; done
if [ $# -lt 2 ]; then echo "ERROR: need a wrapper and a script. $usage" >&2; exit 2; fi
wrapper=$1 script=$2
shift 2
for f in "$wrapper" "$script"; do
  [ -f "$f" ] || { echo "ERROR: '$f' not found in $PWD. $usage" >&2; exit 2; }
done

commit=$(git -C "$repo" rev-parse HEAD)
snap=${SNAPSHOT_DIR:-$repo/.snapshots}/$commit
if [ ! -d "$snap" ]; then  # export once per commit; atomic, so a half-written snapshot is never used
  mkdir -p "$snap.tmp.$$"
  git -C "$repo" archive "$commit" | tar -x -C "$snap.tmp.$$"
  mv "$snap.tmp.$$" "$snap"
fi
# the same files, inside the snapshot
rel() { realpath --relative-to="$repo" "$1"; }
echo "submitting commit ${commit:0:12} from $snap"
exec sbatch --export="ALL,GIT_COMMIT=$commit" "${sbatch_opts[@]}" \
  "$snap/$(rel "$wrapper")" "$snap/$(rel "$script")" "$@"
