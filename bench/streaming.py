"""Streamed full-depth evaluation against the in-memory full model, on a ViT-B/16-sized cache.

Both evaluate the same global model (LoRA rank 8 on ``attn.proj`` and ``mlp.fc2``, a
100-class head, random adapters) on the same random 224x224 images. Each measurement
runs in a fresh process: peak RSS is the increase of ``VmHWM`` over the process before
any weight is loaded (images and adapters already in memory), time is the whole
evaluation (reading the weights included). Prints the table, the ratios against the
targets, and the largest logit difference between the two.

Both processes run with glibc's mmap threshold fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_``),
so a freed activation of a few MiB goes back to the system instead of staying in the
heap: with glibc's default (a threshold that grows with the largest block freed), the
peak of the streamed run varied by 100 MiB between identical runs. ``--default-malloc``
measures without it.

    python bench/streaming.py [--images 64] [--batch 32 8] [--cache DIR] [--default-malloc]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common import ROOT, machine, reset_peak_rss, rss_kib, table, vit_b_cache

NUM_CLASSES = 100
VARIANTS = ("in-memory", "streamed")
RSS_TARGET, TIME_TARGET = 0.35, 1.5

if TYPE_CHECKING:
    from fedra_core.config import LoraSettings


def lora_settings() -> "LoraSettings":
    from fedra_core.config import LoraSettings

    return LoraSettings(rank=8, alpha=16, dropout=0.0, target_modules=("attn.proj", "mlp.fc2"))


def write_state(cache: Path, path: Path) -> None:
    """A random global state (LoRA A and B, head) of the full model, saved for both variants to read."""
    import torch
    from safetensors.torch import save_file

    from fedra_core.evaluation import GlobalModel

    initial = GlobalModel.with_lora(cache, NUM_CLASSES, lora_settings()).initial_state()
    generator = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in initial.items()}, str(path))


def measure(variant: str, cache: Path, state_file: Path, images: int, batch: int, out: Path) -> dict[str, float]:
    """Evaluate once in this process; peak RSS increase over the weight-free process, and time."""
    import torch
    from safetensors.torch import load_file, save_file

    from fedra_core.evaluation import GlobalModel
    from fedra_core.lora import load_trainable_state
    from fedra_core.streaming import stream_logits

    state = load_file(str(state_file))
    pixels = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(1))  # (N, 3, 224, 224)
    idle = rss_kib()
    reset_peak_rss()
    start = time.perf_counter()
    if variant == "in-memory":
        model = GlobalModel.with_lora(cache, NUM_CLASSES, lora_settings()).model
        load_trainable_state(model, state)
        with torch.no_grad():
            logits = torch.cat([model.eval()(pixels[i:i + batch]) for i in range(0, images, batch)])
    else:
        logits = stream_logits(cache, state, pixels, lora_settings(), NUM_CLASSES, batch_size=batch)
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    save_file({"logits": logits.contiguous()}, str(out))
    return {"peak_increase_mib": (peak - idle) / 1024, "seconds": seconds}


def run_child(variant: str, args: argparse.Namespace, cache: Path, state: Path, batch: int, out: Path) -> dict:
    command = [sys.executable, __file__, "--variant", variant, "--cache-dir", str(cache), "--state", str(state),
               "--images", str(args.images), "--batch", str(batch), "--out", str(out)]
    env = dict(os.environ) if args.default_malloc else {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    """Measure both variants at each batch size in subprocesses and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--cache", type=Path, help="folder for the ViT-B/16 cache (default: the temp folder)")
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's default mmap threshold")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.cache_dir, args.state, args.images, args.batch[0], args.out)))
        return
    from safetensors.torch import load_file

    cache = vit_b_cache(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.safetensors"
        write_state(cache, state)
        results, diffs = {}, {}
        for batch in args.batch:
            for variant in VARIANTS:
                results[variant, batch] = run_child(variant, args, cache, state, batch, Path(tmp) / f"{variant}.st")
            logits = [load_file(str(Path(tmp) / f"{v}.st"))["logits"] for v in VARIANTS]
            diffs[batch] = float((logits[0] - logits[1]).abs().max())
    malloc = "glibc default malloc" if args.default_malloc else "MALLOC_MMAP_THRESHOLD_=1 MiB"
    print(f"ViT-B/16 cache at {cache}; {args.images} images 224x224; {malloc}; {machine()}")
    rows = [[variant, batch, f"{r['peak_increase_mib']:.1f}", f"{r['seconds']:.2f}"]
            for (variant, batch), r in results.items()]
    print(table(["variant", "batch", "peak RSS increase (MiB)", "seconds"], rows))
    print()
    ratios = []
    for batch in args.batch:
        full, streamed = results["in-memory", batch], results["streamed", batch]
        rss = streamed["peak_increase_mib"] / full["peak_increase_mib"]
        seconds = streamed["seconds"] / full["seconds"]
        ratios += [[f"peak RSS increase, streamed / in-memory, batch {batch}", f"{rss:.3f}",
                    f"<= {RSS_TARGET} {'met' if rss <= RSS_TARGET else 'MISSED'}"],
                   [f"time, streamed / in-memory, batch {batch}", f"{seconds:.3f}",
                    f"<= {TIME_TARGET} {'met' if seconds <= TIME_TARGET else 'MISSED'}"],
                   [f"largest |logit difference|, batch {batch}", f"{diffs[batch]:.2e}", "<= 1e-4"]]
    if len(args.batch) > 1:
        small, large = min(args.batch), max(args.batch)
        rss = results["streamed", small]["peak_increase_mib"] / results["in-memory", large]["peak_increase_mib"]
        seconds = results["streamed", small]["seconds"] / results["in-memory", large]["seconds"]
        ratios += [[f"peak RSS increase, streamed batch {small} / in-memory batch {large}", f"{rss:.3f}",
                    f"<= {RSS_TARGET} {'met' if rss <= RSS_TARGET else 'MISSED'}"],
                   [f"time, streamed batch {small} / in-memory batch {large}", f"{seconds:.3f}",
                    f"<= {TIME_TARGET} {'met' if seconds <= TIME_TARGET else 'MISSED'}"]]
    print(table(["ratio", "value", "target"], ratios))


if __name__ == "__main__":
    main()
