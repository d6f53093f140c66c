"""TCA-TBE on the GPU (ZipServ, arXiv 2603.17435): fused decode+GEMM (Triton) vs torch BF16 matmul
(cuBLAS) vs decompress-then-matmul, for layer shapes 4096x4096, 4096x14336, 14336x4096, 8192x28672
(out x in) and N in {1, 4, 16, 128} tokens, all in one run; achieved GB/s (bytes the kernel must read:
compressed weight + activations) against the measured device copy bandwidth; correctness (bit-exact
decompression, matmul within BF16 tolerance of the cuBLAS reference). N = 128 > 16 uses
decompress+cuBLAS inside ZipLinear, so the fused column is left empty there.

    python benchmarks/lossless_gpu.py        (needs CUDA and triton; exits with a message otherwise)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._md import table, write_section  # noqa: E402
from modelpress.algos import lossless as LL  # noqa: E402
from modelpress.kernels import zip_gemm as ZG  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
NS = [1, 4, 16, 128]


def bench(fn, reps: int = 50) -> float:
    """Median seconds per call with CUDA events (after warm-up)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write bytes)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    s = bench(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() / s / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("lossless_gpu: no CUDA device here; this benchmark needs an NVIDIA GPU (H100 in the issue) and triton. "
              "Nothing measured, BENCHMARKS.md untouched.")
        return 2
    if not ZG.triton_available():
        print("lossless_gpu: triton is not installed: pip install 'modelpress[gpu]'. Nothing measured.")
        return 2
    dev = torch.cuda.get_device_name(0)
    bw = copy_bandwidth()
    rows = []
    for M, K in SHAPES:
        g = torch.Generator().manual_seed(M + K)
        w_cpu = (torch.randn(M, K, generator=g) * 0.02).to(torch.bfloat16)
        enc = LL.tca_tbe_encode(w_cpu)
        w = w_cpu.cuda()
        t = {k: v.cuda() for k, v in {"bitmaps": torch.from_numpy(enc.bitmaps.view("int64")),
                                      "hi": torch.from_numpy(enc.hi),
                                      "fallback": torch.from_numpy(enc.fallback.view("int16")),
                                      "block_offsets": torch.from_numpy(enc.block_offsets),
                                      "sub_offsets": torch.from_numpy(enc.sub_offsets)}.items()}
        a = (t["bitmaps"], t["hi"], t["fallback"], t["block_offsets"], t["sub_offsets"], enc.e0)
        dec = ZG.decompress_triton(*a, enc.shape, enc.padded)
        exact = torch.equal(dec.view(torch.int16), w.view(torch.int16))
        t_dec = bench(lambda: ZG.decompress_triton(*a, enc.shape, enc.padded))
        del dec
        for N in NS:
            x = torch.randn(N, K, device="cuda").to(torch.bfloat16)
            ref = x @ w.T
            t_cublas = bench(lambda: x @ w.T)
            t_dm = bench(lambda: ZG.decompress_triton(*a, enc.shape, enc.padded) @ x.T)
            fused_s = gbs = ok = ""
            if N <= ZG.FUSED_MAX_N:
                y = ZG.fused_linear_triton(x, *a, enc.shape, enc.padded)
                err = (y.float() - ref.float()).abs().max().item()
                ok = err <= 2e-2 * ref.float().abs().max().item()
                t_f = bench(lambda: ZG.fused_linear_triton(x, *a, enc.shape, enc.padded))
                read = enc.nbytes + x.numel() * 2 + N * M * 4
                fused_s = f"{t_f * 1e6:.1f}"
                gbs = f"{read / t_f / 1e9:.0f} ({100 * read / t_f / 1e9 / bw:.0f}%)"
                speed_cublas, speed_dm = t_cublas / t_f, t_dm / t_f
            rows.append([f"{M}x{K}", N, f"{100 * enc.nbytes / (M * K * 2):.1f}", fused_s, f"{t_cublas * 1e6:.1f}",
                         f"{t_dm * 1e6:.1f}", f"{t_dec * 1e6:.1f}",
                         f"{speed_cublas:.2f}" if fused_s else "", f"{speed_dm:.2f}" if fused_s else "",
                         gbs, "yes" if exact else "NO", ok if fused_s else ""])
            print(rows[-1], flush=True)
    header = ["shape (out x in)", "N", "size % BF16", "fused us", "cuBLAS bf16 us", "decompress+matmul us",
              "decompress us", "speed-up vs cuBLAS", "speed-up vs decompress+matmul", "fused GB/s (% of copy)",
              "decode bit-exact", "matmul within tol"]
    body = (f"Device: {dev}; measured copy bandwidth {bw:.0f} GB/s (read+write). Median of 50 CUDA-event timings. "
            "Targets (issue 3): fused at N=1 >= 1.2x faster than cuBLAS and >= 2x faster than decompress+matmul.\n\n"
            + table(header, rows))
    print(body)
    if not args.no_write:
        write_section("lossless_gpu", "python benchmarks/lossless_gpu.py", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
