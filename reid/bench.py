"""`python -m reid.bench`: throughput and cost of every encoder variant on this machine.

For each variant and device it prints clips/s at a few batch sizes (T=4 frames of 256x128),
and GMAC per clip for the optimised inference (only what the descriptor needs), the
straightforward one (every token through the global and part blocks) and the bare timm
backbone, so the price of the part branch is visible. MACs are counted with torch's
FlopCounterMode (attention through the math kernel so its matmuls are counted too).

On the CPU it also times the same optimised graph exported to ONNX (`reid.export`) under each
installed runtime (ONNX Runtime, OpenVINO), with the same thread count as torch, one column
group per runtime; bf16 rows (`--cpu-bf16`) compare torch autocast with OpenVINO bf16, int8
rows (`--cpu-int8`) time the encoder's OpenVINO INT8 model (`reid.export.cached_int8`, calibrated
as `reid.Encoder` does). `--rounds N` times every row of a variant N times, interleaved (A B C
A B C), so a neighbour's load on a shared machine falls on every precision alike.
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .encoder import Encoder
from .export import OnnxRunner, export_onnx
from .model import KeyReID
from .registry import build_model, list_models

DEFAULT_VARIANTS = ("keyreid_vit_tiny", "keyreid_vit_small", "keyreid_vit_base", "vidtrans_vit_base")
EXPORTED_RUNTIMES = ("onnxruntime", "openvino")
SHORT = {"torch": "torch", "onnxruntime": "ort", "openvino": "ov"}


@dataclass(frozen=True)
class Cost:
    optimised: float
    reference: float
    backbone: float

    @property
    def ratio(self) -> float:
        return self.optimised / self.backbone


def _gmac(function) -> float:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        function()
    return counter.get_total_flops() / 2e9


def example_clip(model: KeyReID, batch: int = 1, device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
    config = model.config
    height, width = config.img_size
    frames = torch.randn(batch, config.num_frames, 3, height, width, device=device)
    keypoints = torch.rand(batch, config.num_frames, 17, 3, device=device) * torch.tensor([width, height, 1.0], device=device)
    cameras = torch.zeros(batch, dtype=torch.long, device=device)
    return frames, keypoints, cameras


def cost_per_clip(model: KeyReID) -> Cost:
    """GMAC per clip: optimised model, straightforward model, and the bare backbone at full depth."""
    model = model.eval()
    frames, keypoints, cameras = example_clip(model)
    config = model.config
    options = dict(img_size=config.img_size, num_classes=0, global_pool="")
    if config.depth is not None:
        options["depth"] = config.depth
    backbone = timm.create_model(config.backbone, **options).eval()
    return Cost(
        optimised=_gmac(lambda: model(frames, keypoints, cameras)),
        reference=_gmac(lambda: model(frames, keypoints, cameras, reference=True)),
        backbone=_gmac(lambda: backbone.forward_features(frames.flatten(0, 1))),
    )


def clips_per_second(model: KeyReID, batch: int, device: torch.device, autocast: torch.dtype | None, repeats: int) -> float:
    frames, keypoints, cameras = example_clip(model, batch, device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        model(frames, keypoints, cameras)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(frames, keypoints, cameras)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def runner_clips_per_second(runner: OnnxRunner, model: KeyReID, batch: int, repeats: int) -> float:
    """clips/s of an exported graph on the same inputs `clips_per_second` uses."""
    frames, keypoints, cameras = (t.numpy() for t in example_clip(model, batch))
    runner(frames, keypoints, cameras)  # warm-up (OpenVINO compiles a new batch shape here)
    start = time.perf_counter()
    for _ in range(repeats):
        runner(frames, keypoints, cameras)
    return batch * repeats / (time.perf_counter() - start)


def _torch_timer(model: KeyReID, batch: int, device: torch.device, autocast: torch.dtype | None, repeats: int):
    return lambda: clips_per_second(model.to(device), batch, device, autocast, repeats)


def _runner_timer(runner: OnnxRunner, model: KeyReID, batch: int, repeats: int):
    return lambda: runner_clips_per_second(runner, model, batch, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list_models())
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per batch size")
    parser.add_argument("--cpu-bf16", action="store_true", help="also time bf16 autocast on the CPU")
    parser.add_argument("--cpu-int8", action="store_true", help="also time the OpenVINO INT8 model on the CPU")
    parser.add_argument("--rounds", type=int, default=1, help="times each variant's rows, interleaved")
    parser.add_argument("--runtimes", nargs="*", choices=EXPORTED_RUNTIMES,
                        default=[r for r in EXPORTED_RUNTIMES if importlib.util.find_spec(r) is not None],
                        help="exported-graph runtimes timed on the CPU (default: those installed)")
    parser.add_argument("--threads", type=int, help="torch and runtime threads (default: torch's count)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    runtimes = ["torch", *args.runtimes]
    print(f"# clips/s (clips of 4 frames, 256x128), {threads} thread(s); columns <runtime>@<batch size>")
    header = f"{'variant':<20} {'device':<6} {'prec':<5} {'GMAC opt':>9} {'GMAC ref':>9} {'backbone':>9} {'opt/bb':>7}"
    header += "".join(f" {SHORT[r] + '@' + str(b):>9}" for r in runtimes for b in args.batch_sizes)
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.variants:
            model = build_model(name, seed=0).eval()
            cost = cost_per_clip(model)
            graph = export_onnx(model, Path(scratch) / f"{name}.onnx") if args.runtimes else None
            rows = []  # (device, precision label, [timer or None per column])
            for device_name in args.devices:
                device = torch.device(device_name)
                precisions = {"cpu": [("fp32", None)] + ([("bf16", torch.bfloat16)] if args.cpu_bf16 else [])
                              + ([("int8", None)] if args.cpu_int8 else [])}.get(device.type, [("bf16", torch.bfloat16)])
                for label, dtype in precisions:
                    timers = [None if label == "int8" else _torch_timer(model, b, device, dtype, args.repeats)
                              for b in args.batch_sizes]
                    for runtime in args.runtimes:
                        if device.type != "cpu" or (label != "fp32" and runtime != "openvino"):
                            timers += [None] * len(args.batch_sizes)  # that runtime has no such row
                            continue
                        if label == "int8":  # the encoder's own INT8 model and calibration
                            encoder = Encoder(model=name, device="cpu", runtime=runtime, precision="int8",
                                              threads=threads, export_dir=scratch)
                            if encoder.runner is None:
                                raise RuntimeError(encoder.runtime_reason)
                            runner = encoder.runner
                        else:
                            runner = OnnxRunner(graph, runtime, threads=threads, precision=label)
                        timers += [_runner_timer(runner, model, b, args.repeats) for b in args.batch_sizes]
                    rows.append((device.type, label, timers))
            for _ in range(args.rounds):
                for device_type, label, timers in rows:
                    rates = [None if timer is None else timer() for timer in timers]
                    print(
                        f"{name:<20} {device_type:<6} {label:<5} {cost.optimised:>9.2f} {cost.reference:>9.2f} "
                        f"{cost.backbone:>9.2f} {cost.ratio:>6.2f}x"
                        + "".join(f" {'-' if r is None else f'{r:.1f}':>9}" for r in rates),
                        flush=True,
                    )
            model.cpu()
            if graph is not None:
                graph.unlink()


if __name__ == "__main__":
    main()
