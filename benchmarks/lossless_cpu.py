"""Lossless BF16 codecs on CPU: stored bytes of TCA-TBE (ZipServ, arXiv 2603.17435) vs a DFloat11-style
Huffman baseline (arXiv 2504.11651) vs raw BF16, next to the empirical-entropy bounds, and single-core
encode/decode throughput (MB/s of BF16 in). Data: every Linear/Embedding weight of SmolLM2-135M-Instruct
rounded to BF16 (tied embedding once), and Gaussian-initialised BF16 matrices.

    python benchmarks/lossless_cpu.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._md import table, write_section  # noqa: E402
from modelpress.algos import lossless as LL  # noqa: E402


def smollm2_weights() -> dict[str, torch.Tensor]:
    from modelpress.model import load
    model, _ = load("smollm2")
    out, seen = {}, set()
    for n, m in model.named_modules():
        if type(m) in (nn.Linear, nn.Embedding) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out[n] = m.weight.detach().to(torch.bfloat16).contiguous()
    return out


def gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)


def measure(tensors: dict[str, torch.Tensor]) -> dict:
    """Bytes and single-thread seconds of both codecs over a set of tensors (bit-exactness checked)."""
    r = {"raw": 0, "numel": 0, "h16": 0.0, "h8": 0.0, "fb": 0, "meta": 0, "pad": 0}
    for codec in ("tca-tbe", "huffman"):
        r[codec] = {"bytes": 0, "enc_s": 0.0, "dec_s": 0.0, "enc_wall": 0.0, "dec_wall": 0.0}
    for w in tensors.values():
        r["raw"] += w.numel() * 2
        r["numel"] += w.numel()
        r["h16"] += LL.entropy_bits(w, "symbol16") * w.numel() / 8
        r["h8"] += LL.entropy_bits(w, "exp+8") * w.numel() / 8
        for codec in ("tca-tbe", "huffman"):
            c0, t0 = time.process_time(), time.perf_counter()
            enc = LL.encode(w, codec)
            c1, t1 = time.process_time(), time.perf_counter()
            back = LL.decode(enc)
            c2, t2 = time.process_time(), time.perf_counter()
            if not torch.equal(back.view(torch.int16), w.view(torch.int16)):
                raise SystemExit(f"{codec} round trip is not bit-exact")
            r[codec]["bytes"] += enc.nbytes
            if codec == "tca-tbe":
                r["fb"] += enc.fallback.size
                r["meta"] += enc.block_offsets.nbytes + enc.sub_offsets.nbytes + 8
                r["pad"] += enc.padded[0] * enc.padded[1] - w.numel()
            r[codec]["enc_s"] += c1 - c0                 # CPU seconds of this (single-threaded) process
            r[codec]["dec_s"] += c2 - c1
            r[codec]["enc_wall"] += t1 - t0
            r[codec]["dec_wall"] += t2 - t1
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Gaussian matrices only, smaller")
    ap.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sets: dict[str, dict[str, torch.Tensor]] = {}
    if not args.quick:
        sets["SmolLM2-135M (all Linear+Embedding, bf16)"] = smollm2_weights()
    sets["Gaussian 1024x1024 (std 0.02)"] = {"g": gaussian(1024, 1024, 0)}
    if not args.quick:
        sets["Gaussian 4096x4096 (std 0.02)"] = {"g": gaussian(4096, 4096, 1)}
        sets["Gaussian 576x1536 x 8 (std 0.02)"] = {f"g{i}": gaussian(576, 1536, 10 + i) for i in range(8)}
    rows, checks = [], []
    load0 = os.getloadavg()[0]
    for name, ts in sets.items():
        r = measure(ts)
        mb = r["raw"] / 1e6
        t, h = r["tca-tbe"], r["huffman"]
        pt, ph = 100 * t["bytes"] / r["raw"], 100 * h["bytes"] / r["raw"]
        b8, b16 = 100 * r["h8"] / r["raw"], 100 * r["h16"] / r["raw"]
        rows.append([name, f"{r['numel'] / 1e6:.2f}", f"{mb:.1f}", f"{pt:.2f}", f"{ph:.2f}", f"{b8:.2f}", f"{b16:.2f}",
                     f"{mb / t['enc_s']:.0f} ({mb / t['enc_wall']:.0f})", f"{mb / t['dec_s']:.0f} ({mb / t['dec_wall']:.0f})",
                     f"{mb / h['enc_s']:.0f} ({mb / h['enc_wall']:.0f})", f"{mb / h['dec_s']:.0f} ({mb / h['dec_wall']:.0f})"])
        n = r["numel"]
        h_e = 16 * r["h8"] / r["raw"] - 8                       # bits of exponent entropy per weight
        gap = (f"gap to exp+8 bound = fixed 3-bit code vs H(e) {h_e:.2f} bits: {100 * (3 - h_e) / 16:.2f} points, "
               f"8 extra bits per fallback ({100 * r['fb'] / n:.2f}% of weights): {100 * 8 * r['fb'] / n / 16:.2f} points, "
               f"offsets+header {100 * r['meta'] / r['raw']:.2f} points, padding {100 * 11 * r['pad'] / n / 16:.2f} points")
        checks.append(f"- {name}: {gap}.  TCA-TBE {pt:.2f}% of BF16 (target <= 70%: {'met' if pt <= 70 else 'MISSED'}); "
                      f"{pt - b8:+.2f} points vs the exp+8 entropy bound and {pt - b16:+.2f} vs the 16-bit-symbol bound "
                      f"(target within 3: {'met' if pt - b8 <= 3 else 'MISSED'} for exp+8, "
                      f"{'met' if pt - b16 <= 3 else 'MISSED'} for 16-bit); {pt - ph:+.2f} points vs Huffman "
                      f"(target <= +2: {'met' if pt - ph <= 2 else 'MISSED'}); encode {mb / t['enc_s']:.0f} MB/s, "
                      f"decode {mb / t['dec_s']:.0f} MB/s (target >= 200: "
                      f"{'met' if min(mb / t['enc_s'], mb / t['dec_s']) >= 200 else 'MISSED'})")
    load1 = os.getloadavg()[0]
    header = ["data", "Mparams", "BF16 MB", "TCA-TBE %", "Huffman %", "bound exp+8 %", "bound 16-bit %",
              "TCA enc MB/s", "TCA dec MB/s", "Huf enc MB/s", "Huf dec MB/s"]
    body = (table(header, rows) + "\n\n"
            "Sizes are stored bytes (all arrays + headers) as % of BF16 bytes. Bounds: empirical order-0 entropy per "
            "weight, of the exponent byte + 8 raw bits (`exp+8`, the limit for codecs that keep sign and mantissa raw, "
            "as both here do) and of the whole 16-bit word (`16-bit`). MB/s = MB of BF16 per CPU-second of this "
            "single-threaded process (numpy; torch.set_num_threads(1)), i.e. per core, wall-clock MB/s in parentheses; "
            "encode and decode of every tensor, bit-exactness checked. "
            f"Load average during the run: {load0:.1f} -> {load1:.1f} on {os.cpu_count()} cores (shared machine: "
            "other processes share the cores and caches, so even per-core figures are lower bounds).\n\n" + "\n".join(checks))
    print(body)
    if not args.no_write:
        write_section("lossless_cpu", "python benchmarks/lossless_cpu.py", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
