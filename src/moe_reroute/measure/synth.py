"""Real-shaped checkpoints with random weights, for engine benchmarks where no weights can be downloaded.

`write(shape, layers, out)` writes a transformers checkpoint with the per-layer dimensions of a known
model (`shapes.SHAPES` for the MoE layer, `shapes.ARCHITECTURES` for the rest), `layers` decoder layers,
a small vocabulary and the reference model's tokenizer, so that vLLM and transformers load it by path.
Random router weights route close to uniformly: U is higher than a trained model's, so every report
made on such a checkpoint says so (`synth.json` in the folder marks it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .shapes import ARCHITECTURES, SHAPES, LayerShape

MARKER = "synth.json"  # written into the checkpoint folder; reports read it to label the numbers
SHARD_BYTES = 2 * 1024**3
INIT_STD = 0.02  # transformers' initializer_range for every family here
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GIB = 1024**3


def shape_names() -> list[str]:
    return list(ARCHITECTURES)


@dataclass(frozen=True)
class Plan:
    """What `write` will make: the config, the parameter count and the disk and memory it needs."""

    name: str
    shape: LayerShape
    config: object  # a transformers PretrainedConfig
    layers: int
    dense_layers: int
    params: int
    dtype: torch.dtype

    @property
    def bytes(self) -> int:
        return self.params * torch.empty((), dtype=self.dtype).element_size()

    @property
    def disk_bytes(self) -> int:
        return self.bytes + 64 * 1024**2  # index, config, tokenizer

    @property
    def memory_bytes(self) -> int:
        # the whole model in `dtype`, plus one shard being serialised
        return self.bytes + min(self.bytes, SHARD_BYTES) + 512 * 1024**2

    def engine_memory_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """About what an engine needs to hold the weights in `dtype` (KV cache and activations not counted)."""
        return self.params * torch.empty((), dtype=dtype).element_size()

    def describe(self) -> str:
        s = self.shape
        dense = f", the first {self.dense_layers} dense" if self.dense_layers else ""
        return (f"{self.name.split(' with ')[0]}: {self.layers} decoder layers{dense}, {s.dims()}, "
                f"vocabulary {self.config.vocab_size}; "
                f"{self.params / 1e9:.2f}B parameters, {self.bytes / GIB:.1f} GiB in {str(self.dtype).removeprefix('torch.')}")


def plan(name: str, layers: int, dtype: torch.dtype = torch.bfloat16, vocab: int | None = None,
         dims: LayerShape | None = None) -> Plan:
    """The checkpoint `write` would make for shape `name` with `layers` decoder layers (nothing written).

    Models whose first layers are dense (DeepSeek-V3: 3) keep them, but at most layers - 1, so that at
    least one layer is MoE. `vocab` defaults to the reference tokenizer's size and may not be smaller.
    `dims` replaces the MoE layer's H, I, E, K (e.g. a small model for tests), keeping the attention of `name`.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown shape {name!r}; synth-model knows {', '.join(ARCHITECTURES)}")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"--layers must be a positive number of decoder layers, got {layers!r}")
    arch = dict(ARCHITECTURES[name])
    if layers > arch["layers"]:
        raise ValueError(f"--layers {layers}: {name} has {arch['layers']} decoder layers; give at most that")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"--dtype must be bfloat16, float16 or float32, got {dtype}")
    tokenizer_vocab = reference_vocab_size()
    vocab = tokenizer_vocab if vocab is None else vocab
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < tokenizer_vocab:
        raise ValueError(f"--vocab must be at least the reference tokenizer's {tokenizer_vocab} tokens, got {vocab!r}")
    shape = SHAPES[name] if dims is None else dims
    config, dense = _config(shape, arch, layers, vocab)
    if dims is not None:  # the router of `name` with these E and K (e.g. DeepSeek-V3's groups must split E)
        from ..contract import RouterSpec

        try:
            RouterSpec.from_config(config)
        except ValueError as e:
            raise ValueError(f"--dims {dims.dims()} does not fit {name}'s router: {e}; give an E and K it takes") from None
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    label = name if dims is None else f"{name} with {dims.dims()}"
    return Plan(label, shape, config, layers, dense, params, dtype)


def _config(s: LayerShape, arch: dict, layers: int, vocab: int):
    from transformers import AutoConfig

    model_type = arch.pop("model_type")
    arch.pop("layers")
    dense = min(arch.pop("dense_layers"), layers - 1)
    rope = arch.pop("rope_theta", None)
    moe = {
        "qwen3_moe": dict(moe_intermediate_size=s.intermediate, num_experts=s.num_experts),
        "deepseek_v3": dict(moe_intermediate_size=s.intermediate, n_routed_experts=s.num_experts,
                            first_k_dense_replace=dense),
        "mixtral": dict(intermediate_size=s.intermediate, num_local_experts=s.num_experts),
        "olmoe": dict(intermediate_size=s.intermediate, num_experts=s.num_experts),
        "gpt_oss": dict(intermediate_size=s.intermediate, num_local_experts=s.num_experts,
                        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]),
    }[model_type]
    if rope is not None:
        arch["rope_parameters"] = {"rope_theta": rope, "rope_type": "default"}
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=s.hidden, num_hidden_layers=layers, num_experts_per_tok=s.top_k,
        max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=INIT_STD, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, **moe, **arch)
    config.architectures = [type_name(model_type)]
    return config, dense


def type_name(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def reference_vocab_size() -> int:
    from .. import reference

    config = json.loads((reference.path() / "config.json").read_text())
    return int(config["vocab_size"])


def check_room(p: Plan, out: Path) -> None:
    """Refuse, saying how much is needed and how much there is, when the disk or memory cannot hold it."""
    base = out.absolute()
    while not base.exists():
        base = base.parent
    free = shutil.disk_usage(base).free
    if p.disk_bytes > free:
        raise ValueError(f"{p.name} with {p.layers} layers needs {p.disk_bytes / GIB:.1f} GiB on disk and {base} has "
                         f"{free / GIB:.1f} GiB free; give fewer --layers or another --out")
    available = available_memory()
    if available is not None and p.memory_bytes > available:
        raise ValueError(f"{p.name} with {p.layers} layers needs {p.memory_bytes / GIB:.1f} GiB of memory to write and "
                         f"{available / GIB:.1f} GiB is available; give fewer --layers")


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def write(p: Plan, out: str | Path, seed: int = 0, progress: bool = True) -> Path:
    """Write the checkpoint `p` to `out` (a new or empty folder): random weights (normal, std 0.02; norms 1,
    biases and DeepSeek's correction bias 0), the reference tokenizer, and `synth.json` describing it."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; give a new folder")
    check_room(p, out)
    # written into a temporary folder beside `out` and renamed to it at the end: an error or Ctrl-C part-way
    # leaves no partial checkpoint (and no folder that a second run would refuse as not empty)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    final, out = out, Path(tempfile.mkdtemp(dir=out.absolute().parent, prefix=f".{out.name}.partial-"))
    try:
        _write_into(p, out, seed, progress)
        os.chmod(out, 0o755)
        if final.exists():
            final.rmdir()  # empty (checked above)
        out.rename(final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return final


def _write_into(p: Plan, out: Path, seed: int, progress: bool) -> None:
    from transformers import AutoModelForCausalLM

    from .. import reference
    from ..progress import progress as bar

    t0 = time.time()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(p.config, dtype=p.dtype)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    params = list(model.named_parameters())
    b = bar(len(params), enabled=progress, desc="random weights", unit="tensor")
    with torch.no_grad():
        for name, t in params:
            if t.dim() >= 2:
                t.normal_(0.0, INIT_STD, generator=g)
            elif "norm" in name.rsplit(".", 2)[-2] and name.endswith(".weight"):  # RMSNorm / LayerNorm scales
                t.fill_(1.0)
            else:
                t.zero_()
            b.update()
    b.close()
    for _, buf in model.named_buffers():  # non-persistent (rotary tables): not saved, but keep them finite
        if buf.is_floating_point():
            buf.zero_()
    model.save_pretrained(out, max_shard_size=SHARD_BYTES)
    for f in TOKENIZER_FILES:
        shutil.copy(reference.path() / f, out / f)
    marker = {"shape": p.name, "layers": p.layers, "dense_layers": p.dense_layers, "params": p.params,
              "dtype": str(p.dtype).removeprefix("torch."), "seed": seed, "random_weights": True,
              "note": "random weights: routing is close to uniform, so U is higher than a trained model's",
              "seconds": round(time.time() - t0, 1)}
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    for f in out.iterdir():  # save_pretrained writes shards 0600
        os.chmod(f, 0o644)


def read_marker(model: str | Path) -> dict | None:
    """The `synth.json` of a checkpoint folder written by `write`, or None for any other model."""
    f = Path(model) / MARKER
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None
