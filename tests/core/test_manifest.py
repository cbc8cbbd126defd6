"""The manifest covers the whole artifact directory; ``dsq validate`` / ``dsq export`` refuse tampered or crafted artifacts.

Every case ends in exit 2 with one line naming the file, key or tensor, before anything is evaluated
or written.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsq.core.manifest import write_manifest
from dsq.cli import main
from dsq.core.manifest import ArtifactIntegrityError, extend_manifest, verify_manifest
from dsq.quantize import PerGroup, WeightScheme
from dsq.tools.testing import make_rtn_artifact

ARTIFACTS = {  # name: (architecture, scheme)
    "int8": ("llama", WeightScheme(8, PerGroup(32), True)),
    "int4-asym": ("llama", WeightScheme(4, PerGroup(32), False)),
    "moe-int4": ("deepseek_v3", WeightScheme(4, PerGroup(32), True)),
    "bias-int8": ("qwen2", WeightScheme(8, PerGroup(32), True)),
}


@pytest.fixture(scope="module")
def artifacts(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Tiny artifacts as ``dsq run`` writes them (weights, config, tokenizer, manifest); copy before changing."""
    return {name: make_rtn_artifact(tiny_checkpoint(arch), tmp_path_factory.mktemp("manifest") / name, scheme)
            for name, (arch, scheme) in ARTIFACTS.items()}


@pytest.fixture()
def art(artifacts, tmp_path) -> Path:
    return Path(shutil.copytree(artifacts["int8"], tmp_path / "art"))


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    return code, err


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _set_manifest(art: Path, data: dict) -> None:
    (art / "manifest.json").write_text(json.dumps(data, indent=2))


def _edit_files(art: Path, edit) -> None:
    data = _manifest(art)
    edit(data["files"])
    _set_manifest(art, data)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- tampering


def _remove_entry_then_change(art: Path) -> None:
    _edit_files(art, lambda files: files.pop("config.json"))
    config = json.loads((art / "config.json").read_text())
    config["vocab_size"] = 4096
    (art / "config.json").write_text(json.dumps(config))


def _outside_entry(art: Path, name: str) -> None:
    outside = art.parent / "x"
    outside.write_text("outside the artifact\n")
    entry = name.replace("OUTSIDE", str(outside))
    _edit_files(art, lambda files: files.__setitem__(entry, _sha(outside.read_bytes())))


def _listed_file_as_symlink(art: Path) -> None:
    """The same bytes, but through a link to a file outside the artifact: the digest alone would pass."""
    copy = art.parent / "tokenizer.json"
    shutil.copy(art / "tokenizer.json", copy)
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to(copy)


def _unlisted_symlink(art: Path) -> None:
    (art / "extra.json").symlink_to(art / "config.json")
    _edit_files(art, lambda files: files.__setitem__("extra.json", files["config.json"]))


def _add(name: str, data: bytes):
    def add(art: Path) -> None:
        (art / name).parent.mkdir(parents=True, exist_ok=True)
        (art / name).write_bytes(data)
    return add


def _flip_byte(art: Path) -> None:
    weights = art / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))


TAMPERED = {
    "added added_tokens.json": (_add("added_tokens.json", b'{"<evil>": 999999}'),  # a token id beyond the vocabulary
                                "added_tokens.json: not listed in manifest.json"),
    "added chat_template.jinja": (_add("chat_template.jinja", b"{{ messages }}"), "chat_template.jinja: not listed in manifest.json"),
    "added pytorch_model.bin": (_add("pytorch_model.bin", b"\x80\x02}q\x00."), "pytorch_model.bin: not listed in manifest.json"),
    "added file in a subdirectory": (_add("sub/notes.txt", b"x"), "sub/notes.txt: not listed in manifest.json"),
    "listed file missing": (lambda a: (a / "tokenizer_config.json").unlink(),
                            "tokenizer_config.json: listed in manifest.json but missing"),
    "entry removed, file changed": (_remove_entry_then_change, "config.json: not listed in manifest.json"),
    "entry ../../x": (lambda a: _outside_entry(a, "../../x"), "entry '../../x' is not a plain relative path"),
    "absolute entry": (lambda a: _outside_entry(a, "OUTSIDE"), "is not a plain relative path"),
    "entry ./config.json": (lambda a: _edit_files(a, lambda f: f.__setitem__("./config.json", f["config.json"])),
                            "entry './config.json' is not a plain relative path"),
    "listed file is a symlink out": (_listed_file_as_symlink, "entry 'tokenizer.json' resolves to"),
    "symlink inside": (_unlisted_symlink, "extra.json: a symbolic link"),
    "changed byte": (_flip_byte, "model.safetensors: sha256 differs from manifest.json"),
    "binary manifest": (lambda a: (a / "manifest.json").write_bytes(b"\xff\xfe{\x00\x9c"), "manifest.json: not UTF-8 text"),
    "manifest not JSON": (lambda a: (a / "manifest.json").write_text("{files: "), "manifest.json: not valid JSON"),
    "files not a mapping": (lambda a: _set_manifest(a, {"files": sorted(_manifest(a)["files"])}),
                            "manifest.json: 'files' must be a non-empty object"),
    "bad digest form": (lambda a: _edit_files(a, lambda f: f.__setitem__("config.json", "abc123")),
                        "entry 'config.json' has digest 'abc123'; a sha256 is 64 lower-case hex digits"),
    "digest not a string": (lambda a: _edit_files(a, lambda f: f.__setitem__("config.json", 7)),
                            "entry 'config.json' has digest 7"),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_validate_refuses_a_tampered_artifact_naming_the_file(art, tmp_path, capsys, case):
    tamper, message = TAMPERED[case]
    tamper(art)
    code, err = _run(capsys, "validate", art, "-o", tmp_path / "ci", "-q")
    assert code == 2, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ci").exists()
    with pytest.raises(ArtifactIntegrityError) as raised:
        verify_manifest(art)
    assert message in str(raised.value)


@pytest.mark.parametrize("case", ["added pytorch_model.bin", "changed byte", "entry ../../x"])
def test_export_refuses_a_tampered_artifact_and_writes_nothing(art, tmp_path, capsys, case):
    tamper, message = TAMPERED[case]
    tamper(art)
    code, err = _run(capsys, "export", art, "-o", tmp_path / "onnx", "-q")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "onnx").exists()


def test_export_refuses_an_output_inside_the_artifact(art, capsys):
    code, err = _run(capsys, "export", art, "-o", art / "onnx", "-q")
    assert code == 2 and f"output {art / 'onnx'} is inside the artifact" in err
    assert not (art / "onnx").exists() and verify_manifest(art).passed


def test_export_refuses_a_compressed_tensors_checkpoint_without_manifest(art, tmp_path, capsys):
    (art / "manifest.json").unlink()
    code, err = _run(capsys, "export", art, "-o", tmp_path / "onnx", "-q")
    assert code == 2 and "compressed-tensors quantization_config but there is no manifest.json" in err
    assert not (tmp_path / "onnx").exists()


# ----------------------------------------------------------------------------- writer and verifier agree


def test_writer_lists_every_file_and_nested_manifests_verify_on_their_own(art):
    """An export written into the artifact before its manifest (a recipe's ``export:``) is in both manifests."""
    onnx = art / "onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"graph")
    (onnx / "export_manifest.json").write_text(json.dumps({"files": {"model.onnx": _sha(b"graph")}}))
    (art / "adapter").mkdir()
    (art / "adapter" / "manifest.json").write_text("{}")  # a nested file named like the manifest is listed too
    write_manifest(art, source={})
    files = _manifest(art)["files"]
    assert {"onnx/model.onnx", "onnx/export_manifest.json", "adapter/manifest.json"} <= set(files)
    assert verify_manifest(art).passed and verify_manifest(onnx).name == "integrity (export_manifest.json)"
    (onnx / "report.json").write_text("{}")  # written after both manifests
    with pytest.raises(ArtifactIntegrityError, match="onnx/report.json: not listed in manifest.json"):
        verify_manifest(art)
    with pytest.raises(ArtifactIntegrityError, match="report.json: not listed in export_manifest.json"):
        verify_manifest(onnx)
    extend_manifest(onnx, ["report.json"])
    assert verify_manifest(onnx).passed


def test_writer_refuses_a_symlink(art):
    (art / "link.json").symlink_to(art / "config.json")
    with pytest.raises(ArtifactIntegrityError, match="link.json: a symbolic link"):
        write_manifest(art, source={})


# ----------------------------------------------------------------------------- crafted quantization_config


def _edit_groups(art: Path, edit) -> None:
    config = json.loads((art / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        edit(group)
    (art / "config.json").write_text(json.dumps(config))


def _edit_tensor(art: Path, suffix: str, edit, contains: str = "") -> str:
    tensors = load_file(art / "model.safetensors")
    name = sorted(k for k in tensors if k.endswith(suffix) and contains in k)[0]
    tensors[name] = edit(tensors[name])
    save_file(tensors, str(art / "model.safetensors"), metadata={"format": "pt"})
    return name


def _wider_scale(art: Path) -> str:
    name = _edit_tensor(art, ".weight_scale", lambda t: torch.cat([t, t[:, :1]], dim=1))
    return f"tensor {name} has shape"


def _narrower_expert_scale(art: Path) -> str:
    name = _edit_tensor(art, "down_proj.weight_scale", lambda t: t[:, :-1].contiguous(), contains=".experts.")
    return f"tensor {name} has shape"


def _wrong_weight_shape_value(art: Path) -> str:
    name = _edit_tensor(art, ".weight_shape", lambda t: t + torch.tensor([0, 8]))
    return f"tensor {name} holds"


def _drop(suffix: str):
    def drop(art: Path) -> str:
        tensors = load_file(art / "model.safetensors")
        name = sorted(k for k in tensors if k.endswith(suffix))[0]
        del tensors[name]
        save_file(tensors, str(art / "model.safetensors"), metadata={"format": "pt"})
        return f"tensor {name} is missing from the artifact"
    return drop


def _wrong_norm_shape(art: Path) -> str:
    _edit_tensor(art, "model.norm.weight", lambda t: torch.ones(t.numel() + 1))
    return "model.norm.weight"


def _group(edit, message: str):
    def apply(art: Path) -> str:
        _edit_groups(art, edit)
        return message
    return apply


CRAFTED = {
    "num_bits 3": ("int8", _group(lambda g: g["weights"].update(num_bits=3), "weights.num_bits is 3; dsq reads 4 or 8-bit")),
    "group_size 0": ("int8", _group(lambda g: g["weights"].update(group_size=0), "weights.group_size is 0; a group size is an integer >= 2")),
    "group_size not dividing": ("int8", _group(lambda g: g["weights"].update(group_size=48), "weights.group_size 48 does not divide")),
    "unknown strategy": ("int8", _group(lambda g: g["weights"].update(strategy="tensor"), "weights.strategy is 'tensor'")),
    "bad regex": ("int8", _group(lambda g: g["targets"].__setitem__(0, "re:model.(layers"), "targets[0] is 're:model.(layers'; not a valid regular expression")),
    "targets not a list": ("int8", _group(lambda g: g.update(targets="re:.*"), "targets is 're:.*'; expected a list")),
    "weights not an object": ("int8", _group(lambda g: g.update(weights=8), "weights is 8; expected an object")),
    "bad input_activations": ("int8", _group(lambda g: g.update(input_activations={"num_bits": 8, "strategy": "token", "dynamic": True}),
                                             "input_activations: int8 input activations need int8 per-channel symmetric weights")),
    "wrong scale shape": ("int8", _wider_scale),
    "wrong unquantized shape": ("int8", _wrong_norm_shape),
    "wrong weight_shape value": ("int4-asym", _wrong_weight_shape_value),
    "zero point missing": ("int4-asym", _drop(".weight_zero_point")),
    "wrong expert scale shape": ("moe-int4", _narrower_expert_scale),
    "bias missing": ("bias-int8", _drop("_proj.bias")),
}


@pytest.mark.parametrize("command", ["validate", "export"])
@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_quantization_config_exits_2_naming_the_key_or_tensor(artifacts, tmp_path, capsys, case, command):
    kind, craft = CRAFTED[case]
    art = Path(shutil.copytree(artifacts[kind], tmp_path / "art"))
    message = craft(art)
    write_manifest(art, source={})  # consistent bytes: only the content is wrong
    code, err = _run(capsys, command, art, "-o", tmp_path / "out", "-q")
    assert code == 2, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
