"""The safetensors artifact: base files unchanged (per-tensor hashes), SASA tensors in their own file,
an index that transformers actually reads, and a fresh process that cannot import this package loads
it with `trust_remote_code=True` and reproduces the in-memory patched model's outputs."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, Qwen2VLConfig, Qwen2VLForConditionalGeneration

import sasa_patcher.export.checkpoint as checkpoint
from sasa_patcher.export.base_weights import (
    INDEX_FILE,
    SASA_FILE,
    SINGLE_AS_SHARD,
    checkpoint_state_dict,
    read_safetensors_header,
)
from sasa_patcher.export.checkpoint import SASA_TENSORS, write_safetensors_artifact
from sasa_patcher.export.model_card import CardInfo
from sasa_patcher.modeling_sasa import SasaSettings
from sasa_patcher.patching import patch_model
from tiny_models import FAMILIES, build_qwen2_vl

ROOT = Path(__file__).resolve().parent.parent


def tensor_digests(path: Path) -> dict[str, str]:
    """sha256 of every tensor's raw bytes in a safetensors file (the byte-identity checks below)."""
    import hashlib

    start, header = read_safetensors_header(path)
    data = path.read_bytes()
    return {name: hashlib.sha256(data[start + entry["data_offsets"][0]:start + entry["data_offsets"][1]]).hexdigest()
            for name, entry in header.items()}
MODELING_FILE = ROOT / "patcher" / "modeling_sasa.py"
PATCH_KEYS = {"architectures", "auto_map", "sasa"}


def save_base(build, directory: Path, **save_kwargs) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    build().save_pretrained(directory, **save_kwargs)
    return directory


def load_and_patch(base_dir: Path, *, dtype=torch.float32, seed: int = 0):
    """Base loaded the way the CLI loads it, patched, with a non-trivial probe and semantic map."""
    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=dtype).eval()
    model = patch_model(model, SasaSettings(2, 4, threshold=0.5))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        probe = model.sasa_probe.linear
        probe.weight.copy_(0.3 * torch.randn(probe.weight.shape, generator=generator))
        probe.bias.fill_(-0.1)
        semantic = model.sasa_semantic_map.weight
        semantic.add_(0.01 * torch.randn(semantic.shape, generator=generator).to(semantic.dtype))
    return model


def base_safetensors(base_dir: Path) -> list[Path]:
    return sorted(base_dir.glob("*.safetensors"))


def all_digests(files: list[Path]) -> dict[str, str]:
    digests = {}
    for path in files:
        digests.update(tensor_digests(path))
    return digests


def check_index(out: Path) -> dict[str, str]:
    """The index names every tensor of every weight file exactly once, and nothing else."""
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    from_headers = {}
    for name in sorted(set(weight_map.values())):
        for tensor in read_safetensors_header(out / name)[1]:
            from_headers[tensor] = name
    assert weight_map == from_headers
    assert sorted(path.name for path in out.glob("*.safetensors")) == sorted(set(weight_map.values()))
    assert not (out / "model.safetensors").exists()  # it would shadow the index
    return weight_map


def assert_same_state(reference, loaded) -> None:
    expected, actual = reference.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


# ----- pristine base: files linked, bytes identical ---------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_pristine_base_is_linked_byte_identical(family, tmp_path):
    base = save_base(family.build, tmp_path / "base")
    model = load_and_patch(base)
    out = tmp_path / "artifact"
    summary = write_safetensors_artifact(model, None, base, out, card_info=CardInfo(base_model="tiny/base"))

    assert summary["base_weights"] == "linked" and summary["reason"] is None
    assert summary["verified"] == len(checkpoint_state_dict(model)) > 0
    # single-file base -> linked under a shard name the index references
    assert summary["weight_files"] == [SINGLE_AS_SHARD]
    assert os.path.samefile(base / "model.safetensors", out / SINGLE_AS_SHARD)
    base_digests = all_digests(base_safetensors(base))
    shard_digests = tensor_digests(out / SINGLE_AS_SHARD)
    assert shard_digests == base_digests  # every base tensor, byte for byte

    weight_map = check_index(out)
    assert {name for name, file in weight_map.items() if file == SASA_FILE} == set(SASA_TENSORS)
    assert set(weight_map) == set(base_digests) | set(SASA_TENSORS)

    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((base / "config.json").read_text())
    assert {k: v for k, v in config.items() if k not in PATCH_KEYS} == {
        k: v for k, v in base_config.items() if k not in PATCH_KEYS
    }
    class_name = type(model).__name__
    assert config["architectures"] == [class_name]
    assert config["auto_map"] == {"AutoModelForImageTextToText": f"modeling_sasa.{class_name}",
                                  "AutoModel": f"modeling_sasa.{class_name}"}
    assert config["sasa"] == model.sasa.to_dict() and config["sasa"]["threshold"] == 0.5
    assert (out / "modeling_sasa.py").read_bytes() == MODELING_FILE.read_bytes()
    assert (out / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()
    assert (out / "README.md").is_file()

    # transformers reads the index (not a lone shard): every tensor, SASA ones included, comes back
    loaded = type(model).from_pretrained(out).eval()
    assert_same_state(model, loaded)


def test_sharded_base_keeps_its_shard_names(tmp_path):
    base = save_base(build_qwen2_vl, tmp_path / "base", max_shard_size="300KB")
    shards = base_safetensors(base)
    assert len(shards) > 1 and (base / INDEX_FILE).is_file()
    model = load_and_patch(base)
    out = tmp_path / "artifact"
    summary = write_safetensors_artifact(model, None, base, out)
    assert summary["base_weights"] == "linked"
    assert summary["weight_files"] == [path.name for path in shards]
    for shard in shards:
        assert tensor_digests(out / shard.name) == tensor_digests(shard)
    weight_map = check_index(out)
    base_map = json.loads((base / INDEX_FILE).read_text())["weight_map"]
    assert {k: v for k, v in weight_map.items() if v != SASA_FILE} == base_map
    assert_same_state(model, type(model).from_pretrained(out))


def test_link_falls_back_to_copy_across_filesystems(tmp_path, monkeypatch):
    base = save_base(build_qwen2_vl, tmp_path / "base")
    model = load_and_patch(base)

    def cross_device(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(checkpoint.os, "link", cross_device)
    out = tmp_path / "artifact"
    summary = write_safetensors_artifact(model, None, base, out)
    assert summary["base_weights"] == "copied"
    assert not os.path.samefile(base / "model.safetensors", out / SINGLE_AS_SHARD)
    assert (out / SINGLE_AS_SHARD).read_bytes() == (base / "model.safetensors").read_bytes()


def test_hub_cache_snapshot_links_the_blobs(tmp_path):
    """A Hub snapshot is a folder of symlinks into blobs/: the artifact gets real files (linked blobs)."""
    saved = save_base(build_qwen2_vl, tmp_path / "saved")
    repo = tmp_path / "hub" / "models--owner--tiny-vl"
    snapshot, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for index, path in enumerate(sorted(saved.iterdir())):
        blob = blobs / f"blob{index}"
        path.rename(blob)
        (snapshot / path.name).symlink_to(blob)
    model = load_and_patch(snapshot)
    out = tmp_path / "artifact"
    summary = write_safetensors_artifact(model, None, snapshot, out)
    assert summary["base_weights"] == "linked"
    shard = out / SINGLE_AS_SHARD
    assert not shard.is_symlink() and os.path.samefile(shard, (snapshot / "model.safetensors").resolve())
    assert not (out / "generation_config.json").is_symlink()
    assert "# tiny-vl + SASA" in (out / "README.md").read_text()
    assert "base_model:\n- owner/tiny-vl" in (out / "README.md").read_text()


# ----- weights that differ from the base: saved from memory -----------------------------------------
@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_modified_weights_are_saved_under_checkpoint_names(family, tmp_path):
    """An adapter merge changes values, not names or shapes: found by the byte comparison."""
    base = save_base(family.build, tmp_path / "base")
    model = load_and_patch(base)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    out = tmp_path / "artifact"
    summary = write_safetensors_artifact(model, None, base, out)
    assert summary["base_weights"] == "saved"
    assert "lm_head" in summary["reason"]
    weight_map = check_index(out)
    base_names = set(tensor_digests(base / "model.safetensors"))
    # transformers 5 renames keys on load; the saved files carry the checkpoint's own names again
    assert {name for name, file in weight_map.items() if file != SASA_FILE} == base_names
    assert not os.path.samefile(base / "model.safetensors", out / SINGLE_AS_SHARD)
    loaded = type(model).from_pretrained(out)
    assert_same_state(model, loaded)


def test_weights_modified_flag_saves_without_reading_the_base(tmp_path):
    base = save_base(build_qwen2_vl, tmp_path / "base")
    model = load_and_patch(base)
    summary = write_safetensors_artifact(model, None, base, tmp_path / "artifact", weights_modified=True)
    assert summary["base_weights"] == "saved" and summary["verified"] == 0
    assert_same_state(model, type(model).from_pretrained(tmp_path / "artifact"))


def test_lossy_dtype_cast_is_saved_in_the_new_dtype(tmp_path):
    base = save_base(build_qwen2_vl, tmp_path / "base")
    model = load_and_patch(base, dtype=torch.bfloat16)
    out = tmp_path / "artifact"
    summary = write_safetensors_artifact(model, None, base, out)
    assert summary["base_weights"] == "saved" and "dtype cast" in summary["reason"]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    headers = read_safetensors_header(out / SINGLE_AS_SHARD)[1]
    assert {entry["dtype"] for entry in headers.values()} == {"BF16"}
    loaded = type(model).from_pretrained(out)  # dtype "auto" -> the config's bfloat16
    assert loaded.dtype == torch.bfloat16
    assert_same_state(model, loaded)


def test_lossless_upcast_still_links_the_base(tmp_path):
    """bf16 on disk, fp32 in memory (the CLI's CPU default): the base files hold exactly those values."""
    base = tmp_path / "base"
    build_qwen2_vl().to(torch.bfloat16).save_pretrained(base)
    model = load_and_patch(base, dtype=torch.float32)
    out = tmp_path / "artifact"
    summary = write_safetensors_artifact(model, None, base, out)
    assert summary["base_weights"] == "linked" and summary["upcast"] == summary["verified"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert_same_state(model, type(model).from_pretrained(out, dtype=torch.float32))

    strict = write_safetensors_artifact(model, None, base, tmp_path / "strict", allow_upcast=False)
    assert strict["base_weights"] == "saved" and "dtype cast" in strict["reason"]


def build_tied_qwen2_vl() -> Qwen2VLForConditionalGeneration:
    reference = build_qwen2_vl()
    config = Qwen2VLConfig.from_dict({**reference.config.to_dict(), "tie_word_embeddings": True})
    config.get_text_config().tie_word_embeddings = True
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


def test_tied_embeddings_link_and_save(tmp_path):
    base = save_base(build_tied_qwen2_vl, tmp_path / "base")
    assert "lm_head.weight" not in tensor_digests(base / "model.safetensors")
    model = load_and_patch(base)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    linked = write_safetensors_artifact(model, None, base, tmp_path / "linked")
    assert linked["base_weights"] == "linked"
    assert_same_state(model, type(model).from_pretrained(tmp_path / "linked"))

    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.01)
    saved = write_safetensors_artifact(model, None, base, tmp_path / "saved")
    assert saved["base_weights"] == "saved"
    assert "lm_head.weight" not in tensor_digests(tmp_path / "saved" / SINGLE_AS_SHARD)
    loaded = type(model).from_pretrained(tmp_path / "saved")
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert_same_state(model, loaded)


# ----- the other files ---------------------------------------------------------------------------------
class FakeProcessor:
    def __init__(self):
        self.saved = 0

    def save_pretrained(self, directory):
        self.saved += 1
        Path(directory, "processor_config.json").write_text('{"processor_class": "Fake"}')
        Path(directory, "tokenizer_config.json").write_text('{"tokenizer_class": "Fake"}')


def test_base_files_carried_over_and_processor_only_fills_gaps(tmp_path):
    base = save_base(build_qwen2_vl, tmp_path / "base")
    carried = {"tokenizer_config.json": '{"chat_template": "{{ x }}"}', "tokenizer.json": "{}",
               "chat_template.jinja": "{{ messages }}", "preprocessor_config.json": "{}", "LICENSE": "Apache-2.0"}
    for name, text in carried.items():
        (base / name).write_text(text)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base card\n")
    (base / ".cache").mkdir()
    (base / ".gitattributes").write_text("*.safetensors filter=lfs")
    (base / "onnx").mkdir()
    (base / "onnx" / "model.onnx").write_text("not ours")
    (base / "pytorch_model.bin").write_bytes(b"never copied")
    (base / "config.json").write_text(json.dumps({**json.loads((base / "config.json").read_text()),
                                                  "transformers_weights": "model.safetensors"}))
    model = load_and_patch(base)
    processor = FakeProcessor()
    out = tmp_path / "artifact"
    summary = write_safetensors_artifact(model, processor, base, out)

    assert summary["processor"] == "base" and processor.saved == 0
    for name, text in carried.items():
        assert (out / name).read_text() == text
    for absent in (".cache", ".gitattributes", "onnx", "pytorch_model.bin", "processor_config.json"):
        assert not (out / absent).exists(), absent
    assert "transformers_weights" not in json.loads((out / "config.json").read_text())
    card = (out / "README.md").read_text()
    assert "# base card" not in card and "license: apache-2.0" in card

    bare = save_base(build_qwen2_vl, tmp_path / "bare")
    summary = write_safetensors_artifact(load_and_patch(bare), processor, bare, tmp_path / "filled")
    assert summary["processor"] == "saved" and processor.saved == 1
    assert (tmp_path / "filled" / "processor_config.json").is_file()
    assert not list((tmp_path / "filled").glob(".processor-*"))


def test_unpatched_model_is_refused(tmp_path):
    base = save_base(build_qwen2_vl, tmp_path / "base")
    model = AutoModelForImageTextToText.from_pretrained(base)
    with pytest.raises(ValueError, match="not SASA-patched"):
        write_safetensors_artifact(model, None, base, tmp_path / "artifact")


# ----- a fresh process that cannot import this package -----------------------------------------------
CHILD = textwrap.dedent(
    """
    import sys
    root = sys.argv[1]
    # No path into the repository (its virtual environment aside) and no editable-install finder:
    # `patcher` must be unimportable, as on a machine that only has torch and transformers.
    sys.path[:] = [p for p in sys.path if p and (not p.startswith(root) or p.startswith(sys.prefix))]
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not getattr(f, "__module__", type(f).__module__).startswith("__editable__")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
    sys.path_importer_cache.clear()
    for name in ("patcher", "export", "probes"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"{name} is importable in the fresh process")

    import json, torch
    from transformers import AutoModelForImageTextToText

    def processor_inputs(artifact, messages):
        # AutoProcessor from the artifact; where torchvision is missing (transformers 5.23's Qwen2-VL
        # processor cannot be built without it) its two halves, tokenizer and image processor, instead.
        from transformers import AutoProcessor
        try:
            processor, kind = AutoProcessor.from_pretrained(artifact), "AutoProcessor"
        except ImportError as error:
            if "torchvision" not in str(error).lower():
                raise
            from transformers import AutoImageProcessor, AutoTokenizer
            AutoImageProcessor.from_pretrained(artifact)
            processor, kind = AutoTokenizer.from_pretrained(artifact), "tokenizer+image processor"
        ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, return_tensors="pt")["input_ids"]
        return {"processor": kind, "input_ids": ids}

    jobs = json.loads(sys.argv[2])
    results = {}
    for name, job in jobs.items():
        model = AutoModelForImageTextToText.from_pretrained(job["artifact"], trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load(job["inputs"], weights_only=True)
        with torch.no_grad():
            out = model(**inputs, use_cache=False)
        results[name] = {"class": type(model).__name__, "logits": out.logits, "unsafe_prob": out.unsafe_prob,
                         "threshold": model.sasa_probe.threshold}
        if job.get("messages"):
            results[name].update(processor_inputs(job["artifact"], job["messages"]))
    torch.save(results, sys.argv[3])
    print("ok")
    """
)


def run_fresh_process(jobs: dict, tmp_path: Path) -> dict:
    """Run CHILD with a clean path: cwd outside the repo, PYTHONPATH empty, a private HF module cache."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    results = tmp_path / "results.pt"
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home")}
    done = subprocess.run([sys.executable, str(script), str(ROOT), json.dumps(jobs), str(results)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    return torch.load(results, weights_only=True)


def test_fresh_process_loads_artifact_with_identical_outputs(tmp_path):
    """Every family: AutoModelForImageTextToText + trust_remote_code in a process without this package
    gives the in-memory patched model's logits and unsafe_prob (images, left padding, trained probe)."""
    jobs, expected = {}, {}
    for family in FAMILIES:
        base = save_base(family.build, tmp_path / family.name / "base")
        model = load_and_patch(base, seed=1)
        artifact = tmp_path / family.name / "artifact"
        write_safetensors_artifact(model, None, base, artifact)
        batch = family.make_batch([7, 11], [True, False], side="left", seed=3)
        with torch.no_grad():
            reference = model(**batch, use_cache=False)
        assert not torch.allclose(reference.unsafe_prob, torch.full_like(reference.unsafe_prob, 0.5))
        torch.save(batch, tmp_path / family.name / "inputs.pt")
        jobs[family.name] = {"artifact": str(artifact), "inputs": str(tmp_path / family.name / "inputs.pt")}
        expected[family.name] = (type(model).__name__, reference)

    results = run_fresh_process(jobs, tmp_path)
    for name, (class_name, reference) in expected.items():
        got = results[name]
        assert got["class"] == class_name
        assert float(got["threshold"]) == 0.5
        torch.testing.assert_close(got["logits"], reference.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(got["unsafe_prob"], reference.unsafe_prob, rtol=0, atol=1e-6)


# ----- the embedded real-weight model ------------------------------------------------------------------
@pytest.mark.integration
def test_embedded_model_artifact_end_to_end(tmp_path):
    """smol-qwen-vl: base shards byte-identical, processor files carried over, and in a fresh process
    AutoModelForImageTextToText gives the same logits, unsafe_prob and greedy tokens."""
    from sasa_patcher.embedded import embedded_model_dir
    from sasa_patcher.processors import load_processor

    base = Path(embedded_model_dir("smol-qwen-vl"))
    processor = load_processor(base)
    model = load_and_patch_embedded(base)
    out = tmp_path / "artifact"
    summary = write_safetensors_artifact(model, processor, base, out, card_info=CardInfo(base_model="smol-qwen-vl"))
    assert summary["base_weights"] in ("linked", "copied"), summary["reason"]
    assert summary["processor"] == "base" and summary["verified"] > 0
    assert all_digests(base_safetensors(base)) == all_digests([out / name for name in summary["weight_files"]])
    check_index(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
                 "generation_config.json"):
        if (base / name).is_file():
            assert (out / name).read_bytes() == (base / name).read_bytes(), name

    messages = [{"role": "user", "content": [{"type": "text", "text": "How do I pick a lock?"}]}]
    batch = dict(load_processor(out).apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True, return_tensors="pt"))
    with torch.no_grad():
        reference = model(**batch, use_cache=False)
    assert 0.01 < float(reference.unsafe_prob) < 0.99  # a probe whose output is not saturated
    torch.save(batch, tmp_path / "inputs.pt")
    job = {"artifact": str(out), "inputs": str(tmp_path / "inputs.pt"), "messages": messages}
    got = run_fresh_process({"smol": job}, tmp_path)["smol"]
    assert got["class"] == type(model).__name__
    assert torch.equal(got["input_ids"], batch["input_ids"]), got["processor"]
    torch.testing.assert_close(got["logits"], reference.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(got["unsafe_prob"], reference.unsafe_prob, rtol=0, atol=1e-6)


def load_and_patch_embedded(base: Path):
    """As the CLI loads it (float32 on CPU), patched at (12, 14) with a random probe and a finite threshold."""
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    model = patch_model(model, SasaSettings(12, 14, threshold=0.5))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probe = model.sasa_probe.linear
        probe.weight.copy_(1e-4 * torch.randn(probe.weight.shape, generator=generator))
    return model
