"""The patch pipeline, once: load -> patch -> calibrate -> export, as every caller runs it.

Why one function: `scripts/patch.py`, the bench and the memory measurement used to load, patch,
calibrate and export each in their own way, so the benchmark did not time what users run. Now all
of them build a `PatchOptions` and call `run_patch`, which returns what happened (artifact paths,
the calibration report, seconds and peak memory per stage). Everything checkable is checked before
the model is loaded, so bad input costs nothing and writes nothing (`UserInputError`, exit code 2).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sasa_patcher.errors import UserInputError
from sasa_patcher.memory import memory_snapshot, reset_peak
from sasa_patcher.modeling_sasa import DEFAULT_REFUSAL, PROBE_FEATURES, PROJECTION_MODES, SERVING_MODES, SasaSettings
from sasa_patcher.probes.localisation import DEFAULT_MAX_PAIRS
from sasa_patcher.tables import format_metric

FORMATS = ("safetensors", "onnx")
BASE_WEIGHTS = {"check": None, "trust": False, "save": True}  # -> write_safetensors_artifact(weights_modified=)
Log = Callable[[str], None]


@dataclass
class PatchOptions:
    """Everything one patch run needs; the CLI flags map one to one (`--no-calibration-record` negated).

    `calibration` is 'builtin', a JSONL manifest path or 'none'; `calibration_prompts` hands prompts
    in directly (the bench's balanced subsample) and then `calibration` only names them on the card.
    `base_weights` says how the base weights reach the artifact: check bytes against the base files,
    trust them, or save from memory (forced by an adapter).
    """

    out: Path
    model: str = "smol-qwen-vl"
    layers: str = "auto"
    projection: str = "replace"
    beta: float = 1.0
    eps: float = 1e-6
    mode: str = "gate"
    refusal_text: str = DEFAULT_REFUSAL
    calibration: str = "builtin"
    calibration_prompts: Sequence | None = None
    probe_features: str = "auto"
    target_fpr: float = 0.05
    policy: str = "all"  # which hazards count as harmful (probes.taxonomy.parse_policy)
    batch_size: int = 8
    semantic_pairs: int = DEFAULT_MAX_PAIRS  # image/text pairs of --layers auto's semantic curve (0: no curve)
    calibration_record: bool = True
    formats: tuple[str, ...] = FORMATS
    push_to_hub: str | None = None
    adapter: Path | None = None
    dtype: str = "auto"
    device: str = "cpu"
    force: bool = False
    base_weights: str = "check"
    allow_random_calibration: bool = False  # shape-true models (random weights) refuse calibration without it
    keep_model: bool = True  # False: the ONNX export drops the model before ONNX Runtime loads (result.model None)
    onnx_precision: str = "fp32"  # fp32 | fp16 (CUDA) | int4 (MatMulNBits): export/onnx_precision.py

    def validate(self) -> None:
        """Every check that needs no model: raises `UserInputError` naming the flag and the fix."""
        from sasa_patcher.export.atomic import check_output_dir
        from sasa_patcher.loading import check_adapter, check_device, torch_dtype

        check_output_dir(self.out, self.force)
        choices = (("projection", self.projection, PROJECTION_MODES), ("mode", self.mode, SERVING_MODES),
                   ("probe-features", self.probe_features, ("auto", *PROBE_FEATURES)),
                   ("base-weights", self.base_weights, tuple(BASE_WEIGHTS)))
        for name, value, allowed in choices:
            if value not in allowed:
                raise UserInputError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0.0 < self.target_fpr < 1.0:
            raise UserInputError(f"--target-fpr must be a rate in (0, 1), got {self.target_fpr}")
        from sasa_patcher.probes.taxonomy import parse_policy

        try:
            parse_policy(self.policy)
        except ValueError as error:
            raise UserInputError(f"--policy: {error}") from None
        if self.batch_size < 1:
            raise UserInputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.semantic_pairs < 0 or self.semantic_pairs == 1:
            raise UserInputError(f"--semantic-pairs must be 0 (no semantic curve) or at least 2, "
                                 f"got {self.semantic_pairs}")
        check_formats(self.formats, ",".join(self.formats))
        check_device(self.device)
        from sasa_patcher.export.onnx_precision import PRECISIONS

        if self.onnx_precision not in PRECISIONS:
            raise UserInputError(f"--onnx-precision must be one of {', '.join(PRECISIONS)}, "
                                 f"got {self.onnx_precision!r}")
        if self.onnx_precision != "fp32" and "onnx" not in self.formats:
            raise UserInputError(f"--onnx-precision {self.onnx_precision} converts the ONNX graphs: "
                                 "add onnx to --format")
        if "onnx" in self.formats:  # float32 and one device: say so before any work, not after calibration
            dtype = torch_dtype(self.dtype, self.device)
            if dtype != torch.float32:
                raise UserInputError(f"the ONNX export is float32, but the model would load as "
                                     f"{str(dtype).split('.')[-1]}: pass --dtype float32, or --format safetensors")
            if self.device == "auto":
                raise UserInputError("the ONNX export needs the whole model on one device: pass --device cpu or "
                                     "cuda, or --format safetensors")
        if self.adapter is not None:
            check_adapter(self.adapter)
        from sasa_patcher.shapes import check_shape_options

        check_shape_options(self.model, "prompts" if self.calibration_prompts is not None else self.calibration,
                            self.allow_random_calibration, torch_dtype(self.dtype, self.device))


def parse_formats(text: str) -> tuple[str, ...]:
    """`--format safetensors,onnx` as a tuple; an unknown or empty list is bad input."""
    formats = tuple(part.strip() for part in text.split(",") if part.strip())
    check_formats(formats, text)
    return formats


def check_formats(formats: tuple[str, ...], text: str) -> None:
    if not formats or any(part not in FORMATS for part in formats):
        raise UserInputError(f"--format takes a comma-separated subset of {', '.join(FORMATS)}, got {text!r}")


@dataclass
class PatchResult:
    """What a run did: the patched model (still in memory), where each artifact is, seconds and memory per stage.

    `seconds` has load, patch, localisation, features, fit (probe fit + leave-one-source-out),
    calibrate (all of calibration), forward_passes (the part of calibration inside the model's own
    calls), export_safetensors, export_onnx and total, for the stages that
    ran; `memory` has one `memory_snapshot` per stage (peak since the previous stage where the kernel
    allows resetting it: `peak_reset_per_stage`).
    """

    out: Path
    model: object
    processor: object
    source: Path
    num_layers: int
    layers_chosen_by: str
    calibration: object | None = None  # probes.calibrate.CalibrationReport
    artifacts: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    memory: dict[str, dict[str, int]] = field(default_factory=dict)
    peak_reset_per_stage: bool = False
    safetensors: dict | None = None  # what the checkpoint writer reports about the base weights
    hub_url: str | None = None


class StageClock:
    """Seconds and a memory snapshot per stage, the peak reset between stages (one clock per run)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.memory: dict[str, dict[str, int]] = {}
        self.peak_reset = reset_peak()
        self.mark = time.perf_counter()

    def done(self, name: str) -> float:
        """Close stage `name` (it ran since the previous one); returns its seconds."""
        now = time.perf_counter()
        self.seconds[name] = now - self.mark
        self.memory[name] = memory_snapshot()
        reset_peak()
        self.mark = now
        return self.seconds[name]


def calibration_prompts(options: PatchOptions) -> list | None:
    """The prompts to calibrate on (None: untrained probe), read before any model is loaded."""
    if options.calibration_prompts is not None:
        return list(options.calibration_prompts)
    if options.calibration == "none":
        return None
    if options.calibration == "builtin":
        from sasa_patcher.probes.calibration_set import default_calibration_set

        return default_calibration_set()
    from sasa_patcher.probes.manifest import load_manifest

    return load_manifest(Path(options.calibration))


def initial_settings(options: PatchOptions, num_layers: int) -> SasaSettings:
    """Settings before calibration: the given layers, or the fallback rule until localisation replaces them."""
    from sasa_patcher.patching import default_layers, parse_layers

    safety, semantic = default_layers(num_layers) if options.layers == "auto" else parse_layers(options.layers)
    features = "projected-logits" if options.probe_features == "auto" else options.probe_features
    from sasa_patcher.modeling_sasa import default_probe_layers

    settings = SasaSettings(safety, semantic, projection=options.projection, beta=options.beta, eps=options.eps,
                            mode=options.mode, refusal_text=options.refusal_text, probe_features=features,
                            probe_layers=default_probe_layers(num_layers))
    try:
        settings.validate(num_layers)
    except ValueError as error:
        raise UserInputError(f"--layers: {error}") from None
    return settings


def resolve(options: PatchOptions) -> tuple[Path, int]:
    """The model directory (resolved once for the whole run) and its decoder depth."""
    from transformers import AutoConfig

    from sasa_patcher.loading import check_architecture, resolve_model

    directory = resolve_model(options.model)
    check_architecture(directory)
    return directory, AutoConfig.from_pretrained(directory).get_text_config().num_hidden_layers


def load_and_patch(options: PatchOptions, directory: Path, num_layers: int, clock: StageClock, log: Log) -> PatchResult:
    """Stages 1 and 2: load the base model as given, then swap in the patched class (no weight copy)."""
    from sasa_patcher.loading import load_model
    from sasa_patcher.patching import patch_model

    settings = initial_settings(options, num_layers)
    result = PatchResult(options.out, None, None, directory, num_layers,
                         "user" if options.layers != "auto" else "default rule", seconds=clock.seconds,
                         memory=clock.memory, peak_reset_per_stage=clock.peak_reset)
    log(f"loading {options.model} ({directory})")
    loaded = load_model(options.model, dtype=options.dtype, device=options.device, adapter=options.adapter,
                        directory=directory)
    clock.done("load")
    result.model = patch_model(loaded.model, settings, loaded.processor.tokenizer)
    result.processor = loaded.processor
    clock.done("patch")
    log(f"loaded in {result.seconds['load']:.1f}s and patched in {result.seconds['patch']:.2f}s ({num_layers} "
        f"layers, s={settings.safety_layer}, f={settings.semantic_layer}, projection {settings.projection}, "
        f"mode {settings.mode})")
    return result


def run_patch(options: PatchOptions, log: Log = lambda message: None,
              resolved: tuple[Path, int] | None = None) -> PatchResult:
    """Load -> patch -> calibrate -> export into `options.out` (staged, moved into place atomically).

    `resolved` is `resolve(options)` when the caller needed the model directory first (the bench
    reads the weight size from it), so the model is still resolved only once.
    """
    from sasa_patcher.export.atomic import atomic_output_dir

    started = time.perf_counter()
    options.validate()
    from sasa_patcher.shapes import is_shape, random_weights_warning

    if is_shape(options.model):
        log(random_weights_warning(options.model))
    directory, num_layers = resolved or resolve(options)
    initial_settings(options, num_layers)  # bad --layers fails before calibration data is read
    prompts = calibration_prompts(options)
    if prompts is None and options.layers == "auto":
        log("no calibration: layers fall back to the default rule (two fifths of the depth, f = s + 2)")
    from sasa_patcher.export.atomic import check_free_disk, disk_needed

    needed = disk_needed(directory, options.out, options.formats)  # checked before the model loads
    log(f"the artifact needs about {needed / 1024**3:.1f} GiB of disk "
        f"({check_free_disk(options.out.parent, needed, f'writing {options.out}') / 1024**3:.0f} GiB free)")
    clock = StageClock()
    result = load_and_patch(options, directory, num_layers, clock, log)
    with atomic_output_dir(options.out, options.force, needed_bytes=needed, log=log) as staging:
        plot = calibrate_stage(options, result, prompts, staging, clock, log)
        export_stage(options, result, staging, plot, clock, log)
    result.artifacts = {name: options.out / path.relative_to(staging) for name, path in result.artifacts.items()}
    if options.push_to_hub:
        from sasa_patcher.export.hub import push_to_hub

        result.hub_url = push_to_hub(options.out, options.push_to_hub)
        log(f"uploaded to {result.hub_url}")
    result.seconds["total"] = time.perf_counter() - started
    return result


def calibrate_stage(options: PatchOptions, result: PatchResult, prompts: list | None, staging: Path,
                    clock: StageClock, log: Log) -> Path | None:
    """Stage 3: localise (s, f) when asked, fit the probe and its threshold; returns the localisation plot."""
    if prompts is None:
        log("probe head: untrained (zero weights, threshold +inf: nothing is flagged)")
        return None
    from sasa_patcher.patching import parse_layers
    from sasa_patcher.probes.calibrate import calibrate
    from sasa_patcher.probes.taxonomy import parse_policy

    log(f"calibrating on {len(prompts)} prompts ({options.calibration})")
    layers = "auto" if options.layers == "auto" else parse_layers(options.layers)
    transfer_sets = None
    if options.calibration == "builtin" and options.calibration_prompts is None:
        from sasa_patcher.probes.reformulation import PAST_TENSE_SOURCE, load_past_tense

        transfer_sets = {PAST_TENSE_SOURCE: load_past_tense()}  # never fitted: a transfer figure
    report = calibrate(result.model, result.processor, prompts, layers=layers, features=options.probe_features,
                       target_fpr=options.target_fpr, batch_size=options.batch_size, plot_dir=staging,
                       policy=parse_policy(options.policy), pairs="auto" if options.semantic_pairs else None,
                       max_pairs=options.semantic_pairs, log=log, transfer_sets=transfer_sets)
    clock.done("calibrate")
    result.calibration = report
    timings = report.timings  # forward passes (features, projected continuation, localisation), then fitting
    passes = ("localisation_s", "features_s", "projected_features_s", "total_s", "forward_s")
    fitting = sum(value for key, value in timings.items() if key.endswith("_s") and key not in passes)
    result.seconds.update(localisation=timings.get("localisation_s", 0.0), fit=fitting,
                          features=timings["features_s"] + timings.get("projected_features_s", 0.0),
                          forward_passes=timings["forward_s"])
    rest = timings["total_s"] - timings["forward_s"] - fitting
    log(f"calibration took {timings['total_s']:.0f}s = {timings['total_s'] / max(timings['forward_s'], 1e-9):.2f}x "
        f"the forward passes it must run ({timings['forward_s']:.0f}s inside the model's calls; probe fits and "
        f"transfer {fitting:.0f}s; curves, tokenising and feature storage {rest:.0f}s)")
    if options.layers == "auto":
        result.layers_chosen_by = "calibration"
    for line in calibration_lines(report):
        log(line)
    if options.calibration_record:
        result.artifacts["calibration_record"] = report.write_audit(staging / "calibration.jsonl")
    return next(iter(sorted(staging.glob("*.png"))), None)


def export_stage(options: PatchOptions, result: PatchResult, staging: Path, plot: Path | None, clock: StageClock,
                 log: Log) -> None:
    """Stage 4: the safetensors artifact (base files unchanged + SASA tensors), then the ONNX graphs."""
    if "safetensors" in options.formats:
        from sasa_patcher.export.checkpoint import write_safetensors_artifact

        modified = True if options.adapter else BASE_WEIGHTS[options.base_weights]
        result.safetensors = write_safetensors_artifact(result.model, result.processor, result.source, staging,
                                                        card_info=card_info(options, plot),
                                                        weights_modified=modified)
        result.artifacts["safetensors"] = staging
        log(f"safetensors artifact written in {clock.done('export_safetensors'):.1f}s")
    if "onnx" in options.formats:
        from sasa_patcher.export.onnx_export import export_onnx

        if result.model.device.type != "cpu":
            log("moving the model to the CPU for the ONNX export (traced and parity-checked there)")
            result.model = result.model.to("cpu")
        def release() -> None:  # the PyTorch weights and the parity session are never resident together
            result.model = None

        export_onnx(result.model, result.processor, staging / "onnx", log=log,
                    release_model=None if options.keep_model else release)
        result.artifacts["onnx"] = staging / "onnx"
        log(f"ONNX artifact written in {clock.done('export_onnx'):.1f}s; parity figures in "
            "onnx/parity.json")
        if options.onnx_precision != "fp32":  # after the fp32 export and its parity against PyTorch
            from sasa_patcher.export.onnx_precision_parity import replace_with_precision

            replace_with_precision(staging / "onnx", options.onnx_precision, log=log)
            log(f"ONNX graphs in {options.onnx_precision} in {clock.done('onnx_precision'):.1f}s; "
                f"{options.onnx_precision} vs fp32 figures in onnx/parity.json (precision)")


def card_info(options: PatchOptions, plot: Path | None):
    """The model card's names: licence and source models from the embedded-model registry, by exact name."""
    from sasa_patcher.embedded import EMBEDDED_PROVENANCE
    from sasa_patcher.export.model_card import CardInfo
    from sasa_patcher.loading import ALIASES

    provenance = EMBEDDED_PROVENANCE.get(options.model)
    calibration = options.calibration
    if options.calibration_prompts is not None:
        calibration = f"{calibration} ({len(options.calibration_prompts)} prompts)"
    return CardInfo(
        base_model=ALIASES.get(options.model, options.model),
        license=provenance.license if provenance else None,
        localisation_plot=plot,
        source_models=list(provenance.source_models) if provenance else [],
        calibration_data=[] if calibration == "none" else [calibration],
    )


def _rate(value: dict) -> str:
    """"0.93 (37/40)" from a `rate_with_interval` record ("n/a (0/0)" when empty)."""
    rate = "n/a" if value.get("rate") is None else f"{value['rate']:.2f}"
    return f"{rate} ({value['k']}/{value['n']})"


def calibration_lines(report) -> list[str]:
    """The calibration figures a user reads on the console: layers, probe choice, held-out and per-source AUROC."""
    held, metrics = report.heldout, report.metrics
    s, f = report.layers
    lines = [f"layers: s={s}, f={f} ({metrics.get('layers_chosen_by', 'given')})"]
    if metrics.get("candidates"):
        lines.append("probe features (AUROC: cross-validated / leave-one-category-out / leave-one-source-out): "
                     + ", ".join(f"{name} {format_metric(value.get('cv_auroc'))} / "
                                 f"{format_metric(value.get('loco_mean_auroc'))} / "
                                 f"{format_metric(value.get('loso_mean_auroc'))}"
                                 for name, value in metrics["candidates"].items())
                     + f" -> {report.feature} ({metrics.get('features_chosen_by', 'given')})")
    lines.append(f"held-out ({held['n_harmful']} harmful, {held['n_benign']} benign): AUROC {held['auroc']:.3f}, "
                 f"TPR {held['tpr']:.3f}, FPR {held['fpr']:.3f} at threshold {report.threshold:.4f} "
                 f"(target FPR {report.target_fpr:.2f} on calibration data)")
    for name, key in (("TPR", "tpr_interval"), ("FPR", "fpr_interval")):
        if metrics.get(key) and None not in metrics[key]:
            low, high = metrics[key]
            confidence = metrics.get("interval_confidence", 0.95)
            lines.append(f"  held-out {name} {confidence:.0%} interval: [{low:.3f}, {high:.3f}]")
    if metrics.get("policy") and metrics["policy"].get("allowed"):
        lines.append("policy: not counted as harmful: " + ", ".join(metrics["policy"]["allowed"]))
    for title, key in (("held-out TPR per hazard", "per_category_tpr"), ("held-out FPR per benign family",
                                                                         "per_family_fpr")):
        if metrics.get(key):
            lines.append(f"{title}: " + ", ".join(f"{name} {value['rate']:.2f} ({value['k']}/{value['n']})"
                                                  for name, value in metrics[key].items()))
    if metrics.get("loco_auroc"):
        lines.append(f"leave-one-category-out AUROC: mean {format_metric(metrics.get('loco_mean_auroc'))}; per hazard: "
                     + ", ".join(f"{name} {value:.3f}" for name, value in metrics["loco_auroc"].items()
                                 if value is not None))
    for kind, figures in (metrics.get("heldout_by_modality") or {}).items():
        if kind in ("text", "image"):
            lines.append(f"held-out {kind} prompts: AUROC {format_metric(figures['auroc'])}, "
                         f"TPR {_rate(figures['tpr'])}, FPR {_rate(figures['fpr'])}")
    for variant, value in ((metrics.get("heldout_by_modality") or {}).get("harmful_image_by_variant") or {}).items():
        lines.append(f"  held-out harmful image prompts, {variant}: flagged {_rate(value)}")
    if metrics.get("loso_fpr_by_source"):
        lines.append("leave-one-source-out FPR at the threshold: "
                     + ", ".join(f"{name} {_rate(value)}" for name, value in metrics["loso_fpr_by_source"].items())
                     + "; per modality: " + ", ".join(f"{name} {_rate(value)}" for name, value
                                                      in metrics["loso_fpr_by_modality"].items()))
    for name, value in (metrics.get("transfer") or {}).items():
        lines.append(f"transfer, {name} (never fitted): flagged {_rate(value['flagged'])}")
    if metrics.get("loso_auroc"):
        lines.append(f"leave-one-source-out AUROC: mean {format_metric(metrics.get('loso_mean_auroc'))}, "
                     f"min {format_metric(metrics.get('loso_min_auroc'))}; per source: "
                     + ", ".join(f"{name} {value:.3f}" for name, value in metrics["loso_auroc"].items()
                                 if value is not None))
    return lines
