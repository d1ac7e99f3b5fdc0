"""Latency of the SASA-patched decoder against the unpatched one, in PyTorch and in ONNX Runtime.

Three variants run on the same token ids (PyTorch) or the same input embeddings (ONNX Runtime):
- `baseline`: the unpatched model. PyTorch: the transformers base class's own `forward` called on
  the patched model (`patch_model` swaps the class in place and only adds modules, so the base
  forward is exactly the model before patching, on the same weights). ONNX Runtime: the decoder
  exported by the same exporter with `probe=False` (original stream only, no probe).
- `gate`, `augment`: the patched model in each serving mode.

One run = a prefill of the prompt (past length 0, T tokens) and then `decode_tokens` decode steps of
one token each, feeding the cache back; a run yields the prefill time and the mean time per decode
token. Figures are medians over repeats after untimed warm-up runs. PyTorch runs the three variants
interleaved repeat by repeat (one model, no extra memory; slow drift of a shared machine hits all
three alike). ONNX Runtime keeps one session alive at a time, so a large model's three float32
decoders never sit in memory together, and still interleaves the variants in rounds (`time_rounds`:
load a session, warm up, time a share of the repeats, release; next variant), so drift reaches every
variant, not only the one timed last.

Noise (`compare`): repeat i of the baseline and repeat i of a patched variant ran close together (the
same interleaved repeat, or the same round), so each measure also carries the paired ratios
patched_i / baseline_i, their median and interquartile range (min-max below 4 repeats), the
baseline's own run-to-run spread, and a verdict: "inside the noise" when the floor lies within the
paired ratios' spread, so this run cannot tell the ratio from its floor.

What each runtime computes at prefill: PyTorch keeps the logits of the last position only
(`logits_to_keep=1`, what `generate` does); the ONNX decoder graph returns the logits of every
position, in the baseline graph as in the patched ones.

Floors (`layer_floors`) count decoder-layer passes relative to the base model's L. Work outside the
layers (embedding, final norm, lm_head, the projection, the probe) is left out, so a measured ratio
can sit below its floor when that shared work is large (the ONNX prefill's lm_head over all T
positions), and above it by the patch's per-call overhead.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path

import numpy as np
import torch

from sasa_patcher.errors import UserInputError
from sasa_patcher.export.onnx_graphs import export_decoder
from sasa_patcher.export.onnx_runtime import text_positions
from sasa_patcher.modeling_sasa import (
    CACHE_KEY,
    MULTI_LAYER_FEATURES,
    PROJECTED_FEATURES,
    SasaSettings,
    default_probe_layers,
    transformers_base_class,
)
from sasa_patcher.patching import temporary_settings

VARIANTS = ("baseline", "gate", "augment")
# measure -> (phase, patched variant); every measure is that variant's median over the baseline's.
MEASURES = {
    "prefill": ("prefill", "gate"),
    "prefill_augment": ("prefill", "augment"),
    "decode_gate": ("decode", "gate"),
    "decode_augment": ("decode", "augment"),
}
# Multimodal placeholder ids: a prompt must not contain them, or the models would expect images.
MULTIMODAL_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")

Runner = Callable[[], tuple[float, float]]  # one run -> (prefill seconds, mean seconds per decode token)
Samples = dict[str, dict[str, list[float]]]  # variant -> phase ("prefill" | "decode") -> seconds per repeat
# Below this many repeats the quartiles of the paired ratios mean little: the spread is their min-max.
IQR_MIN_REPEATS = 4
INSIDE, ABOVE, BELOW, NO_SPREAD = "inside the noise", "above the floor", "below the floor", "no spread: 1 repeat"
# ONNX Runtime: at most this many rounds of load session -> time -> release per variant (see `ort_rounds`).
ORT_MAX_ROUNDS = 5


# ----- floors ---------------------------------------------------------------------------------------
def layer_floors(num_layers: int, safety_layer: int, semantic_layer: int, probe_features: str = "projected-logits",
                 probe_layers: Sequence[int] = ()) -> dict[str, float]:
    """Decoder-layer passes of each patched measure over the base model's L, as `sasa_probe_features` runs them.

    prefill (gate): all L layers of the original stream; the probe's second pass over layers s+1..L-1 only
        when it reads the projected stream (`projected-logits`, `hidden`): 1 + (L-s-1)/L. With `logits` or
        a multi-layer feature the probe reads the original stream already there (one forward plus the head): 1.
    prefill_augment: the original stream up to f and the projected stream s+1..L-1, ((f+1) + (L-s-1))/L,
        plus the original layers f+1..L-1 when the probe reads them (`logits`, or a multi-layer feature
        with a probe layer above f).
    decode_gate: the original stream only: 1.
    decode_augment: the two cached streams of `sasa_serving_streams`, ((f+1) + (L-s-1))/L.
    """
    layers = list(probe_layers) or (default_probe_layers(num_layers) if probe_features in MULTI_LAYER_FEATURES else [])
    SasaSettings(safety_layer, semantic_layer, probe_features=probe_features, probe_layers=layers).validate(num_layers)
    length, s, f = num_layers, safety_layer, semantic_layer
    second_pass = length - s - 1
    augment_streams = (f + 1) + second_pass
    reads_projected = probe_features in PROJECTED_FEATURES
    reads_original_above_f = probe_features == "logits" or (probe_features in MULTI_LAYER_FEATURES and max(layers) > f)
    return {
        "prefill": (length + (second_pass if reads_projected else 0)) / length,
        "prefill_augment": (augment_streams + (length - f - 1 if reads_original_above_f else 0)) / length,
        "decode_gate": 1.0,
        "decode_augment": augment_streams / length,
    }


def model_floors(model) -> dict[str, float]:
    settings = model.sasa
    return layer_floors(model.config.get_text_config().num_hidden_layers, settings.safety_layer,
                        settings.semantic_layer, settings.probe_features, settings.probe_layers)


# ----- inputs ---------------------------------------------------------------------------------------
def token_ceiling(config) -> int:
    """Ids below this are plain text tokens: the vocabulary up to the first multimodal placeholder id."""
    ids = [getattr(config, name, None) for name in MULTIMODAL_TOKEN_FIELDS]
    vocab = config.get_text_config().vocab_size
    return min([vocab, *(value for value in ids if isinstance(value, int) and value > 0)])


def bench_token_ids(config, batch: int, prompt_tokens: int, decode_tokens: int, seed: int = 0) -> torch.Tensor:
    """[batch, prompt + decode] seeded random text ids: a dense decoder's latency does not depend on them."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, token_ceiling(config), (batch, prompt_tokens + decode_tokens), generator=generator)


# ----- shared harness -------------------------------------------------------------------------------
@contextlib.contextmanager
def on_cpu(model) -> Iterator[None]:
    """The exporter traces with CPU example inputs: a GPU model visits the CPU for the export."""
    device = model.device
    model.to("cpu")
    try:
        yield
    finally:
        model.to(device)


def time_runs(runners: dict[str, Runner], repeats: int, warmup: int, advance: Callable[[], None]) -> Samples:
    """Warm-up runs, then `repeats` timed runs of every runner, interleaved repeat by repeat."""
    samples: Samples = {name: {"prefill": [], "decode": []} for name in runners}
    for repeat in range(warmup + repeats):
        for name, runner in runners.items():
            prefill, decode = runner()
            if repeat >= warmup:
                samples[name]["prefill"].append(prefill)
                samples[name]["decode"].append(decode)
            advance()
    return samples


def round_sizes(repeats: int, rounds: int) -> list[int]:
    """`repeats` shared over `rounds` (at least one repeat per round), the larger shares first."""
    rounds = max(1, min(rounds, repeats))
    return [repeats // rounds + (index < repeats % rounds) for index in range(rounds)]


def time_rounds(open_runner: Callable[[str], AbstractContextManager[Runner]], variants: Sequence[str], repeats: int,
                warmup: int, rounds: int, advance: Callable[[], None]) -> tuple[Samples, dict[str, list[float]]]:
    """`repeats` timed runs of every variant in rounds with one runner open at a time; also each opening's seconds.

    Each round opens every variant's runner in turn (the order rotated by one each round, so no variant
    always runs first or last in a round), makes `warmup` untimed runs and then its share of the
    repeats, and closes it before the next one opens. Every variant gets the same share in a round, so
    repeat i of each variant falls in the same round: the pairs `compare` divides ran within one round
    of each other. One round is the old schedule, one variant after the other.
    """
    samples: Samples = {variant: {"prefill": [], "decode": []} for variant in variants}
    opening: dict[str, list[float]] = {variant: [] for variant in variants}
    for index, size in enumerate(round_sizes(repeats, rounds)):
        shift = index % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            started = time.perf_counter()
            with open_runner(variant) as runner:
                opening[variant].append(time.perf_counter() - started)
                part = time_runs({variant: runner}, size, warmup, advance)
                del runner  # the closing context must hold the last reference, so the session goes with it
            for phase, values in part[variant].items():
                samples[variant][phase].extend(values)
    return samples, opening


def spread(values: Sequence[float]) -> tuple[str, float, float]:
    """("iqr", 25th, 75th percentile) of `values` (numpy's linear interpolation), or ("min-max", min, max)
    below `IQR_MIN_REPEATS` values."""
    if len(values) < IQR_MIN_REPEATS:
        return "min-max", float(min(values)), float(max(values))
    low, high = np.percentile(values, [25, 75])
    return "iqr", float(low), float(high)


def verdict(floor: float, low: float, high: float, repeats: int) -> str:
    """Where the floor sits against the paired ratios' spread [low, high]: within it, the measurement
    cannot tell the ratio from its floor."""
    if repeats < 2:
        return NO_SPREAD
    if low <= floor <= high:
        return INSIDE
    return ABOVE if low > floor else BELOW


def compare(samples: Samples, floors: dict[str, float]) -> dict[str, dict]:
    """Each measure: patched median over baseline median, the floor, the milliseconds behind them, and the noise.

    `ratio` is the headline (median over median). The noise comes from the paired ratios patched_i /
    baseline_i of repeat i of each variant: their median, their spread (`spread_statistic` "iqr": the
    25th-75th percentile; "min-max" below `IQR_MIN_REPEATS` repeats) as `ratio_low`-`ratio_high`, and
    the `verdict` of the floor against that spread. `baseline_spread` is the baseline's own run-to-run
    spread (same statistic) over its median.
    """
    report = {}
    for measure, (phase, variant) in MEASURES.items():
        baseline = [seconds * 1e3 for seconds in samples["baseline"][phase]]
        patched = [seconds * 1e3 for seconds in samples[variant][phase]]
        base_ms, patched_ms = statistics.median(baseline), statistics.median(patched)
        paired = [after / before for before, after in zip(baseline, patched, strict=True)]
        statistic, low, high = spread(paired)
        _, base_low, base_high = spread(baseline)
        report[measure] = {
            "ratio": patched_ms / base_ms,
            "floor": floors[measure],
            "baseline_ms": base_ms,
            "patched_ms": patched_ms,
            "baseline_samples_ms": baseline,
            "patched_samples_ms": patched,
            "paired_ratios": paired,
            "paired_ratio_median": statistics.median(paired),
            "spread_statistic": statistic,
            "ratio_low": low,
            "ratio_high": high,
            "baseline_spread": (base_high - base_low) / base_ms,
            "verdict": verdict(floors[measure], low, high, len(paired)),
        }
    return report


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="run", disable=not enabled)


# ----- PyTorch --------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_run(forward, ids: torch.Tensor, prompt_tokens: int, device: torch.device) -> tuple[float, float]:
    """Prefill `prompt_tokens`, then one decode step per remaining column of `ids`."""
    mask = torch.ones_like(ids)
    steps = ids.shape[1] - prompt_tokens
    _sync(device)
    started = time.perf_counter()
    out = forward(input_ids=ids[:, :prompt_tokens], attention_mask=mask[:, :prompt_tokens], use_cache=True,
                  logits_to_keep=1)
    _sync(device)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for position in range(prompt_tokens, ids.shape[1]):
        out = forward(input_ids=ids[:, position:position + 1], attention_mask=mask[:, :position + 1],
                      use_cache=True, **{CACHE_KEY: getattr(out, CACHE_KEY)})
    _sync(device)
    return prefill, (time.perf_counter() - started) / steps


def torch_runner(model, variant: str, ids: torch.Tensor, prompt_tokens: int) -> Runner:
    """One variant's run: the base class's forward for `baseline`, the patched forward in its mode otherwise."""
    device = model.device
    ids = ids.to(device)
    if variant == "baseline":
        forward = partial(transformers_base_class(type(model)).forward, model)
        mode = contextlib.nullcontext
    else:
        forward = partial(type(model).forward, model)
        mode = partial(temporary_settings, model, mode=variant)

    def run() -> tuple[float, float]:
        if variant == "baseline":
            model.sasa_forget_multimodal_state()
        with mode(), torch.inference_mode():
            return _torch_run(forward, ids, prompt_tokens, device)

    return run


def bench_pytorch(model, ids: torch.Tensor, prompt_tokens: int, *, repeats: int, warmup: int,
                  progress: bool = False) -> dict:
    """The four measures for the patched `model` in PyTorch; `ids` = prompt then decode tokens."""
    runners = {variant: torch_runner(model, variant, ids, prompt_tokens) for variant in VARIANTS}
    with _progress((warmup + repeats) * len(runners), "pytorch", progress) as bar:
        samples = time_runs(runners, repeats, warmup, bar.update)
    report = compare(samples, model_floors(model))
    report["runtime"] = {"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
                         "threads": torch.get_num_threads(), "prefill_logits": "last position",
                         "interleaved": True, "schedule": "variants interleaved repeat by repeat"}
    return report


# ----- ONNX Runtime ---------------------------------------------------------------------------------
def onnxruntime_providers(device: str) -> list[str]:
    """CPU: the CPU provider. CUDA: the CUDA provider (CPU for what it does not run); it must be installed."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserInputError("--device cuda with onnxruntime needs the CUDA build of onnxruntime "
                             "(pip install .[gpu], then pip uninstall onnxruntime); or pass --runtimes pytorch")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def export_decoders(model, out_dir: Path, reuse: dict[str, Path] | None = None,
                    log: Callable[[str], None] = lambda message: None) -> tuple[dict[str, Path], dict[str, float]]:
    """The baseline (probe=False), gate and augment decoder graphs of `model`: paths and export seconds.

    `reuse` names graphs already exported from this model with its current settings (the artifact's
    gate decoder), which are not exported again.
    """
    paths, seconds = dict(reuse or {}), {}
    for variant in VARIANTS:
        if variant in paths:
            continue
        paths[variant] = Path(out_dir) / f"decoder_{variant}.onnx"
        started = time.perf_counter()
        with on_cpu(model), temporary_settings(model, mode="gate" if variant == "baseline" else variant):
            export_decoder(model, paths[variant], probe=variant != "baseline")
        seconds[variant] = time.perf_counter() - started
        log(f"exported the {variant} decoder in {seconds[variant]:.1f}s")
    return paths, seconds


class OrtDecoder:
    """One decoder graph in an ONNX Runtime session, fed through IO binding.

    The cache returned by one step is bound as the next step's past where the provider keeps it, so
    on CUDA the keys and values never travel through the host between steps.
    """

    def __init__(self, path: Path, providers: list[str], threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        inputs = {value.name: value for value in self.session.get_inputs()}
        self.past_names = [name for name in inputs if name.startswith("past.")]
        # the family's extra [B, T] inputs (Gemma 3's token_type_ids): zeros, the prompts here are text only
        self.extra_names = [name for name in inputs if name not in self.past_names
                            and name not in ("inputs_embeds", "attention_mask", "position_ids")]
        self.past_dims = inputs[self.past_names[0]].shape
        self.position_rows = self._position_rows(inputs["position_ids"].shape)
        self.output_names = [value.name for value in self.session.get_outputs()]

    @staticmethod
    def _position_rows(shape: list) -> int | None:
        """Rows of a [rows, B, T] position_ids input as the graph declares it (M-RoPE: 3, or 4 with a text
        row first); None for [B, T]."""
        if len(shape) == 2:
            return None
        if len(shape) != 3 or not isinstance(shape[0], int):
            raise ValueError(f"the decoder graph's position_ids has shape {shape}: expected [B, T] or a fixed "
                             "number of rows [rows, B, T]")
        return shape[0]

    def empty_past(self, batch: int) -> list:
        import onnxruntime as ort

        shape = [batch, self.past_dims[1], 0, self.past_dims[3]]
        return [ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device, 0) for _ in self.past_names]

    def step(self, embeds: np.ndarray, attention_mask: np.ndarray, past: list) -> list:
        """One call of the graph: logits, unsafe_prob, then the presents (the next step's past), as OrtValues."""
        import onnxruntime as ort

        positions = text_positions(attention_mask)[:, -embeds.shape[1]:]
        if self.position_rows is not None:  # text-only prompts: every row holds the text positions
            positions = np.stack([positions] * self.position_rows)
        binding = self.session.io_binding()
        extra = [(name, np.zeros(embeds.shape[:2], np.int64)) for name in self.extra_names]
        for name, array in (("inputs_embeds", embeds), ("attention_mask", attention_mask), ("position_ids", positions),
                            *extra):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array),
                                                                               self.device, 0))
        for name, value in zip(self.past_names, past, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return binding.get_outputs()


def ort_runner(decoder: OrtDecoder, embeds: np.ndarray, prompt_tokens: int) -> Runner:
    """Prefill the first `prompt_tokens` embeddings, then one decode step per remaining position."""
    batch, total = embeds.shape[:2]
    mask = np.ones((batch, total), np.int64)

    def run() -> tuple[float, float]:
        started = time.perf_counter()
        past = decoder.step(embeds[:, :prompt_tokens], mask[:, :prompt_tokens], decoder.empty_past(batch))[2:]
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for position in range(prompt_tokens, total):
            past = decoder.step(embeds[:, position:position + 1], mask[:, :position + 1], past)[2:]
        return prefill, (time.perf_counter() - started) / (total - prompt_tokens)

    return run


def ort_rounds(repeats: int) -> int:
    """Rounds of the ONNX Runtime schedule: one per repeat, at most `ORT_MAX_ROUNDS`.

    Why rounds, and why capped. Holding the three sessions together would interleave for free, but
    keeps three float32 decoders resident, which is what one-session-at-a-time exists to avoid. So
    each round loads a session, warms it up, times its share and releases it. A load is not free:
    ONNX Runtime reads the graph and its weights and runs its graph optimisations (seconds for the
    embedded model on CPU, more for a multi-GiB float32 graph), and the first run on a fresh session
    pays for its memory arena (and, on CUDA, kernel selection), so every load takes its own `warmup`
    runs. Against the exports (minutes per decoder) and the timed runs, a few extra loads are cheap,
    and they buy pairs timed seconds apart instead of a whole variant's block apart. The cap bounds
    the extra cost at (ORT_MAX_ROUNDS - 1) x 3 loads and warm-ups however many repeats are asked for;
    the default 5 repeats get one repeat per round. The report keeps every load's seconds
    (`session_load_seconds`) so the cost can be judged on the machine that ran.
    """
    return max(1, min(repeats, ORT_MAX_ROUNDS))


@contextlib.contextmanager
def ort_session_runner(path: Path, providers: list[str], threads: int | None, embeds: np.ndarray,
                       prompt_tokens: int) -> Iterator[Runner]:
    """A fresh session on `path` and its runner, released on exit (the caller drops the runner first)."""
    decoder = OrtDecoder(path, providers, threads)
    try:
        yield ort_runner(decoder, embeds, prompt_tokens)
    finally:
        del decoder


def bench_onnxruntime(model, ids: torch.Tensor, prompt_tokens: int, work_dir: Path, *, device: str = "cpu",
                      threads: int | None = None, repeats: int, warmup: int, reuse: dict[str, Path] | None = None,
                      rounds: int | None = None, progress: bool = False,
                      log: Callable[[str], None] = lambda message: None) -> dict:
    """The four measures for the patched `model`'s decoder graphs in ONNX Runtime (exported into `work_dir`).

    The variants run in `rounds` (default `ort_rounds(repeats)`) of load session -> `warmup` untimed
    runs -> a share of the repeats -> release, one session alive at a time (`time_rounds`); the report
    says how (`interleaved`, `schedule`, `rounds`) and what the loads cost (`session_load_seconds`).
    """
    providers = onnxruntime_providers(device)
    paths, export_seconds = export_decoders(model, work_dir, reuse, log)
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(ids.to(model.device)).float().cpu().numpy()
    sizes = round_sizes(repeats, ort_rounds(repeats) if rounds is None else rounds)
    with _progress((warmup * len(sizes) + repeats) * len(VARIANTS), "onnxruntime", progress) as bar:
        samples, load_seconds = time_rounds(
            lambda variant: ort_session_runner(paths[variant], providers, threads, embeds, prompt_tokens),
            VARIANTS, repeats, warmup, len(sizes), bar.update)
    report = compare(samples, model_floors(model))
    if len(sizes) > 1:
        schedule = (f"{len(sizes)} rounds of load session, {warmup} warm-up, time {'/'.join(map(str, sizes))} "
                    "repeats, release; variant order rotated each round; one session alive at a time")
    else:
        schedule = "one variant after the other (one session load each); one session alive at a time"
    report["runtime"] = {"providers": providers, "threads": threads, "prefill_logits": "all positions",
                         "export_seconds": export_seconds, "reused_graphs": sorted(reuse or {}),
                         "interleaved": len(sizes) > 1, "rounds": len(sizes), "schedule": schedule,
                         "session_load_seconds": load_seconds}
    return report
