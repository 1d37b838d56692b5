"""Shared helpers for the benchmarks: a ViT-B/16-sized backbone cache, memory readings, tables."""

import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VIT_B = "vit_base_patch16_224"


def vit_b_cache(directory: Path | None = None) -> Path:
    """A backbone cache with ViT-B/16's architecture and random weights (none can be downloaded)."""
    import torch

    from fedra_core.backbone import import_timm, read_meta, write_cache

    cache = (directory or Path(tempfile.gettempdir()) / "fedra-bench") / "vit-b16"
    try:
        read_meta(cache)
        return cache
    except Exception:  # noqa: BLE001 - any unreadable cache is rebuilt
        pass
    timm = import_timm()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(VIT_B, pretrained=False)
    write_cache(model, VIT_B, {}, cache)
    return cache


def rss_kib(field: str = "VmRSS") -> int:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    """Median wall time of ``fn`` over ``repeat`` calls, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line describing where the benchmark ran."""
    import platform

    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
