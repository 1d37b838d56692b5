"""The CUDA path on a ViT-B/16-sized backbone (random weights): training throughput and assembly.

1. Training: the project's local round (``run_local_round``, the code the ClientApp and the
   node's worker run) against a bare timm + peft loop written here with the same sub-model
   (same blocks, same weights, LoRA on the same modules, trainable head), the same AdamW,
   clipping, bf16 autocast and a DataLoader of the same batches (the project's round gathers
   them on the GPU: same batches, same order); the bare loop with every batch already on the
   GPU (what data loading costs it); and the project's round with ``training.loader_workers``
   (batches collated by worker processes instead).
   For k = 3, 6 and 12 blocks: images/s, the ratio project / bare, and the achieved TFLOP/s
   (FLOPs of one training step counted by ``torch.utils.flop_counter``) against the GPU's
   measured bf16 matrix rate (an 8192^3 product) and its datasheet peak.
2. On JPEG files (``--files N``): the project's round with the batches decoded in the
   training process against ``training.loader_workers`` processes.
3. Assembly onto the GPU: time and device memory of ``assemble`` for k = 3 and k = 12 against
   ``timm.create_model`` + ``load_state_dict`` + ``.cuda()``.

    python bench/gpu.py [--batch 128] [--steps 40] [--repeat 3] [--files 768] [--profile 12] [--json FILE]

On a machine without CUDA it runs the same code on the CPU with ``--device cpu`` (tiny
settings only make sense there: ``--batch 4 --steps 2 --blocks 3``), to check the script.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from common import VIT_B, machine, table, vit_b_cache

NUM_CLASSES = 345  # DomainNet's
LORA = {"rank": 8, "alpha": 8, "dropout": 0.1, "target_modules": ["attn.proj", "mlp.fc2"]}
# dense bf16 tensor-core peak, from the datasheets (SXM parts)
DATASHEET_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def experiment(cache: Path, blocks: int, steps: int, batch: int, precision: str, device: str) -> dict:
    """The default experiment's LoRA and optimizer on the ViT-B/16 cache, ``steps`` of ``batch``."""
    return {"backbone": {"cache": str(cache), "lora": LORA},
            "clients": {"capacities": [blocks]},
            "data": {"num_classes": NUM_CLASSES},
            "training": {"local_steps": steps, "batch_size": batch, "optimizer": "adamw", "lr": 1e-3,
                         "weight_decay": 1e-5, "grad_clip": 10.0, "precision": precision, "device": device}}


def spread(blocks: int, depth: int) -> list[int]:
    """``blocks`` global indices spread over the depth, as FedRA's allocation gives them."""
    return sorted({round(i * (depth - 1) / max(blocks - 1, 1)) for i in range(blocks)})


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_tflops(device: str, size: int = 8192, repeat: int = 10) -> float:
    """Measured bf16 matrix-product rate on random data (mean of ``repeat`` after 3 warm-ups)."""
    import torch

    if not device.startswith("cuda"):
        return float("nan")
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync(device)
    return 2 * size**3 * repeat / (time.perf_counter() - start) / 1e12


def dataset(batch: int, batches: int, image_size: int):
    """``batches`` distinct batches of random images and labels, in host memory, as a Dataset."""
    import torch
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(0)
    n = batch * batches
    return TensorDataset(torch.randn(n, 3, image_size, image_size, generator=generator),
                         torch.randint(0, NUM_CLASSES, (n,), generator=generator))


def bare_model(cache: Path, layers: list[int], device: str):
    """timm's ViT-B/16 with the cache's weights, cut to ``layers``, LoRA and the head through peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from fedra_core.backbone import WEIGHTS_FILE, import_timm

    model = import_timm().create_model(VIT_B, num_classes=NUM_CLASSES)
    model.load_state_dict(load_file(str(cache / WEIGHTS_FILE)), strict=False)
    model.blocks = torch.nn.Sequential(*[model.blocks[i] for i in layers])
    config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                        target_modules=LORA["target_modules"], modules_to_save=["head"])
    return get_peft_model(model, config).to(device)


def epochs(batches, steps: int):
    """``steps`` batches, iterating ``batches`` afresh at every epoch (a loader loads them again)."""
    done = 0
    while True:
        for batch in batches:
            yield batch
            done += 1
            if done == steps:
                return


def bare_round(model, batches, steps: int, device: str, precision: str) -> tuple[float, int]:
    """The textbook loop: seconds for ``steps`` steps over ``batches`` (a loader or device tensors)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-5)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    model.train()
    sync(device)
    start = time.perf_counter()
    seen = 0
    for images, labels in epochs(batches, steps):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=precision != "fp32"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        seen += labels.shape[0]
    sync(device)
    return time.perf_counter() - start, seen


def bare_evaluate(model, loader, device: str, precision: str) -> int:
    """The textbook evaluation loop: correct predictions summed on the device, one sync at the end."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=precision != "fp32"):
                logits = model(images)
            correct += (logits.float().argmax(dim=1) == labels).sum()
    return int(correct)


def evaluation(model, project_model, data, args: argparse.Namespace) -> dict[str, float]:
    """Images/s of the project's ``evaluate`` against the bare loop, same loader (median of ``repeat``)."""
    import torch
    from torch.utils.data import DataLoader

    from fedra_core.training import evaluate

    loader = DataLoader(data, batch_size=args.batch, pin_memory=args.device.startswith("cuda"))
    device = torch.device(args.device)
    runs: dict[str, list[float]] = {"project": [], "bare": []}
    for i in range(args.repeat + 1):
        for name, fn in (("project", lambda: evaluate(project_model, loader, device, args.precision)),
                         ("bare", lambda: bare_evaluate(model, loader, args.device, args.precision))):
            sync(args.device)
            start = time.perf_counter()
            fn()
            sync(args.device)
            if i:
                runs[name].append(len(data) / (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in runs.items()}


def step_flops(model, batch, device: str, precision: str) -> int:
    """FLOPs of one training step (forward and backward) of ``model`` on ``batch``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    images, labels = (t.to(device) for t in batch)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    model.train()
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=precision != "fp32"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def profile(run, name: str, args: argparse.Namespace) -> None:
    """The costliest kernels and operators of ``run()`` (``name``: which loop), printed and saved."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with torch.profiler.profile(activities=activities) as prof:
        run()
    key = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
    text = prof.key_averages().table(sort_by=key, row_limit=25)
    print(f"{name}:\n{text}", flush=True)
    if args.json:
        args.json.with_suffix(f".profile-{name}.txt").write_text(text)


def training(cache: Path, blocks: int, args: argparse.Namespace) -> dict:
    """Images/s of the project's round, the bare loop and the bare loop on device-resident batches."""
    import torch
    from torch.utils.data import DataLoader

    from fedra_core.backbone import read_meta
    from fedra_core.config import NodeSettings, experiment_from_dict
    from fedra_core.evaluation import GlobalModel
    from fedra_core.local import build_submodel, run_local_round
    from fedra_core.methods import method_for

    meta = read_meta(cache)
    layers = spread(blocks, meta.num_layers)
    values = experiment(cache, blocks, args.steps, args.batch, args.precision, args.device)
    exp = experiment_from_dict(values)
    with_workers = experiment_from_dict({**values, "training": {**values["training"], "loader_workers": args.workers}})
    method = method_for(exp)
    sent = method.sendable(GlobalModel(cache, NUM_CLASSES, method).initial_state(), layers)
    node = NodeSettings(0, 1, blocks, None, cache, args.device)
    data = dataset(args.batch, args.distinct, meta.image_size)

    def project(workers: bool = False) -> tuple[float, int, float]:
        result = run_local_round(with_workers if workers else exp, node, layers, sent, data, NUM_CLASSES, 1)
        return result.result.seconds, result.result.num_examples, result.setup_seconds

    model = bare_model(cache, layers, args.device)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(1), pin_memory=args.device.startswith("cuda"))
    resident = [(x.to(args.device), y.to(args.device)) for x, y in DataLoader(data, batch_size=args.batch)]

    runs: dict[str, list[float]] = {"project": [], "workers": [], "bare": [], "resident": []}
    setups = []
    warm = True
    for _ in range(args.repeat + 1):  # the first pass warms up kernels and allocator, not counted
        seconds, seen, setup = project()
        if not warm:
            runs["project"].append(seen / seconds)
            setups.append(setup)
        seconds, seen, setup = project(workers=True)
        if not warm:
            runs["workers"].append(seen / seconds)
        seconds, seen = bare_round(model, loader, args.steps, args.device, args.precision)
        if not warm:
            runs["bare"].append(seen / seconds)
        seconds, seen = bare_round(model, resident, args.steps, args.device, args.precision)
        if not warm:
            runs["resident"].append(seen / seconds)
        warm = False
    flops = step_flops(model, next(iter(loader)), args.device, args.precision) / args.batch  # per image
    project_model = build_submodel(exp, node, layers, NUM_CLASSES, sent)[0]
    evaluated = evaluation(model, project_model, data, args)
    del project_model
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else float("nan")
    if blocks == args.profile:  # 10 steps of each loop on device-resident batches
        profile(lambda: bare_round(model, resident, 10, args.device, args.precision), "bare", args)
        short = experiment_from_dict({**values, "training": {**values["training"], "local_steps": 10}})
        profile(lambda: run_local_round(short, node, layers, sent, data, NUM_CLASSES, 1), "project", args)
    del model, resident
    median = {k: statistics.median(v) for k, v in runs.items()}
    return {"blocks": blocks, "layers": layers, "images_per_s": median, "all": runs,
            "setup_s": statistics.median(setups), "flops_per_image": flops, "eval_images_per_s": evaluated,
            "tflops": {k: v * flops / 1e12 for k, v in median.items()}, "peak_mib": peak}


def image_folder(count: int, side: int = 320) -> tuple[list[Path], list[int]]:
    """``count`` JPEG files (smooth random pictures, ``side`` pixels) in a new folder; their labels."""
    import tempfile

    import numpy as np
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="fedra-gpu-images-"))
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(count):
        coarse = (rng.random((12, 12, 3)) * 255).astype(np.uint8)
        path = folder / f"{i}.jpg"
        Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
        labels.append(i % NUM_CLASSES)
    return paths, labels


def file_training(cache: Path, blocks: int, files: tuple[list[Path], list[int]], args: argparse.Namespace
                  ) -> dict[str, float]:
    """Images/s of the project's round on JPEG files (decode, random resized crop): loader in-process vs workers."""
    from fedra_core.backbone import read_meta
    from fedra_core.config import NodeSettings, experiment_from_dict
    from fedra_core.data.folders import ImageFileDataset
    from fedra_core.evaluation import GlobalModel
    from fedra_core.local import run_local_round
    from fedra_core.methods import method_for

    meta = read_meta(cache)
    layers = spread(blocks, meta.num_layers)
    values = experiment(cache, blocks, args.file_steps, args.batch, args.precision, args.device)
    method = method_for(experiment_from_dict(values))
    sent = method.sendable(GlobalModel(cache, NUM_CLASSES, method).initial_state(), layers)
    node = NodeSettings(0, 1, blocks, None, cache, args.device)
    data = ImageFileDataset(*files, meta.image_size, meta.mean, meta.std, train=True)
    runs: dict[str, list[float]] = {"in-process": [], "workers": []}
    for i in range(args.repeat):
        for name, workers in (("in-process", 0), ("workers", args.workers)):
            exp = experiment_from_dict({**values, "training": {**values["training"], "loader_workers": workers}})
            result = run_local_round(exp, node, layers, sent, data, NUM_CLASSES, 1).result
            if i:  # the first pass warms the file cache and the kernels
                runs[name].append(result.num_examples / result.seconds)
    return {k: statistics.median(v) for k, v in runs.items()}


def assembly(cache: Path, args: argparse.Namespace) -> list[dict]:
    """Seconds and device memory to put a sub-model on the device: ``assemble`` vs timm + load_state_dict."""
    import torch
    from safetensors.torch import load_file

    from fedra_core.backbone import WEIGHTS_FILE, assemble, import_timm, read_meta

    timm = import_timm()
    depth = read_meta(cache).num_layers
    cuda = args.device.startswith("cuda")

    def timm_full() -> torch.nn.Module:
        model = timm.create_model(VIT_B, num_classes=NUM_CLASSES)
        model.load_state_dict(load_file(str(cache / WEIGHTS_FILE)), strict=False)
        return model.to(args.device)

    variants = {"assemble k=3": lambda: assemble(cache, spread(3, depth), NUM_CLASSES, args.device)[0],
                "assemble k=12": lambda: assemble(cache, None, NUM_CLASSES, args.device)[0],
                "timm + load_state_dict + .cuda()": timm_full}
    rows = []
    image = torch.randn(8, 3, 224, 224, device=args.device)
    for name, build in variants.items():
        build()  # warm: file cache, CUDA context, timm's registry
        times, memory, peaks = [], [], []
        for _ in range(args.repeat):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if cuda else 0
            sync(args.device)
            start = time.perf_counter()
            model = build()
            sync(args.device)
            times.append(time.perf_counter() - start)
            if cuda:
                memory.append((torch.cuda.memory_allocated() - before) / 2**20)
                with torch.no_grad():
                    model(image)
                peaks.append((torch.cuda.max_memory_allocated() - before) / 2**20)
            del model
        rows.append({"variant": name, "seconds": statistics.median(times),
                     "resident_mib": statistics.median(memory) if memory else float("nan"),
                     "peak_mib": statistics.median(peaks) if peaks else float("nan")})
    return rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--distinct", type=int, default=4, help="distinct batches in the data set")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--blocks", default="3,6,12")
    parser.add_argument("--workers", type=int, default=6, help="training.loader_workers of the second project run")
    parser.add_argument("--files", type=int, default=0, help="also train on this many JPEG files (0: not)")
    parser.add_argument("--file-steps", type=int, default=20, help="steps of each round on the files")
    parser.add_argument("--profile", type=int, default=0, help="profile the bare loop at this many blocks")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: CUDA is not available here (run it on a GPU machine, or --device cpu)")
    cache = vit_b_cache(args.cache)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    measured = matmul_tflops(args.device)
    datasheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in name), float("nan"))
    print(f"{machine()}; {name}; bf16 matmul measured {measured:.0f} TFLOP/s, datasheet {datasheet:.0f}",
          flush=True)
    results = {"device": name, "matmul_tflops": measured, "datasheet_tflops": datasheet, "training": [],
               "args": {k: str(v) for k, v in vars(args).items()}}
    for blocks in (int(b) for b in args.blocks.split(",")):
        row = training(cache, blocks, args)
        results["training"].append(row)
        print(json.dumps(row), flush=True)
    if args.files:
        files = image_folder(args.files)
        results["files"] = {}
        for blocks in (int(b) for b in args.blocks.split(",")):
            results["files"][blocks] = file_training(cache, blocks, files, args)
            print("files", blocks, json.dumps(results["files"][blocks]), flush=True)
    results["assembly"] = assembly(cache, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))

    print(f"\nTraining, {args.precision} autocast, batch {args.batch}, {args.steps} steps, median of "
          f"{args.repeat} (images/s; TFLOP/s counted by torch.utils.flop_counter)")
    rows = []
    for r in results["training"]:
        ips, tf = r["images_per_s"], r["tflops"]
        rows.append([r["blocks"], f"{ips['project']:.0f}", f"{ips['bare']:.0f}",
                     f"**{ips['project'] / ips['bare']:.3f}**", f"{ips['resident']:.0f}",
                     f"{ips['project'] / ips['resident']:.3f}", f"{ips['workers']:.0f}",
                     f"{tf['project']:.0f}", f"{100 * tf['project'] / measured:.0f}% / "
                     f"{100 * tf['project'] / datasheet:.0f}%", f"{r['setup_s']:.2f}", f"{r['peak_mib']:.0f}"])
    print(table(["k", "project", "bare timm+peft", "project / bare", "bare, batches already on the device",
                 "project / that", f"project, {args.workers} loader workers", "project TFLOP/s",
                 "of measured / datasheet bf16", "setup s", "peak MiB"], rows))
    print("\nEvaluation (images/s, same loader, batch {})".format(args.batch))
    print(table(["k", "project evaluate", "bare loop", "project / bare"],
                [[r["blocks"], f"{r['eval_images_per_s']['project']:.0f}", f"{r['eval_images_per_s']['bare']:.0f}",
                  f"{r['eval_images_per_s']['project'] / r['eval_images_per_s']['bare']:.3f}"]
                 for r in results["training"]]))
    if args.files:
        print(f"\nTraining on {args.files} JPEG files (320 px, decoded, random resized crop to 224 and flip), "
              f"{args.file_steps} steps of {args.batch}, images/s")
        print(table(["k", "loader in the training process", f"{args.workers} loader workers", "workers / in-process"],
                    [[k, f"{r['in-process']:.0f}", f"{r['workers']:.0f}", f"{r['workers'] / r['in-process']:.2f}"]
                     for k, r in results["files"].items()]))
    print("\nAssembly onto the device (median of {}; resident = memory the model holds, peak = after "
          "one forward of 8 images)".format(args.repeat))
    base = results["assembly"][-1]
    print(table(["variant", "seconds", "vs timm", "resident MiB", "peak MiB"],
                [[a["variant"], f"{a['seconds']:.3f}", f"{a['seconds'] / base['seconds']:.2f}",
                  f"{a['resident_mib']:.0f}", f"{a['peak_mib']:.0f}"] for a in results["assembly"]]))


if __name__ == "__main__":
    main()
