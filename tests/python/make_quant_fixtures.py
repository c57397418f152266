#!/usr/bin/env python3
"""FP8 and GPTQ-Int4 versions of the tiny fixture, in exactly the official checkpoints' formats, and
the fp32 checkpoints of the values they mean (the references `q35jit eval --device cpu` is compared with).

Reads tests/fixtures/tiny-qwen35moe (bf16, fused experts) and writes under OUT:
  OUT/tiny-fp8/        Qwen3.5-*-FP8 layout: per-expert experts; every projection (attention q/k/v/o,
                       DeltaNet in_proj_qkv / in_proj_z / out_proj, shared expert, routed experts) as
                       F8_E4M3 with <module>.weight_scale_inv F32 [ceil(N/128), ceil(K/128)];
                       embeddings, lm_head, router, shared-expert gate, conv1d, in_proj_a/b, A_log,
                       dt_bias and norms bf16; quantization_config {quant_method fp8, fmt e4m3,
                       activation_scheme dynamic, weight_block_size [128, 128]}.
  OUT/tiny-gptq/       Qwen3.5-*-GPTQ-Int4 layout: routed experts per expert as GPTQ (4 bits, group 32,
                       symmetric, desc_act false, AutoGPTQ v1 zeros: qzeros stores 7 for the zero
                       point 8), qweight I32 [K/8, N], qzeros I32 [K/G, N/8], scales F16 [K/G, N],
                       g_idx I32 [K]; everything else bf16; a `dynamic` field excluding the rest.
                       (Group 32, not 128: the fixture's expert down_proj has K = 64.)
  OUT/tiny-fp8-ref/, OUT/tiny-gptq-ref/
                       the same model with every weight as the fp32 value its format defines
                       (fp8 * scale_inv, (q - zero) * scale), per-expert layout, no quantization_config.
The quantizers are written here from the formats' definitions (round to nearest, ties to even),
independently of the C++ loader. Only numpy is needed (safetensors files are read and written by hand).

Usage: python3 tests/python/make_quant_fixtures.py --out build/goldens/quant
"""
import argparse
import json
import shutil
import struct
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "tests" / "fixtures" / "tiny-qwen35moe"
GPTQ_GROUP = 32
FP8_BLOCK = 128
DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "U8": np.uint8}


def read_safetensors(path):
    """{name: float32 array} (bf16 widened exactly)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        raw = body[b:e]
        if t["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(raw, dtype=DTYPES[t["dtype"]]).astype(np.float32)
        out[name] = a.reshape(t["shape"])
    return out


def write_safetensors(path, tensors):
    """tensors: list of (name, dtype string, array); arrays already in that dtype (BF16: uint16)."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, dtype, a in tensors:
        blob = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for blob in blobs:
            f.write(blob)


def bf16_bits(a):
    """fp32 values that are exact bf16 (the fixture's) -> their bf16 bits."""
    bits = a.astype(np.float32).view(np.uint32)
    assert np.all(bits & 0xFFFF == 0)
    return (bits >> 16).astype(np.uint16)


# ---- fp8 e4m3fn, from its definition: (-1)^s 2^(e-7) (1 + m/8); e = 0: 2^-6 m/8; 0x7f/0xff NaN ----
def e4m3_table():
    v = np.zeros(256, dtype=np.float64)
    for b in range(256):
        s, e, m = b >> 7, (b >> 3) & 15, b & 7
        mag = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        v[b] = np.nan if (b & 0x7F) == 0x7F else (-mag if s else mag)
    return v


E4M3 = e4m3_table()
POS_CODES = np.arange(0, 0x7F)  # 0 .. 448, increasing


def to_e4m3(x):
    """Round to the nearest e4m3 value (ties to the even code), saturating at 448."""
    mag = np.minimum(np.abs(x.astype(np.float64)), 448.0)
    vals = E4M3[POS_CODES]
    hi = np.clip(np.searchsorted(vals, mag), 0, len(vals) - 1)
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = mag - vals[lo], vals[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (POS_CODES[hi] % 2 == 0))
    code = np.where(pick_hi, POS_CODES[hi], POS_CODES[lo]).astype(np.uint8)
    return np.where(x < 0, code | 0x80, code).astype(np.uint8)


def quantize_fp8(w):
    """[N, K] -> (codes u8 [N, K], scale_inv f32 [ceil(N/B), ceil(K/B)], reference f32 [N, K])."""
    N, K = w.shape
    sn, sk = -(-N // FP8_BLOCK), -(-K // FP8_BLOCK)
    scale = np.zeros((sn, sk), dtype=np.float32)
    codes = np.zeros((N, K), dtype=np.uint8)
    for i in range(sn):
        for j in range(sk):
            blk = w[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK]
            s = np.float32(np.abs(blk).max() / 448.0) if np.abs(blk).max() > 0 else np.float32(1.0)
            scale[i, j] = s
            codes[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK] = to_e4m3(blk / s)
    full = np.repeat(np.repeat(scale, FP8_BLOCK, 0), FP8_BLOCK, 1)[:N, :K]
    ref = E4M3[codes].astype(np.float32) * full  # fp32 product, as the definition says
    return codes, scale, ref


def quantize_gptq(w, group):
    """[N, K] symmetric int4 (zero point 8), v1 storage. Returns the four tensors and the reference."""
    N, K = w.shape
    g = w.reshape(N, K // group, group)
    scale = (np.abs(g).max(axis=2) / 7.0).astype(np.float16)  # [N, K/G]
    scale = np.where(scale == 0, np.float16(1.0), scale)
    s32 = scale.astype(np.float32)
    q = np.clip(np.rint(g / s32[:, :, None]), -8, 7).astype(np.int64) + 8  # unsigned 0..15
    q = q.reshape(N, K)
    ref = ((q - 8).astype(np.float32).reshape(N, K // group, group) * s32[:, :, None]).reshape(N, K)
    qT = q.T  # [K, N]
    qweight = np.zeros((K // 8, N), dtype=np.uint32)
    for j in range(8):
        qweight |= (qT[j::8].astype(np.uint32) << (4 * j))
    zcols = -(-N // 8)
    qzeros = np.zeros((K // group, zcols), dtype=np.uint32)
    for n in range(N):
        qzeros[:, n // 8] |= np.uint32(7) << np.uint32(4 * (n % 8))  # v1: zero point 8 stored as 7
    g_idx = (np.arange(K) // group).astype(np.int32)
    return qweight.view(np.int32), qzeros.view(np.int32), scale.T.copy(), g_idx, ref


def fp8_module(name, shape):
    """The tensors the official FP8 checkpoints store in fp8."""
    if len(shape) != 2 or not name.endswith(".weight") or name == "lm_head.weight":
        return False
    leaf = name[:-len(".weight")].rsplit(".", 1)[-1]
    return leaf.endswith("_proj") and leaf not in ("in_proj_a", "in_proj_b")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    weights = read_safetensors(SRC / "model.safetensors")
    config = json.loads((SRC / "config.json").read_text())

    # Per-expert names for the quantized checkpoints (as the official ones store them).
    per_expert = {}
    for name, a in weights.items():
        if name.startswith("model.visual."):
            continue
        if name.endswith("mlp.experts.gate_up_proj"):
            base, inter = name[:-len("gate_up_proj")], a.shape[1] // 2
            for e in range(a.shape[0]):
                per_expert[f"{base}{e}.gate_proj.weight"] = a[e, :inter]
                per_expert[f"{base}{e}.up_proj.weight"] = a[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            base = name[:-len("down_proj")]
            for e in range(a.shape[0]):
                per_expert[f"{base}{e}.down_proj.weight"] = a[e]
        else:
            per_expert[name] = a

    for kind in ("fp8", "gptq"):
        out, ref_out = args.out / f"tiny-{kind}", args.out / f"tiny-{kind}-ref"
        for d in (out, ref_out):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                shutil.copy(SRC / f, d / f)
        tensors, ref = [], {}
        for name in sorted(per_expert):
            a = per_expert[name]
            module = name[:-len(".weight")]
            if kind == "fp8" and fp8_module(name, a.shape):
                codes, scale, r = quantize_fp8(a)
                tensors += [(name, "F8_E4M3", codes), (module + ".weight_scale_inv", "F32", scale)]
                ref[name] = r
            elif kind == "gptq" and ".mlp.experts." in name:
                qweight, qzeros, scales, g_idx, r = quantize_gptq(a, GPTQ_GROUP)
                tensors += [(module + ".qweight", "I32", qweight), (module + ".qzeros", "I32", qzeros),
                            (module + ".scales", "F16", scales), (module + ".g_idx", "I32", g_idx)]
                ref[name] = r
            else:
                tensors.append((name, "BF16", bf16_bits(a)))
                ref[name] = a
        write_safetensors(out / "model.safetensors", tensors)
        cfg = json.loads(json.dumps(config))
        if kind == "fp8":
            cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
                                          "modules_to_not_convert": ["lm_head", "mlp.gate", "shared_expert_gate",
                                                                     "in_proj_a", "in_proj_b"]}
        else:
            cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GPTQ_GROUP, "sym": True,
                                          "desc_act": False, "checkpoint_format": "gptq",
                                          "dynamic": {"-:.*self_attn.*": {}, "-:.*linear_attn.*": {},
                                                      "-:.*shared_expert.*": {}, "-:.*mtp.*": {}, "-:.*visual.*": {}}}
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        (ref_out / "config.json").write_text(json.dumps(config, indent=2))
        write_safetensors(ref_out / "model.safetensors",
                          [(n, "F32", ref[n].astype(np.float32)) for n in sorted(ref)])
        print(f"[quant fixtures] wrote {out} and {ref_out}")


if __name__ == "__main__":
    main()
