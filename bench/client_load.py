"""Client memory and load: a 3-of-12 block sub-model against the full ViT-B/16.

Each measurement runs in a fresh process so that peak resident memory is its own.
Prints bytes read, peak RSS increase over the idle (imports done) process, and time,
with ratios to the full assembly and to plain ``timm.create_model`` + ``load_state_dict``.

    python bench/client_load.py [--blocks 3] [--cache DIR]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import ROOT, machine, reset_peak_rss, rss_kib, table, timed, vit_b_cache

VARIANTS = ("assemble-k", "assemble-full", "timm-full")


def measure(variant: str, cache: Path, blocks: int) -> dict[str, float]:
    """Run one variant in this process: bytes read, peak RSS increase (one forward pass), and time."""
    import torch
    from safetensors.torch import load_file

    from fedra_core.backbone import WEIGHTS_FILE, assemble, import_timm, read_meta

    timm = import_timm()
    meta = read_meta(cache)
    torch.set_num_threads(1)
    layers = list(range(0, meta.num_layers, meta.num_layers // blocks))[:blocks]

    def run() -> tuple[torch.nn.Module, int]:
        if variant == "timm-full":
            model = timm.create_model(meta.timm_name, num_classes=10, **meta.kwargs)
            weights = load_file(str(cache / WEIGHTS_FILE))
            model.load_state_dict(weights, strict=False)
            return model, sum(t.numel() * t.element_size() for t in weights.values())
        model, stats = assemble(cache, layers if variant == "assemble-k" else None, num_classes=10)
        return model, stats.bytes_read

    idle = rss_kib()
    reset_peak_rss()
    model, bytes_read = run()
    with torch.no_grad():  # touch every weight: memory-mapped tensors count once used
        model(torch.zeros(1, 3, meta.image_size, meta.image_size))
    peak = rss_kib("VmHWM")
    del model
    seconds = timed(run, repeat=3)
    image = torch.zeros(1, 3, meta.image_size, meta.image_size)

    def run_and_forward() -> None:
        with torch.no_grad():
            run()[0](image)

    with_forward = timed(run_and_forward, repeat=3)
    return {"bytes_read": bytes_read, "peak_increase_mib": (peak - idle) / 1024, "seconds": seconds,
            "with_forward": with_forward}


def main() -> None:
    """Measure the three variants in subprocesses and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cache = vit_b_cache(args.cache)
    if args.variant:
        print(json.dumps(measure(args.variant, cache, args.blocks)))
        return
    results = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--blocks", str(args.blocks),
                              *(["--cache", str(args.cache)] if args.cache else [])],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    k, full, plain = results["assemble-k"], results["assemble-full"], results["timm-full"]
    rows = [[name, f"{r['bytes_read'] / 2**20:.1f}", f"{r['peak_increase_mib']:.1f}", f"{r['seconds']:.3f}",
             f"{r['with_forward']:.3f}"] for name, r in results.items()]
    print(f"ViT-B/16 cache at {cache}; {machine()}")
    print(table(["variant", "MiB read", "peak RSS increase (MiB)", "seconds", "seconds incl. first forward"], rows))
    print()
    print(table(["ratio", "value", "target"], [
        [f"bytes read, {args.blocks}/12 vs full assembly", f"{k['bytes_read'] / full['bytes_read']:.3f}", "<= 0.30"],
        [f"peak RSS increase, {args.blocks}/12 vs full assembly",
         f"{k['peak_increase_mib'] / full['peak_increase_mib']:.3f}", "<= 0.40"],
        [f"time, {args.blocks}/12 assembly vs timm.create_model + load_state_dict",
         f"{k['seconds'] / plain['seconds']:.3f}", "<= 0.33"],
        [f"time incl. first forward, {args.blocks}/12 vs timm path", f"{k['with_forward'] / plain['with_forward']:.3f}",
         "(weights are memory-mapped: the first use pays the reads)"],
    ]))


if __name__ == "__main__":
    main()
