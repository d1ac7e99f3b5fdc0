"""Held-out evaluation: data selection, metrics against direct computations, generation on tiny models,
and the evaluate CLI (sasa_patcher.cli.evaluate) on a tiny safetensors artifact (plus its bad-input exits)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models as tm
from sasa_patcher.cli import evaluate as evaluate_cli
from sasa_patcher.evaluation.evaluation_report import plot_transfer, transfer_rows
from sasa_patcher.evaluation.systems import TorchSystem, generate_all, left_pad, until_eos
from sasa_patcher.evaluation.utility import perplexity, token_kl, token_nll, user_text_mask, utility_metrics
from sasa_patcher.export.checkpoint import write_safetensors_artifact
from sasa_patcher.modeling_sasa import SasaSettings
from sasa_patcher.patching import patch_model
from sasa_patcher.probes.calibration_set import builtin_calibration_set
from sasa_patcher.probes.features import encode_prompts
from sasa_patcher.probes.splits import split
from tiny_calibration import synthetic_prompts, tiny_processor

ROOT = Path(__file__).resolve().parent.parent
REFUSAL_IDS = [7, 8, 9, tm.EOS]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SASA_PATCHER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are all synchronisation and no arithmetic: with two test workers on two busy cores,
    two torch threads each made the end-to-end test 5x slower (measured: 60 s against 11 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def patched_pair(threshold: float | None = None):
    """The tiny Qwen2-VL as the base and, with the same weights, patched with a non-trivial probe."""
    base = tm.build_qwen2_vl()
    model = patch_model(tm.build_qwen2_vl(), SasaSettings(1, 3, threshold=threshold, refusal_token_ids=REFUSAL_IDS))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.sasa_probe.linear.weight.copy_(0.2 * torch.randn(model.sasa_probe.linear.weight.shape,
                                                               generator=generator))
    return base, model


# ----- utility against direct computations ------------------------------------------------------------------
def test_token_kl_matches_numpy_and_is_zero_for_identical_logits():
    generator = torch.Generator().manual_seed(0)
    p_logits = torch.randn(5, 11, generator=generator)
    q_logits = torch.randn(5, 11, generator=generator)
    assert torch.equal(token_kl(p_logits, p_logits), torch.zeros(5, dtype=torch.float64))
    p = np.exp(p_logits.double().numpy())
    p /= p.sum(-1, keepdims=True)
    q = np.exp(q_logits.double().numpy())
    q /= q.sum(-1, keepdims=True)
    expected = (p * np.log(p / q)).sum(-1)
    np.testing.assert_allclose(token_kl(p_logits, q_logits).numpy(), expected, rtol=1e-10)
    assert (expected > 0).all()


def test_nll_and_perplexity_match_a_direct_computation():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 13, generator=generator)
    targets = torch.randint(0, 13, (7,), generator=generator)
    probs = np.exp(logits.double().numpy())
    probs /= probs.sum(-1, keepdims=True)
    nll = -np.log(probs[np.arange(7), targets.numpy()])
    np.testing.assert_allclose(token_nll(logits, targets).numpy(), nll, rtol=1e-10)
    assert perplexity(token_nll(logits, targets)) == pytest.approx(math.exp(nll.mean()), rel=1e-12)
    uniform = torch.zeros(4, 13)
    assert perplexity(token_nll(uniform, torch.arange(4))) == pytest.approx(13.0)


def test_helpers_for_the_onnx_runtime():
    ids, mask = left_pad([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert until_eos([4, 5, 1, 6], {1}) == [4, 5] and until_eos([4], {1}) == [4]


# ----- tiny models --------------------------------------------------------------------------------------
def test_user_text_mask_selects_exactly_the_prompt_text():
    processor = tiny_processor("qwen2_vl")
    prompts = [p for p in synthetic_prompts(6) if p.image is None]
    batch = encode_prompts(processor, prompts)
    mask = user_text_mask(processor, prompts, batch["input_ids"])
    vocabulary = {index: token for token, index in processor.tokenizer.get_vocab().items()}
    for row, prompt in enumerate(prompts):
        chosen = "".join(vocabulary[int(i)] for i in batch["input_ids"][row][mask[row]])
        assert chosen == prompt.text.lower()  # the character tokenizer lower-cases


def test_utility_gate_is_the_base_and_augment_is_not():
    base, model = patched_pair()
    processor = tiny_processor("qwen2_vl")
    prompts = [p for p in synthetic_prompts(10) if p.image is None]
    systems = [TorchSystem("base", base, processor), TorchSystem("gate", model, processor, "gate"),
               TorchSystem("augment", model, processor, "augment")]
    figures = utility_metrics(systems, processor, prompts, batch_size=3, progress=False)
    assert figures["base"]["kl_to_base"] == 0.0
    assert figures["gate"]["kl_to_base"] < 1e-9
    assert figures["gate"]["perplexity"] == pytest.approx(figures["base"]["perplexity"], rel=1e-6)
    assert figures["augment"]["kl_to_base"] > 1e-4
    # the base's perplexity, one unpadded prompt at a time, straight from the model
    nll = []
    for prompt in prompts:
        batch = encode_prompts(processor, [prompt])
        with torch.no_grad():
            logits = base(**batch).logits[0, :-1].double()
        scored = user_text_mask(processor, [prompt], batch["input_ids"])[0, 1:]
        log_probs = torch.log_softmax(logits, -1)[scored]
        nll.append(-log_probs.gather(-1, batch["input_ids"][0, 1:][scored][:, None]).squeeze(-1))
    nll = torch.cat(nll)
    assert figures["base"]["tokens"] == len(nll) == sum(len(p.text) for p in prompts)
    assert figures["base"]["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)


@pytest.mark.parametrize("mode", ["base", "gate", "augment"])
def test_batched_generation_equals_one_by_one(mode, tmp_path):
    base, model = patched_pair()
    processor = tiny_processor("qwen2_vl")
    prompts = synthetic_prompts(9, image_dir=tmp_path)
    probe_scores = [s.unsafe_prob for s in generate_all(TorchSystem("gate", model, processor, "gate"), prompts,
                                                          batch_size=9, max_new_tokens=1, progress=False)]
    model.set_sasa(dataclasses.replace(model.sasa, threshold=float(np.median(probe_scores))))
    system = TorchSystem("base", base, processor) if mode == "base" else TorchSystem(mode, model, processor, mode)
    batched = generate_all(system, prompts, batch_size=4, max_new_tokens=6, progress=False)
    alone = [system.generate([prompt], 6)[0] for prompt in prompts]
    assert [g.text for g in batched] == [g.text for g in alone]
    if mode == "base":
        assert all(g.unsafe_prob is None for g in batched)
        return
    np.testing.assert_allclose([g.unsafe_prob for g in batched], [g.unsafe_prob for g in alone], atol=1e-5)
    np.testing.assert_allclose([g.unsafe_prob for g in batched], probe_scores, atol=1e-5)
    refusal = processor.decode(REFUSAL_IDS, skip_special_tokens=True)
    flagged = [g.text == refusal for g in batched]
    if mode == "gate":
        assert flagged == [score > model.sasa.threshold for score in probe_scores] and any(flagged)
    else:
        assert not any(flagged)  # augment never forces the refusal


# ----- the CLI end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_artifact(tiny_dir, tmp_path_factory):
    """The tiny base directory (model + processor) and the safetensors artifact of its patched copy."""
    artifact = tmp_path_factory.mktemp("tiny-eval") / "artifact"
    _, model = patched_pair(threshold=0.5)
    write_safetensors_artifact(model, tiny_processor("qwen2_vl"), tiny_dir, artifact)
    return tiny_dir, artifact


def test_cli_end_to_end_writes_the_report(tiny_artifact, tmp_path, capsys):
    base_dir, artifact = tiny_artifact
    out = tmp_path / "eval"
    code = evaluate_cli.main([str(base_dir), str(artifact), "--out", str(out), "--limit", "2", "--max-new-tokens", "3",
                     "--batch-size", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["categories.png", "evaluation.json", "evaluation.md",
                                                     "evaluation.png", "generations.jsonl"]
    report = json.loads((out / "evaluation.json").read_text())
    assert report["systems"] == ["base", "gate", "augment"] and report["runtime"] == "safetensors"
    # the built-in set's held-out side holds image prompts too (everyday questions about photos, harmful
    # requests with an image attached)
    assert report["counts"] == {"harmful_text": 2, "harmful_typographic": 2, "harmful_image": 2, "benign_text": 2,
                                "benign_typographic": 2, "benign_image": 2, "over_refusal": 2}
    metrics = report["metrics"]
    assert set(metrics) == {"asr", "refusal_rate", "flagged_rate", "probe", "by_category", "same_answer_as_base",
                            "utility"}
    assert metrics["same_answer_as_base"]["gate"] == 1.0
    assert set(metrics["asr"]) == {"harmful_text", "harmful_typographic", "harmful_image"}
    assert set(metrics["probe"]) == {"text", "typographic", "image"}
    assert set(metrics["probe"]["text"]) == {"gate", "augment"}
    assert metrics["utility"]["gate"]["kl_to_base"] < 1e-9 < metrics["utility"]["augment"]["kl_to_base"]
    assert report["sasa"]["threshold"] == 0.5 and report["seconds"]["total_s"] > 0
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 14
    assert set(records[0]) >= {"set", "category", "source_label", "text", "label", "model", "generation", "refused",
                               "unsafe_prob"}
    gate = [r for r in records if r["model"] == "gate" and r["set"] == "harmful_text"]
    flags = [r["unsafe_prob"] > 0.5 for r in gate]
    assert metrics["flagged_rate"]["harmful_text"]["gate"] == np.mean(flags)
    # per hazard: the held-out harmful text prompts of that hazard, flagged at the artifact's threshold
    harmful = metrics["by_category"]["text"]["harmful"]
    assert sum(entry["n"] for entry in harmful.values()) == 2 and all(r["category"] for r in gate)
    for category, entry in harmful.items():
        own = [r for r in gate if r["category"] == category]
        assert entry["flagged_rate"]["gate"] == np.mean([r["unsafe_prob"] > 0.5 for r in own])
        assert set(entry["refusal_rate"]) == {"base", "gate", "augment"}
    # per benign family: benign text and over-refusal prompts together
    assert sum(entry["n"] for entry in metrics["by_category"]["text"]["benign"].values()) == 4
    table = (out / "evaluation.md").read_text()
    assert "| metric | base | gate | augment |" in table and "attack success rate, harmful_typographic" in table
    assert "| side | category | n | flagged, gate | flagged, augment | refused, base | refused, gate | refused, " \
           "augment |" in table
    assert f"| harmful | {next(iter(harmful))} | " in table
    for chart in ("evaluation.png", "categories.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".eval.partial-*"))


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("not-artifact", "not a SASA artifact"),
    ("unknown-mode", "--modes takes"),
    ("onnx-missing", "no SASA ONNX artifact"),
    ("onnx-not-baked", "baked"),
    ("existing-out", "--force"),
    ("bad-limit", "--limit"),
    ("bad-threads", "--threads"),
])
def test_bad_input_exits_2_with_one_line(tiny_artifact, tmp_path, capsys, case, message):
    base_dir, artifact = tiny_artifact
    out = tmp_path / "eval"
    patched, extra = artifact, []
    if case == "missing":
        patched = tmp_path / "nowhere"
    elif case == "not-artifact":
        patched = base_dir
    elif case == "unknown-mode":
        extra = ["--modes", "gate,shield"]
    elif case == "onnx-missing":
        extra = ["--runtime", "onnx"]
    elif case == "onnx-not-baked":
        patched = tmp_path / "onnx"
        patched.mkdir()
        (patched / "sasa_onnx.json").write_text(json.dumps({"sasa": {"mode": "gate"}}))
        extra = ["--modes", "gate,augment"]
    elif case == "existing-out":
        out.mkdir()
    elif case == "bad-limit":
        extra = ["--limit", "-1"]
    elif case == "bad-threads":
        extra = ["--threads", "0"]
    code = evaluate_cli.main([str(base_dir), str(patched), "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert case == "existing-out" or not out.exists()


@pytest.mark.slow
def test_onnx_system_matches_the_pytorch_system(tmp_path):
    """The tiny patched model exported to ONNX (gate baked, ~10-30 s): the same answers, verdicts and
    scored teacher-forced logits as in PyTorch, on text prompts and on images of the supported size."""
    from sasa_patcher.evaluation.systems import OnnxSystem
    from sasa_patcher.export.onnx_export import export_onnx
    from sasa_patcher.export.onnx_runtime import OnnxVlm

    _, model = patched_pair(threshold=0.45)
    processor = tiny_processor("qwen2_vl")
    export_onnx(model, processor, tmp_path / "art" / "onnx", image_size=(56, 56))
    onnx = OnnxSystem("onnx-gate", OnnxVlm(tmp_path / "art"))
    torch_system = TorchSystem("gate", model, processor, "gate")
    prompts = synthetic_prompts(8)
    for index in (0, 3):
        path = tmp_path / f"square{index}.png"
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(path)
        prompts[index] = dataclasses.replace(prompts[index], image=path)
    expected = generate_all(torch_system, prompts, batch_size=3, max_new_tokens=5, progress=False)
    got = generate_all(onnx, prompts, batch_size=3, max_new_tokens=5, progress=False)
    assert [g.text for g in got] == [g.text for g in expected]
    np.testing.assert_allclose([g.unsafe_prob for g in got], [g.unsafe_prob for g in expected], atol=1e-5)
    assert any(g.unsafe_prob > 0.45 for g in got) and any(g.unsafe_prob <= 0.45 for g in got)
    text = [p for p in prompts if p.image is None]
    batch = encode_prompts(processor, text)
    scored = user_text_mask(processor, text, batch["input_ids"])
    torch.testing.assert_close(onnx.logits(batch)[scored], torch_system.logits(batch)[scored], rtol=0, atol=1e-4)


@pytest.mark.integration
def test_cli_on_the_embedded_model(tmp_path):
    """smol-qwen-vl, patched without calibration (untrained probe: nothing flagged), one prompt per category:
    the real chat template's user text is located exactly, and gate is the base."""
    from sasa_patcher.loading import load_model

    loaded = load_model("smol-qwen-vl")
    benign = [p for p in split(builtin_calibration_set()).heldout if p.label == 0][:4]
    batch = encode_prompts(loaded.processor, benign)
    mask = user_text_mask(loaded.processor, benign, batch["input_ids"])
    assert [loaded.processor.decode(batch["input_ids"][row][mask[row]]) for row in range(4)] == [p.text for p in benign]

    settings = SasaSettings(11, 13, threshold=0.5)
    model = patch_model(loaded.model, settings, loaded.processor.tokenizer)
    write_safetensors_artifact(model, loaded.processor, loaded.source, tmp_path / "art")
    out = tmp_path / "eval"
    code = evaluate_cli.main(["smol-qwen-vl", str(tmp_path / "art"), "--out", str(out), "--limit", "1",
                     "--max-new-tokens", "4", "--no-progress"])
    assert code == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["data"]["calibration_digest_matches_builtin"] is None  # nothing recorded: uncalibrated
    metrics = report["metrics"]
    assert set(metrics["same_answer_as_base"]) == {"gate", "augment"} and metrics["same_answer_as_base"]["gate"] == 1.0
    assert metrics["utility"]["gate"]["kl_to_base"] < 1e-6 < metrics["utility"]["augment"]["kl_to_base"]
    assert all(rate == 0.0 for rate in metrics["flagged_rate"]["harmful_text"].values())


def test_transfer_chart_reads_the_artifacts_held_out_source_figures(tmp_path):
    rate = {"rate": 0.25, "low": 0.1, "high": 0.5, "k": 2, "n": 8}
    metrics = {"loso_fpr_by_source": {"chitchat": rate, "empty": {**rate, "rate": None, "k": 0, "n": 0}},
               "loso_fpr_by_modality": {"image": rate},
               "heldout_by_modality": {"harmful_image_by_variant": {"typographic": rate}},
               "transfer": {"past-tense": {"flagged": rate}}}
    labels = [label for label, _ in transfer_rows(metrics)]
    assert labels == ["benign chitchat (held out)", "benign image prompts (held out)", "harmful image, typographic",
                      "attack: past-tense"]  # empty rates are left out
    assert plot_transfer({"base": "tiny", "calibration_metrics": metrics}, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_transfer({"base": "tiny", "calibration_metrics": {}}, tmp_path / "none.png")
