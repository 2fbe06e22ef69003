"""Check the interconnect before a long run: an all-reduce over every rank of the job, at message sizes from 1 KB to
1 GB, first within each node and then across all of them. For each size it gives the bus bandwidth, computed as
nccl-tests does (algbw x 2(n-1)/n), and the slowest rank. On GPU it also names the transport NCCL chose on each rank.

    sbatch run-gpu8-dist.sh check_interconnect.py      # the nodes, GPUs and launch your training job gets
    srun python check_interconnect.py                  # inside a Slurm job, one task per GPU
    torchrun --standalone --nproc_per_node=2 check_interconnect.py --device=cpu --max-bytes=16M   # gloo smoke test

Output:
- a line per message size;
- one summary line with the peak bus bandwidth, across nodes and within one;
- a WARNING when the figure across nodes is below --warn-below of the figure within a node, or when NCCL sent over
  sockets on a node that has an InfiniBand device;
- a final JSON line: {"event": "done", ..., "rows": [{"bytes": ..., "busbw": GB/s, "slowest_rank": ...}, ...]}.

How to read it, and the figures to expect on NVLink, InfiniBand, RoCE, Slingshot and EFA: docs/network.md.
Copy it with the cluster/ folder, which it calls to launch.
"""
import argparse
import glob
import json
import os
import re
import socket
import tempfile
import time

try:
    import cluster  # the launch code the training scripts use
except ModuleNotFoundError as e:  # first: copied without it, the script stops at once
    raise SystemExit(f"ERROR: {__file__} needs the cluster/ folder beside it: copy it from the same repository") \
        if e.name == "cluster" else e from None

import torch
import torch.distributed as dist

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def size(text):
    """'1K', '64M', '1G', '4096': bytes (binary units)."""
    m = re.fullmatch(r"(\d+)([KMG]?)B?", text.strip().upper())
    if not m or int(m[1]) == 0:
        raise argparse.ArgumentTypeError(f"a size such as 4096, 1K, 64M or 1G, got {text}")
    return int(m[1]) * UNITS[m[2]]


def words(nbytes):
    unit = max((u for u in UNITS if nbytes >= UNITS[u] and nbytes % UNITS[u] == 0), key=UNITS.get)
    return f"{nbytes // UNITS[unit]} {unit}B"


def get_args(argv=None):
    p = argparse.ArgumentParser(description="All-reduce bus bandwidth within each node and across nodes")
    p.add_argument("--min-bytes", type=size, default=1 << 10, help="smallest message (default: 1K)")
    p.add_argument("--max-bytes", type=size, default=None,
                   help="largest message (default: 1G on GPU, 64M on CPU, where gloo is slow)")
    p.add_argument("--factor", type=cluster.positive_int, default=2,
                   help="each size is this times the one before (default: 2)")
    p.add_argument("--iters", type=cluster.positive_int, default=20, help="timed all-reduces per size (default: 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed all-reduces first, per size (default: 5)")
    p.add_argument("--warn-below", type=float, default=0.15,
                   help="WARNING when the peak across nodes is below this fraction of the peak within a node "
                        "(default: 0.15: well below any healthy InfiniBand, RoCE, Slingshot or EFA, above sockets)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: a GPU if there is one")
    p.add_argument("--dist-timeout", type=cluster.positive_int, default=600,
                   help="seconds the ranks wait for each other (default: 600)")
    p.add_argument("--output-dir", default="./out", help="NCCL's flight recorder writes here on a timeout")
    return p.parse_args(argv)


# --- what NCCL chose ---------------------------------------------------------
def nccl_log(env=os.environ):
    """Before NCCL starts: its INFO lines go to a file of this process's own, read by transports(); else None."""
    if env.get("NCCL_DEBUG_FILE"):  # the user's: theirs to read
        return None
    path = os.path.join(tempfile.gettempdir(), f"check_interconnect-nccl-{os.getpid()}.log")
    env.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET", NCCL_DEBUG_FILE=path)
    return path


def transports(text):
    """The transports in NCCL's INFO lines ('Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM'): P2P (NVLink or PCIe), SHM,
    NET/IB (RoCE when its device says so), NET/Socket, NET/<plugin> (Slingshot's and EFA's libfabric), sorted."""
    found = {m[1] for m in re.finditer(r" via (P2P|SHM|NET/[A-Za-z][\w ]*?|COLL\w*)(?=/|\s*$)", text, re.M)}
    found |= {f"NET/{m[1].strip()}" for m in re.finditer(r"Using network (\w[\w ]*)", text)}
    if "NET/IB" in found and re.search(r"NET/IB : Using \[\d+\]\S+/RoCE", text):
        found = found - {"NET/IB"} | {"NET/IB (RoCE)"}
    return sorted(found)


def has_infiniband():
    """An InfiniBand or RoCE device on this node (what NCCL's NET/IB would use)."""
    return bool(glob.glob("/sys/class/infiniband/*"))


# --- the measurement ---------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_all_reduce(x, group, args, device):
    """This rank's mean time per all-reduce of x over `group`, the ranks started together."""
    for _ in range(args.warmup):
        dist.all_reduce(x, group=group)
    dist.all_reduce(torch.zeros(1, device=device))  # every rank of the job here: the timed loops start together
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        dist.all_reduce(x, group=group)
    sync(device)
    return (time.perf_counter() - t0) / args.iters


def bus_bandwidth(nbytes, seconds, n):
    """nccl-tests' bus bandwidth of an all-reduce over n ranks, in GB/s: what each link carried."""
    return nbytes / seconds / 1e9 * 2 * (n - 1) / n


def figure(value):
    """A bandwidth for the JSON record, to 4 significant digits (a slow link's small figure does not round to 0)."""
    return float(f"{value:.4g}")


def check(args, device):
    rank, world = cluster.RANK, cluster.WORLD_SIZE
    hosts = cluster.all_gather(socket.gethostname())
    nodes = list(dict.fromkeys(hosts))
    per_node = [hosts.count(h) for h in nodes]
    groups = [dist.new_group([r for r, h in enumerate(hosts) if h == node]) for node in nodes]  # every rank, in order
    mine, in_node = groups[nodes.index(hosts[rank])], min(per_node)
    phases = ([("node", mine, in_node)] if in_node > 1 else []) + ([("all", None, world)] if len(nodes) > 1 else [])
    max_bytes = args.max_bytes or (1 << 30 if device.type == "cuda" else 64 << 20)
    sizes = []
    while (nbytes := args.min_bytes * args.factor ** len(sizes)) <= max_bytes:
        sizes.append(nbytes)
    cluster.print0(f"all-reduce, float32, {len(nodes)} node(s) x {'/'.join(map(str, sorted(set(per_node))))} "
                   f"rank(s), {world} in all, on {device.type} ({'nccl' if device.type == 'cuda' else 'gloo'}); "
                   f"{words(sizes[0])} to {words(sizes[-1])}, {args.iters} timed of each after {args.warmup}")
    if not phases:
        cluster.fail("one rank: nothing to measure. HINT: run it with 2 or more ranks (a GPU each on GPU nodes)")
    cluster.print0(f"{'bytes':>10} {'phase':>6} {'time us':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}  slowest rank")
    rows = []
    for nbytes in sizes:
        x = torch.zeros(nbytes // 4, device=device)
        row = {"bytes": nbytes}
        for phase, group, n in phases:
            times = cluster.all_gather(seconds_per_all_reduce(x, group, args, device))
            slowest = max(range(world), key=times.__getitem__)
            if phase == "node":  # each node's group ran at once: the slowest node's figure
                row.update(node_busbw=figure(bus_bandwidth(nbytes, times[slowest], n)), node_slowest_rank=slowest)
            else:
                row.update(busbw=figure(bus_bandwidth(nbytes, times[slowest], n)), slowest_rank=slowest,
                           time_us=round(times[slowest] * 1e6, 1), algbw=figure(nbytes / times[slowest] / 1e9))
            cluster.print0(f"{words(nbytes):>10} {phase:>6} {times[slowest] * 1e6:>10.1f} "
                           f"{nbytes / times[slowest] / 1e9:>11.3f} {bus_bandwidth(nbytes, times[slowest], n):>11.3f}"
                           f"  {slowest} ({hosts[slowest]})")
        if len(nodes) == 1:  # one node: its figures are the job's
            row.update(busbw=row["node_busbw"], slowest_rank=row["node_slowest_rank"])
        rows.append(row)
        del x
    return report(args, device, rows, hosts, nodes, per_node)


def report(args, device, rows, hosts, nodes, per_node):
    """The summary line, the warnings and the JSON line."""
    text = ""
    if LOG and os.path.exists(LOG):
        with open(LOG) as f:
            text = f.read()
        os.remove(LOG)
    used = cluster.all_gather(transports(text))
    ib = cluster.all_gather(has_infiniband())
    peak = max(rows, key=lambda r: r["busbw"])
    node_peak = max((r for r in rows if "node_busbw" in r), key=lambda r: r["node_busbw"], default=None)
    where = f"across {len(nodes)} nodes" if len(nodes) > 1 else "within the node"
    line = f"peak bus bandwidth {where}: {peak['busbw']:.2f} GB/s at {words(peak['bytes'])}"
    if node_peak and len(nodes) > 1:
        line += f"; within a node: {node_peak['node_busbw']:.2f} GB/s at {words(node_peak['bytes'])}"
    cluster.print0(line)
    if node_peak and len(nodes) > 1 and peak["busbw"] < args.warn_below * node_peak["node_busbw"]:
        share = peak["busbw"] / node_peak["node_busbw"]
        cluster.print0(f"WARNING: across nodes the all-reduce reaches {peak['busbw']:.2f} GB/s, {share:.0%} of the "
                       f"{node_peak['node_busbw']:.2f} GB/s within a node (--warn-below {args.warn_below:g}): the "
                       "network between the nodes limits every step. "
                       "HINT: NCCL may have picked the wrong interface or fallen back to sockets; see docs/network.md")
    for rank, (names, has_ib) in enumerate(zip(used, ib, strict=True)):
        if "NET/Socket" in names and has_ib:
            cluster.print0(f"WARNING: rank {rank} on {hosts[rank]} sent over sockets (NET/Socket), though the node has "
                           "an InfiniBand device. HINT: NCCL_IB_HCA, NCCL_SOCKET_IFNAME and NCCL's IB plugin; see "
                           "docs/network.md")
    if any(used):
        for names in dict.fromkeys(map(tuple, used)):
            ranks = [r for r, u in enumerate(used) if tuple(u) == names]
            cluster.print0(f"NCCL transport on rank(s) {','.join(map(str, ranks))}: {', '.join(names) or '?'}")
    done = {"event": "done", "world_size": cluster.WORLD_SIZE, "nodes": len(nodes), "ranks_per_node": per_node,
            "device": device.type, "peak_busbw": peak["busbw"],
            "peak_busbw_node": node_peak and node_peak["node_busbw"], "transports": used, "rows": rows}
    cluster.print0(json.dumps(done))
    return done


LOG = None  # NCCL's INFO lines of this process, on GPU


def main(args):
    global LOG
    if args.device != "cpu" and torch.cuda.is_available():
        LOG = nccl_log()
    with cluster.process_group(args, group="always") as device:
        check(args, device)


if __name__ == "__main__":
    main(get_args())
