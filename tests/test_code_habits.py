"""What keeps the repository readable and its copies in step: the helpers copied byte for byte between the standalone
training scripts, the lines the sbatch wrappers share, 120 columns, ruff and shellcheck."""
import ast
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

DDP, LIGHTNING = "mnist_ddp.py", "mnist_lightning_ddp.py"
DEEPSPEED, IMAGENET = "mnist_ddp_deepspeed.py", "imagenet_ddp.py"
ALL = [DDP, LIGHTNING, DEEPSPEED, IMAGENET]
WITH_SIGNALS = [DDP, DEEPSPEED, IMAGENET, LIGHTNING]
MNIST = [DDP, LIGHTNING, DEEPSPEED]

# Each helper, and the scripts that carry a copy of it. mnist_ddp.py's copies are the unit-tested ones; a copy that
# drifts from them is untested code. Renaming or dropping a helper in one script fails here too.
COPIES = {
    "positive_int": ALL, "first_host": [DDP, DEEPSPEED, IMAGENET], "launch_env": [DDP, DEEPSPEED, IMAGENET],
    "print0": ALL, "print_line": ALL, "fail": ALL, "CUDA_DRIVER_FLOOR": ALL, "unusable_gpus": ALL,
    "gpu_index": ALL, "autocast_dtype": ALL, "init_failed": ALL, "rng_state": [DDP, DEEPSPEED, IMAGENET],
    "set_rng_state": [DDP, DEEPSPEED, IMAGENET],
    "all_ranks_ok": ALL, "all_gather": ALL,
    # the signal block
    "STOP_SIGNALS": WITH_SIGNALS, "STOP_CHECK_EVERY": WITH_SIGNALS, "EXIT_RESUMABLE": WITH_SIGNALS,
    "received_signals": WITH_SIGNALS, "on_stop_signal": WITH_SIGNALS, "stop_signal": WITH_SIGNALS,
    "stop_check": WITH_SIGNALS, "NEAR_END": WITH_SIGNALS, "stop_clock": WITH_SIGNALS, "slurm_seconds": WITH_SIGNALS,
    "job_end_time": WITH_SIGNALS, "near_end": WITH_SIGNALS, "ignore_stop_signals": [IMAGENET, LIGHTNING],
    "check_writable": [DDP, DEEPSPEED, IMAGENET], "load_latest_checkpoint": [DDP, IMAGENET], "check_same_run": ALL,
    "tensorboard": [DDP, DEEPSPEED, IMAGENET], "PROFILE_STEPS": ALL, "profiler": ALL,
    "run_name": ALL, "task_checkpoint_dir": ALL,
    # where the time went
    "TIME_PARTS": ALL, "DATA_WAIT_HINT": ALL, "process_start": ALL, "TimeSplit": ALL, "TIMES": ALL,
    "MNIST_FILES": MNIST, "download_mnist": MNIST, "read_idx": MNIST, "Net": MNIST, "param_checksum": ALL,
}


def top_level_definitions(path):
    """{name: source text} of the module's functions, classes and simple assignments, comments inside included."""
    text = path.read_text()
    found = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            found[node.name] = "\n".join(text.splitlines()[start - 1:node.end_lineno])
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = ast.get_source_segment(text, node)
    return found


@pytest.mark.parametrize("name", sorted(COPIES))
def test_copied_helpers_stay_identical(name):
    scripts = COPIES[name]
    copies = {s: top_level_definitions(REPO / s).get(name) for s in scripts}
    missing = [s for s, src in copies.items() if src is None]
    assert not missing, f"{name} is no longer defined in {missing}"
    reference = copies[scripts[0]]
    differ = [s for s, src in copies.items() if src != reference]
    assert not differ, f"{name} in {differ} differs from the copy in {scripts[0]}: keep the copies byte for byte equal"


def test_every_script_uses_its_stop_check_at_both_places():
    for script in WITH_SIGNALS:
        text = (REPO / script).read_text()
        if script == LIGHTNING:  # Lightning's loop calls StopOnSignal.check at the three places
            assert "self.check(trainer, pl_module, 0, 0)" in text
            assert "self.check(trainer, pl_module, trainer.current_epoch + 1, batch_idx + 1)" in text
            assert "self.check(trainer, pl_module, trainer.current_epoch, 0)" in text
            assert text.count("stop_check(pl_module.device, self.args.checkpoint_dir and checkpoint, epoch, step)") == 1
        else:  # before the first step, every STOP_CHECK_EVERY steps, after each epoch
            assert text.count("stop_check(device, None, 0, 0)") == 1, script
            assert text.count("stop_check(device, args.checkpoint_dir and checkpoint, epoch, ") == 2, script
        defs = top_level_definitions(REPO / script)
        rest = text.replace(defs["stop_check"], "").replace(defs["stop_signal"], "")
        assert "stop_signal(device)" not in rest, f"{script}: the loop calls stop_check, never stop_signal itself"


WRAPPERS = sorted(p.name for p in REPO.glob("run-*.sh"))
SAME_LAUNCH = [("run-gpu4.sh", "run-gpu8.sh"), ("run-gpu4-dist.sh", "run-gpu8-dist.sh")]


def wrapper_parts(name):
    """(#SBATCH lines, the body every wrapper shares, the launch part) of a wrapper."""
    lines = (REPO / name).read_text().splitlines()
    body_start = lines.index("set -euo pipefail")
    launch_start = next(i for i, line in enumerate(lines) if line.startswith(("# Launch:", "# Staging:")))
    return [line for line in lines if line.startswith("#SBATCH")], lines[body_start:launch_start], lines[launch_start:]


def test_wrappers_share_their_lines():
    assert len(WRAPPERS) == 6, WRAPPERS
    ref_sbatch, ref_body, _ = wrapper_parts("run-gpu4.sh")
    for name in WRAPPERS:
        sbatch, body, launch = wrapper_parts(name)
        # the same options in the same order, their comments in one column
        options = [line.split("=")[0].split()[1] for line in sbatch]
        assert options == [line.split("=")[0].split()[1] for line in ref_sbatch], name
        assert {line.index(" # ") for line in sbatch} == {ref_sbatch[0].index(" # ")}, name
        assert f"wrapper={name}  #" in body[1], "the wrapper names itself in its usage line"
        assert body[:1] + body[2:] == ref_body[:1] + ref_body[2:], f"{name}: the shared lines differ from run-gpu4.sh's"
        assert any(line.startswith("srun ") for line in launch), f"{name}: the launch line is in the file"
    for a, b in SAME_LAUNCH:
        assert wrapper_parts(a)[2] == wrapper_parts(b)[2], f"{a} and {b} launch the same way"
    srun_launch = wrapper_parts("run-gpu4.sh")[2]
    assert wrapper_parts("run-imagenet.sh")[2][-len(srun_launch):] == srun_launch, "staging, then the srun launch"


def tracked(*patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip("not a git checkout: the tracked files are unknown")
    return out.stdout.split()


def test_lines_are_at_most_120_columns():
    wide = [f"{f}:{n}" for f in tracked("*.py", "*.sh", ".ci/run")
            for n, line in enumerate((REPO / f).read_text().splitlines(), 1) if len(line) > 120]
    assert not wide, wide


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if "No module named ruff" in r.stdout:
        pytest.skip("ruff is not installed in this venv (requirements.txt installs it)")
    assert r.returncode == 0, r.stdout


def test_shellcheck_is_clean():
    if not shutil.which("shellcheck"):
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck missing on CI: ./dev.sh test installs it with apt")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; ./dev.sh test does as root)")
    r = subprocess.run(["shellcheck", *tracked("*.sh", ".ci/run")], cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0, r.stdout
