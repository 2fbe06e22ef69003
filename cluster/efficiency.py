"""How well a run used its hardware: the efficiency line at the end of every run (docs/outputs.md).

train_flops() counts one training step's floating-point operations per sample with torch's own counter
(torch.utils.flop_counter), once, on a copy of the model on the meta device: nothing is computed, no random number
is drawn. GpuUse samples the rank's own GPU's utilisation through NVML (nvidia-ml-py), found by its UUID, not its
index. efficiency() puts them together with the throughput, the peak memory and the time split."""
import copy
import resource
import threading

import torch

from . import launch

# Dense peak TFLOP/s per device as torch sees it (an MI250X's two dies are two devices): 16-bit tensor cores (bf16 and
# fp16 alike), TF32 tensor cores, plain float32. The first name found in torch.cuda.get_device_name() counts, so the
# longer names come first. Sources: the vendors' data sheets, listed in docs/outputs.md.
PEAK_TFLOPS = {
    "H100 PCIe": (756, 378, 51), "H100 NVL": (835, 418, 60), "H100": (989, 495, 67), "H200": (989, 495, 67),
    "GH200": (989, 495, 67), "B200": (2250, 1100, 80), "A100": (312, 156, 19.5), "A40": (150, 75, 37.4),
    "A10": (125, 62.5, 31.2), "L40S": (362, 183, 91.6), "L40": (181, 90.5, 90.5), "L4": (121, 60, 30.3),
    "V100": (125, None, 15.7), "MI300X": (1307, 654, 163.4), "MI250X": (191.5, None, 47.9),
    "MI250": (181, None, 45.3),
}
MFU_HINT = 0.10  # a HINT below this MFU, on a GPU, for a model of at least HINT_FLOPS per sample and step
HINT_FLOPS = 1e9  # (ResNet-50 at 224 px: 12 GFLOP; such models reach 30-50% in bf16)


def train_flops(model, sample_shape, batch=2, dtype=torch.float32):
    """FLOPs of one training step (forward and backward) per sample of shape `sample_shape` (and `dtype`: token ids are
    torch.long), counted by torch's FlopCounterMode on a meta-device copy of `model` (call it before DDP, fully_shard
    or torch.compile wrap it). None where the copy cannot run on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        ghost = copy.deepcopy(model).to("meta")
        with FlopCounterMode(display=False) as counter:
            ghost(torch.empty(batch, *sample_shape, device="meta", dtype=dtype)).float().sum().backward()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return counter.get_total_flops() / batch


def peak_flops(device, precision):
    """The device's dense peak FLOP/s for `precision` ("16-bit", "tf32" or "fp32"), or None (CPU, a GPU not in the
    table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for model, peaks in PEAK_TFLOPS.items():
        if model in name:
            peak = peaks[{"16-bit": 0, "tf32": 1, "fp32": 2}[precision]]
            return peak * 1e12 if peak else None
    return None


class GpuUse:
    """Samples this rank's GPU's utilisation (NVML's, in %) every `every` seconds in a thread, from start() to
    stop(), which returns their mean. Silent where there is no GPU or no nvidia-ml-py: stop() then returns None."""

    def __init__(self, device, every=2.0):
        self.samples, self.every, self.handle, self.stopped = [], every, None, threading.Event()
        if device.type != "cuda":
            return
        try:
            import pynvml  # nvidia-ml-py
            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)  # CUDA_VISIBLE_DEVICES renumbers; UUIDs stay
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            self.nvml = pynvml
        except Exception:  # no nvidia-ml-py, no NVML (a ROCm GPU), an old torch without .uuid: no figure
            self.handle = None

    def start(self):
        if self.handle is not None:
            threading.Thread(target=self._sample, name="gpu-use", daemon=True).start()
        return self

    def _sample(self):
        while not self.stopped.wait(self.every):
            try:
                self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            except Exception:
                return

    def stop(self):
        self.stopped.set()
        return sum(self.samples) / len(self.samples) if self.samples else None


def peak_memory(device):
    """This process's peak memory in bytes: the GPU's allocations, or on the CPU the peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def efficiency(device, precision, flops_per_sample, samples_per_s, gpu_use, time_split, per="sample"):
    """The efficiency figures (a dict for the done record) and their line; `samples_per_s` is all ranks' together, of
    samples or (per="token") tokens."""
    per_gpu = samples_per_s / launch.WORLD_SIZE if samples_per_s else None
    peak = peak_flops(device, precision)
    mfu = flops_per_sample * per_gpu / peak if peak and per_gpu and flops_per_sample else None
    ranks = launch.all_gather((peak_memory(device), gpu_use))  # one collective for both
    memory = max(m for m, _ in ranks)  # the rank that needed most
    uses = [u for _, u in ranks if u is not None]
    steps = time_split["data"] + time_split["compute"]
    figures = {f"{per}s_per_s_per_gpu": per_gpu, f"flops_per_{per}": flops_per_sample, "precision": precision,
               "peak_flops": peak, "mfu": mfu, "peak_memory_bytes": memory,
               "gpu_utilization": sum(uses) / len(uses) if uses else None,
               "data_wait": time_split["data"] / steps if steps else None}
    unit = "GPU" if device.type == "cuda" else "process"
    line = " | ".join([
        f"efficiency: {per_gpu:.0f} {per}s/s per {unit}" if per_gpu else "efficiency: no training step timed",
        f"{flops_per_sample / 1e9:.3g} GFLOP per {per}" if flops_per_sample else "FLOPs n/a",
        f"MFU {100 * mfu:.1f}% of {peak / 1e12:g} TFLOP/s ({precision})" if mfu is not None else
        "MFU n/a (CPU)" if unit == "process" else "MFU n/a (FLOPs or throughput unknown)" if peak else
        f"MFU n/a (no {precision} peak known for {torch.cuda.get_device_name(device)})",
        f"peak memory {memory / 2**30:.2f} GiB ({'GPU' if unit == 'GPU' else 'resident'}, the most on any rank)",
        f"GPU use {figures['gpu_utilization']:.0f}%" if uses else "GPU use n/a",
        f"data wait {100 * figures['data_wait']:.0f}%" if steps else "data wait n/a"])
    hints = []
    if mfu is not None and mfu < MFU_HINT and (flops_per_sample >= HINT_FLOPS or per == "token"):
        what = "a transformer" if per == "token" else f"a model of {flops_per_sample / 1e9:.0f} GFLOP per sample"
        hints.append(f"HINT: MFU {100 * mfu:.1f}% is far below the 30-50% {what} reaches: try --amp (bf16), a larger "
                     "--batch-size, --compile, and see the data wait above")
    return figures, line, hints
