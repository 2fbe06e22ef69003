"""The efficiency line's figures, where they can be checked on the CPU: torch's FLOP counter (cluster.train_flops)
against a hand count, the GPU peak table's lookup. A training's line and its done record: test_mnist_ddp.py."""
import copy
import os
import sys

import pytest
import torch

from conftest import REPO, hand_count_train_flops

sys.path.insert(0, str(REPO))
import cluster  # noqa: E402
import mnist_ddp  # noqa: E402


def test_train_flops_of_the_mnist_cnn_and_resnet18_match_a_hand_count():
    """cluster.train_flops (torch's counter, on a meta-device copy) within 2% of a hand count of the convolutions and
    linear layers: the MNIST CNN (exact: it has nothing else) and ResNet-18 at 224 px (torch's counter leaves out
    batch norms, ReLUs and additions, as MFU's convention does). Counting starts no thread and draws no random
    number: nothing is computed."""
    torchvision = pytest.importorskip("torchvision")
    net = mnist_ddp.Net()
    copy.deepcopy(net)  # torch's CPU thread pool starts at a first copy, in any run: not ours to count
    threads = sorted(os.listdir("/proc/self/task"))
    before = torch.get_rng_state()
    assert cluster.train_flops(net, (1, 28, 28)) == hand_count_train_flops(net, (1, 28, 28)) == 17_519_104
    assert torch.equal(torch.get_rng_state(), before), "counting draws no random number (dropout on meta)"
    assert sorted(os.listdir("/proc/self/task")) == threads, "no thread started"
    resnet = torchvision.models.resnet18(num_classes=1000)
    counted, by_hand = cluster.train_flops(resnet, (3, 224, 224)), hand_count_train_flops(resnet, (3, 224, 224))
    assert abs(counted - by_hand) <= 0.02 * by_hand, (counted, by_hand)
    assert 10.5e9 < counted < 11.5e9, "3 x ResNet-18's 1.82 G multiply-adds forward, in FLOPs"
    assert all(p.device.type == "cpu" for p in resnet.parameters()), "the model itself stays where it was"


def test_the_peak_table_looks_up_the_gpu_by_name_and_precision(monkeypatch):
    """The longer names first (an H100 PCIe is not an H100 SXM, an L40S not an L4); none on the CPU or for a GPU that
    is not in the table, which the line then prints as n/a."""
    from cluster import efficiency
    gpu = torch.device("cuda", 0)
    for name, precision, tflops in [("NVIDIA H100 80GB HBM3", "16-bit", 989), ("NVIDIA H100 PCIe", "tf32", 378),
                                    ("NVIDIA H200", "fp32", 67), ("NVIDIA A100-SXM4-80GB", "16-bit", 312),
                                    ("NVIDIA L40S", "16-bit", 362), ("NVIDIA L4", "16-bit", 121),
                                    ("AMD Instinct MI250X", "16-bit", 191.5)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert efficiency.peak_flops(gpu, precision) == tflops * 1e12, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA GeForce GTX 1080")
    assert efficiency.peak_flops(gpu, "16-bit") is None
    assert efficiency.peak_flops(torch.device("cpu"), "fp32") is None


def test_a_sweep_tasks_own_line_is_in_the_config_record_and_tensorboards_hparams(tmp_path, monkeypatch):
    """Array task 1 of a sweep file: the settings that Outputs writes (the metrics file's config record and
    TensorBoard's hparams, read back with TensorBoard's reader) hold that task's line, and the run is named
    ARRAYJOB_TASK, so two tasks' runs are told apart."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("--lr=0.01 --batch-size=16\n# a comment\n--lr=0.003 --batch-size=128 --amp\n")
    env = {"SWEEP": str(sweep), "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_JOB_ID": "4244"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = mnist_ddp.get_args([f"--output-dir={tmp_path / 'out'}", "--checkpoint-dir=none"])
    assert args.lr == 0.003 and args.batch_size == 128 and args.amp
    outputs = cluster.Outputs(args, torch.device("cpu"), run=cluster.run_record(args, script="mnist_ddp.py"),
                              flops=None)
    outputs.flush()
    [metrics] = (tmp_path / "out").glob("metrics-*.jsonl")
    assert metrics.name == "metrics-4242_1.jsonl"
    config = json.loads(metrics.read_text().splitlines()[0])
    assert config["event"] == "config" and config["run"] == "4242_1", config
    assert (config["options"]["lr"], config["options"]["batch_size"], config["options"]["amp"]) == (0.003, 128, True)
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard" / "4242_1"))
    events.Reload()
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    shown = start.session_start_info.hparams
    assert (shown["lr"].number_value, shown["batch_size"].number_value) == (0.003, 128)
    assert shown["amp"].string_value == "True"
    outputs.tb.close()
    outputs.metrics.close()
