#!/usr/bin/env bash
# Submit a job that runs the code of the current git commit, whatever you edit or check out afterwards.
#
#   ./safe-sbatch.sh [SBATCH OPTIONS] WRAPPER SCRIPT.py [ARGS...]
#   e.g. ./safe-sbatch.sh -p gpu --time 4:00:00 run-gpu4-dist.sh mnist_ddp.py --epochs=100
#
# It refuses uncommitted changes to tracked files (the job would not run what the commit says); untracked files, such
# as the outputs a run writes (out/, checkpoints/, *.out), do not stop it. It exports exactly what git tracks at the
# commit, once, into $SNAPSHOT_DIR/<commit> (default: .snapshots/ in the repository; add it to .gitignore) and submits
# the snapshot's wrapper and script. The job still runs in the current directory, so the log, --output-dir,
# --checkpoint-dir and relative data paths stay where you expect; GIT_COMMIT is exported to the job. A snapshot not
# submitted for SNAPSHOT_DAYS days (default 30) is removed.
set -euo pipefail

usage="usage: ./safe-sbatch.sh [SBATCH OPTIONS] WRAPPER SCRIPT.py [ARGS...]"
if ! repo=$(git rev-parse --show-toplevel 2>/dev/null); then
  echo "ERROR: $PWD is not inside a git repository. $usage" >&2
  exit 2
fi
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
  echo "ERROR: tracked files have uncommitted changes; the job would not run what the commit says:" >&2
  git -C "$repo" status --short --untracked-files=no >&2
  echo "HINT: commit them (or git stash), then submit again" >&2
  exit 1
fi

# split: sbatch options (they start with -; a value after = or as the next word) | wrapper | script | its arguments
sbatch_opts=()
while [ $# -gt 0 ] && [[ $1 == -* ]]; do
  sbatch_opts+=("$1") && shift
  # -p long, --time 1:00:00: the next word is the option's value unless it is a file (the wrapper) or an option
  if [[ ${sbatch_opts[-1]} != *=* && $# -gt 2 && $1 != -* && ! -f $1 ]]; then sbatch_opts+=("$1") && shift; fi
done
if [ $# -lt 2 ]; then echo "ERROR: need a wrapper and a script. $usage" >&2; exit 2; fi
wrapper=$1 script=$2
shift 2
for f in "$wrapper" "$script"; do
  [ -f "$f" ] || { echo "ERROR: '$f' not found in $PWD. $usage" >&2; exit 2; }
done

commit=$(git -C "$repo" rev-parse HEAD)
snapshots=${SNAPSHOT_DIR:-$repo/.snapshots} && snap=$snapshots/$commit
if [ ! -d "$snap" ]; then  # export once per commit; atomic, so a half-written snapshot is never used
  mkdir -p "$snap.tmp.$$"
  git -C "$repo" archive "$commit" | tar -x -C "$snap.tmp.$$"
  mv "$snap.tmp.$$" "$snap"
fi
touch "$snap" && find "$snapshots" -mindepth 1 -maxdepth 1 -type d -mtime +"${SNAPSHOT_DAYS:-30}" -exec rm -rf {} +
# the same files, inside the snapshot
rel() { realpath --relative-to="$repo" "$1"; }
echo "submitting commit ${commit:0:12} from $snap"
exec sbatch --export="ALL,GIT_COMMIT=$commit" "${sbatch_opts[@]}" \
  "$snap/$(rel "$wrapper")" "$snap/$(rel "$script")" "$@"
