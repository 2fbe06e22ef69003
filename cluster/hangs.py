"""A hang leaves evidence: every thread's Python stack, with this rank and host, printed
- when this rank's collective times out, with one ERROR line naming it; the rank then tells the others through the
  store the ranks met at, and each other rank that has made no progress for STALL_MARGIN s prints its stacks too: the
  rank the others waited for is among them;
- when a SIGTERM (scancel, a launcher ending the job) finds this rank, once training has begun, without progress for
  STALL_MARGIN s more than the longest it has ever gone between two step checks;
- on DUMP_SIGNAL (scancel --signal=URG JOBID), training going on.
Progress is what every script must call anyway (stop_check), and TIMES's laps where a script has them: a long
evaluation or a first torch.compile on every rank at once is no hang, and prints nothing. A watcher thread does the
printing: the signals reach it through a pipe (signal.set_wakeup_fd), so it hears them while the main thread waits
inside a collective or is stuck elsewhere."""
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from . import launch

DUMP_SIGNAL = signal.SIGURG  # scancel --signal=URG JOBID: bash, srun, torchrun and the DataLoader workers ignore it
STALL_MARGIN = 10
POLL = 1.0  # seconds between the watcher's looks at the signals it was sent
NEWS_EVERY = 5.0  # seconds between its looks in the store for news of a timed-out collective (a request to rank 0's)
PACKAGE = os.path.dirname(os.path.abspath(__file__))
# armed: training has begun; last: this rank's last progress, gap: the longest between two (perf_counter seconds);
# dumped: the progress whose stall has been reported; store: the watcher's own connection to the ranks' store
WATCH = {"armed": False, "stopping": False, "timed_out": False, "last": 0.0, "gap": 0.0, "dumped": None, "store": None}


def progress(armed=False):
    """This rank moved on (a step check; a lap of the time split): it is not stuck. armed: training has begun."""
    now = time.perf_counter()
    if WATCH["armed"]:
        WATCH["gap"] = max(WATCH["gap"], now - WATCH["last"])
    WATCH["last"], WATCH["armed"] = now, WATCH["armed"] or armed


def watch():
    """Start the watcher thread; returns the function that stops it."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set signal handlers
        return lambda: None
    read, write = os.pipe()
    os.set_blocking(write, False)
    WATCH.update(armed=False, stopping=False, timed_out=False, last=time.perf_counter(), gap=0.0, dumped=None,
                 store=None)
    previous = signal.signal(DUMP_SIGNAL, lambda *_: None), signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    thread = threading.Thread(target=_watcher, args=(read,), name="cluster-watch", daemon=True)
    thread.start()

    def unwatch():
        signal.signal(DUMP_SIGNAL, previous[0])
        signal.set_wakeup_fd(previous[1])
        os.write(write, b"\0")  # 0 is no signal: the watcher's cue to end
        thread.join()
        os.close(read), os.close(write)
        WATCH["store"] = None  # its connection closes with the process group
    return unwatch


def _watcher(read):
    term, news, asked = None, None, 0.0  # when a SIGTERM came; which rank's collective timed out; when we last asked
    while True:
        data = os.read(read, 512) if select.select([read], [], [], POLL)[0] else b""
        if 0 in data:
            return
        if DUMP_SIGNAL in data:
            _print_stacks(f"stacks on {DUMP_SIGNAL.name}, as asked; training goes on")
        term = time.perf_counter() if signal.SIGTERM in data else term
        if news is None and WATCH["armed"] and not WATCH["timed_out"] and time.monotonic() - asked >= NEWS_EVERY:
            news, asked = _news(), time.monotonic()
        stalled = time.perf_counter() - WATCH["last"]
        if WATCH["dumped"] == WATCH["last"] or WATCH["stopping"] or WATCH["timed_out"]:
            continue
        if news and stalled > STALL_MARGIN:
            why = f"{news} timed out, and this rank has made no progress for {stalled:.0f} s"
        elif term is not None and WATCH["armed"] and stalled > STALL_MARGIN + WATCH["gap"]:
            why = f"SIGTERM came while this rank had made no progress for {stalled:.0f} s"
        else:
            continue
        WATCH["dumped"] = WATCH["last"]
        _print_stacks(f"WARNING: {why}: it may be the rank the others wait for")


def _store():
    """This process's own connection to the store the ranks met at (MASTER_ADDR:MASTER_PORT); None until the process
    group exists, False where it cannot be had."""
    if WATCH["store"] is None and launch.WORLD_SIZE > 1 and dist.is_initialized():
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        try:
            WATCH["store"] = dist.PrefixStore("cluster-hang/", dist.TCPStore(
                addr, int(port), is_master=False, timeout=timedelta(seconds=5), wait_for_workers=False))
        except Exception:  # no address (a launcher that says nothing), or the store is gone: never mind
            WATCH["store"] = False
    return WATCH["store"]


def _news():
    """Which rank's collective timed out, told through the store (and acknowledged), else None."""
    store = _store()
    try:
        if store and store.check(["timed-out"]):
            store.add("seen", 1)
            return store.get("timed-out").decode()
    except Exception:  # the store's rank has gone: no more news
        WATCH["store"] = False
    return None


def _tell_the_others(what):
    """Put `what` timed out in the store, and wait a few seconds for the other ranks to read it: rank 0 holds the
    store (unless torchrun's agent does), and it is gone once rank 0 has exited."""
    store = _store()
    try:
        if store:
            store.set("timed-out", what)
            deadline = time.monotonic() + 2 * NEWS_EVERY + 2
            while store.add("seen", 0) < launch.WORLD_SIZE - 1 and time.monotonic() < deadline:
                time.sleep(0.1)
    except Exception:
        pass


def _print_stacks(why, error=None):
    """Every thread's Python stack (the main thread's: where `error` was raised), with rank and host, a line a write."""
    names, me = {t.ident: t.name for t in threading.enumerate()}, threading.get_ident()
    lines = [f"{why}. Rank {launch.RANK} on {socket.gethostname()} (pid {os.getpid()}), every thread's Python stack, "
             "most recent call last:"]
    for ident, frame in sys._current_frames().items():
        if (ident != me or error) and names.get(ident) != "cluster-watch":
            main = error and ident == threading.main_thread().ident
            lines.append(f"Thread {names.get(ident, ident)}{' (where the error was raised)' * bool(main)}:")
            lines += "".join(traceback.format_tb(error.__traceback__) if main else traceback.format_stack(frame)
                             ).rstrip("\n").split("\n")
    for line in lines:  # whole lines, each with its rank: ranks that share a pipe interleave only between lines
        sys.stderr.write(f"[rank {launch.RANK}] {line}\n")
    sys.stderr.flush()


def _where(frame):
    folder, name = os.path.split(os.path.abspath(frame.filename))
    return f"{'cluster/' * (folder == PACKAGE)}{name} line {frame.lineno}, in {frame.name}"


def timed_out(error, timeout):
    """If a collective timed out here (not a store's wait, a DataLoader's): one ERROR line naming it, where it was
    called and the timeout, then the stacks, and the news to the other ranks; True. Else False."""
    frames, torch_dir = traceback.extract_tb(error.__traceback__), os.path.dirname(torch.__file__)
    c10d = [f.name for f in frames if f.filename.endswith("distributed_c10d.py")]
    backward = any(f.name == "backward" for f in frames)
    if not c10d and not backward:
        return False
    what = c10d[-1] if c10d else "the gradients' all-reduce (or FSDP2's reduce-scatter) in backward()"
    ours = [f for f in frames if not f.filename.startswith(torch_dir)]  # the script's frames, and this package's
    script = [f for f in ours if os.path.dirname(os.path.abspath(f.filename)) != PACKAGE]
    where = ", from ".join(dict.fromkeys(_where(f) for f in ours[-1:] + script[-1:])) or "?"
    WATCH["timed_out"] = True  # this rank's stall is reported here
    message = (f"rank {launch.RANK} on {socket.gethostname()}: {what} ({where}) timed out after {timeout} s "
               f"(--dist-timeout): a rank never joined it. A rank that is stuck prints its own stack in this log "
               f"(\"WARNING: ... made no progress\"); on NCCL, --output-dir's flight_recorder/ has every rank's last "
               f"collectives. HINT: if a rank is only slow (rank 0 alone saving or evaluating), raise --dist-timeout")
    launch.print_line(f"ERROR: {message}", sys.stderr)
    _print_stacks("the stacks at the timeout", error)
    launch.error_file(f"ERROR: {message}")
    _tell_the_others(f"rank {launch.RANK}'s {c10d[-1] if c10d else 'gradient all-reduce in backward()'}")
    return True


def flight_recorder(output_dir, env=os.environ):
    """NCCL: torch's flight recorder keeps each rank's last collectives and, on a timeout, writes them to
    OUTPUT_DIR/flight_recorder/rank_N; read them with: torchfrtrace OUTPUT_DIR/flight_recorder --prefix rank_"""
    folder = os.path.join(os.path.abspath(output_dir), "flight_recorder")
    os.makedirs(folder, exist_ok=True)
    for names, value in [(("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"), "2000"),
                         (("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"), f"{folder}/rank_"),
                         (("TORCH_NCCL_DUMP_ON_TIMEOUT",), "1")]:
        if not any(env.get(name) for name in names):  # the user's own setting wins, under either name
            env.update(dict.fromkeys(names, value))  # both names: torch 2.5 reads the old, later ones the new
