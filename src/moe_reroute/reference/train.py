"""Train the reference model from scratch: corpus -> tokenizer -> Qwen3-MoE with Qwen3-30B-A3B's router
geometry (128 experts, top-8, renormalised), checkpointed and resumable.

Load balancing acts within every layer: the Switch-style loss E * sum_e f_e * P_e is computed per layer
and summed (transformers' load_balancing_loss_func pools counts over layers first, which lets single
layers collapse).
"""

from __future__ import annotations

import json
import math
import platform
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
    train_tokens: int = 10_000_000
    lr: float = 3e-3
    warmup_steps: int = 200
    weight_decay: float = 0.1
    balance_coef: float = 0.01
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


def train_tokenizer(text_file: Path, out_dir: Path, vocab_size: int):
    """Byte-level BPE trained on the training split only; saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(text_file)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def encode(tokenizer, text_file: Path, cache: Path) -> torch.Tensor:
    if cache.exists():
        return torch.load(cache, weights_only=True)
    ids = []
    for chunk in text_file.read_text().split("\n\n"):
        ids.extend(tokenizer(chunk + "\n\n")["input_ids"])
    t = torch.tensor(ids, dtype=torch.int32)
    torch.save(t, cache)
    return t


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Sum over layers of E * sum_e f_e * P_e, each layer's own counts (1.0 per layer when balanced)."""
    total = 0.0
    for logits in router_logits:  # [N, E]
        probs = torch.softmax(logits.float(), dim=-1)
        E = probs.shape[-1]
        chosen = torch.topk(probs, top_k, dim=-1).indices
        f = torch.zeros(E, device=probs.device).scatter_add_(0, chosen.flatten(), torch.ones(chosen.numel()))
        f = f / chosen.numel()
        total = total + E * (f * probs.mean(dim=0)).sum()
    return total


def train(workdir: Path, out_dir: Path, cfg: TrainConfig = TrainConfig(), progress: bool = True) -> Path:
    """Build the corpus and tokenizer, then train (resuming from workdir/checkpoint.pt), then export."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "train.txt").exists():
        corpus.build(workdir)
    tok_dir = workdir / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer(workdir / "train.txt", tok_dir, cfg.vocab_size)
    data = encode(tokenizer, workdir / "train.txt", workdir / "train_ids.pt")

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(model_config(cfg), experts_implementation="grouped_mm")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    ckpt = workdir / "checkpoint.pt"
    step, log, elapsed = 0, [], 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        if state["config"] != asdict(cfg):
            raise RuntimeError(f"{ckpt} was made with another TrainConfig; delete it to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, log, elapsed = state["step"], state["log"], state.get("elapsed_s", 0.0)
        torch.set_rng_state(state["rng"])
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=cfg.steps, initial=step, desc="training reference model", unit="step", disable=not progress)
    t0, tokens0 = time.time(), 0
    t_last = t0
    while step < cfg.steps:
        gen.manual_seed(cfg.seed * 1_000_003 + step)  # batch of step s is fixed: resuming replays nothing
        starts = torch.randint(0, len(data) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = torch.stack([data[s : s + cfg.seq_len + 1] for s in starts]).long()
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(input_ids=batch[:, :-1], output_router_logits=True)
        logits = out.logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        bal = balance_loss(out.router_logits, cfg.top_k)
        loss = ce + cfg.balance_coef * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens0 += batch[:, :-1].numel()
        log.append({"step": step, "ce": float(ce), "balance": float(bal) / cfg.num_layers, "lr": lr})
        bar.set_postfix(ce=f"{float(ce):.3f}", bal=f"{float(bal) / cfg.num_layers:.3f}",
                        tok_s=f"{tokens0 / (time.time() - t0):.0f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            elapsed += time.time() - t_last
            t_last = time.time()
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "step": step, "log": log, "rng": torch.get_rng_state(), "elapsed_s": elapsed}, tmp)
            tmp.replace(ckpt)
    bar.close()
    return export(model, tokenizer, workdir, out_dir, cfg, log, elapsed)


def export(model, tokenizer, workdir: Path, out_dir: Path, cfg: TrainConfig, log: list, elapsed_s: float) -> Path:
    """Write the shipped files: bf16 safetensors, config, tokenizer, held-out text, training log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "heldout.txt").write_text((workdir / "heldout.txt").read_text())
    hardware = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    (out_dir / "training.json").write_text(json.dumps({"config": asdict(cfg), "log_tail": log[-20:],
                                                       "wall_minutes": round(elapsed_s / 60, 1), "hardware": hardware,
                                                       "corpus": json.loads((workdir / "corpus.json").read_text())},
                                                      indent=1))
    return out_dir


CALIBRATION_TOKENS = 2048


def calibrate_sere(workdir: Path, out_dir: Path, tokens: int = CALIBRATION_TOKENS, windows: int = 16) -> Path:
    """SERE's expert similarity (CKA) for the exported model, from `windows` evenly spaced windows of the
    training split (never the held-out text), written as sere/similarity.safetensors in the model folder (a subfolder: engines such as vLLM
    load every *.safetensors beside the weights)."""
    from transformers import AutoModelForCausalLM

    from ..hf.calibrate import calibrate_similarity, save_similarity

    data = torch.load(workdir / "train_ids.pt", weights_only=True).long()
    width = tokens // windows
    starts = torch.linspace(0, len(data) - width - 1, windows).long()
    ids = torch.stack([data[s : s + width] for s in starts])  # [windows, width]
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True).eval()
    similarity = calibrate_similarity(model, ids, method="cka", max_tokens=tokens)
    from ..measure.evaluate import SIMILARITY_FILE

    (out_dir / SIMILARITY_FILE).parent.mkdir(exist_ok=True)
    return save_similarity(similarity, out_dir / SIMILARITY_FILE, method="cka", tokens=str(tokens),
                           text=f"training split, {windows} evenly spaced windows of {width} tokens")
