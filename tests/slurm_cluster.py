"""A real two-node Slurm cluster on this machine, for the tests: slurmctld + two slurmd + munge (Debian's packages).

Each node is a network namespace with its own hostname (n1, n2) and address (10.99.0.11, .12) on a bridge
(10.99.0.1) that this module creates; slurmctld runs in the root namespace. The nodes advertise 4 fake GPUs
(character devices, so Slurm sets CUDA_VISIBLE_DEVICES; the scripts fall back to CPU) and more CPUs and memory
than the machine has (SlurmdParameters=config_overrides), so the wrappers' own #SBATCH lines schedule as written.
The filesystem is shared, as on a real cluster.

Needs root, iproute2, and the packages slurmctld slurmd slurm-client munge (./dev.sh test installs them).
stop() undoes exactly what start() did, also after a failed start: daemons by their pid files, namespaces
(which removes the veths), the bridge, and our /etc/hosts lines.
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BRIDGE, BRIDGE_ADDR, PREFIX = "slurmtbr0", "10.99.0.1", 24
NODES = {"n1": "10.99.0.11", "n2": "10.99.0.12"}
GPUS_PER_NODE, CPUS_PER_NODE, MEM_MB_PER_NODE = 4, 64, 256000
HOSTS_MARK = "# slurm-test-cluster"
PACKAGES = ("slurmctld", "slurmd", "sbatch", "munged", "ip", "nsenter", "unshare")


def missing_requirements():
    """Why this machine cannot run the cluster, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, slurmd)"
    missing = [p for p in PACKAGES if not shutil.which(p) and not Path("/usr/sbin", p).exists()]
    if missing:
        return (f"missing {', '.join(missing)}: apt-get install slurmctld slurmd slurm-client munge iproute2 "
                "(./dev.sh test does)")
    return None


def sh(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


class SlurmCluster:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-test-"))
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started_munge = False
        self.netns = []

    # ------------------------------------------------------------------ start
    def start(self):
        try:
            self._munge()
            self._network()
            self._config()
            sh("/usr/sbin/slurmctld", "-f", str(self.conf))
            for name in NODES:
                # its own network and hostname; NOT `ip netns exec`, which remounts /sys and kills slurmd 22.05
                sh("nsenter", f"--net=/run/netns/{self._ns(name)}", "unshare", "--uts", "sh", "-c",
                   f"hostname {name} && exec /usr/sbin/slurmd -f {self.conf}")
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _ns(self, name):
        return f"slurmt-{name}"

    def _munge(self):
        if sh("munge", "-n", check=False).returncode == 0:
            return  # a munged is already running: use it, and leave it running
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            sh("mungekey", "--create", "--keyfile", str(key))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        sh("runuser", "-u", "munge", "--", "/usr/sbin/munged")
        self.started_munge = True
        for _ in range(50):
            if sh("munge", "-n", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("munged did not come up")

    def _network(self):
        self._remove_network()  # leftovers of a killed earlier run
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{BRIDGE_ADDR}/{PREFIX}", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i, (name, addr) in enumerate(NODES.items()):
            ns, host_end = self._ns(name), f"slurmtv{i}"
            sh("ip", "netns", "add", ns)
            self.netns.append(ns)
            sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", host_end, "master", BRIDGE, "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        lines = [f"{addr} {name} {HOSTS_MARK}" for name, addr in NODES.items()]
        with open("/etc/hosts", "a") as f:
            f.write("\n".join(lines) + "\n")

    def _config(self):
        d = self.dir
        for sub in ("state", "log", "gpus", *(f"spool-{n}" for n in NODES)):
            (d / sub).mkdir(exist_ok=True)
        for k in range(GPUS_PER_NODE):
            os.mknod(d / "gpus" / f"nvidia{k}", 0o666 | 0o020000, os.makedev(195, k))  # char devices, like real GPUs
        (d / "gres.conf").write_text(f"Name=gpu File={d}/gpus/nvidia[0-{GPUS_PER_NODE - 1}]\n")
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={n} NodeAddr={a} CPUs={CPUS_PER_NODE} RealMemory={MEM_MB_PER_NODE} "
            f"Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN" for n, a in NODES.items())
        self.conf.write_text(f"""\
ClusterName=testcluster
SlurmctldHost={socket.gethostname()}({BRIDGE_ADDR})
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
MpiDefault=none
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
# a requeued job is eligible again after cred_expire, then waits for the main scheduling loop (60 s by default)
SchedulerParameters=sched_interval=2
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_idle(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = sh("sinfo", "-h", "-N", "-o", "%N %T", check=False, env=self.env)
            states = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
            if set(states) == set(NODES) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not idle after {timeout} s: {r.stdout}\n{self.logs()}")

    # ------------------------------------------------------------------ use
    def job_state(self, job_id):
        r = sh("scontrol", "show", "job", "-o", str(job_id), check=False, env=self.env)
        fields = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)
        return fields.get("JobState"), fields.get("ExitCode")

    def logs(self):
        out = []
        for f in sorted((self.dir / "log").glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(out)

    # ------------------------------------------------------------------ stop
    def stop(self):
        for pidfile in [self.dir / "slurmctld.pid"] + [self.dir / f"slurmd-{n}.pid" for n in NODES]:
            kill_pidfile(pidfile)
        self._remove_network()
        if self.started_munge:
            kill_pidfile(Path("/run/munge/munged.pid"))
        shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_network(self):
        for name in NODES:
            sh("ip", "netns", "delete", self._ns(name), check=False)  # also deletes the veth pair
        sh("ip", "link", "delete", BRIDGE, check=False)
        try:
            text = Path("/etc/hosts").read_text()
            kept = [line for line in text.splitlines() if not line.endswith(HOSTS_MARK)]
            if len(kept) != len(text.splitlines()):
                Path("/etc/hosts").write_text("\n".join(kept) + "\n")
        except OSError:
            pass


def kill_pidfile(pidfile, timeout=10):
    try:
        pid = int(Path(pidfile).read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 15)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
