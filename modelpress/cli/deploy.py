"""`modelpress deploy DIR --device jetson-agx-orin --context 2048 --control-hz 10`: memory fit, roofline
decode/prefill time, energy per token, thermal derating and control-loop deadline per device profile
(arXiv 2603.16952); `--measure` calibrates against this machine (CPU, or CUDA when present)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..deploy.estimate import builtin_profiles, estimate_dir, load_profile

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(subparsers) -> tuple[str, ...]:
    p = subparsers.add_parser("deploy", help="will it fit and how fast: roofline estimates per device (--measure: "
                                             "calibrate on this machine)")
    p.add_argument("dir", nargs="?", help='export folder, Hugging Face model folder, or "smollm2"')
    p.add_argument("--device", action="append", metavar="NAME|YAML",
                   help="device profile name or your own YAML (repeatable, comma-separated); default: all shipped")
    p.add_argument("--list-devices", action="store_true", help="list the shipped device profiles and exit")
    p.add_argument("--context", type=int, default=2048, help="tokens in the KV cache (default 2048)")
    p.add_argument("--control-hz", type=float, help="control-loop rate to check the deadline 1/Hz against")
    p.add_argument("--action-tokens", type=int, default=1, help="tokens decoded per control step (default 1)")
    p.add_argument("--obs-tokens", type=int, default=0, help="new observation tokens prefilled per control step")
    p.add_argument("--kv-bits", type=float, default=16, help="KV-cache element width in bits (default 16)")
    p.add_argument("--float-bits", type=int, default=16,
                   help="bits at which floating tensors are deployed (default 16; 0 = as stored)")
    p.add_argument("--bits", type=float, help="what-if: size every linear at this many bits instead of the stored bytes")
    p.add_argument("--compute", choices=("fp16", "int8", "fp32"), default="fp16",
                   help="precision of the matmuls (int8 = W8A8 kernels); default fp16")
    p.add_argument("--bw-efficiency", type=float, help="achieved / peak bandwidth (default: the profile's, 1.0)")
    p.add_argument("--compute-efficiency", type=float, help="achieved / peak throughput (default: the profile's, 1.0)")
    p.add_argument("--overhead-us", type=float, help="runtime fixed cost per layer per forward pass in microseconds")
    p.add_argument("--json", metavar="PATH", help="also write the estimates as JSON")
    p.add_argument("--measure", action="store_true",
                   help="calibrate: probe this machine, time DIR's prefill/decode, report estimate vs measured")
    p.add_argument("--measure-context", type=int, default=128, help="prompt tokens for --measure (default 128)")
    p.add_argument("--measure-tokens", type=int, default=16, help="decoded tokens for --measure (default 16)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for --measure (default 1)")
    p.add_argument("--dtype", choices=DTYPES, help="model dtype for --measure (default: float32 on CPU, bfloat16 on CUDA)")
    return ("deploy",)


def _devices(arg: list[str] | None) -> list[str]:
    if not arg:
        return builtin_profiles()
    return [d.strip() for a in arg for d in a.split(",") if d.strip()]


def _resolve(src: str | None) -> Path:
    if src is None:
        raise UserError("deploy needs a model folder: `modelpress deploy DIR` (an export, an HF folder or \"smollm2\")")
    if src == "smollm2":
        from ..model import smollm2_dir
        return smollm2_dir()
    path = Path(src)
    if not path.is_dir():
        raise UserError(f"{src} is not a folder: pass an export folder, a Hugging Face model folder or \"smollm2\"")
    return path


def _check_numbers(args) -> None:
    """Values that would give a silently wrong estimate (a negative width "fits") are refused at once."""
    import math
    for flag, v, lo, strict in (("--bits", args.bits, 0, True), ("--kv-bits", args.kv_bits, 0, True),
                                ("--float-bits", args.float_bits, 0, False), ("--context", args.context, 1, False),
                                ("--control-hz", args.control_hz, 0, True), ("--action-tokens", args.action_tokens, 1, False),
                                ("--obs-tokens", args.obs_tokens, 0, False), ("--bw-efficiency", args.bw_efficiency, 0, True),
                                ("--compute-efficiency", args.compute_efficiency, 0, True),
                                ("--overhead-us", args.overhead_us, 0, False),
                                ("--measure-context", args.measure_context, 1, False),
                                ("--measure-tokens", args.measure_tokens, 1, False), ("--threads", args.threads, 1, False)):
        if v is None:
            continue
        if not math.isfinite(v) or v < lo or (strict and v <= lo):
            raise UserError(f"{flag} {v:g} is out of range: it must be {'>' if strict else '>='} {lo}")
    if args.bits is not None and args.bits > 64:
        raise UserError(f"--bits {args.bits:g} is out of range: give the bits per weight, at most 64")


def _mb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else (f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB")


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table
    console = Console()
    if args.list_devices:
        t = Table("name", "device", "memory", "bandwidth", "fp16 dense", "int8 dense", "TDP", "sustained")
        for n in builtin_profiles():
            p = load_profile(n)
            t.add_row(n, p.title, f"{p.memory_gib:g} GiB", f"{p.bandwidth_gbs:g} GB/s", f"{p.peak_fp16_tflops:g} TFLOPS",
                      f"{p.peak_int8_tops:g} TOPS", f"{p.tdp_w:g} W", f"{p.sustained_clock_ratio:g}")
        console.print(t)
        return 0
    _check_numbers(args)
    folder = _resolve(args.dir)
    if args.measure:
        return _measure(args, folder, console)
    devices = _devices(args.device)
    kw = dict(context=args.context, bits=args.bits, float_bits=args.float_bits or None, compute=args.compute,
              kv_bits=args.kv_bits, control_hz=args.control_hz, action_tokens=args.action_tokens,
              obs_tokens=args.obs_tokens, bandwidth_efficiency=args.bw_efficiency,
              compute_efficiency=args.compute_efficiency, overhead_us_per_layer=args.overhead_us)
    ests = estimate_dir(folder, devices, **kw)
    cols = ["device", "weights + KV", "fits", "decode / token", "sustained", "bound", "tok/s", "prefill (TTFT)",
            "energy / token"]
    if args.control_hz:
        cols += [f"step @ {args.control_hz:g} Hz", "deadline"]
    t = Table(*cols, title=f"{folder} - context {args.context}, {args.compute} compute, roofline estimate")
    for e in ests:
        row = [e.device, f"{_mb(e.weight_bytes)} + {_mb(e.kv_bytes)}",
               "[green]yes[/]" if e.fits else f"[red]no[/] ({_mb(e.capacity_bytes)})", _ms(e.decode_s),
               _ms(e.decode_s_sustained), e.decode_bound, f"{e.tokens_per_s:.4g}", _ms(e.prefill_s_sustained),
               "n/a" if e.energy_j_per_token is None else f"{e.energy_j_per_token * 1e3:.3g} mJ"]
        if args.control_hz:
            row += [_ms(e.control_step_s), "[green]met[/]" if e.deadline_met else "[red]missed[/]"]
        t.add_row(*row)
    console.print(t)
    console.print("sustained = thermally derated clocks (profile sustained_clock_ratio); ideal kernels unless "
                  "--bw-efficiency/--compute-efficiency/--overhead-us or a calibrated profile say otherwise")
    if args.json:
        from ..io import atomic_write_text
        atomic_write_text(args.json, json.dumps([e.as_dict() for e in ests], indent=1))
    return 0


def _measure(args, folder: Path, console) -> int:
    import torch
    from rich.table import Table

    from ..export import load_model as load
    from ..deploy.measure import calibrate
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    model, tok = load("smollm2" if args.dir == "smollm2" else folder, dtype=dtype)
    dev = torch.device("cuda" if cuda else "cpu")
    model = model.to(dev)
    ids = _prompt(tok, model.config.vocab_size, args.measure_context).to(dev)
    vendor = load_profile(_devices(args.device)[0]) if args.device else None
    res = calibrate(model, ids, args.measure_tokens, vendor=vendor)
    pr, m = res["probes"], res["measured"]
    console.print(f"probes on {dev} ({dtype}, {torch.get_num_threads()} threads): copy {pr['copy_gbs']:.3g} GB/s, "
                  f"gemv {pr['gemv_gbs']:.3g} GB/s, matmul {pr['matmul_tflops'] * 1e3:.3g} GFLOP/s, "
                  f"overhead {pr['overhead_us_per_layer']:.3g} us/layer")
    t = Table("estimate", "decode / token", "x measured", "prefill", "x measured",
              title=f"{folder}: measured decode {_ms(m['decode_s'])} (median {_ms(m['decode_median_s'])}), "
                    f"prefill of {res['context']} tokens {_ms(m['prefill_s'])}")
    for label, r in res["estimates"].items():
        t.add_row(label, f"{_ms(r['decode_s'])} ({r['decode_bound']})", f"{r['decode_ratio']:.2f}",
                  f"{_ms(r['prefill_s'])} ({r['prefill_bound']})", f"{r['prefill_ratio']:.2f}")
    console.print(t)
    if args.json:
        from ..io import atomic_write_text
        out = {k: v for k, v in res.items() if k != "profile"}
        out["profile"] = res["profile"].__dict__
        atomic_write_text(args.json, json.dumps(out, indent=1, default=str))
    return 0


def _prompt(tok, vocab: int, n: int):
    """`n` token ids of reference Wikipedia text (random ids when there is no tokenizer)."""
    import torch
    if tok is not None:
        try:
            from ..calib.sources import wiki_texts
            ids = tok(" ".join(wiki_texts("eval")[:50]), return_tensors="pt").input_ids[:, :n]
            if ids.shape[1] == n:
                return ids
        except Exception:  # noqa: BLE001 - the reference text is optional for timing
            pass
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))
