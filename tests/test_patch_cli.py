"""The patch CLI: bad input exits 2 with one line and writes nothing; a real run writes a loadable checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sasa_patcher.cli import patch as patch_cli

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "patch.py"


def run_main(capsys, argv):
    code = patch_cli.main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "layers,message",
    [("3,3", "must come before"), ("4,2", "must come before"), ("1,6", "does not exist"),
     ("-1,3", "non-negative"), ("a,b", "two integers")],
)
def test_bad_layers_exit_2_and_write_nothing(capsys, tiny_dir, tmp_path, layers, message):
    out = tmp_path / "out"
    code, err = run_main(capsys, ["--model", str(tiny_dir), "--out", str(out), f"--layers={layers}"])
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_alias_missing_dir_unsupported_arch(capsys, tmp_path):
    out = tmp_path / "out"
    assert run_main(capsys, ["--model", "no-such-alias", "--out", str(out)])[0] == 2
    assert run_main(capsys, ["--model", str(tmp_path / "missing"), "--out", str(out)])[0] == 2
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, err = run_main(capsys, ["--model", str(bert), "--out", str(out)])
    assert code == 2 and "supported are gemma3, llava, qwen2_5_vl, qwen2_vl" in err
    assert not out.exists()


def test_existing_output_needs_force(capsys, tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_main(capsys, ["--model", str(tiny_dir), "--out", str(out)])
    assert code == 2 and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_default_formats_then_force_into_the_existing_directory(capsys, tiny_dir, tmp_path):
    """What a user runs with no --format: safetensors and the ONNX branch (with its parity check); then the same
    --out again with --force (safetensors only, to keep the test short): the directory is replaced as a whole."""
    out = tmp_path / "out"
    argv = ["--model", str(tiny_dir), "--out", str(out), "--calibration", "none"]
    code, err = run_main(capsys, argv + ["--layers", "1,3"])
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["sasa"]["semantic_layer"] == 3
    parity = json.loads((out / "onnx" / "parity.json").read_text())["parity"]
    assert parity["passed"] and {case["name"] for case in parity["cases"]} >= {"image-batch1", "text-batch1"}
    assert json.loads((out / "onnx" / "sasa_onnx.json").read_text())["sasa"]["semantic_layer"] == 3
    code, err = run_main(capsys, argv + ["--layers", "1,4", "--format", "safetensors", "--force"])
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["sasa"]["semantic_layer"] == 4
    assert not (out / "onnx").exists()  # the old artifact is gone, not mixed with the new one
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no staging left behind


def test_unreadable_adapter(capsys, tiny_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("not json")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    code, err = run_main(capsys, ["--model", str(tiny_dir), "--out", str(out), "--adapter", str(adapter)])
    assert code == 2 and "unreadable" in err
    assert not out.exists()


def test_real_process_exit_code_and_one_line(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--model", "no-such-alias", "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown model alias")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.integration
def test_patch_embedded_model_end_to_end(tmp_path):
    """The real CLI on the embedded model; the checkpoint loads through trust_remote_code in a new process.

    That this works without the package importable is shown in tests/test_checkpoint.py.
    """
    out = tmp_path / "patched"
    result = subprocess.run([sys.executable, str(SCRIPT), "--model", "smol-qwen-vl", "--out", str(out),
                             "--layers", "12,14", "--calibration", "none", "--format", "safetensors"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert str(out.resolve()) in result.stdout
    assert "untrained" in result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["sasa"]["safety_layer"] == 12 and config["sasa"]["semantic_layer"] == 14
    assert (out / "modeling_sasa.py").is_file()
    check = (
        "import torch\n"
        "from transformers import AutoModelForImageTextToText, AutoTokenizer\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"p = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "msgs = [{'role': 'user', 'content': 'Hi'}]\n"
        "x = p.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,"
        " return_tensors='pt')\n"
        "o = m(**x)\n"
        "print(type(m).__name__, tuple(o.unsafe_prob.shape))\n"
    )
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["SasaQwen2VLForConditionalGeneration", "(1,)"]


@pytest.mark.parametrize("dtype", ["bfloat16", "fp16"])
def test_onnx_with_half_precision_exits_2_before_any_work(capsys, tiny_dir, tmp_path, dtype):
    out = tmp_path / "out"
    code, err = run_main(capsys, ["--model", str(tiny_dir), "--out", str(out), "--dtype", dtype,
                                  "--calibration", "none"])
    assert code == 2 and "float32" in err and "--format safetensors" in err
    assert not out.exists()
