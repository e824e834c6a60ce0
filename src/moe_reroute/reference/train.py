"""Train the reference model from scratch: corpus -> tokenizer -> Qwen3-MoE with Qwen3-30B-A3B's router
geometry (128 experts, top-8, renormalised), checkpointed and resumable.

Load balancing is global-batch, as in Qwen3 (Qiu et al. 2025, "Demons in the Detail", arXiv 2501.11873):
the per-layer loss E * sum_e f_e * P_e takes the expert frequencies f from a long window of recent steps
(`balance_window` steps of every domain) and the mean router probabilities P from the current batch. A
micro-batch's own f would force every batch, and so every domain, to spread over all experts; the
window's f only asks that experts stay busy over the whole mixture, which lets them specialise by domain.
Each layer has its own loss (transformers' load_balancing_loss_func pools counts over layers first, which
lets single layers collapse). An optional router z-loss (ST-MoE) keeps router logits small.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import corpus


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vocab_size: int = 8192
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    num_experts: int = 128
    top_k: int = 8
    moe_intermediate_size: int = 56
    seq_len: int = 256
    batch_size: int = 16
    train_tokens: int = 4_000_000
    lr: float = 3e-3
    warmup_steps: int = 200
    weight_decay: float = 0.1
    balance_coef: float = 0.05
    balance_window: int = 64  # steps whose expert counts make the global-batch frequencies f
    z_loss_coef: float = 0.0
    revive_below: float = 0.25  # at each checkpoint, experts under this x uniform load since the last one
    # become copies of the busiest experts (0: off); see revive()
    checkpoint_every: int = 50

    @property
    def steps(self) -> int:
        return math.ceil(self.train_tokens / (self.seq_len * self.batch_size))


def model_config(cfg: TrainConfig):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=cfg.moe_intermediate_size,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=4 * cfg.seq_len,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        router_aux_loss_coef=0.0,
    )


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int):
    """Byte-level BPE trained on the training split only (every domain, code and the other languages
    included); saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def document_ids(tokenizer, text: str) -> list[int]:
    """A document's tokens followed by the end-of-text token if the tokenizer has one (paragraphs encoded
    one by one, as in the first reference model)."""
    chunks = [c + "\n\n" for c in text.split("\n\n")]
    ids = [i for enc in tokenizer(chunks)["input_ids"] for i in enc]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def encode(tokenizer, docs: list, cache: Path) -> dict[str, torch.Tensor]:
    """Each domain's training documents as one token stream (int32), cached."""
    if cache.exists():
        return torch.load(cache, weights_only=True)
    streams: dict[str, list[int]] = {}
    for d in docs:
        streams.setdefault(d.domain, []).extend(document_ids(tokenizer, d.text))
    out = {k: torch.tensor(streams[k], dtype=torch.int32) for k in corpus.DOMAINS if k in streams}
    torch.save(out, cache)
    return out


class GlobalBalance:
    """Global-batch load balancing: per layer, E * sum_e f_e * P_e with f from the expert counts of the
    last `window` steps (this one included) and P from the current batch (1.0 per layer when balanced).

    `counts` [window, L, E] is a ring buffer of per-step top-k counts; it is saved with the checkpoint.
    """

    def __init__(self, layers: int, experts: int, window: int, top_k: int):
        self.counts = torch.zeros(window, layers, experts)  # [W, L, E]
        self.top_k = top_k

    def __call__(self, router_logits: tuple[torch.Tensor, ...], step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over layers of the global-batch loss, the same with this batch's own f, for the log)."""
        total, local = 0.0, 0.0
        slot = step % self.counts.shape[0]
        for layer, logits in enumerate(router_logits):  # [N, E]
            probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
            E = probs.shape[-1]
            chosen = torch.topk(probs, self.top_k, dim=-1).indices  # [N, K]
            c = torch.bincount(chosen.flatten(), minlength=E).float()  # [E]
            self.counts[slot, layer] = c
            f = self.counts[:, layer].sum(0)
            f = f / f.sum()
            P = probs.mean(dim=0)  # [E]
            total = total + E * (f * P).sum()
            local = local + E * (c / c.sum() * P).sum().detach()
        return total, local


@torch.no_grad()
def revive(model, opt, counts: torch.Tensor, below: float, step: int, recent: int) -> dict[int, list[list[int]]]:
    """Split the busiest experts into idle ones. In each layer, every expert whose load over the last
    `recent` steps is under `below` x uniform becomes a copy of one of the busiest experts (router row,
    with a little noise, and expert weights; its optimiser state cleared): the pair shares that expert's
    tokens and computes what it did, then the two drift apart. An idle expert cannot come back by itself:
    the balance gradient on its logit is proportional to its router probability, near zero once the router
    has learned to avoid it, and the language-model loss only reaches experts that are selected.
    Returns {layer: [[idle expert, busy expert it copied], ...]}.

    counts: [W, L, E] the balance window's per-step expert counts (step s in slot s % W).
    """
    W = counts.shape[0]
    load = counts[[(step - 1 - i) % W for i in range(min(recent, W))]].sum(0)  # [L, E]
    ratio = load / load.mean(dim=1, keepdim=True).clamp_min(1e-9)
    gen = torch.Generator().manual_seed(step)
    out = {}
    for layer, block in enumerate(model.model.layers):
        idle = torch.nonzero(ratio[layer] < below).flatten().tolist()
        if not idle or len(idle) > ratio.shape[1] // 2:
            continue
        busy = torch.argsort(ratio[layer], descending=True)[: len(idle)].tolist()
        gate = block.mlp.gate.weight  # [E, H]
        params = [gate] + [p for p in block.mlp.experts.parameters() if p.shape[0] == gate.shape[0]]  # [E, ...]
        scale = 0.01 * gate.abs().mean()
        for dst, src in zip(idle, busy):
            for prm in params:
                prm[dst] = prm[src]
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in opt.state.get(prm, {}):
                        opt.state[prm][key][dst] = 0.0
            gate[dst] += scale * torch.randn(gate.shape[1], generator=gen)
        out[layer] = [[d, b] for d, b in zip(idle, busy)]
    return out


def z_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2, summed over layers."""
    return sum(torch.logsumexp(logits.float(), dim=-1).pow(2).mean() for logits in router_logits)


def batch_rows(data: dict[str, torch.Tensor], step: int, cfg: "TrainConfig") -> torch.Tensor:
    """The fixed batch of step `step` [B, S+1]: rows cycle through the domains (every batch mixes them,
    and every domain gets the same share of training), each row a random window of its domain."""
    domains = list(data)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # resuming replays nothing
    rows = []
    for r in range(cfg.batch_size):
        stream = data[domains[(step * cfg.batch_size + r) % len(domains)]]
        s = int(torch.randint(0, len(stream) - cfg.seq_len - 1, (1,), generator=gen))
        rows.append(stream[s : s + cfg.seq_len + 1])
    return torch.stack(rows).long()


ADDED_LATER = {"revive_below": 0.0}  # TrainConfig fields newer than some checkpoints, as those ran
RESUMABLE = {"train_tokens", "balance_coef", "revive_below"}  # may change on resume; kept in schedule_changes


def train(workdir: Path, out_dir: Path, cfg: TrainConfig = TrainConfig(), progress: bool | None = None,
          stop_after: int | None = None) -> Path | None:
    """Build the corpus and tokenizer, then train (resuming from workdir/checkpoint.pt), then export.
    stop_after: checkpoint at that step and return None without exporting (resume later, maybe with another
    train_tokens or balance_coef)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from ..progress import progress as progress_bar

    workdir.mkdir(parents=True, exist_ok=True)
    if not corpus.is_built(workdir):
        corpus.build(workdir)
    docs = corpus.read_jsonl(workdir / "train.jsonl")
    tok_dir = workdir / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer([d.text for d in docs], tok_dir, cfg.vocab_size)
    data = encode(tokenizer, docs, workdir / "train_ids.pt")

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(model_config(cfg), experts_implementation="grouped_mm")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    balance = GlobalBalance(cfg.num_layers, cfg.num_experts, cfg.balance_window, cfg.top_k)
    ckpt = workdir / "checkpoint.pt"
    step, log, elapsed, schedule, revived = 0, [], 0.0, [], []
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        state["config"] = {**ADDED_LATER, **state["config"]}
        changed = {k for k, v in asdict(cfg).items() if state["config"].get(k) != v}
        if changed - RESUMABLE:
            raise RuntimeError(f"{ckpt} was made with another TrainConfig ({sorted(changed)} differ); delete it to "
                               f"start over (only {sorted(RESUMABLE)} may change on resume)")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        balance.counts = state["balance_counts"]
        step, log, elapsed = state["step"], state["log"], state.get("elapsed_s", 0.0)
        schedule = list(state.get("schedule_changes", []))
        revived = list(state.get("revived", []))
        if changed:  # e.g. a shorter run: the cosine schedule continues from here towards the new end
            schedule.append({"step": step, **{k: [state["config"][k], getattr(cfg, k)] for k in sorted(changed)}})
        torch.set_rng_state(state["rng"])
    model.train()
    tty = sys.stderr.isatty() if progress is None else progress
    bar = progress_bar(cfg.steps - step, enabled=tty, desc="training reference model", unit="step")
    t0, tokens0 = time.time(), 0
    t_last = t0
    while step < cfg.steps:
        batch = batch_rows(data, step, cfg)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(input_ids=batch[:, :-1], output_router_logits=True)
        logits = out.logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        bal, bal_local = balance(out.router_logits, step)
        loss = ce + cfg.balance_coef * bal
        z = z_loss(out.router_logits) if cfg.z_loss_coef > 0 else torch.zeros(())
        if cfg.z_loss_coef > 0:
            loss = loss + cfg.z_loss_coef * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens0 += batch[:, :-1].numel()
        L = cfg.num_layers
        log.append({"step": step, "ce": float(ce.detach()), "balance": float(bal.detach()) / L,
                    "balance_batch": float(bal_local) / L, "z": float(z.detach()) / L, "lr": lr})
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or step == stop_after:
            elapsed += time.time() - t_last
            t_last = time.time()
            if cfg.revive_below > 0 and step <= cfg.steps - 2 * cfg.checkpoint_every:  # time to learn after
                reset = revive(model, opt, balance.counts, cfg.revive_below, step, cfg.checkpoint_every)
                if reset:
                    revived.append({"step": step, "experts_reset": reset})
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "balance_counts": balance.counts, "step": step, "log": log, "rng": torch.get_rng_state(),
                        "elapsed_s": elapsed, "schedule_changes": schedule, "revived": revived}, tmp)
            tmp.replace(ckpt)
            if not tty:  # one line per checkpoint in logs, not one per step
                recent = log[-cfg.checkpoint_every:]
                mean = lambda k: sum(e[k] for e in recent) / len(recent)  # noqa: E731
                print(f"step {step}/{cfg.steps} ce {mean('ce'):.3f} balance(global) {mean('balance'):.3f} "
                      f"balance(batch) {mean('balance_batch'):.3f} lr {lr:.2e} "
                      f"{tokens0 / (time.time() - t0):.0f} tok/s, {elapsed / 60:.1f} min", flush=True)
            if step == stop_after:
                bar.close()
                return None
    bar.close()
    return export(model, tokenizer, workdir, out_dir, cfg, log, elapsed, schedule, revived)


def export(model, tokenizer, workdir: Path, out_dir: Path, cfg: TrainConfig, log: list, elapsed_s: float,
           schedule_changes: list | None = None, revived: list | None = None) -> Path:
    """Write the shipped files: bf16 safetensors, config, tokenizer, held-out text (whole, and its tuning
    and validation parts), calibration sample of the training split, training log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    held = corpus.read_jsonl(workdir / "heldout.jsonl")
    corpus.write_jsonl(out_dir / "heldout.jsonl", held)
    (out_dir / "heldout.txt").write_text("\n\n".join(d.text for d in held))  # plain text, for text readers
    from . import write_heldout_parts

    write_heldout_parts(out_dir)  # tuning.jsonl (tune on it) and validation.jsonl (evaluate on it)
    calibration = corpus.calibration_sample(corpus.read_jsonl(workdir / "train.jsonl"))
    corpus.write_jsonl(out_dir / "calibration.jsonl", calibration)  # trained on: never evaluate on it
    n = torch.get_num_threads()
    hardware = f"{platform.machine()} CPU, {n} thread{'s' if n > 1 else ''}, torch {torch.__version__}"
    (out_dir / "training.json").write_text(json.dumps({"config": asdict(cfg), "log_tail": log[-20:],
                                                       "schedule_changes": schedule_changes or [],
                                                       "revived": revived or [],
                                                       "wall_minutes": round(elapsed_s / 60, 1), "hardware": hardware,
                                                       "corpus": json.loads((workdir / "corpus.json").read_text())},
                                                      indent=1))
    return out_dir


CALIBRATION_TOKENS = 2048


def train_stream(workdir: Path) -> torch.Tensor:
    """The training split's tokens, every domain's stream one after the other in corpus.DOMAINS order."""
    data = torch.load(workdir / "train_ids.pt", weights_only=True)
    return torch.cat([data[k] for k in corpus.DOMAINS if k in data]).long()


def calibrate_sere(workdir: Path, out_dir: Path, tokens: int = CALIBRATION_TOKENS, windows: int = 16) -> Path:
    """SERE's expert similarity (CKA) for the exported model, from `windows` evenly spaced windows of the
    training split (every domain; never the held-out text), written as sere/similarity.safetensors in the
    model folder (a subfolder: engines such as vLLM load every *.safetensors beside the weights)."""
    from transformers import AutoModelForCausalLM

    from ..hf.calibrate import calibrate_similarity, save_similarity

    data = train_stream(workdir)
    width = tokens // windows
    starts = torch.linspace(0, len(data) - width - 1, windows).long()
    ids = torch.stack([data[s : s + width] for s in starts])  # [windows, width]
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True).eval()
    similarity = calibrate_similarity(model, ids, method="cka", max_tokens=tokens)
    from ..measure.evaluate import SIMILARITY_FILE

    (out_dir / SIMILARITY_FILE).parent.mkdir(exist_ok=True)
    return save_similarity(similarity, out_dir / SIMILARITY_FILE, method="cka", tokens=str(tokens),
                           text=f"training split, {windows} evenly spaced windows of {width} tokens")
