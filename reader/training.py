"""Training the reader: smol-qwen-vl's vision tower and merger learn to read; the language model stays frozen.

Two objectives, run in this order:
1. `ctc`: each merged image token is scored against the frozen token-embedding rows (cosine, plus a
   learned blank), and CTC aligns the text's tokens to the image tokens in raster order. No
   language-model pass, so a step costs a fraction of an `lm` step: it teaches recognition.
2. `lm`: the frozen language model's next-token loss on the transcription, given the image and the
   request. SmolLM2 copies only ~60-70% of a sentence placed in its context as exact token embeddings
   (measured), so recognition alone is not transcription: this stage teaches the tower to present
   what it read in the form the language model copies out.

Every batch is a pure function of (seed, stage, step), so a run resumed from a checkpoint sees exactly
the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import PreTrainedModel, ProcessorMixin
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from reader.corpus import MAX_PHRASE_WORDS, random_phrase, split_sentences, stdlib_sentences, vocabulary_words
from reader.render import Sample, font_paths, render_sample
from reader.transcribe import score, transcribe, transcription_prompt
from sasa_patcher.errors import UserInputError
from sasa_patcher.export.atomic import atomic_file
from sasa_patcher.probes.features import padding_side

# Bigger than the embedded model's seeded 2-layer, 128-wide tower, which cannot resolve glyphs; small
# enough to ship (3.0 M parameters, 12.2 MB in fp32).
READER_VISION = {
    "depth": 4,
    "embed_dim": 192,
    "num_heads": 6,
    "mlp_ratio": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
STAGES = ("ctc", "lm")
PHRASE_SHARE = 0.4
CURRICULUM_START_WORDS = 2
COSINE_SCALE = 16.0
NORM_WEIGHT = 0.1
NEGATIVES = 4096
CHECKPOINT_NAME = "checkpoint.pt"
LM_PROBE_SIZE = 8


@dataclass(frozen=True)
class ReaderSettings:
    """Everything a training run depends on; stored in every checkpoint and checked on resume."""

    seed: int = 0
    ctc_steps: int = 1500
    lm_steps: int = 200
    ctc_batch: int = 32
    lm_batch: int = 8
    ctc_lr: float = 1e-3
    lm_lr: float = 2e-4
    warmup_steps: int = 100
    # CTC steps over which the longest training text grows from 2 words to whole sentences (0: off).
    curriculum_steps: int = 0

    def steps(self, stage: str) -> int:
        return {"ctc": self.ctc_steps, "lm": self.lm_steps}[stage]

    def batch(self, stage: str) -> int:
        return {"ctc": self.ctc_batch, "lm": self.lm_batch}[stage]

    def lr(self, stage: str) -> float:
        return {"ctc": self.ctc_lr, "lm": self.lm_lr}[stage]


def fresh_tower(model: PreTrainedModel, seed: int) -> None:
    """Replace the model's vision tower and merger by a seeded, untrained reader-sized one."""
    config = Qwen2VLVisionConfig(**READER_VISION, hidden_size=model.config.text_config.hidden_size)
    torch.manual_seed(seed)
    model.model.visual = Qwen2VisionTransformerPretrainedModel(config).to(model.device)
    model.config.vision_config = config


def freeze_language_model(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """Only the tower trains; returns its parameters."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = list(model.model.visual.parameters())
    for parameter in trainable:
        parameter.requires_grad_(True)
    return trainable


class TextSource:
    """Training text: standard-library sentences (training side of the hash split) and vocabulary phrases."""

    def __init__(self, tokenizer) -> None:
        self.sentences, _ = split_sentences(stdlib_sentences())
        self.words = vocabulary_words(tokenizer)
        self.fonts = font_paths()

    def samples(self, seed: int, stage: str, step: int, count: int, max_words: int | None = None) -> list[Sample]:
        """`max_words` cuts sentences to their first words and shortens phrases (the curriculum)."""
        rng = random.Random(f"{seed}:{stage}:{step}")
        samples = []
        for _ in range(count):
            if rng.random() < PHRASE_SHARE:
                text = random_phrase(rng, self.words, max_words or MAX_PHRASE_WORDS)
            else:
                text = rng.choice(self.sentences)
                if max_words is not None:
                    text = " ".join(text.split()[:max_words])
            samples.append(render_sample(text, rng, self.fonts))
        return samples


def curriculum_words(settings: ReaderSettings, stage: str, step: int) -> int | None:
    """The longest text at this step: CTC starts on short texts, whose alignment is easy to find.

    Tried against CTC's two plateaus (uniform, then all-blank, ~1000 of the first 1500 steps); measured
    on CPU it did not shorten them (docs/reader.md). Off by default.
    """
    if stage != "ctc" or step >= settings.curriculum_steps:
        return None
    return CURRICULUM_START_WORDS + (MAX_PHRASE_WORDS - CURRICULUM_START_WORDS) * step // settings.curriculum_steps


def learning_rate(settings: ReaderSettings, stage: str, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    peak, total = settings.lr(stage), settings.steps(stage)
    if step < settings.warmup_steps:
        return peak * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, total - settings.warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class CtcObjective(torch.nn.Module):
    """CTC over the language model's own token embeddings; the blank is the one learned vector.

    The softmax runs over the batch's own tokens plus NEGATIVES random vocabulary rows, not all 49152:
    the full softmax was 80% of a step's time on CPU, and the classifier is discarded after training
    (the language model reads the image tokens directly).
    """

    def __init__(self, model: PreTrainedModel, vocabulary_size: int) -> None:
        super().__init__()
        embedding = model.get_input_embeddings().weight[:vocabulary_size].detach()
        # SmolLM2's embedding rows share a large common direction (mean pairwise cosine 0.44), which
        # squeezes a cosine classifier; centred rows are nearly orthogonal (mean cosine 0.0003).
        self.register_buffer("centre", embedding.mean(0), persistent=False)
        self.register_buffer("directions", F.normalize(embedding - self.centre, dim=-1), persistent=False)
        self.target_norm = embedding.norm(dim=-1).median().item()
        self.blank = torch.nn.Parameter(torch.randn(embedding.shape[1], device=embedding.device))

    def start_at_centre(self, model: PreTrainedModel) -> None:
        """Start the merger's output at the embedding centre, for a fresh tower only.

        A fresh merger outputs ~0, which is -centre after centring: every image token would start as
        the same direction with the same logits. Biasing the output by the centre starts them spread.
        """
        with torch.no_grad():
            model.model.visual.merger.mlp[-1].bias.copy_(self.centre)

    def forward(self, features: list[torch.Tensor], targets: list[list[int]], sample_seed: int) -> torch.Tensor:
        device = self.directions.device
        flat = torch.tensor([token for target in targets for token in target], device=device)
        generator = torch.Generator().manual_seed(sample_seed)
        negatives = torch.randint(len(self.directions), (NEGATIVES,), generator=generator).to(device)
        classes = torch.unique(torch.cat([flat, negatives]))
        lengths = torch.tensor([len(f) for f in features])
        padded = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)  # (B, T, D)
        unit = F.normalize(padded - self.centre, dim=-1)
        logits = COSINE_SCALE * torch.cat(
            [unit @ F.normalize(self.blank, dim=0)[:, None], unit @ self.directions[classes].T], dim=-1
        )
        log_probs = logits.log_softmax(-1).transpose(0, 1)  # (T, B, 1 + classes)
        labels = torch.searchsorted(classes, flat) + 1
        ctc = F.ctc_loss(
            log_probs, labels, lengths, torch.tensor([len(t) for t in targets]), blank=0, zero_infinity=True
        )
        norms = torch.cat(features).norm(dim=-1)
        return ctc + NORM_WEIGHT * ((norms / self.target_norm - 1) ** 2).mean()

    @torch.no_grad()
    def read(self, features: list[torch.Tensor]) -> list[list[int]]:
        """Greedy CTC decoding over the whole vocabulary: best class per image token, repeats merged, blanks dropped."""
        blank = F.normalize(self.blank, dim=0)[:, None]
        tokens = []
        for image in features:
            unit = F.normalize(image - self.centre, dim=-1)
            best = torch.cat([unit @ blank, unit @ self.directions.T], dim=-1).argmax(-1).tolist()
            merged = [label for i, label in enumerate(best) if i == 0 or label != best[i - 1]]
            tokens.append([label - 1 for label in merged if label != 0])
        return tokens


def merged_token_counts(model: PreTrainedModel, grid_thw: torch.Tensor) -> list[int]:
    """How many image tokens each image becomes after the merger (one per 2x2 patches)."""
    return (grid_thw.prod(-1) // model.model.visual.spatial_merge_size**2).tolist()


def image_features(model: PreTrainedModel, inputs) -> list[torch.Tensor]:
    """The merged image tokens the language model would receive, one tensor per image."""
    features = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    return list(torch.split(features, merged_token_counts(model, inputs["image_grid_thw"])))


def ctc_loss(
    model: PreTrainedModel, processor: ProcessorMixin, objective: CtcObjective, samples: list[Sample], seed: int
) -> torch.Tensor:
    inputs = processor.image_processor(images=[s.image for s in samples], return_tensors="pt").to(model.device)
    targets = [processor.tokenizer(s.text, add_special_tokens=False).input_ids for s in samples]
    return objective(image_features(model, inputs), targets, seed)


@torch.no_grad()
def progress_score(
    stage: str, model: PreTrainedModel, processor: ProcessorMixin, objective: CtcObjective, samples: list[Sample]
) -> dict[str, float]:
    """Held-out token accuracy of what the stage trains: greedy CTC reading (no language model, ~1 s for
    32 images on CPU) in `ctc`, the language model's transcription (generation: its first LM_PROBE_SIZE
    samples only) in `lm`."""
    if stage == "lm":
        samples = samples[:LM_PROBE_SIZE]
        answers = transcribe(model, processor, [s.image for s in samples])
    else:
        inputs = processor.image_processor(images=[s.image for s in samples], return_tensors="pt").to(model.device)
        answers = processor.tokenizer.batch_decode(objective.read(image_features(model, inputs)))
    return score([s.text for s in samples], answers, processor.tokenizer)


def lm_loss(model: PreTrainedModel, processor: ProcessorMixin, samples: list[Sample]) -> torch.Tensor:
    """Next-token loss on `text<|im_end|>` after the chat-formatted transcription request."""
    tokenizer = processor.tokenizer
    prompt = transcription_prompt(processor)
    texts = [prompt + s.text + "<|im_end|>" for s in samples]
    with padding_side(processor, "right"):
        inputs = processor(text=texts, images=[s.image for s in samples], padding=True, return_tensors="pt")
    inputs = inputs.to(model.device)
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    image_tokens = merged_token_counts(model, inputs["image_grid_thw"])
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids) - 1
    for row, count in enumerate(image_tokens):
        labels[row, : prompt_tokens + count] = -100
    return model(**inputs, labels=labels).loss


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a run killed mid-write keeps the previous checkpoint."""
    with atomic_file(path) as partial:
        torch.save(state, partial)


def load_checkpoint(path: Path, settings: ReaderSettings) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["settings"] != dataclasses.asdict(settings):
        raise UserInputError(
            f"{path} was written with other settings ({state['settings']}); resume with the same ones or pass --restart"
        )
    return state


def save_tower(model: PreTrainedModel, path: Path) -> None:
    """The shipped artifact: the tower and merger weights only, fp32, in safetensors."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.model.visual.state_dict().items()}
    with atomic_file(path) as partial:
        save_file(tensors, partial, metadata={"format": "pt", "vision_config": str(READER_VISION)})
