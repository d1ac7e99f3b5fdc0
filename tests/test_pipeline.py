"""The patch pipeline on a tiny model: options checked before loading, stages timed, artifacts where it says.

Also the small modules the pipeline stands on: the embedded registry's licences, temporary settings,
the JSONL writer and the table helper.
"""

from __future__ import annotations

import json

import pytest

from sasa_patcher.embedded import EMBEDDED_MODELS, EMBEDDED_PROVENANCE
from sasa_patcher.errors import UserInputError
from sasa_patcher.jsonl import write_jsonl
from sasa_patcher.modeling_sasa import SasaSettings
from sasa_patcher.patching import patch_model, temporary_settings
from sasa_patcher.pipeline import PatchOptions, card_info, parse_formats, run_patch
from sasa_patcher.tables import escape_cell, format_metric, markdown_table, text_table
from tiny_calibration import synthetic_prompts
from tiny_models import build_qwen2_vl


@pytest.mark.parametrize("changes,message", [
    ({"target_fpr": 1.5}, "--target-fpr"),
    ({"batch_size": 0}, "--batch-size"),
    ({"semantic_pairs": 1}, "--semantic-pairs"),
    ({"semantic_pairs": -2}, "--semantic-pairs"),
    ({"formats": ("gguf",)}, "--format"),
    ({"formats": ()}, "--format"),
    ({"mode": "block"}, "--mode"),
    ({"dtype": "bfloat16"}, "float32"),
    ({"projection": "rotate"}, "--projection"),
    ({"policy": "hate,weather"}, "--policy"),
])
def test_bad_options_raise_before_loading(tmp_path, changes, message):
    options = PatchOptions(out=tmp_path / "out", model="no-such-model", **changes)
    with pytest.raises(UserInputError, match=message):
        run_patch(options)  # the unknown model would fail later: the options fail first
    assert not (tmp_path / "out").exists()


def test_parse_formats():
    assert parse_formats("safetensors, onnx") == ("safetensors", "onnx")
    with pytest.raises(UserInputError, match="--format"):
        parse_formats("safetensors,tflite")


def test_run_patch_writes_the_artifact_and_reports_stages(tiny_dir, tmp_path):
    out = tmp_path / "patched"
    lines: list[str] = []
    options = PatchOptions(out=out, model=str(tiny_dir), layers="1,3", calibration="manifest",
                           calibration_prompts=synthetic_prompts(48), formats=("safetensors",), semantic_pairs=4)
    result = run_patch(options, log=lines.append)
    assert result.out == out and result.layers_chosen_by == "user" and result.num_layers == 6
    assert result.artifacts == {"calibration_record": out / "calibration.jsonl", "safetensors": out}
    records = [json.loads(line) for line in (out / "calibration.jsonl").read_text().splitlines()]
    assert len(records) == 48 and {"text", "label", "split"} <= records[0].keys()
    config = json.loads((out / "config.json").read_text())
    assert (config["sasa"]["safety_layer"], config["sasa"]["semantic_layer"]) == (1, 3)
    assert result.calibration is not None and result.calibration.layers == (1, 3)
    for stage in ("load", "patch", "calibrate", "localisation", "features", "fit", "export_safetensors", "total"):
        assert result.seconds[stage] >= 0, stage
    assert set(result.memory) == {"load", "patch", "calibrate", "export_safetensors"}
    assert all(snapshot["peak_rss"] > 0 for snapshot in result.memory.values())
    assert result.seconds["total"] >= result.seconds["load"] + result.seconds["export_safetensors"]
    assert any(line.startswith("held-out") for line in lines)
    assert result.calibration.localisation.counts["pairs"] == 4
    assert 0 < result.seconds["forward_passes"] < result.seconds["calibrate"]
    assert any("the forward passes it must run" in line for line in lines)


def test_untrained_probe_writes_no_record(tiny_dir, tmp_path):
    out = tmp_path / "patched"
    result = run_patch(PatchOptions(out=out, model=str(tiny_dir), layers="1,3", calibration="none",
                                    formats=("safetensors",)))
    assert result.calibration is None and "calibration_record" not in result.artifacts
    assert not (out / "calibration.jsonl").exists() and (out / "config.json").is_file()


def test_card_licence_from_the_registry_by_exact_name(tmp_path):
    assert set(EMBEDDED_PROVENANCE) == set(EMBEDDED_MODELS)
    embedded = card_info(PatchOptions(out=tmp_path, model="smol-qwen-vl"), None)
    assert embedded.license == "apache-2.0" and embedded.source_models == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    lookalike = card_info(PatchOptions(out=tmp_path, model="smol-finetune/"), None)
    assert lookalike.license is None and lookalike.source_models == []


def test_temporary_settings_restore_even_on_error():
    model = patch_model(build_qwen2_vl(), SasaSettings(1, 3))
    with temporary_settings(model, mode="augment", safety_layer=2, semantic_layer=4) as inside:
        assert model.sasa is inside and (inside.mode, inside.safety_layer) == ("augment", 2)
    assert (model.sasa.mode, model.sasa.safety_layer, model.sasa.semantic_layer) == ("gate", 1, 3)
    with pytest.raises(RuntimeError), temporary_settings(model, mode="augment"):
        raise RuntimeError("a failed measurement")
    assert model.sasa.mode == "gate" and model.config.sasa["mode"] == "gate"


def test_write_jsonl_keeps_unicode(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "café"}, {"n": 1}])
    assert path.read_text(encoding="utf-8") == '{"text": "café"}\n{"n": 1}\n'


def test_tables():
    rows = [["name", "value"], ["a|b", "1.0"], ["long name", "22"]]
    assert text_table(rows) == ["name       value", "a|b          1.0", "long name     22"]
    assert markdown_table(rows, align=["---", "---:"]) == [
        "| name | value |", "| --- | ---: |", "| a\\|b | 1.0 |", "| long name | 22 |"]
    assert escape_cell("x\ny") == "x y"
    assert [format_metric(v) for v in (None, float("nan"), 0.5, 0.0004)] == ["–", "–", "0.500", "0.0004"]
