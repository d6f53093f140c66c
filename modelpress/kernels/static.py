"""Static performance figures of Triton kernels, measurable without a GPU: compile ahead of time for a
CUDA target (sm_90 = H100) with Triton's bundled ptxas, disassemble with its bundled nvdisasm /
cuobjdump, and read registers, spills, shared memory, occupancy and the SASS of the main loop.

The measure of a decode+GEMM kernel (ZipServ, arXiv 2603.17435, sec. on ZipGEMM) is the number of
thread-instructions issued per decoded weight in its K loop:
  per_weight = (SASS instructions in the loop body) * (threads per program) / (weights per iteration)
An H100 (132 SMs x 4 schedulers x 32 lanes x ~1.98 GHz ~ 33e12 thread-instructions/s) reading 11-bit
weights from 3.35 TB/s HBM (~2.4e12 weights/s) can issue ~13-14 per weight; a kernel above that is
instruction-bound, not memory-bound. Static counts: every instruction of the loop body once (branches
inside the body counted as if all taken)."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from .zip_gemm import resident_ctas


@dataclass
class StaticFigures:
    name: str
    regs: int                  # registers per thread
    spill_bytes: int           # local memory per thread (spill stores/loads go there)
    smem: int                  # shared memory per program, bytes (Triton's dynamic + static)
    warps: int                 # warps per program
    ctas_per_sm: int           # resident programs per SM (sm_90 limits)
    loop_sass: int             # SASS instructions in the main (K) loop body
    weights_per_iter: int      # decoded weights per loop iteration
    barriers: int              # BAR instructions in the loop body
    shared_ops: int            # LDS/STS/LDSM in the loop body
    global_loads: int          # LDG in the loop body

    @property
    def warps_per_sm(self) -> int:
        return self.ctas_per_sm * self.warps

    @property
    def per_weight(self) -> float:
        """Thread-instructions issued per decoded weight in the main loop."""
        return self.loop_sass * 32 * self.warps / max(self.weights_per_iter, 1)


def tool(name: str) -> str:
    """Path of a CUDA binary tool bundled with triton (ptxas, nvdisasm, cuobjdump)."""
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found at {path}: install triton's NVIDIA backend (pip install triton)")
    return path


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3, arch: int = 90,
                 aligned: tuple[str, ...] = ()):
    """Ahead-of-time compile a @triton.jit function for CUDA sm_<arch> (no GPU or driver needed). aligned:
    arguments known to be multiples of 16 (pointers: 16-byte aligned), as a launch specialises them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                            "num_stages": num_stages})


def _on_cubin(cubin: bytes, name: str, *args: str) -> str:
    """Stdout of the bundled CUDA tool `name` run with `args` on the cubin (written to a temporary file)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([tool(name), *args, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def sass_lines(cubin: bytes) -> list[tuple[str, str]]:
    """(label or "", instruction text) of every SASS instruction of the cubin's kernel, in order; the
    label is the one nvdisasm puts right before the instruction (branch targets)."""
    return parse_sass(_on_cubin(cubin, "nvdisasm", "-c"))


def parse_sass(text: str) -> list[tuple[str, str]]:
    lines, label = [], ""
    for ln in text.splitlines():
        lab = re.match(r"^(\.L_x_\d+):", ln.strip())
        if lab:
            label = lab.group(1)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", ln)
        if m:
            lines.append((label, m.group(1).strip()))
            label = ""
    return lines


def main_loop(lines: list[tuple[str, str]]) -> list[str]:
    """Instructions of the largest loop: from the target label of a backward branch to the branch,
    the backward branch spanning the most instructions."""
    where = {lab: i for i, (lab, _) in enumerate(lines) if lab}
    best = (0, -1)
    for i, (_, ins) in enumerate(lines):
        m = re.search(r"\bBRA\b.*?\((\.L_x_\d+)\)", ins)
        if m and m.group(1) in where and where[m.group(1)] <= i and i - where[m.group(1)] > best[1] - best[0]:
            best = (where[m.group(1)], i)
    return [ins for _, ins in lines[best[0]: best[1] + 1]]


def resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local/stack bytes per thread) from cuobjdump -res-usage."""
    out = _on_cubin(cubin, "cuobjdump", "-res-usage")
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    local = int(re.search(r"STACK:(\d+)", out).group(1)) + int(re.search(r"LOCAL:(\d+)", out).group(1))
    return regs, local


def figures(name: str, compiled, weights_per_iter: int) -> StaticFigures:
    cubin = compiled.asm["cubin"]
    regs, local = resources(cubin)
    smem = int(compiled.metadata.shared)
    warps = int(compiled.metadata.num_warps)
    body = main_loop(sass_lines(cubin))
    op = [ins.split()[0] if not ins.startswith("@") else ins.split()[1] for ins in body]
    return StaticFigures(
        name=name, regs=regs, spill_bytes=local, smem=smem, warps=warps,
        ctas_per_sm=resident_ctas(regs, smem, warps), loop_sass=len(body), weights_per_iter=weights_per_iter,
        barriers=sum(o.startswith("BAR") for o in op),
        shared_ops=sum(o.startswith(("LDS", "STS", "LDSM")) for o in op),
        global_loads=sum(o.startswith("LDG") for o in op))


# --------------------------------------------------------------------------- the kernels of zip_gemm

_FUSED_SIG = {"bm_ptr": "*i64", "tab_ptr": "*i32", "hi_ptr": "*u8", "fb_ptr": "*u8", "blk_ptr": "*i32",
              "sub_ptr": "*i16", "x_ptr": "*bf16", "out_ptr": "*bf16", "bias_ptr": "*bf16", "n_cb": "i32",
              "M": "i32", "K": "i32", "N": "i32", "cb_per_split": "i32", "stride_xn": "i32",
              "SPLIT": "constexpr", "HAS_BIAS": "constexpr", "INTERP": "constexpr", "BLOCK_N": "constexpr"}
_DEC_SIG = {"bm_ptr": "*i64", "tab_ptr": "*i32", "hi_ptr": "*u8", "fb_ptr": "*u8", "blk_ptr": "*i32",
            "sub_ptr": "*i16", "out_ptr": "*i16", "n_cb": "i32", "rows": "i32",
            "cols": "i32", "INTERP": "constexpr"}


@dataclass
class Variant:
    name: str
    fn: object
    signature: dict
    constexprs: dict
    weights_per_iter: int        # weights decoded per main-loop iteration (0: no decode loop)
    num_warps: int
    num_stages: int
    aligned: tuple[str, ...] = ()   # multiples of 16 at launch (torch pointers; M, K, strides of LLM layers)


def _pointers(sig: dict) -> tuple[str, ...]:
    return tuple(k for k, v in sig.items() if v.startswith("*"))


def variants() -> list[Variant]:
    """Every compiled form of the current kernels, as launched by zip_gemm on the issue's layer shapes
    (torch pointers 16-byte aligned; M, K, x's row stride and the K-block count multiples of 16)."""
    from . import zip_gemm as ZG
    w, s = ZG.NUM_WARPS, ZG.NUM_STAGES
    split = {**_FUSED_SIG, "out_ptr": "*fp32"}
    al = _pointers(_FUSED_SIG) + ("M", "K", "stride_xn", "n_cb")
    out = [Variant("fused (1 split, bias, bf16 out)", ZG.fused_kernel, _FUSED_SIG,
                   {"SPLIT": False, "HAS_BIAS": True, "INTERP": False, "BLOCK_N": 16}, 4096, w, s, al),
           Variant("fused (split-K partials)", ZG.fused_kernel, split,
                   {"SPLIT": True, "HAS_BIAS": False, "INTERP": False, "BLOCK_N": 16}, 4096, w, s, al),
           Variant("decompress", ZG.decompress_kernel, _DEC_SIG, {"INTERP": False}, 0, w, 3,
                   _pointers(_DEC_SIG) + ("n_cb", "cols")),
           Variant("split-K reduce (8 splits)", ZG.splitk_reduce_kernel,
                   {"ws_ptr": "*fp32", "y_ptr": "*bf16", "bias_ptr": "*bf16", "M": "i32", "N": "i32",
                    "SPLITS": "constexpr", "HAS_BIAS": "constexpr", "BLOCK": "constexpr"},
                   {"SPLITS": 8, "HAS_BIAS": True, "BLOCK": 256}, 0, 4, 3)]
    return out


def baseline_variant(module) -> Variant:
    """The fused kernel before issue 19 (16 rows per program, scans, atomics), from its source module:
    one 16x64 tile (1024 weights) per loop iteration."""
    sig = {"bm_ptr": "*i64", "hi_ptr": "*u8", "fb_ptr": "*i16", "blk_ptr": "*i32", "sub_ptr": "*i16",
           "x_ptr": "*bf16", "y_ptr": "*fp32", "bias_ptr": "*fp32", "e0": "i32", "n_cb": "i32", "M": "i32",
           "K": "i32", "N": "i32", "cb_per_split": "i32", "stride_xn": "i32", "ATOMIC": "constexpr",
           "HAS_BIAS": "constexpr", "F32_DOT": "constexpr"}
    return Variant("baseline fused (before issue 19, split-K atomics)", module.fused_kernel, sig,
                   {"ATOMIC": True, "HAS_BIAS": False, "F32_DOT": False}, 1024, 4, 3,
                   _pointers(sig) + ("M", "K", "stride_xn", "n_cb"))


def measure(v: Variant, arch: int = 90) -> StaticFigures:
    k = compile_sm90(v.fn, v.signature, v.constexprs, num_warps=v.num_warps, num_stages=v.num_stages, arch=arch,
                     aligned=v.aligned)
    return figures(v.name, k, v.weights_per_iter)
