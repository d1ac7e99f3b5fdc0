"""User JSONL manifests: a good one loads; every kind of bad one is refused naming the file and line."""

import json

import pytest
from PIL import Image

from sasa_patcher.errors import UserInputError
from sasa_patcher.probes.manifest import load_manifest


def write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture
def image(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (16, 16), "white").save(tmp_path / "imgs" / "a.png")
    return "imgs/a.png"


def test_good_manifest_loads(tmp_path, image):
    path = write(
        tmp_path / "mine.jsonl",
        [
            {"text": "How do I bake bread?", "label": 0},
            "",
            {"text": "What is shown here?", "label": 1, "image": image, "note": "extra keys are ignored"},
            {"text": "Write a poem.", "label": 0, "image": None},
        ],
    )
    prompts = load_manifest(path)
    assert [p.label for p in prompts] == [0, 1, 0]
    assert [p.form for p in prompts] == ["question", "question", "imperative"]
    assert prompts[1].image == (tmp_path / image).resolve()
    assert prompts[2].text == "Write a poem."  # user text is kept as written
    assert {p.source for p in prompts} == {"manifest:mine"}
    assert load_manifest(path, source="clinic")[0].source == "clinic"


def test_image_path_is_relative_to_the_manifest_not_the_cwd(tmp_path, image, monkeypatch):
    path = write(tmp_path / "m.jsonl", [{"text": "a", "label": 0, "image": image}, {"text": "b", "label": 1}])
    monkeypatch.chdir("/")
    assert load_manifest(path)[0].image == (tmp_path / image).resolve()


BAD_LINES = [
    ("not json {", "invalid JSON"),
    ('["text", 0]', "expected a JSON object"),
    ({"label": 0}, 'missing field "text"'),
    ({"text": "hi"}, 'missing field "label"'),
    ({"text": "", "label": 0}, '"text" must be a non-empty string'),
    ({"text": 5, "label": 0}, '"text" must be a non-empty string'),
    ({"text": "hi", "label": 2}, '"label" must be the number 0'),
    ({"text": "hi", "label": "1"}, '"label" must be the number 0'),
    ({"text": "hi", "label": True}, '"label" must be the number 0'),
    ({"text": "hi", "label": 1.0}, '"label" must be the number 0'),
    ({"text": "hi", "label": 0, "image": 3}, '"image" must be a path string'),
    ({"text": "hi", "label": 0, "image": "missing.png"}, "does not exist"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_bad_line_is_reported_with_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", [{"text": "ok", "label": 1}, line])
    with pytest.raises(UserInputError) as error:
        load_manifest(path)
    assert message in str(error.value)
    assert f"{path} line 2" in str(error.value)


def test_unreadable_image_is_refused(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = write(tmp_path / "m.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0, "image": "broken.png"}])
    with pytest.raises(UserInputError, match="cannot be read as an image") as error:
        load_manifest(path)
    assert "line 2" in str(error.value)


def test_truncated_image_is_refused(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    path = write(tmp_path / "m.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0, "image": "cut.png"}])
    with pytest.raises(UserInputError, match="cannot be read as an image"):
        load_manifest(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_manifest_is_refused(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(UserInputError, match="has no prompts") as error:
        load_manifest(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(("label", "name"), [(0, "benign"), (1, "harmful")])
def test_single_class_manifest_is_refused(tmp_path, label, name):
    path = write(tmp_path / "one.jsonl", [{"text": "a", "label": label}, {"text": "b", "label": label}])
    with pytest.raises(UserInputError, match=f"only {name}") as error:
        load_manifest(path)
    assert "both classes" in str(error.value) and str(path) in str(error.value)


def test_missing_and_undecodable_files_are_refused(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9", "label": 0}'.encode("latin-1"))
    with pytest.raises(UserInputError, match="UTF-8"):
        load_manifest(tmp_path / "latin1.jsonl")
