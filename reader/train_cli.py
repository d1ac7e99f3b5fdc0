#!/usr/bin/env python3
"""Train smol-qwen-vl's vision tower and merger to read rendered text (the language model stays frozen).

    python -m reader.train_cli --out build/reader            # CPU: about an hour with the defaults
    python -m reader.train_cli --out build/reader --device cuda

Re-running with the same --out resumes from the last checkpoint (same settings required); --stop-after
time-boxes a run. The result, `reader.safetensors`, holds the tower and merger only (fp32, ~12 MB):
`python -m reader.measure_cli --weights` measures it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from reader.history import write_history
from reader.measure import heldout_sentences, styled_samples
from reader.training import (
    CHECKPOINT_NAME,
    STAGES,
    CtcObjective,
    ReaderSettings,
    TextSource,
    ctc_loss,
    curriculum_words,
    freeze_language_model,
    fresh_tower,
    learning_rate,
    lm_loss,
    load_checkpoint,
    progress_score,
    save_checkpoint,
    save_tower,
)
from sasa_patcher.console import log, report_user_error
from sasa_patcher.errors import UserInputError
from sasa_patcher.loading import load_model
from sasa_patcher.smollm2 import SMOLLM2_VOCAB


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = ReaderSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/reader"), help="checkpoints and reader.safetensors")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--ctc-steps", type=int, default=defaults.ctc_steps, help="recognition steps (no LM pass)")
    parser.add_argument("--lm-steps", type=int, default=defaults.lm_steps, help="transcription steps through the LM")
    parser.add_argument("--ctc-batch", type=int, default=defaults.ctc_batch)
    parser.add_argument("--lm-batch", type=int, default=defaults.lm_batch)
    parser.add_argument("--ctc-lr", type=float, default=defaults.ctc_lr)
    parser.add_argument("--lm-lr", type=float, default=defaults.lm_lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--curriculum-steps", type=int, default=defaults.curriculum_steps,
                        help="ctc steps over which texts grow from 2 words to whole sentences (0: off)")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="steps between checkpoints (each also scores --heldout-probe held-out renderings)")
    parser.add_argument("--heldout-probe", type=int, default=32, metavar="N",
                        help="held-out renderings scored at each checkpoint (0: none; the lm stage uses 8 at most)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                        help="checkpoint and stop after this many steps in this run (time-boxed; re-run to resume)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> ReaderSettings:
    fields = {field.name for field in dataclasses.fields(ReaderSettings)}
    settings = ReaderSettings(**{name: getattr(args, name) for name in fields})
    if min(settings.ctc_steps, settings.lm_steps, settings.curriculum_steps) < 0:
        raise UserInputError("--ctc-steps, --lm-steps and --curriculum-steps must be >= 0")
    if args.heldout_probe < 0:
        raise UserInputError("--heldout-probe must be >= 0")
    if min(settings.ctc_batch, settings.lm_batch) < 1:
        raise UserInputError("--ctc-batch and --lm-batch must be >= 1")
    return settings


def train(args: argparse.Namespace) -> None:
    """Train (or resume) to the end, writing reader.safetensors, or checkpoint and stop after --stop-after steps."""
    settings = settings_from(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = args.out / CHECKPOINT_NAME

    loaded = load_model("smol-qwen-vl", dtype="float32", device=args.device)
    model, processor = loaded.model, loaded.processor
    fresh_tower(model, settings.seed)
    parameters = freeze_language_model(model)
    objective = CtcObjective(model, SMOLLM2_VOCAB).to(model.device)
    objective.start_at_centre(model)
    optimizer = torch.optim.AdamW([*parameters, objective.blank], lr=settings.ctc_lr, weight_decay=0.01)
    source = TextSource(processor.tokenizer)
    heldout_probe = styled_samples(heldout_sentences(args.heldout_probe))
    history: list[dict] = []
    stage_index, step = 0, 0
    if checkpoint_path.exists() and not args.restart:
        state = load_checkpoint(checkpoint_path, settings)
        model.model.visual.load_state_dict(state["tower"])
        objective.blank.data.copy_(state["blank"])
        optimizer.load_state_dict(state["optimizer"])
        stage_index, step, history = STAGES.index(state["stage"]), state["step"], state["history"]
        log(f"resuming at stage {state['stage']}, step {step}")
    model.train()
    started, done_this_run = time.monotonic(), 0
    for stage in STAGES[stage_index:]:
        total = settings.steps(stage)
        bar = tqdm(range(step, total), desc=f"reader {stage}", initial=step, total=total, dynamic_ncols=True)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(settings, stage, step)
            words = curriculum_words(settings, stage, step)
            samples = source.samples(settings.seed, stage, step, settings.batch(stage), words)
            if stage == "ctc":
                loss = ctc_loss(model, processor, objective, samples, settings.seed * 1_000_003 + step)
            else:
                loss = lm_loss(model, processor, samples)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            history.append({"stage": stage, "step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.3f}")
            done_this_run += 1
            stopping = args.stop_after is not None and done_this_run >= args.stop_after
            if (step + 1) % args.checkpoint_every == 0 or step + 1 == total or stopping:
                if heldout_probe:
                    model.eval()
                    progress = progress_score(stage, model, processor, objective, heldout_probe)
                    model.train()
                    history[-1]["heldout_token_accuracy"] = progress["token_accuracy"]
                    bar.write(f"{stage} step {step + 1}: held-out token accuracy {progress['token_accuracy']:.3f} "
                              f"({'greedy CTC reading' if stage == 'ctc' else 'transcription'})")
                save_checkpoint(
                    checkpoint_path,
                    {
                        "settings": dataclasses.asdict(settings),
                        "stage": stage,
                        "step": step + 1,
                        "tower": model.model.visual.state_dict(),
                        "blank": objective.blank.detach(),
                        "optimizer": optimizer.state_dict(),
                        "history": history,
                    },
                )
                write_history(history, args.out)
            if stopping:
                bar.close()
                log(f"stopped after {done_this_run} steps; re-run the same command to resume")
                return
        step = 0
    weights = args.out / "reader.safetensors"
    save_tower(model, weights)
    log(f"trained in {time.monotonic() - started:.0f} s this run; weights in {weights}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except UserInputError as error:
        return report_user_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
