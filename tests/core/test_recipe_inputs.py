"""Bad recipes fail at load with one short line naming the key, the file or the line: exit 2, no traceback.

Every case goes through ``dsq recipe`` (which only loads the recipe), so each is a few milliseconds.
"""
import os
from pathlib import Path

import pytest

from dsq.cli import main
from dsq.core.errors import RecipeError
from dsq.eval.gates import _SPECS, Gates
from dsq.run.recipe import GatesSection, load_recipe
from dsq.run.validate import load_gates_file

PUBLIC_V3 = Path(__file__).resolve().parents[2] / "dsq" / "assets" / "public_configs" / "deepseek-v3"
MAX_MESSAGE = 3000 + len("dsq: error: \n")  # characters, whatever the input


def _bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + f"\nmodel: *a{levels - 1}\n"


def _aliases(n: int) -> str:
    return "x: &x 1\nl: [" + ", ".join(["*x"] * n) + "]\n"


# (id, recipe text (str: YAML, bytes: raw file), command-line overrides, fragments the message must contain)
CASES = [
    # the file itself
    ("not-utf8", b"output: runs/\xff\n", [], ["is not UTF-8 text: byte 0xff on line 1"]),
    ("not-utf8-line-3", b"seed: 0\n\nmodel: \xc3\x28\n", [], ["is not UTF-8 text", "on line 3"]),
    ("not-yaml", "a: [1,\n", [], ["is not valid YAML"]),
    ("not-a-mapping", "- a\n- b\n", [], ["a recipe file must hold a mapping of keys, got list"]),
    ("nul-char", "model: \"a\\0b\"\n", [], ["'model'", "NUL"]),
    # duplicate keys: YAML would keep the last one silently
    ("duplicate-top", "seed: 1\noutput: x\nseed: 2\n", [], ["line 3: duplicate key 'seed' (first at line 1)"]),
    ("duplicate-nested", "quantize:\n  method: gptq\n  weights: {bits: 4}\n  method: awq\n", [],
     ["line 4: duplicate key 'method' (first at line 2)"]),
    ("duplicate-flow", "eval: {gates: {max_ppl: 10, max_ppl: 20}}\n", [], ["line 1: duplicate key 'max_ppl'"]),
    ("duplicate-in-override", "", ["quantize={method: rtn, method: gptq}"], ["command-line override", "duplicate key 'method'"]),
    # hostile YAML: the message stays short
    ("alias-bomb", _bomb(), [], ["aliases expand to more than 10000 values"]),
    ("alias-cycle", "model: &a [*a]\n", [], ["an alias refers to the value that contains it"]),
    ("too-many-aliases", _aliases(101), [], ["more than 100 YAML aliases"]),
    ("too-deep", "model: " + "[" * 40 + "]" * 40 + "\n", [], ["nested more than 32 levels deep"]),
    ("huge-value", "model: [" + ", ".join(['"' + "x" * 500 + '"'] * 1000) + "]\n", [], ["'model'", "valid string"]),
    ("many-errors", "".join(f"k{i}: {i}\n" for i in range(50)), [], ["unknown key 'k0'", "and 45 more errors"]),
    # seeds: integers in [0, 2**32 - 1]
    ("seed-1e23", "seed: 1e23\n", [], ["'seed'", "valid integer", "(got 1e+23)"]),
    ("seed-quoted", "seed: '7'\n", [], ["'seed'", "valid integer", "(got '7')"]),
    ("seed-1e23-float", "seed: 1.0e+23\n", [], ["'seed'", "valid integer"]),
    ("seed-too-big", f"seed: {2**32}\n", [], ["'seed'", "less than or equal to 4294967295"]),
    ("seed-negative", "seed: -1\n", [], ["'seed'", "greater than or equal to 0"]),
    ("seed-float", "seed: 3.0\n", [], ["'seed'", "valid integer"]),
    ("seed-calibration", "quantize: {method: gptq, calibration: {seed: 1.0e+30}}\n", [], ["'quantize.calibration.seed'"]),
    ("seed-train-data", "quantize: null\nfinetune: {lora: {}, data: {seed: -5}}\n", [], ["'finetune.data.seed'"]),
    ("seed-training", "quantize: null\nfinetune: {lora: {}, training: {seed: 99999999999}}\n", [], ["'finetune.training.seed'"]),
    ("seed-fewshot", "eval: {multiple_choice: {fewshot_seed: 1e23}}\n", [], ["'eval.multiple_choice.fewshot_seed'"]),
    ("seed-override", "", ["seed=1e23"], ["'seed'", "command-line overrides: seed=1e23"]),
    # names and paths: non-empty where given
    ("text-field-empty", "quantize: null\nfinetune: {lora: {}, data: {text_field: ''}}\n", [],
     ["'finetune.data.text_field'", "must not be empty"]),
    ("calibration-text-field-empty", "quantize: {method: gptq, calibration: {text_field: ' '}}\n", [],
     ["'quantize.calibration.text_field'", "must not be empty"]),
    ("messages-field-empty", "quantize: null\nfinetune: {lora: {}, data: {messages_field: ''}}\n", [],
     ["'finetune.data.messages_field'"]),
    ("prompt-field-empty", "quantize: null\nfinetune: {lora: {}, data: {prompt_field: '', response_field: r}}\n", [],
     ["'finetune.data.prompt_field'"]),
    ("split-empty", "quantize: {method: awq, calibration: {split: ''}}\n", [], ["'quantize.calibration.split'"]),
    ("calibration-data-empty", "quantize: {method: gptq, calibration: {data: ''}}\n", [],
     ["'quantize.calibration.data'", "must not be empty"]),
    ("perplexity-data-empty", "eval: {perplexity: {data: ''}}\n", [], ["'eval.perplexity.data'", "must not be empty"]),
    ("mc-data-empty", "eval: {multiple_choice: {data: ''}}\n", [], ["'eval.multiple_choice.data'", "must not be empty"]),
    ("fewshot-data-empty", "eval: {multiple_choice: {fewshot_data: ''}}\n", [], ["'eval.multiple_choice.fewshot_data'"]),
    ("train-data-empty", "quantize: null\nfinetune: {lora: {}, data: {train: ''}}\n", [], ["'finetune.data.train'"]),
    ("model-empty", "model: ''\n", [], ["'model'", "must not be empty"]),
    ("output-blank", "output: '  '\n", [], ["'output'", "must not be empty"]),
    ("override-without-value", "", ["quantize.method=gptq", "quantize.calibration.data="],
     ["command-line override 'quantize.calibration.data=' has no value", "quantize.calibration.data=null"]),
    ("data-empty-override", "", ["quantize.method=gptq", "quantize.calibration.data=''"],
     ["'quantize.calibration.data'", "must not be empty"]),
    # bitsandbytes block sizes: what its kernels accept, listed
    ("bnb-blocksize-0", "quantize: {method: bnb-nf4, bnb: {blocksize: 0}}\n", [],
     ["'quantize.bnb.blocksize'", "32, 64, 128, 256, 512, 1024, 2048 or 4096", "(got 0)"]),
    ("bnb-blocksize-100", "quantize: {method: bnb-fp4, bnb: {blocksize: 100}}\n", [], ["'quantize.bnb.blocksize'"]),
    ("bnb-blocksize-override", "", ["quantize.method=bnb-nf4", "quantize.bnb.blocksize=8192"], ["'quantize.bnb.blocksize'"]),
    # gates: ranges at load, not after the run
    ("gate-top1-above-1", "eval: {gates: {min_top1_agreement: 1.5}}\n", [],
     ["'eval.gates.min_top1_agreement'", "less than or equal to 1", "(got 1.5)"]),
    ("gate-mc-acc-percent", "eval: {gates: {min_mc_acc: 55}}\n", [], ["'eval.gates.min_mc_acc'"]),
    ("gate-kl-negative", "eval: {gates: {max_mean_kl: -0.1}}\n", [], ["'eval.gates.max_mean_kl'"]),
    ("gate-ppl-below-1", "eval: {gates: {max_ppl: 0.5}}\n", [], ["'eval.gates.max_ppl'"]),
    ("gate-ppl-increase-below-minus-100", "eval: {gates: {max_ppl_increase_pct: -100}}\n", [], ["'eval.gates.max_ppl_increase_pct'"]),
    ("gate-size-zero", "eval: {gates: {max_size_ratio: 0}}\n", [], ["'eval.gates.max_size_ratio'"]),
    ("gate-recovery-zero", "eval: {gates: {min_mc_recovery_pct: 0}}\n", [], ["'eval.gates.min_mc_recovery_pct'"]),
    ("gate-speed-negative", "eval: {speed: {}, gates: {min_decode_speed_ratio: -1}}\n", [], ["'eval.gates.min_decode_speed_ratio'"]),
    ("gate-nan", "eval: {gates: {max_mean_kl: .nan}}\n", [], ["'eval.gates.max_mean_kl'", "finite number"]),
    ("gate-inf", "eval: {gates: {max_ppl: .inf}}\n", [], ["'eval.gates.max_ppl'", "finite number"]),
    ("gate-string", "eval: {gates: {max_ppl: 'ten'}}\n", [], ["'eval.gates.max_ppl'"]),
    ("gate-override", "", ["eval.gates.min_top1_agreement=1.5"], ["'eval.gates.min_top1_agreement'", "command-line"]),
    ("gate-unknown-lists-gate-keys", "eval: {gates: {min_top1: 0.9}}\n", [],
     ["unknown key 'eval.gates.min_top1'", "min_decode_speed_ratio", "min_mc_recovery_pct", "min_top1_agreement"]),
    # gates whose measurement the eval section does not make
    ("gate-speed-without-speed", "eval: {gates: {min_prefill_speed_ratio: 0.5}}\n", [],
     ["gate 'eval.gates.min_prefill_speed_ratio'", "needs 'eval.speed'", "not set"]),
    ("gate-mc-without-mc", "eval: {multiple_choice: null, gates: {min_mc_recovery_pct: 95}}\n", [],
     ["gate 'eval.gates.min_mc_recovery_pct'", "needs 'eval.multiple_choice'", "null"]),
    ("gate-mc-drop-without-mc", "eval: {multiple_choice: null, gates: {max_mc_acc_drop_pts: 2}}\n", [],
     ["gate 'eval.gates.max_mc_acc_drop_pts'", "needs 'eval.multiple_choice'"]),
    ("gate-ppl-without-ppl", "eval: {perplexity: null, gates: {max_ppl_increase_pct: 2}}\n", [],
     ["gate 'eval.gates.max_ppl_increase_pct'", "needs 'eval.perplexity'"]),
    ("gate-top1-without-text", "eval: {perplexity: null, gates: {min_top1_agreement: 0.9}}\n", [],
     ["gate 'eval.gates.min_top1_agreement'", "needs 'eval.perplexity'"]),
    # numbers that mean nothing
    ("nan-damp", "quantize: {method: gptq, gptq: {damp: .nan}}\n", [], ["'quantize.gptq.damp'", "finite number"]),
    ("inf-threshold", "quantize: {method: bnb-int8, bnb: {threshold: .inf}}\n", [], ["'quantize.bnb.threshold'", "finite"]),
    ("inf-lr", "quantize: null\nfinetune: {lora: {}, training: {lr: .inf}}\n", [], ["'finetune.training.lr'"]),
    ("lr-huge", "quantize: null\nfinetune: {lora: {}, training: {lr: 1000.0}}\n", [], ["'finetune.training.lr'"]),
    ("max-shard-zero", "max_shard_mb: 0\n", [], ["'max_shard_mb'"]),
    ("max-shard-huge", "max_shard_mb: 100000000000\n", [], ["'max_shard_mb'", "less than or equal to 1048576"]),
    ("group-size-huge", "quantize: {weights: {group_size: 1000000000}}\n", [], ["'quantize.weights.group_size'"]),
    ("samples-zero", "quantize: {method: gptq, calibration: {samples: 0}}\n", [], ["'quantize.calibration.samples'"]),
    ("context-huge", "eval: {perplexity: {context: 100000000000, stride: 128}}\n", [], ["'eval.perplexity.context'"]),
    ("stride-over-context", "eval: {perplexity: {context: 64, stride: 128}}\n", [], ["'eval.perplexity.stride'", "exceeds context 64"]),
    ("speed-zero", "eval: {speed: {new_tokens: 0}}\n", [], ["'eval.speed.new_tokens'"]),
    ("export-batch-zero", "export: {validation: {batch_sizes: [1, 0]}}\n", [], ["'export.validation.batch_sizes.1'"]),
    ("export-threads-zero", "export: {threads: 0}\n", [], ["'export.threads'"]),
    ("fewshot-negative", "eval: {multiple_choice: {num_fewshot: -1}}\n", [], ["'eval.multiple_choice.num_fewshot'"]),
    # coerced types are refused: what is written is what runs
    ("bits-string", "quantize: {weights: {bits: '4'}}\n", [], ["'quantize.weights.bits'", "4 or 8"]),
    ("samples-float", "quantize: {method: gptq, calibration: {samples: 1.5}}\n", [], ["'quantize.calibration.samples'"]),
    ("samples-bool", "quantize: {method: gptq, calibration: {samples: true}}\n", [], ["'quantize.calibration.samples'"]),
    ("overwrite-string", "overwrite: 'yes'\n", [], ["'overwrite'", "valid boolean"]),
    # patterns and devices
    ("include-empty", "quantize: {targets: {include: []}}\n", [], ["'quantize.targets.include'", "at least 1 item"]),
    ("include-bad-regex", "quantize: {targets: {include: ['(']}}\n", [], ["'quantize.targets.include.0'", "invalid module pattern"]),
    ("lora-targets-empty", "quantize: null\nfinetune: {lora: {targets: []}}\n", [], ["'finetune.lora.targets'"]),
    ("device-meta", "quantize: {device: meta}\n", [], ["'quantize.device'", "'cpu', 'cuda' or 'cuda:N'"]),
]


@pytest.mark.parametrize(("text", "overrides", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_recipe_is_one_line_and_exit_2(tmp_path, capsys, text, overrides, fragments):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code = main(["recipe", str(path), *overrides])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("dsq: error: ") and err.count("dsq: error") == 1 and "Traceback" not in err
    assert str(path) in err or "command-line override" in err
    assert len(err) <= MAX_MESSAGE, len(err)
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p.mkdir(), "is a directory, not a YAML file"),
        (lambda p: os.mkfifo(p), "is not a regular file"),
        (lambda p: p.write_text("#" * (1 << 20) + "\n"), "a recipe is at most 1048576 bytes"),
        (lambda p: None, "recipe file not found"),
    ],
    ids=["directory", "fifo", "too-large", "missing"],
)
def test_recipe_path_that_is_not_a_readable_file(tmp_path, capsys, make, fragment):
    path = tmp_path / "recipe.yaml"
    make(path)
    assert main(["recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and str(path) in err and "Traceback" not in err


def test_plan_refuses_a_bad_blocksize_before_planning(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("quantize: {method: bnb-nf4, bnb: {blocksize: 0}}\n")
    assert main(["plan", str(PUBLIC_V3), str(path)]) == 2
    err = capsys.readouterr().err
    assert "'quantize.bnb.blocksize'" in err and "32, 64, 128" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "text",
    [
        "eval: {gates: {min_mc_recovery_pct: 98.5, max_mc_acc_drop_pts: -1, max_ppl_increase_pct: -10}}\n",
        "eval: {speed: {repeats: 1}, gates: {min_prefill_speed_ratio: 0.8, min_decode_speed_ratio: 0.5}}\n",
        "quantize:\n  method: gptq\n  calibration: &c {samples: 4}\nfinetune: {lora: {}, data: {seq_len: 16}}\n",
        "eval: {gates: {min_mc_acc: 0, min_top1_agreement: 1, max_mean_kl: 0, max_ppl: 1}}\n",
    ],
    ids=["recovery-and-negative-bounds", "speed-gates", "anchor", "range-ends"],
)
def test_documented_gates_and_range_ends_load(tmp_path, capsys, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert main(["recipe", str(path)]) == 0, capsys.readouterr().err


def test_yaml_12_floats_are_numbers(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("quantize: null\nfinetune: {lora: {}, training: {lr: 3e-4, weight_decay: 1E-2}}\n")
    training = load_recipe(path, ["finetune.training.max_grad_norm=5e-1"]).finetune.training
    assert (training.lr, training.weight_decay, training.max_grad_norm) == (3e-4, 1e-2, 0.5)


def test_merge_keys_may_override_what_they_merge(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("quantize:\n  method: gptq\n  calibration: &c {samples: 4, seq_len: 32}\n"
                    "eval:\n  fidelity: {<<: {seq_len: 16, max_tokens: 64}, seq_len: 32}\n")
    recipe = load_recipe(path)
    assert recipe.eval.fidelity.seq_len == 32 and recipe.eval.fidelity.max_tokens == 64


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("gates: {min_top1: 0.9}\n", ["unknown key 'gates.min_top1'", "allowed keys here: max_mc_acc_drop_pts, max_mean_kl", "min_mc_recovery_pct"]),
        ("gates: {min_top1_agreement: 1.5}\n", ["'gates.min_top1_agreement'", "less than or equal to 1"]),
        ("gates: {min_decode_speed_ratio: 0.9}\n", ["gate 'gates.min_decode_speed_ratio'", "needs 'speed'"]),
        ("perplexity: {context: 8, stride: 16}\n", ["'perplexity.stride'"]),
        ("gates: {max_ppl: 1}\ngates: {max_ppl: 2}\n", ["line 2: duplicate key 'gates'"]),
    ],
)
def test_gates_file_of_validate_has_the_recipe_checks(tmp_path, text, fragments):
    path = tmp_path / "gates.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_gates_file(path, tmp_path)
    message = str(info.value)
    assert str(path) in message and all(f in message for f in fragments), message


def test_gates_file_accepts_every_documented_gate(tmp_path):
    path = tmp_path / "gates.yaml"
    path.write_text("speed: {repeats: 1}\ngates: {min_mc_recovery_pct: 95, min_prefill_speed_ratio: 0.5, "
                    "min_decode_speed_ratio: 0.5, max_size_ratio: 0.3}\n")
    gates = load_gates_file(path, tmp_path).gates
    assert (gates.min_mc_recovery_pct, gates.min_prefill_speed_ratio, gates.max_size_ratio) == (95, 0.5, 0.3)


def test_one_definition_of_the_gates():
    assert list(Gates.model_fields) == list(GatesSection.model_fields) == list(_SPECS)
    with pytest.raises(RecipeError, match=r"'min_top1_agreement' in gates: Input should be less than or equal to 1"):
        Gates(min_top1_agreement=1.5)
    with pytest.raises(RecipeError, match=r"unknown key 'min_top1'.*min_top1_agreement"):
        Gates(min_top1=0.5)
    assert Gates(**GatesSection(max_ppl=12.0).model_dump()).max_ppl == 12.0
