"""What block surrogates cost: size against a block, bytes read, wire bytes and client memory.

For the built-in backbone (``digits-vit``, its cache and its ``surrogates.safetensors``,
distilled first when missing) and for ViT-B/16's shapes (sizes only), it prints:

- parameters and fp32 bytes of one surrogate against one block, and their ratio;
- for a client holding k of the 12 blocks: bytes read from disk without and with the
  surrogates of the skipped blocks, the bytes ``redistill`` adds to the task message (the
  surrogates sent, as Flower serializes them) against the task without them, and the
  peak resident memory of one local round (20 steps of batch 32) without and with
  surrogates, each in a fresh process;
- how far a k-block sub-model's features (the head's input) are from the full model's,
  without and with surrogates: mean squared difference over the variance of the full
  model's features, on 256 augmented proxy images the surrogates were not distilled on,
  mean over 4 random sub-models per depth;
- the distillation time recorded in the file (once per cache and recipe).

    python bench/surrogates.py [--depths 3 4 6] [--steps 20] [--batch 32] [--no-rounds]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import ROOT, machine, table

NUM_CLASSES = 10
CACHE = Path("~/.cache/fedra/backbones/digits-vit").expanduser()


def experiment(surrogates: str | None, steps: int, batch: int) -> dict:
    """The extreme benchmark's training settings, with or without surrogates."""
    return {"backbone": {"cache": str(CACHE), "builtin": "digits-vit",
                         "lora": {"rank": 8, "alpha": 8, "dropout": 0.0, "target_modules": ["attn.proj", "mlp.fc2"]}},
            "clients": {"capacities": [4] * 6}, "strategy": {"surrogates": surrogates},
            "training": {"local_steps": steps, "batch_size": batch, "optimizer": "adamw", "lr": 0.003,
                         "num_threads": 1}}


def sizes(dim: int, block_params: int, rank: int) -> list[str]:
    """A table row: surrogate and block parameters and fp32 bytes, and the ratio."""
    from fedra_core.surrogates import Surrogate

    params = sum(p.numel() for p in Surrogate(dim, rank).parameters())
    return [f"{rank}", f"{params:,}", f"{block_params:,}", f"{4 * params:,} / {4 * block_params:,}",
            f"{100 * params / block_params:.2f}%"]


def block_params(timm_name: str, **kwargs: object) -> tuple[int, int]:
    """Width and parameters of one block of a timm ViT, built on the meta device."""
    import torch

    from fedra_core.backbone import import_timm

    with torch.device("meta"):
        model = import_timm().create_model(timm_name, **kwargs)
    return model.embed_dim, sum(p.numel() for p in model.blocks[0].parameters())


def measure(values: dict, layers: list[int]) -> dict:
    """In this process: bytes read, task bytes and the peak RSS of one local round of a client holding ``layers``."""
    import torch
    from flwr.app import ConfigRecord, RecordDict
    from torch.utils.data import TensorDataset

    from common import reset_peak_rss, rss_kib
    from fedra_core.config import NodeSettings, experiment_from_dict
    from fedra_core.evaluation import GlobalModel
    from fedra_core.local import run_local_round
    from fedra_core.methods import method_for
    from fedra_core.surrogates import PREFIX, load_surrogates, to_state
    from server_app.replies import serialized_bytes
    from server_app.strategy import to_record

    exp = experiment_from_dict(values)
    method = method_for(exp)
    state = GlobalModel(CACHE, NUM_CLASSES, method).initial_state()
    sent = {k: torch.randn_like(v) for k, v in method.sendable(state, layers).items()}  # distinct values
    skipped = [i for i in range(12) if i not in layers]
    extras = to_state(load_surrogates(CACHE, skipped, 8)[0]) if exp.strategy.surrogates else {}
    config = ConfigRecord({"server-round": 1, "layers": layers, "experiment": exp.to_json()})
    task = serialized_bytes(RecordDict({"arrays": to_record(sent, "float32"), "config": config}))
    with_extras = serialized_bytes(RecordDict({"arrays": to_record({**sent, **extras}, "float32"), "config": config}))
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(640, 3, 24, 24, generator=generator), torch.arange(640) % NUM_CLASSES)
    node = NodeSettings(0, 1, len(layers), None, CACHE, "cpu")
    torch.set_num_threads(1)
    reset_peak_rss()
    before = rss_kib()
    result = run_local_round(exp, node, layers, sent, data, NUM_CLASSES, 1)
    return {"bytes_read": result.assembly.bytes_read, "task": task, "task_with_surrogates": with_extras,
            "surrogate_keys": len([k for k in result.assembly.keys_read if k.startswith(PREFIX)]),
            "peak_mib": (rss_kib("VmHWM") - before) / 1024, "seconds": result.result.seconds}


def fidelity(k: int, draws: int = 4) -> tuple[float, float]:
    """Relative feature error of random k-block sub-models of the built-in backbone, without and with surrogates."""
    import numpy as np
    import torch

    from fedra_core.backbone import assemble, read_meta
    from fedra_core.config import experiment_from_dict
    from fedra_core.methods import method_for
    from fedra_core.pretrain import augment
    from fedra_core.surrogates import Recipe, proxy_images

    def features(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.forward_head(model.forward_features(images), pre_logits=True)  # (B, C)

    images = augment(proxy_images(Recipe(images=256, seed=7), read_meta(CACHE)).tensors[0],
                     torch.Generator().manual_seed(3))
    method = method_for(experiment_from_dict(experiment("frozen", 1, 1)))
    target = features(assemble(CACHE, None, 0)[0])
    scale = float((target - target.mean(0)).pow(2).mean())
    rng, plain, with_surrogates = np.random.default_rng(0), [], []
    for _ in range(draws):
        layers = sorted(rng.choice(12, size=k, replace=False).tolist())
        plain.append(float((features(assemble(CACHE, layers, 0)[0]) - target).pow(2).mean()) / scale)
        with_surrogates.append(float((features(method.assemble(CACHE, layers, 0)[0]) - target).pow(2).mean()) / scale)
    return float(np.mean(plain)), float(np.mean(with_surrogates))


def run_child(values: dict, layers: list[int]) -> dict:
    """``measure`` in a fresh interpreter, so each peak is that round's alone."""
    code = ("import json, sys; sys.path.insert(0, 'bench'); from surrogates import measure; "
            "print(json.dumps(measure(json.loads(sys.argv[1]), json.loads(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(values), json.dumps(layers)], cwd=ROOT,
                         capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Print the size table, the feature errors, the per-depth cost table and the distillation time."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", nargs="+", type=int, default=[3, 4, 6])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--no-rounds", action="store_true", help="skip the client rounds (bytes and memory)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from fedra_core.pretrain import RECIPES, ensure_builtin_backbone
    from fedra_core.surrogates import Recipe, ensure_surrogates

    ensure_builtin_backbone(CACHE, "digits-vit")
    info = ensure_surrogates(CACHE, Recipe())
    dim, params = block_params(RECIPES["digits-vit"]["timm_name"], **RECIPES["digits-vit"]["kwargs"])
    vit_dim, vit_params = block_params("vit_base_patch16_224")
    print(f"# Block surrogates: cost ({machine()})\n")
    print(table(["backbone", "rank", "surrogate params", "block params", "bytes surrogate / block (fp32)", "ratio"],
                [["digits-vit (64 wide)", *sizes(dim, params, 8)],
                 ["ViT-B/16 (768 wide)", *sizes(vit_dim, vit_params, 8)],
                 ["ViT-B/16 (768 wide)", *sizes(vit_dim, vit_params, 16)]]))
    torch.set_num_threads(1)
    errors = {k: fidelity(k) for k in args.depths}
    print("\n## Features of random k-block sub-models against the full model's (relative squared error)\n")
    print(table(["blocks held", "plain sub-model", "with surrogates", "ratio"],
                [[f"{k} of 12", f"{p:.3f}", f"{w:.3f}", f"{w / p:.2f}x"] for k, (p, w) in errors.items()]))
    rows = []
    for k in [] if args.no_rounds else args.depths:
        layers = list(range(0, 12, 12 // k))[:k] if 12 % k == 0 else list(range(k))
        plain = run_child(experiment(None, args.steps, args.batch), layers)
        frozen = run_child(experiment("frozen", args.steps, args.batch), layers)
        print(f"k={k}: done", file=sys.stderr, flush=True)
        rows.append([f"{k} of 12", f"{plain['bytes_read']:,} / {frozen['bytes_read']:,}",
                     f"{frozen['bytes_read'] / plain['bytes_read']:.3f}x",
                     f"{plain['task']:,} / {frozen['task_with_surrogates']:,}",
                     f"{frozen['task_with_surrogates'] / plain['task']:.2f}x",
                     f"{plain['peak_mib']:.1f} / {frozen['peak_mib']:.1f}",
                     f"{plain['seconds']:.1f} / {frozen['seconds']:.1f}"])
    if rows:
        print(f"\n## A client round on digits-vit ({args.steps} steps of batch {args.batch}), without / with surrogates\n")
        print(table(["blocks held", "bytes read", "ratio", "task bytes (redistill sends the surrogates)", "ratio",
                     "peak MiB", "train s"], rows))
    print(f"\nDistillation of the 12 surrogates ({info['source']}): {info['seconds']} s once per cache, "
          f"relative errors per block {info['relative_errors']} (1 = no better than skipping the block)")


if __name__ == "__main__":
    main()
