"""Hash splits: disjoint, complete, stable across runs and processes, groups kept together; source families."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sasa_patcher.probes.calibration_set import builtin_calibration_set, form_twin
from sasa_patcher.probes.datasets import Prompt
from sasa_patcher.probes.splits import (
    group_key,
    is_heldout,
    source_family,
    sources,
    split,
)

ROOT = Path(__file__).resolve().parents[1]


def synthetic(n=600):
    return [
        Prompt(text=f"Explain topic number {i}", label=i % 2, source=f"set{i % 3}", form="imperative") for i in range(n)
    ]


def test_split_is_disjoint_complete_and_near_the_fraction():
    prompts = synthetic(2000)
    parts = split(prompts)
    assert len(parts.calibration) + len(parts.heldout) == len(prompts)
    assert not {p.text for p in parts.calibration} & {p.text for p in parts.heldout}
    assert 0.26 < len(parts.heldout) / len(prompts) < 0.34
    assert 0.45 < len(split(prompts, heldout_fraction=0.5).heldout) / len(prompts) < 0.55


def test_split_is_stable_across_runs_and_input_order():
    prompts = synthetic()
    first = {p.text for p in split(prompts).heldout}
    second = {p.text for p in split(list(reversed(prompts))).heldout}
    assert first == second
    # membership depends on the prompt alone: removing others never moves a prompt
    assert {p.text for p in split(prompts[:100]).heldout} == first & {p.text for p in prompts[:100]}


def test_split_is_stable_across_processes():
    here = hashlib.sha256("\n".join(p.text for p in split(synthetic()).heldout).encode()).hexdigest()
    code = (
        "import hashlib\n"
        "from test_splits import synthetic\n"
        "from sasa_patcher.probes.splits import split\n"
        "print(hashlib.sha256('\\n'.join(p.text for p in split(synthetic()).heldout).encode()).hexdigest())"
    )
    for seed in ("0", "1"):  # different hash() salts must not matter
        env = {"PYTHONHASHSEED": seed, "PATH": "", "PYTHONPATH": str(ROOT / "tests")}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == here


def test_identical_texts_land_on_the_same_side():
    prompts = synthetic(300)
    copies = [
        Prompt(text=f"  explain TOPIC number {i}.", label=0, source="other", form="imperative") for i in range(300)
    ]
    for original, copy in zip(prompts, copies, strict=True):
        assert is_heldout(original) == is_heldout(copy)


def test_derived_prompts_follow_their_origin():
    real = Prompt(text="How can I launder money?", label=1, source="donotanswer", form="question")
    twin = form_twin(real)
    assert twin is not None and twin.origin == real.text
    assert group_key(twin) == group_key(real)
    for fraction in (0.1, 0.3, 0.5, 0.9):
        assert is_heldout(twin, fraction) == is_heldout(real, fraction)


def test_builtin_twins_never_straddle_the_split():
    parts = split(builtin_calibration_set())
    calibration_keys = {group_key(p) for p in parts.calibration}
    assert not calibration_keys & {group_key(p) for p in parts.heldout}


def test_image_prompts_without_origin_are_keyed_on_the_image(tmp_path):
    paths = []
    for i, colour in enumerate(("red", "blue")):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), colour).save(paths[-1])
    a, b = (Prompt(text="What is in the image?", label=0, source="m", form="question", image=p) for p in paths)
    assert group_key(a) != group_key(b)
    assert group_key(a) == group_key(a)


def test_salt_gives_another_split_and_fraction_is_checked():
    prompts = synthetic()
    assert {p.text for p in split(prompts, salt="a").heldout} != {p.text for p in split(prompts).heldout}
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            split(prompts, heldout_fraction=bad)


def test_source_families():
    prompts = synthetic(30) + [
        Prompt(text="Explain topic number 0", label=0, source="set9/typographic", form="imperative"),
    ]
    assert source_family("advbench/typographic") == "advbench"
    assert sources(prompts) == ["set0", "set1", "set2", "set9"]
