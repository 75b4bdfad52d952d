"""GRPO end to end on rollstream: sample from a vLLM deployment, learn, push
the new weights back, sample from them, with zero train/inference mismatch.

    python -m rollstream.examples.grpo                   # the demo: a tiny model learns a task
    python -m rollstream.examples.grpo --model DIR --replicas 2 --steps 50

The loop, written against rollstream's public API only:

1. A DeploymentManager brings up the policy's deployment (local processes or
   Ray actors); a WeightSyncer hot-loads the trainer's initial weights.
2. Each step samples a group of completions per prompt with top-k/top-p,
   through the deployment's replicas, with the engine's logprobs of the
   distribution it sampled from, the sampling masks (the kept token ids of
   every sampled token) and the weight version of every token.
3. The reward is computed from the sampled text (verifiable, no logprobs).
4. The trainer recomputes the logprobs of the sampled tokens on the masked
   logits (the same truncated distribution the engine sampled from) and
   takes a GRPO step (group-normalised advantages, clipped ratio against the
   engine's logprobs as the behaviour policy).
5. The new weights go back as a delta snapshot, verified on every replica
   before it serves them; the next step samples from them.

The task: the prompt is a letter (a-h); the reward is the fraction of the
first four letters of the answer equal to it. The demo's model (rollstream's
41-token character-level Qwen3, random weights) starts near 0 and learns it
in a couple of minutes on two CPU cores. With ``--model`` (any local Hugging
Face checkpoint) the prompt asks for it in words.

Every step reports the largest difference between the trainer's and the
engine's logprobs with the masks (float32: below 1e-4) and without them (the
error of ignoring top-k/top-p), and checks that every sample came from the
snapshot the trainer saved last. Metrics go to ``metrics.jsonl`` and a plot
to ``grpo.png`` in the run directory the output names.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LETTERS = "abcdefgh"


@dataclass
class GRPOConfig:
    """Every knob of the loop (the command line's flags)."""

    model: str | None = None  # None: rollstream's character-level demo model
    steps: int = 24
    prompts: int = 16  # prompts per step
    group: int = 16  # samples per prompt
    max_tokens: int = 4
    temperature: float = 1.0
    top_k: int = 16
    top_p: float = 0.95
    lr: float = 3e-3
    clip: float = 0.2
    replicas: int = 1
    backend: str = "local"
    ray_address: str | None = None
    seed: int = 0
    run_dir: str | None = None
    keep: bool = False  # keep the deployment running afterwards
    quiet: bool = False


@dataclass
class StepRecord:
    """What one step measured (one line of metrics.jsonl)."""

    step: int
    version: str  # the snapshot the samples must come from
    reward: float
    max_diff_masked: float
    max_diff_unmasked: float
    versions_ok: bool
    sampled_tokens: int
    sample_s: float
    train_s: float
    snapshot_s: float
    hotload_s: float
    step_s: float
    tokens_per_s: float
    delta_bytes: int
    full_bytes: int
    rollstream_s: float  # client CPU while sampling + snapshot encode + client CPU while hot-loading
    hotload_paused_s: float = 0.0
    weight_versions: list[str] = field(default_factory=list)

    @property
    def rollstream_share(self) -> float:
        return self.rollstream_s / self.step_s if self.step_s else 0.0


def reward(text: str, letter: str, length: int = 4) -> float:
    """Fraction of the first ``length`` letters of ``text`` equal to ``letter``."""
    letters = [c for c in text.lower() if c.isalpha()][:length]
    return sum(c == letter for c in letters) / length


def prompt(letter: str, words: bool) -> list[dict[str, str]]:
    content = f"Repeat the letter {letter} four times, and write nothing else." if words else letter
    return [{"role": "user", "content": content}]


def run(cfg: GRPOConfig) -> list[StepRecord]:
    """The loop; returns one record per step."""
    import torch
    import transformers

    from rollstream import AdaptiveConcurrencyController, ChatTokenizer, DeploymentSampler
    from rollstream.deployment import DeploymentConfig, DeploymentManager, WeightSyncer, default_shape
    from rollstream.masks import apply_sampling_mask
    from rollstream.testing import char_model

    run_dir = Path(cfg.run_dir or f"runs/grpo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if cfg.quiet else print
    say(f"run directory: {run_dir}")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model_dir = Path(cfg.model).resolve() if cfg.model else char_model(run_dir / "model", seed=cfg.seed)
    words = cfg.model is not None

    # 1. The deployment, and the trainer's copy of the same weights.
    mgr = DeploymentManager(
        cfg.backend,
        state_dir=run_dir / "deployments",
        backend_options={"address": cfg.ray_address} if cfg.ray_address else None,
    )
    cpu = default_shape() == "cpu-small"
    config = DeploymentConfig(
        deployment_id="grpo",
        base_model=str(model_dir),
        min_replica_count=cfg.replicas,
        deployment_shape=default_shape(),
        # A step's 256 short requests should not queue 8 at a time.
        extra_args=["--max-num-seqs", "64"] if cpu else None,
    )
    t0 = time.perf_counter()
    mgr.create_or_get(config, force_recreate=True)
    say(f"starting {cfg.replicas} vLLM replica(s) of {model_dir.name} ({config.deployment_shape})...")
    info = mgr.wait_for_ready("grpo", timeout_s=1800)
    say(f"deployment ready after {time.perf_counter() - t0:.0f} s: " + ", ".join(info.replica_urls))

    if cpu:
        # The engine's replicas run on this machine's cores too: a trainer
        # with as many threads as cores fights them (10x slower steps here).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    dtype = torch.float32 if cpu else torch.bfloat16
    policy: Any = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    device = "cpu" if cpu else "cuda"
    policy.to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    syncer = WeightSyncer(
        policy, deploy_mgr=mgr, deployment_id="grpo", base_model=str(model_dir), hotload_timeout=600
    )
    syncer.save_and_hotload("step-0", checkpoint_type="base")
    full_bytes = syncer.last_snapshot.nbytes if syncer.last_snapshot else 0
    mgr.warmup(str(info.inference_model))

    tokenizer = ChatTokenizer.from_pretrained(model_dir)
    sampler = DeploymentSampler(
        inference_url=mgr.inference_url,
        model=str(info.inference_model),
        tokenizer=tokenizer,
        endpoint="generate",  # weight versions per token, sampling masks
        concurrency_controller=AdaptiveConcurrencyController(initial_window=64),
    )
    records: list[StepRecord] = []
    metrics = (run_dir / "metrics.jsonl").open("w")
    # torch and transformers leave millions of long-lived objects: without
    # this, every full garbage collection rescans them (tens of ms, at random
    # points of the loop).
    gc.collect()
    gc.freeze()
    try:
        for step in range(cfg.steps):
            version = syncer.chain.loaded_identity or "step-0"
            t_step = time.perf_counter()

            # 2. Sample: a group per prompt, with logprobs, masks and versions.
            letters = [random.choice(LETTERS) for _ in range(cfg.prompts)]
            t, cpu0 = time.perf_counter(), time.process_time()
            groups = asyncio.run(_sample(sampler, letters, words, cfg, step))
            sample_s, sample_cpu = time.perf_counter() - t, time.process_time() - cpu0

            # 3. Reward, from the text alone.
            rewards = [
                [reward(tokenizer.decode(c.completion_ids), letter) for c in g]
                for letter, g in zip(letters, groups, strict=True)
            ]
            samples = [c for g in groups for c in g]
            versions = sorted({v.version for c in samples for v in c.weight_versions})

            # 4. Train on the masked logits.
            t = time.perf_counter()
            masked_diff, unmasked_diff = _grpo_step(
                policy, optimizer, groups, rewards, cfg, device, apply_sampling_mask, torch
            )
            train_s = time.perf_counter() - t

            # 5. Push the new weights back (a verified delta hot-load).
            cpu1 = time.process_time()
            syncer.save_and_hotload(f"step-{step + 1}")
            hotload_cpu = time.process_time() - cpu1 - syncer.last_timing.get("save_time_s", 0.0)
            snap = syncer.last_snapshot
            step_s = time.perf_counter() - t_step

            tokens = sum(c.completion_len for c in samples)
            rec = StepRecord(
                step=step,
                version=version,
                reward=sum(map(sum, rewards)) / len(samples),
                max_diff_masked=masked_diff,
                max_diff_unmasked=unmasked_diff,
                versions_ok=versions == [version],
                sampled_tokens=tokens,
                sample_s=sample_s,
                train_s=train_s,
                snapshot_s=syncer.last_timing.get("save_time_s", 0.0),
                hotload_s=syncer.last_timing.get("hotload_time_s", 0.0),
                step_s=step_s,
                tokens_per_s=tokens / sample_s if sample_s else 0.0,
                delta_bytes=snap.nbytes if snap else 0,
                full_bytes=full_bytes,
                rollstream_s=sample_cpu + syncer.last_timing.get("save_time_s", 0.0) + max(hotload_cpu, 0.0),
                hotload_paused_s=syncer.last_timing.get("hotload_paused_window_s", 0.0),
                weight_versions=versions,
            )
            records.append(rec)
            metrics.write(json.dumps({**asdict(rec), "rollstream_share": rec.rollstream_share}) + "\n")
            metrics.flush()
            say(_line(rec))
    finally:
        metrics.close()
        sampler.close()
        if not cfg.keep:
            mgr.delete("grpo")
        mgr.close()
    if not cfg.quiet:
        print(_table(records))
        plot = _plot(records, run_dir / "grpo.png")
        print(f"\nmetrics: {run_dir / 'metrics.jsonl'}" + (f"\nplot:    {plot}" if plot else ""))
    return records


async def _sample(
    sampler: Any, letters: Sequence[str], words: bool, cfg: GRPOConfig, step: int
) -> list[list[Any]]:
    """One group per prompt, all in flight at once (the concurrency controller
    keeps the replicas' queues full); a progress bar over prompts."""
    bar = None
    if not cfg.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(letters), desc=f"step {step:>3} sampling", unit="prompt", leave=False)

    async def one(i: int, letter: str) -> list[Any]:
        try:
            return list(
                await sampler.sample_with_tokens(
                    prompt(letter, words),
                    n=cfg.group,
                    max_tokens=cfg.max_tokens,
                    temperature=cfg.temperature,
                    top_k=cfg.top_k,
                    top_p=cfg.top_p,
                    logprobs=True,
                    sampling_mask=True,
                    seed=cfg.seed * 1_000_003 + step * 1009 + i,
                )
            )
        finally:
            if bar is not None:
                bar.update(1)

    try:
        return list(await asyncio.gather(*(one(i, letter) for i, letter in enumerate(letters))))
    finally:
        if bar is not None:
            bar.close()


def _grpo_step(
    policy: Any,
    optimizer: Any,
    groups: list[list[Any]],
    rewards: list[list[float]],
    cfg: GRPOConfig,
    device: str,
    apply_sampling_mask: Any,
    torch: Any,
) -> tuple[float, float]:
    """One GRPO update; returns the largest |trainer - engine| logprob over
    the sampled tokens, with and without the sampling masks."""
    policy.train()
    optimizer.zero_grad(set_to_none=True)
    samples = [
        (c, float(adv))
        for group, rs in zip(groups, rewards, strict=True)
        for c, adv in zip(group, _advantages(rs, torch), strict=True)
        if c.completion_len
    ]
    n_tokens = sum(c.completion_len for c, _ in samples)
    # One forward pass over every sequence (right-padded).
    width = max(len(c.full_tokens) for c, _ in samples)
    ids = torch.zeros((len(samples), width), dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    for b, (c, _) in enumerate(samples):
        ids[b, : len(c.full_tokens)] = torch.tensor(c.full_tokens)
        attention[b, : len(c.full_tokens)] = 1
    logits = policy(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
    logits = logits / cfg.temperature
    # Row t of each mask belongs to the logits that predicted completion token
    # t, i.e. position prompt_len - 1 + t.
    starts = [c.prompt_len - 1 for c, _ in samples]
    targets = ids[:, 1:].to(device)
    # The distribution the engine sampled from: top-k/top-p applied, batched.
    masked = apply_sampling_mask(
        logits[:, :-1], [c.sampling_mask for c, _ in samples], start=starts,
        keep=[ids[b, c.prompt_len : c.prompt_len + c.completion_len] for b, (c, _) in enumerate(samples)],
    )  # fmt: skip
    logp_all = masked.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    with torch.no_grad():
        full_all = logits[:, :-1].log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    losses = []
    masked_diff = unmasked_diff = 0.0
    for b, (c, adv) in enumerate(samples):
        span = slice(c.prompt_len - 1, c.prompt_len - 1 + c.completion_len)
        logp, full = logp_all[b, span], full_all[b, span]
        old = torch.tensor(c.inference_logprobs, dtype=torch.float32, device=device)
        masked_diff = max(masked_diff, float((logp.detach() - old).abs().max()))
        unmasked_diff = max(unmasked_diff, float((full - old).abs().max()))
        ratio = (logp - old).exp()
        clipped = ratio.clamp(1 - cfg.clip, 1 + cfg.clip)
        losses.append(-torch.minimum(ratio * adv, clipped * adv).sum())
    loss = torch.stack(losses).sum() / max(n_tokens, 1)
    loss.backward()
    optimizer.step()
    return masked_diff, unmasked_diff


def _advantages(rewards: list[float], torch: Any) -> list[float]:
    """Group-normalised advantages (GRPO)."""
    r = torch.tensor(rewards, dtype=torch.float32)
    return [float(a) for a in (r - r.mean()) / (r.std() + 1e-4)]


def _line(r: StepRecord) -> str:
    return (
        f"step {r.step:>3}  reward {r.reward:5.3f}  "
        f"logprob mismatch: masked {r.max_diff_masked:.1e} unmasked {r.max_diff_unmasked:5.2f}  "
        f"versions {'ok' if r.versions_ok else 'WRONG ' + str(r.weight_versions)} ({r.version})  "
        f"time: sample {r.sample_s:4.2f}s train {r.train_s:4.2f}s snapshot {r.snapshot_s:4.2f}s "
        f"hot-load {r.hotload_s:4.2f}s  {r.tokens_per_s:5.0f} tok/s  "
        f"delta {r.delta_bytes / 1e3:.0f}/{r.full_bytes / 1e3:.0f} kB  rollstream {r.rollstream_share:4.1%}"
    )


def _table(records: Sequence[StepRecord]) -> str:
    if not records:
        return "no steps"
    head = (
        f"\n{'step':>4} {'reward':>6} {'masked':>8} {'unmasked':>8} {'sample':>7} {'train':>6} "
        f"{'snap':>6} {'hotload':>7} {'step':>6} {'tok/s':>6} {'delta kB':>8} {'rollstream':>10}"
    )
    rows = [
        f"{r.step:>4} {r.reward:>6.3f} {r.max_diff_masked:>8.1e} {r.max_diff_unmasked:>8.2f} "
        f"{r.sample_s:>6.2f}s {r.train_s:>5.2f}s {r.snapshot_s:>5.2f}s {r.hotload_s:>6.2f}s "
        f"{r.step_s:>5.2f}s {r.tokens_per_s:>6.0f} {r.delta_bytes / 1e3:>8.0f} {r.rollstream_share:>10.1%}"
        for r in records
    ]
    n = len(records)

    def mean(attr: str) -> float:
        return sum(float(getattr(r, attr)) for r in records) / n

    summary = (
        f"\nreward {records[0].reward:.3f} -> {records[-1].reward:.3f}; largest logprob mismatch with masks "
        f"{max(r.max_diff_masked for r in records):.1e} "
        f"(without: {max(r.max_diff_unmasked for r in records):.2f}); "
        f"every sample from the snapshot just saved: {all(r.versions_ok for r in records)}\n"
        f"per step (mean of {n}): {mean('step_s'):.2f} s = sample {mean('sample_s'):.2f} + train "
        f"{mean('train_s'):.2f} + snapshot {mean('snapshot_s'):.2f} + hot-load {mean('hotload_s'):.2f} "
        f"(paused {mean('hotload_paused_s'):.2f}); rollstream's own share {mean('rollstream_share'):.1%}; "
        f"delta {mean('delta_bytes') / 1e3:.0f} kB vs full {records[0].full_bytes / 1e3:.0f} kB"
    )
    return "\n".join([head, *rows, summary])


def _plot(records: Sequence[StepRecord], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install 'rollstream[demo]')")
        return None
    steps = [r.step for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, [r.reward for r in records], "o-", color="tab:blue", label="mean reward")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward", color="tab:blue")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.semilogy(
        steps,
        [max(r.max_diff_masked, 1e-9) for r in records],
        "s-",
        color="tab:green",
        label="mismatch, masked",
    )
    ax2.semilogy(
        steps, [r.max_diff_unmasked for r in records], "^--", color="tab:red", label="mismatch, no masks"
    )
    ax2.axhline(1e-4, color="gray", lw=0.8, ls=":")
    ax2.set_ylabel("max |trainer - engine| logprob")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [str(h.get_label()) for h in lines], loc="upper left")
    ax.set_title("GRPO on rollstream: reward and train/inference mismatch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    d = GRPOConfig()
    p = argparse.ArgumentParser(
        prog="python -m rollstream.examples.grpo", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--model", default=d.model, help="a local Hugging Face checkpoint (default: the demo model)"
    )
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--prompts", type=int, default=d.prompts, help="prompts per step")
    p.add_argument("--group", type=int, default=d.group, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--backend", choices=("local", "ray"), default=d.backend)
    p.add_argument("--ray-address", default=d.ray_address)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--run-dir", default=d.run_dir)
    p.add_argument("--keep", action="store_true", help="leave the deployment running")
    a = p.parse_args(argv)
    cfg = GRPOConfig(**{k.replace("-", "_"): v for k, v in vars(a).items()})
    records = run(cfg)
    ok = all(r.versions_ok for r in records) and all(r.max_diff_masked < 1e-4 for r in records)
    if not ok and cfg.model is None:
        print("the trainer and the engine disagreed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
