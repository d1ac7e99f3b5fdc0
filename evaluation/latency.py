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
three alike). ONNX Runtime times one variant after the other with one session alive at a time, so a
large model's three float32 decoders never sit in memory together.

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
from functools import partial
from pathlib import Path

import numpy as np
import torch

from sasa_patcher.errors import UserInputError
from sasa_patcher.export.onnx_graphs import export_decoder
from sasa_patcher.export.onnx_runtime import text_positions
from sasa_patcher.modeling_sasa import (
    CACHE_KEY,
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


# ----- floors ---------------------------------------------------------------------------------------
def layer_floors(num_layers: int, safety_layer: int, semantic_layer: int, probe_features: str = "projected-logits",
                 probe_layers: Sequence[int] = ()) -> dict[str, float]:
    """Decoder-layer passes of each patched measure over the base model's L, as `sasa_probe_features` runs them.

    prefill (gate): all L layers of the original stream; the probe's second pass over layers s+1..L-1 only
        when it reads the projected stream (`projected-logits`, `hidden`): 1 + (L-s-1)/L. With `logits` or
        `multi-layer` the probe reads the original stream already there (one forward plus the head): 1.
    prefill_augment: the original stream up to f and the projected stream s+1..L-1, ((f+1) + (L-s-1))/L,
        plus the original layers f+1..L-1 when the probe reads them (`logits`, or `multi-layer` with a
        probe layer above f).
    decode_gate: the original stream only: 1.
    decode_augment: the two cached streams of `sasa_serving_streams`, ((f+1) + (L-s-1))/L.
    """
    layers = list(probe_layers) or (default_probe_layers(num_layers) if probe_features == "multi-layer" else [])
    SasaSettings(safety_layer, semantic_layer, probe_features=probe_features, probe_layers=layers).validate(num_layers)
    length, s, f = num_layers, safety_layer, semantic_layer
    second_pass = length - s - 1
    augment_streams = (f + 1) + second_pass
    reads_projected = probe_features in PROJECTED_FEATURES
    reads_original_above_f = probe_features == "logits" or (probe_features == "multi-layer" and max(layers) > f)
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


def compare(samples: Samples, floors: dict[str, float]) -> dict[str, dict]:
    """Each measure: patched median over baseline median, the floor, and the milliseconds behind them."""
    report = {}
    for measure, (phase, variant) in MEASURES.items():
        baseline = [seconds * 1e3 for seconds in samples["baseline"][phase]]
        patched = [seconds * 1e3 for seconds in samples[variant][phase]]
        base_ms, patched_ms = statistics.median(baseline), statistics.median(patched)
        report[measure] = {
            "ratio": patched_ms / base_ms,
            "floor": floors[measure],
            "baseline_ms": base_ms,
            "patched_ms": patched_ms,
            "baseline_samples_ms": baseline,
            "patched_samples_ms": patched,
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
                         "threads": torch.get_num_threads(), "prefill_logits": "last position"}
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
        for name, array in (("inputs_embeds", embeds), ("attention_mask", attention_mask), ("position_ids", positions)):
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


def bench_onnxruntime(model, ids: torch.Tensor, prompt_tokens: int, work_dir: Path, *, device: str = "cpu",
                      threads: int | None = None, repeats: int, warmup: int, reuse: dict[str, Path] | None = None,
                      progress: bool = False, log: Callable[[str], None] = lambda message: None) -> dict:
    """The four measures for the patched `model`'s decoder graphs in ONNX Runtime (exported into `work_dir`)."""
    providers = onnxruntime_providers(device)
    paths, export_seconds = export_decoders(model, work_dir, reuse, log)
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(ids.to(model.device)).float().cpu().numpy()
    samples: Samples = {}
    with _progress((warmup + repeats) * len(VARIANTS), "onnxruntime", progress) as bar:
        for variant in VARIANTS:
            decoder = OrtDecoder(paths[variant], providers, threads)
            samples.update(time_runs({variant: ort_runner(decoder, embeds, prompt_tokens)}, repeats, warmup,
                                     bar.update))
            del decoder  # one session alive at a time
    report = compare(samples, model_floors(model))
    report["runtime"] = {"providers": providers, "threads": threads, "prefill_logits": "all positions",
                         "export_seconds": export_seconds, "reused_graphs": sorted(reuse or {})}
    return report
