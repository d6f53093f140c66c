"""Models scored on the evaluation windows with one decoder layer resident at a time: the original read from its
safetensors shards (reference_scores_streamed: the reference side of `evaluate`,
modelpress.eval.perplexity.ReferenceScores) and a native export, its compressed modules rebuilt one layer at a
time (export_scores_streamed: the compared side, which `evaluate` also takes as scores), so that neither model is
ever held whole.

The pass is modelpress.engine.layerwise.steps run over the evaluation windows instead of calibration samples,
with a checkpoint object that materializes each layer from the shards and sends it back to the meta device
after: every window goes through layer 0, then layer 1, ... exactly as the model's own forward would take it
(the same keyword arguments, captured from the model's forward, the same batches). The outputs of the last
layer are then handed to the model's own forward once more with every decoder layer replaced by a stand-in
that replays them (and `inputs_embeds` of zeros, so the input embedding is not read), so whatever the model does
after its stack (final norm, OPT's project_out, ...) runs as written; the output layer's input is captured by
the same pre-hook modelpress.eval.perplexity uses. The figures are therefore bitwise those of
`reference_scores(model, windows)` on the whole model (tests/test_stream.py checks it on every tiny
architecture, and that a streamed `compress` reports exactly the in-memory run's figures). Resident at any time:
one decoder layer, the windows' hidden states, the output layer (and for an export, everything outside the
decoder stack) while the scores are computed."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..eval.perplexity import CHUNK_ELEMENTS, ReferenceScores, _post, scores_from_hidden
from ..eval.size import plain_size
from ..model import decoder_layers
from ..progress import bar
from .layerwise import StandIn, steps
from .memory import large_allocations_mapped, release_memory, trim_heap
from .shards import _SIZES, SafeFile, Shards
from .store import skeleton


class _Windows:
    """Evaluation windows in the shape of a CalibrationSet for layerwise.steps: no attention mask is passed,
    as modelpress.eval scores windows (model(input_ids=...))."""

    def __init__(self, ids: Tensor):
        self.input_ids, self.attention_mask = ids, None

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class _FromShards:
    """The checkpoint protocol of layerwise.steps: layer i is read from the shards before its pass and sent
    back to the meta device after it; the last layer's outputs are kept (`finals`)."""

    def __init__(self, shards: Shards, prefix: str, dtype: torch.dtype, advance):
        self.shards, self.prefix, self.dtype, self.advance = shards, prefix, dtype, advance
        self.finals: list[Tensor] | None = None

    def restore(self, layers):
        return 0, None, {}

    def load_layer(self, i: int, layer: nn.Module) -> None:
        pre = f"{self.prefix}.{i}."
        layer.load_state_dict({n: self.shards.src(pre + n, self.dtype).tensor() for n in layer.state_dict()},
                              assign=True, strict=True)

    def save(self, i: int, layer: nn.Module, next_inputs: list[Tensor], stats: dict) -> None:
        layer.to("meta")
        release_memory()
        self.finals = next_inputs
        self.advance()


class _Replay(StandIn):
    """Stands in for a decoder layer: hands the hidden states on unchanged, or (the last layer) returns the
    stored outputs of the real stack for this batch."""

    def __init__(self, inner: nn.Module, out: Tensor | None):
        super().__init__(inner)
        self.out = out

    def forward(self, *args, **kw):
        hs = args[0] if args else kw["hidden_states"]
        return hs if self.out is None else self.out[:, : hs.shape[1]]


class _Stop(Exception):
    pass


def _after_stack(model: nn.Module, final: Tensor, head_input: bool) -> Tensor:
    """The model's forward from its last decoder layer's output `final` (b, T, hidden) on: the output layer's
    input (head_input) or the model's logits."""
    prefix, layers = decoder_layers(model)
    real = list(layers)
    emb = model.get_input_embeddings()
    got: list[Tensor] = []

    def hook(_m, args):
        got.append(args[0])
        raise _Stop

    h = model.get_output_embeddings().register_forward_pre_hook(hook) if head_input else None
    try:
        for i, layer in enumerate(real):
            layers[i] = _Replay(layer, final if i == len(real) - 1 else None)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        zeros = torch.zeros(final.shape[0], final.shape[1], emb.embedding_dim, dtype=dtype, device=final.device)
        try:
            logits = model(inputs_embeds=zeros, use_cache=False).logits
        except _Stop:
            return got[0]
        return logits
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer
        if h is not None:
            h.remove()


def output_layer(model: nn.Module, shards: Shards, dtype: torch.dtype) -> nn.Module:
    """The skeleton's output layer with its weights read from the shards (a tied one from the input embedding's
    tensors); the skeleton's input embedding is left as it was."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    pre = names[id(head)] + "."
    state = {}
    for k in head.state_dict():
        name = pre + k
        if name not in shards.files and k == "weight" and getattr(model.config, "tie_word_embeddings", False):
            name = names[id(emb)] + ".weight"
        state[k] = shards.src(name, dtype).tensor()
    head.load_state_dict(state, assign=True, strict=True)
    return head


def load_output_layer(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The output layer of the model in the HF folder `folder`, read alone from its shards."""
    model, shards = skeleton(Path(folder), dtype)
    return output_layer(model, shards, dtype)


@torch.no_grad()
def reference_scores_streamed(folder: str | Path, windows: Tensor, batch_size: int = 2,
                              dtype: torch.dtype = torch.float32, chunk_elements: int = CHUNK_ELEMENTS,
                              progress: str | None = None) -> ReferenceScores:
    """modelpress.eval.perplexity.reference_scores of the model in the HF folder `folder` (config.json and
    safetensors shards) on `windows`, with one decoder layer resident at a time (see the module docstring).
    Raises UserError when the model's logits are not its output layer applied to the stack's output (then
    score the whole model instead)."""
    return _folder_pass(Path(folder), windows, batch_size, dtype, chunk_elements, progress, True)[0]


def folder_scores_streamed(folder: str | Path, windows: Tensor, batch_size: int = 2,
                           dtype: torch.dtype = torch.float32, chunk_elements: int = CHUNK_ELEMENTS,
                           progress: str | None = None) -> tuple[ReferenceScores, dict]:
    """reference_scores_streamed plus the model's size report (modelpress.eval.size.plain_size: the folder's
    tensors as an export would store them), for `eval` of an uncompressed HF folder: the compared side of
    `evaluate`, so without its own NLL (evaluate computes it)."""
    scores, model = _folder_pass(Path(folder), windows, batch_size, dtype, chunk_elements, progress, False)
    return scores, plain_size(model)


@torch.no_grad()
def _folder_pass(folder: Path, windows: Tensor, batch_size: int, dtype: torch.dtype, chunk_elements: int,
                 progress: str | None, with_nll: bool) -> tuple[ReferenceScores, nn.Module]:
    with large_allocations_mapped():
        model, shards = skeleton(Path(folder), dtype)
        prefix, layers = decoder_layers(model)
        with bar(progress and f"{progress}: layers", len(layers)) as advance:
            reader = _FromShards(shards, prefix, dtype, advance)
            for _ in steps(model, _Windows(windows), batch_size, checkpoint=reader):
                pass
        return _scores(model, reader.finals, output_layer(model, shards, dtype), windows, batch_size, chunk_elements,
                       progress, with_nll), model


def _scores(model: nn.Module, finals: list[Tensor], head: nn.Module, windows: Tensor, batch_size: int,
            chunk_elements: int, progress: str | None, with_nll: bool) -> ReferenceScores:
    """The scores from the last decoder layer's outputs per batch: the stack's tail replayed, then
    scores_from_hidden with `head`; checks on a short prefix that logits = post(head(hidden))."""
    post = _post(model)
    probe = _after_stack(model, finals[0][:1, : min(8, windows.shape[1])], head_input=False).float()
    hidden = [_after_stack(model, f, head_input=True) for f in finals]
    finals.clear()
    trim_heap()
    want = post(head(hidden[0][:1, : probe.shape[1]])).float()
    if want.shape != probe.shape or not torch.allclose(want, probe, rtol=1e-4, atol=1e-4 * float(probe.abs().max())):
        raise UserError(f"{type(model).__name__} does more after its output layer than modelpress can replay "
                        "layer by layer: score the whole model (run without streaming)")
    return scores_from_hidden(windows, batch_size, hidden, head, post, chunk_elements,
                              progress and f"{progress}: batches", with_nll)


class _Export:
    """A native export read part by part: the tensors under a name prefix (checked against the manifest's
    sha256, 16-bit stored ones widened to the compute dtype) with the compressed modules and aliases there."""

    def __init__(self, folder: Path, manifest: dict, dtype: torch.dtype):
        from ..export.native import WEIGHTS, member
        self.where = str(folder / WEIGHTS)
        self.file = SafeFile(member(folder, WEIGHTS, str(folder)))
        self.manifest, self.dtype = manifest, dtype
        self.sha = manifest.get("tensor_sha256", {})
        self.upcast = set((manifest.get("storage") or {}).get("upcast", []))
        if set(self.file.keys()) != set(self.sha):
            raise UserError(f"{self.where}: its tensors differ from those recorded in the manifest: the export "
                            "was edited; re-export it")

    def part(self, inside: str | None, outside: str | None = None) -> tuple[dict, dict, dict]:
        """(tensors, modules, aliases) named under `inside` (relative to it), or not under `outside`."""
        from ..export.native import check_tensors

        def mine(k: str) -> bool:
            return k.startswith(inside) if inside else not k.startswith(outside)
        cut = len(inside or "")
        names = [k for k in self.file.keys() if mine(k)]
        tensors = {k: self.file.read(k) for k in names}
        check_tensors(tensors, {k: self.sha[k] for k in names}, self.where)
        tensors = {k[cut:]: (v.to(self.dtype) if k in self.upcast else v) for k, v in tensors.items()}
        mods = {k[cut:]: v for k, v in self.manifest["modules"].items() if mine(k)}
        aliases = {k[cut:]: v[cut:] for k, v in self.manifest.get("aliases", {}).items() if mine(k)}
        return tensors, mods, aliases

    def nbytes(self) -> dict[str, int]:
        """Stored bytes of every tensor, from the file's header."""
        return {k: _SIZES[dt] * math.prod(shape) for k, (dt, shape) in self.file.entries.items()}


class _FromExport(_FromShards):
    """The checkpoint protocol of layerwise.steps for an export: layer i rebuilt from its stored state
    (modelpress.export.native.apply_state), sent back to the meta device after its pass; each rebuilt
    compressed module's size extras are kept (`extras`)."""

    def __init__(self, export: _Export, prefix: str, advance):
        self.export, self.prefix, self.advance = export, prefix, advance
        self.finals, self.extras = None, {}

    def load_layer(self, i: int, layer: nn.Module) -> None:
        from ..eval.size import module_extras
        from ..export.native import apply_state
        pre = f"{self.prefix}.{i}."
        tensors, mods, aliases = self.export.part(pre)
        apply_state(layer, tensors, mods, aliases, self.export.where)
        self.extras.update({pre + n: module_extras(layer.get_submodule(n)) for n in mods})


def export_size(folder: str | Path, check: bool = True) -> dict:
    """modelpress.eval.size.size_report of a native export, rebuilding one decoder layer's modules at a time."""
    return _export_pass(Path(folder), None, 2, CHUNK_ELEMENTS, None, check)[1]


@torch.no_grad()
def export_scores_streamed(folder: str | Path, windows: Tensor, batch_size: int = 2,
                           chunk_elements: int = CHUNK_ELEMENTS, progress: str | None = None,
                           check: bool = True) -> tuple[ReferenceScores, dict]:
    """A native export scored on `windows` one decoder layer at a time (its compressed modules rebuilt per
    layer, every tensor checked against the manifest's sha256, the files' checksums first when `check`), as
    (its scores, output layer kept: evaluate(scores, windows, reference) compares it (the scores hold no NLL
    of their own: evaluate computes it); its size report, as modelpress.eval.size.size_report of the loaded
    export gives it)."""
    return _export_pass(Path(folder), windows, batch_size, chunk_elements, progress, check)


def _export_pass(folder: Path, windows: Tensor | None, batch_size: int, chunk_elements: int, progress: str | None,
                 check: bool) -> tuple[ReferenceScores | None, dict]:
    from ..eval.size import module_extras, size_of
    from ..export.native import apply_state, export_skeleton, parse_dtype
    from ..model import count_params
    with large_allocations_mapped():
        model, manifest, dtype = export_skeleton(folder, check)
        export = _Export(folder, manifest, dtype)
        prefix, layers = decoder_layers(model)
        tensors, mods, aliases = export.part(None, outside=prefix + ".")
        apply_state(model, tensors, mods, aliases, export.where, missing_ok=prefix + ".")
        params = count_params(model)             # (after the outside is applied: a tied output layer counts once)
        extras = {n: module_extras(model.get_submodule(n)) for n in mods}
        del tensors
        with bar(progress and f"{progress}: layers", len(layers)) as advance:
            reader = _FromExport(export, prefix, advance)
            if windows is None:                                   # the size alone: no forward pass
                for i, layer in enumerate(layers):
                    reader.load_layer(i, layer)
                    reader.save(i, layer, [], {})
            else:
                for _ in steps(model, _Windows(windows), batch_size, checkpoint=reader):
                    pass
        extras.update(reader.extras)
        storage = parse_dtype((manifest.get("storage") or {}).get("dtype", str(dtype)), export.where)
        size = size_of(export.nbytes(), manifest["modules"], extras, params, storage)
        size["file_bytes"] = export.file.path.stat().st_size
        if windows is None:
            return None, size
        return _scores(model, reader.finals, model.get_output_embeddings(), windows, batch_size, chunk_elements,
                       progress, False), size
