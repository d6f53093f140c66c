"""The offload path's model structure and layer store: which tensors make up each decoder layer (read
from a meta-device skeleton, or from the shard names alone), and where each layer currently lives (the
shards, or the file of the last stage that touched it), with the per-stage progress that makes an
offloaded run resumable. The LayerStore is what modelpress.engine.layerwise gets as the checkpoint of a
calibrated stage (restore / load_layer / save)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..io import atomic_save_file, atomic_write_text, sha256_file
from .checkpoint import _jsonable
from .memory import release_memory, trim_heap
from .shards import SafeFile, Shards, Src


@dataclass
class Structure:
    """Names of everything the offloaded run touches, from the skeleton or from the shard names."""
    prefix: str                                            # e.g. "model.layers"
    layer_names: list[list[str]]                           # tensors of layer i, relative to "<prefix>.<i>."
    linears: list[dict[str, tuple[int, int, bool]]]        # layer i: {relative module: (out, in, has bias)}
    outside: list[str]                                     # tensors outside the stack (aliases excluded)
    outside_linears: dict[str, tuple[int, int, bool]]      # full module name -> (out, in, has bias)
    aliases: dict[str, str] = field(default_factory=dict)  # tied tensor -> the tensor it shares

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)


def structure_from_model(model: nn.Module) -> Structure:
    from ..model import decoder_layers, layer_linears
    prefix, layers = decoder_layers(model)
    lin = [{n: (m.out_features, m.in_features, m.bias is not None) for n, m in layer_linears(layer).items()}
           for layer in layers]
    seen: dict[int, str] = {}
    outside, aliases = [], {}
    for k, v in model.state_dict(keep_vars=True).items():
        if k.startswith(prefix + "."):
            continue
        if id(v) in seen:
            aliases[k] = seen[id(v)]
            continue
        seen[id(v)] = k
        outside.append(k)
    out_lin = {n: (m.out_features, m.in_features, m.bias is not None) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not n.startswith(prefix + ".")}
    return Structure(prefix, [list(layer.state_dict().keys()) for layer in layers], lin, outside, out_lin, aliases)


def structure_from_shards(shards: Shards, config) -> Structure | None:
    """The structure of an ordinary decoder LM (every 2-D `.weight` inside the stack is an nn.Linear, the
    output projection is `lm_head`) read from the shard names alone, so no model class is imported; None
    when the folder does not look like one (the caller builds the skeleton instead)."""
    n = getattr(config, "num_hidden_layers", None)
    pat = re.compile(r"^(.+?)\.(\d+)\.(.+)$")
    groups: dict[str, dict[int, list[str]]] = {}
    for name in shards.files:
        m = pat.match(name)
        if m:
            groups.setdefault(m[1], {}).setdefault(int(m[2]), []).append(m[3])
    cands = [p for p, g in groups.items() if sorted(g) == list(range(n or -1))]
    if len(cands) != 1:
        return None
    prefix = cands[0]
    layer_names = [sorted(groups[prefix][i]) for i in range(n)]
    linears = []
    for i, names in enumerate(layer_names):
        lin = {}
        for r in names:
            full = f"{prefix}.{i}.{r}"
            shape = shards.files[full].spec(full)[1]
            if r.endswith(".weight") and len(shape) == 2:
                mod = r[:-len(".weight")]
                lin[mod] = (shape[0], shape[1], f"{mod}.bias" in names)
        linears.append(lin)
    outside = sorted(k for k in shards.files if not k.startswith(prefix + "."))
    out_lin, aliases = {}, {}
    if "lm_head.weight" in shards.files:
        o, i = shards.files["lm_head.weight"].spec("lm_head.weight")[1]
        out_lin["lm_head"] = (o, i, "lm_head.bias" in shards.files)
    else:                               # no output projection stored: it is tied to the input embedding
        emb = [k for k in outside if k.endswith(".weight") and len(shards.files[k].spec(k)[1]) == 2
               and "embed" in k]
        if len(emb) != 1:
            return None
        aliases["lm_head.weight"] = emb[0]
        o, i = shards.files[emb[0]].spec(emb[0])[1]
        out_lin["lm_head"] = (o, i, False)
    return Structure(prefix, layer_names, linears, outside, out_lin, aliases)


def _transplant(layer: nn.Module, path: Path) -> None:
    """Load a saved layer into `layer` keeping every module object (stages map modules by identity)."""
    from ..model import set_module
    from ..modules import MODULE_TYPES
    f = SafeFile(path)
    modules, aliases = json.loads(f.metadata["modules"]), json.loads(f.metadata["aliases"])
    tensors = {k: f.read(k) for k in f.keys()}
    for name, spec in modules.items():
        pre = name + "."
        sub = {k[len(pre):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(pre)]}
        new = MODULE_TYPES[spec["kind"]].from_state(sub, spec["config"])
        old = layer.get_submodule(name)
        if type(old) is type(new):
            old.__dict__.update(new.__dict__)
        else:
            set_module(layer, name, new)
    for alias, src in aliases.items():
        tensors[alias] = tensors[src]
    missing, unexpected = layer.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith(tuple(n + "." for n in modules))]
    if missing or unexpected:
        raise UserError(f"{path} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                        "delete the .offload folder and start over")


class LayerStore:
    """Where each decoder layer currently lives: the shards, or the file of the last stage that touched
    it; plus the per-stage progress that makes a run resumable. Passed to modelpress.engine.layerwise as the
    checkpoint of a calibrated stage (restore / load_layer / save)."""

    def __init__(self, struct: Structure, shards: Shards, work: Path, dtype: torch.dtype,
                 layers: nn.ModuleList | None = None):
        self.struct, self.shards, self.work, self.dtype = struct, shards, work, dtype
        self.layers = layers
        self.latest: dict[int, Path] = {}
        self.outside_latest: Path | None = None
        self.digests: dict[Path, str] = {}
        self.stage = 0
        self.resident: list[nn.Module] = []
        self.progress: dict = {"done": 0, "files": {}, "stats": {}, "finished": False}

    @property
    def prefix(self) -> str:
        return self.struct.prefix

    # progress ------------------------------------------------------------------------------------
    def _pfile(self, k: int) -> Path:
        return self.work / f"stage{k}" / "progress.json"

    def _write_progress(self) -> None:
        atomic_write_text(self._pfile(self.stage), json.dumps(self.progress, default=float))

    def begin_stage(self, k: int) -> bool:
        """Enter stage k, picking up what an interrupted run left; True when the stage already finished."""
        self.stage = k
        (self.work / f"stage{k}").mkdir(parents=True, exist_ok=True)
        p = self._pfile(k)
        self.progress = json.loads(p.read_text()) if p.exists() else \
            {"done": 0, "files": {}, "stats": {}, "finished": False}
        for key, digest in self.progress["files"].items():      # later stages supersede earlier ones
            path = self.work / f"stage{k}" / f"{key}.safetensors"
            self.digests[path] = digest
            if key == "outside":
                self.outside_latest = path
            else:
                self.latest[int(key.removeprefix("layer"))] = path
        if not self.progress["finished"]:
            self.verify()
        return self.progress["finished"]

    def verify(self) -> None:
        """Every file the run still reads is there with the sha256 recorded when it was finished."""
        for path in [*self.latest.values(), *([self.outside_latest] if self.outside_latest else [])]:
            if not path.exists() or sha256_file(path) != self.digests[path]:
                raise UserError(f"{path} is missing or does not match its checksum in {path.parent / 'progress.json'}: "
                                f"delete {self.work} and start over")

    def finish_stage(self, stats: dict) -> None:
        self.progress["stats"] = _jsonable(stats)
        self.progress["finished"] = True
        self._write_progress()

    def record(self, key: str, path: Path, digest: str, stats: dict, done: int | None = None) -> None:
        """A finished unit (layer<i> or outside) is in place: record it (progress written last), then
        drop the copy an earlier stage left."""
        self.progress["files"][key] = digest
        self.digests[path] = digest
        self.progress["stats"].update(_jsonable(stats))
        if done is not None:
            self.progress["done"] = done
        self._write_progress()
        old = self.outside_latest if key == "outside" else self.latest.get(int(key.removeprefix("layer")))
        if old is not None and old != path:
            old.unlink(missing_ok=True)
        if key == "outside":
            self.outside_latest = path
        else:
            self.latest[int(key.removeprefix("layer"))] = path

    # the layerwise checkpoint protocol -------------------------------------------------------------
    @property
    def done(self) -> int:
        return self.progress["done"]

    def restore(self, layers) -> tuple[int, list[torch.Tensor] | None, dict]:
        d = self.done
        if d == 0:
            return 0, None, {}
        f = SafeFile(self.work / f"stage{self.stage}" / f"inputs{d}.safetensors")
        return d, [f.read(f"b{j}") for j in range(len(f.keys()))], self.progress["stats"]

    def load_layer(self, i: int, layer: nn.Module) -> None:
        self.resident = list(layer.modules())
        if i in self.latest:
            _transplant(layer, self.latest[i])
        else:
            pre = f"{self.prefix}.{i}."
            names = list(layer.state_dict().keys())
            layer.load_state_dict({n: self.shards.src(pre + n, self.dtype).tensor() for n in names},
                                  assign=True, strict=True)

    def save(self, i: int, layer: nn.Module, next_inputs, stats: dict) -> None:
        """Layer i is done: its file and the next layer's inputs first, the progress that points to them
        last (a kill in between leaves the previous state intact)."""
        from .checkpoint import save_module
        d = self.work / f"stage{self.stage}"
        path = d / f"layer{i}.safetensors"
        save_module(layer, path)
        self.release(layer)
        atomic_save_file({f"b{j}": x.detach().cpu() for j, x in enumerate(next_inputs)}, d / f"inputs{i + 1}.safetensors")
        self.record(f"layer{i}", path, sha256_file(path), stats, done=i + 1)
        (d / f"inputs{i}.safetensors").unlink(missing_ok=True)

    def release(self, layer: nn.Module) -> None:
        """Move the layer, and every module it held when it was loaded, to the meta device: a stage
        replaces linears by new modules while the engine still refers to the old ones until the next
        layer (measured: the previous layer's 134 MB of dense weights stayed alive into the next one)."""
        layer.to("meta")                                 # the layer lives on disk from here
        for m in self.resident:
            m.to("meta")
        self.resident = []
        release_memory()

    def save_final(self, items: list[tuple[int, nn.Module]], stage_stats: dict) -> None:
        """The layers the engine left materialized (it stops after the last targeted layer without handing
        it back) and the end of the stage, recorded by one progress write: a kill before it recomputes
        them from their previous home, a kill after it finds the stage finished."""
        from .checkpoint import save_module
        d = self.work / f"stage{self.stage}"
        written = []
        for i, layer in items:
            path = d / f"layer{i}.safetensors"
            save_module(layer, path)
            self.release(layer)
            written.append((i, path, sha256_file(path)))
        for i, path, digest in written:
            self.progress["files"][f"layer{i}"] = digest
            self.digests[path] = digest
        self.progress["stats"], self.progress["finished"] = _jsonable(stage_stats), True
        self._write_progress()
        for i, path, _ in written:
            old = self.latest.get(i)
            if old is not None and old != path:
                old.unlink(missing_ok=True)
            self.latest[i] = path
        for p in d.glob("inputs*.safetensors"):
            p.unlink()

    def retype(self) -> None:
        """Give the skeleton's (meta) modules the classes the layer files hold (a calibration-free stage
        ran without the skeleton), so a stage's module-identity maps stay valid when layers are loaded."""
        from ..model import set_module
        from ..modules import MODULE_TYPES
        for i, path in self.latest.items():
            for name, spec in json.loads(SafeFile(path).metadata["modules"]).items():
                old, cls = self.layers[i].get_submodule(name), MODULE_TYPES[spec["kind"]]
                if type(old) is not cls:
                    shell = cls.__new__(cls)
                    shell.__dict__.update(old.__dict__)
                    set_module(self.layers[i], name, shell)

    # reading for the per-linear stages and the export ----------------------------------------------
    def layer_sources(self, i: int) -> tuple[dict[str, Src], dict, dict]:
        """Layer i as ({relative tensor name: source}, modules, aliases) of its current home."""
        if i in self.latest:
            f = SafeFile(self.latest[i])
            return ({k: Src(f, k) for k in f.keys()}, json.loads(f.metadata["modules"]),
                    json.loads(f.metadata["aliases"]))
        pre = f"{self.prefix}.{i}."
        return {n: self.shards.src(pre + n, self.dtype) for n in self.struct.layer_names[i]}, {}, {}

    def outside_sources(self) -> tuple[dict[str, Src], dict]:
        """Everything outside the stack as ({full name: source}, compressed modules)."""
        srcs = {n: self.shards.src(n, self.dtype) for n in self.struct.outside}
        modules: dict = {}
        if self.outside_latest is not None:
            f = SafeFile(self.outside_latest)
            modules = json.loads(f.metadata["modules"])
            comp = tuple(m + "." for m in modules)
            srcs = {n: s for n, s in srcs.items() if not n.startswith(comp)}
            srcs.update({k: Src(f, k) for k in f.keys()})
        return srcs, modules


def skeleton(folder: Path, dtype: torch.dtype) -> tuple[nn.Module, Shards]:
    """The model on the meta device. Tensors outside the decoder stack are materialized except the input
    embedding, which is read from the shards only while the model runs (the layer-0 input capture) and
    released after, and the output projection, which is never needed before the export."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..model import decoder_layers, load_config, normalize
    config = load_config(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    normalize(model)
    model.eval()
    shards = Shards(folder)
    prefix, _ = decoder_layers(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    lazy = tuple(f"{names[id(m)]}." for m in (emb, head) if m is not None)
    outside = [k for k in model.state_dict() if not k.startswith(prefix + ".")]
    missing = [k for k in outside if k not in shards.files]
    tied = getattr(model.config, "tie_word_embeddings", False)
    if missing and not (tied and all(k == "lm_head.weight" or k.endswith(".lm_head.weight") for k in missing)):
        raise UserError(f"tensors {missing[:3]} are missing from the shards in {folder}: the folder does not match config.json")
    if tied:
        model.tie_weights()
    now = [k for k in outside if k in shards.files and not k.startswith(lazy)]
    model.load_state_dict(shards.get(now, dtype), strict=False, assign=True)
    if emb is not None:
        # not resident between forwards: a one-element CPU placeholder broadcast to the full shape (a meta
        # tensor here would move the calibration ids to the meta device: layerwise reads the device of
        # the model's first parameter); materialized from the shards for the forward, released after
        pre = names[id(emb)] + "."
        keys = [pre + k for k in emb.state_dict()]

        def placeholder(mod):
            for n, p in list(mod.named_parameters(recurse=False)):
                setattr(mod, n, nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False))

        def materialize(mod, _args):
            mod.load_state_dict({k[len(pre):]: shards.src(k, dtype).tensor() for k in keys}, assign=True)

        def release(mod, _args, _out):
            placeholder(mod)
            trim_heap()

        shared = head is not None and head.weight is emb.weight
        placeholder(emb)
        if shared:                          # keep the tie visible (structure_from_model reads it as an alias)
            head.weight = emb.weight
        emb.register_forward_pre_hook(materialize)
        emb.register_forward_hook(release)
    return model, shards


# ---------------------------------------------------------------------------------------------- stages

@dataclass
class _ConfigOnly:
    """Stands in for the model where only its config is needed (the export's config.json)."""
    config: object


class RawConfig:
    """config.json as read, with attribute access: transformers.AutoConfig imports the model package
    (~85 MB resident), which a run that builds no model does not need."""

    def __init__(self, d: dict):
        self._d = d

    def __getattr__(self, name):
        try:
            return self.__dict__["_d"][name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        return dict(self._d)
