"""The CLI end to end: output, --json, and one-line errors with exit code 2 for every bad input."""

import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

from vlora_compress import synthetic
from vlora_compress.cli.app import compress_main, expand_main, inspect_main


def run(main, args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_one_line_error(code, out, err, *words):
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


def only(folder):
    return sorted(p.name for p in folder.iterdir())


def test_compress_json_is_the_only_thing_on_stdout(gpt2_file, tmp_path, capsys):
    out = tmp_path / "g.vlora.safetensors"
    code, stdout, _ = run(compress_main, [gpt2_file, "--rank", 2, "--chunks", 2, "-o", out, "--json"], capsys)
    assert code == 0
    report = json.loads(stdout)
    for field in ("original_bytes", "compressed_bytes", "size_ratio", "original_params", "compressed_params",
                  "rank", "chunks", "stacks", "tensors"):
        assert field in report
    assert report["compressed_bytes"] < report["original_bytes"]
    assert math.isclose(report["size_ratio"], report["compressed_bytes"] / report["original_bytes"])
    assert all(0 <= t["rel_error"] for t in report["tensors"])
    assert report["stacks"][0]["chunks"] == [[0, 1], [2, 3]]


def test_compress_default_output_and_table(gpt2_file, capsys):
    code, stdout, _ = run(compress_main, [gpt2_file, "-r", 2], capsys)
    assert code == 0
    assert (gpt2_file.parent / "gpt2.vlora.safetensors").exists()
    assert "size ratio" in stdout and "c_attn" in stdout


def test_expand_then_inspect_both_kinds(gpt2_file, tmp_path, capsys):
    v = tmp_path / "g.vlora.safetensors"
    run(compress_main, [gpt2_file, "-o", v, "-r", 2, "-c", 2], capsys)
    code, stdout, _ = run(expand_main, [v, "-o", tmp_path / "dense.safetensors", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["output"].endswith("dense.safetensors")
    code, stdout, _ = run(inspect_main, [v, "--json"], capsys)
    info = json.loads(stdout)
    assert info["kind"] == "vlora" and info["stacks"][0]["chunks"] == [[0, 1], [2, 3]]
    assert info["bytes_by_role"]["increments"] > 0
    code, stdout, _ = run(inspect_main, [tmp_path / "dense.safetensors", "--json"], capsys)
    info = json.loads(stdout)
    assert info["kind"] == "checkpoint" and info["stacks"][0]["prefix"] == "transformer.h"
    code, stdout, _ = run(inspect_main, [gpt2_file], capsys)
    assert code == 0 and "transformer.h" in stdout


def test_spectra_json_and_plot(gpt2_file, tmp_path, capsys):
    png = tmp_path / "spectra.png"
    code, stdout, _ = run(inspect_main, [gpt2_file, "--spectra", "--rank", 4, "--json", "--plot", png], capsys)
    assert code == 0
    pairs = json.loads(stdout)["pairs"]
    assert len(pairs) == 4 * 3  # four families, three consecutive pairs each
    assert png.stat().st_size > 10_000
    code, stdout, _ = run(inspect_main, [gpt2_file, "--spectra"], capsys)
    assert code == 0 and "kept@4" in stdout


def test_console_scripts_exit_2_without_traceback(tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    proc = subprocess.run([os.path.join(bin_dir, "vlora-compress"), str(tmp_path / "nope.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"vlora-compress: error: {tmp_path / 'nope.safetensors'}: no such file or folder"
    proc = subprocess.run([os.path.join(bin_dir, "vlora-inspect"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--spectra" in proc.stdout


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


def _nan_checkpoint(path):
    def make(key, shape):
        t = synthetic.gaussian(0)(key, shape)
        if key == "transformer.h.2.mlp.c_fc.weight":
            t[3, 5] = float("nan")
        return t
    return synthetic.write_checkpoint(path, synthetic.gpt2_keys(), make)


def _no_stacks(path):
    return synthetic.write_checkpoint(path, [("embed.weight", (10, 4)), ("head.weight", (3, 4))])


BAD_SOURCES = {
    "missing": (lambda p: p / "missing.safetensors", "no such file"),
    "empty": (lambda p: _write_bytes(p / "empty.safetensors", b""), "is empty"),
    "short": (lambda p: _write_bytes(p / "short.safetensors", b"\x05\x00"), "truncated"),
    "truncated": (lambda p: _write_bytes(p / "t.safetensors", struct.pack("<Q", 200) + b"{}"), "truncated"),
    "not safetensors": (lambda p: _write_bytes(p / "x.safetensors", b"this is plainly not a tensor file"),
                        "not a safetensors file"),
    "bad header": (lambda p: _write_bytes(p / "h.safetensors", struct.pack("<Q", 8) + b"not json"), "not a valid"),
    "nan": (_nan_checkpoint, "NaN or Inf"),
    "no stacks": (_no_stacks, "no repeated layer stack"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source_gets_one_line_and_leaves_nothing(case, tmp_path, capsys):
    make, words = BAD_SOURCES[case]
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = make(src_dir) if case not in ("nan", "no stacks") else make(src_dir / "m.safetensors")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = only(src_dir)
    code, out, err = run(compress_main, [src, "-o", out_dir / "o.vlora.safetensors"], capsys)
    assert_one_line_error(code, out, err, words)
    assert only(out_dir) == [] and only(src_dir) == before


def test_truncated_real_checkpoint_is_refused(minilm_dir, tmp_path, capsys):
    data = (minilm_dir / "model.safetensors").read_bytes()
    src = _write_bytes(tmp_path / "cut.safetensors", data[: len(data) // 2])
    code, out, err = run(compress_main, [src, "-o", tmp_path / "o.vlora.safetensors"], capsys)
    assert_one_line_error(code, out, err, "cut.safetensors", "truncated")


def test_index_naming_a_missing_shard(llama_index, tmp_path, capsys):
    (llama_index.parent / "model-00002-of-00002.safetensors").unlink()
    code, out, err = run(compress_main, [llama_index, "-o", tmp_path / "o.vlora.safetensors"], capsys)
    assert_one_line_error(code, out, err, "missing shard model-00002-of-00002.safetensors")


@pytest.mark.parametrize("args,words", [
    (["--rank", "0"], "--rank must be"),
    (["--rank", "-3"], "--rank must be"),
    (["--chunks", "0"], "--chunks must be"),
    (["--chunks", "5"], "more than the 4 layers"),
    (["--svd", "fast"], "--svd must be"),
    (["--dtype", "int3"], "--dtype must be"),
    (["--rank", "four"], "Invalid value for '--rank'"),
])
def test_bad_options(gpt2_file, tmp_path, capsys, args, words):
    code, out, err = run(compress_main, [gpt2_file, "-o", tmp_path / "o.vlora.safetensors", *args], capsys)
    assert_one_line_error(code, out, err, words)
    assert not (tmp_path / "o.vlora.safetensors").exists()


def test_unwritable_output_folder(gpt2_file, tmp_path, capsys):
    code, out, err = run(compress_main, [gpt2_file, "-o", tmp_path / "no" / "such" / "o.safetensors"], capsys)
    assert_one_line_error(code, out, err, "output folder does not exist")
    code, out, err = run(compress_main, [gpt2_file, "-o", gpt2_file / "o.safetensors"], capsys)
    assert_one_line_error(code, out, err, "not a folder")


def test_existing_output_needs_force(gpt2_file, tmp_path, capsys):
    out_file = tmp_path / "o.vlora.safetensors"
    out_file.write_bytes(b"keep me")
    code, out, err = run(compress_main, [gpt2_file, "-o", out_file], capsys)
    assert_one_line_error(code, out, err, "already exists", "--force")
    assert out_file.read_bytes() == b"keep me"
    code, _, _ = run(compress_main, [gpt2_file, "-o", out_file, "--force", "-q"], capsys)
    assert code == 0 and out_file.stat().st_size > 1000
    code, out, err = run(expand_main, [out_file, "-o", gpt2_file], capsys)
    assert_one_line_error(code, out, err, "already exists")


def test_output_never_overwrites_the_source(gpt2_file, capsys):
    code, out, err = run(compress_main, [gpt2_file, "-o", gpt2_file, "--force"], capsys)
    assert_one_line_error(code, out, err, "is the source checkpoint")


def test_failure_midway_leaves_no_partial_file(tmp_path, capsys):
    # the NaN sits in the last layer, so the writer has already streamed most of the file
    def make(key, shape):
        t = synthetic.gaussian(0)(key, shape)
        if key == "transformer.h.3.mlp.c_proj.weight":
            t[0, 0] = float("inf")
        return t
    src = synthetic.write_checkpoint(tmp_path / "m.safetensors", synthetic.gpt2_keys(), make)
    code, out, err = run(compress_main, [src, "-o", tmp_path / "o.vlora.safetensors"], capsys)
    assert_one_line_error(code, out, err, "transformer.h.3.mlp.c_proj.weight", "NaN or Inf")
    assert only(tmp_path) == ["m.safetensors"]


def test_expand_refuses_plain_checkpoints_and_compress_refuses_vlora(gpt2_file, tmp_path, capsys):
    code, out, err = run(expand_main, [gpt2_file, "-o", tmp_path / "d.safetensors"], capsys)
    assert_one_line_error(code, out, err, "is not a VLoRA file")
    v = tmp_path / "g.vlora.safetensors"
    run(compress_main, [gpt2_file, "-o", v], capsys)
    code, out, err = run(compress_main, [v, "-o", tmp_path / "again.safetensors"], capsys)
    assert_one_line_error(code, out, err, "already a VLoRA file")


def test_inspect_bad_input(tmp_path, capsys):
    code, out, err = run(inspect_main, [tmp_path / "none.safetensors"], capsys)
    assert_one_line_error(code, out, err, "no such file")
    bad = _write_bytes(tmp_path / "x.safetensors", b"\x00" * 3)
    code, out, err = run(inspect_main, [bad, "--spectra"], capsys)
    assert_one_line_error(code, out, err, "truncated")


def test_folder_source_picks_the_model_file(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    synthetic.write_checkpoint(folder / "model.safetensors", synthetic.vit_keys(), dtype=torch.float16)
    code, stdout, _ = run(compress_main, [folder, "--json", "-r", 2], capsys)
    assert code == 0
    report = json.loads(stdout)
    assert report["output"] == str(tmp_path / "model.vlora.safetensors")
    assert report["stacks"][0]["prefix"] == "blocks"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only folders")
def test_read_only_output_folder(gpt2_file, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    code, out, err = run(compress_main, [gpt2_file, "-o", ro / "o.vlora.safetensors"], capsys)
    assert_one_line_error(code, out, err, "not writable")


def test_damaged_vlora_file_gets_one_line_from_every_command(gpt2_file, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    v = tmp_path / "g.vlora.safetensors"
    run(compress_main, [gpt2_file, "-o", v], capsys)
    with safe_open(str(v), "pt") as f:
        meta = {**f.metadata(), "vlora.version": "9"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(v), meta)
    for main, args in ((expand_main, [v, "-o", tmp_path / "d.safetensors"]), (inspect_main, [v])):
        code, out, err = run(main, args, capsys)
        assert_one_line_error(code, out, err, "format version '9'")
    assert not (tmp_path / "d.safetensors").exists()


def test_bad_calibration_data_gets_one_line(minilm_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, out, err = run(compress_main, [minilm_dir, "-o", tmp_path / "o.vlora.safetensors", "--calib", empty], capsys)
    assert_one_line_error(code, out, err, "empty.jsonl", "holds no text")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{oops\n')
    code, out, err = run(compress_main, [minilm_dir, "-o", tmp_path / "o.vlora.safetensors", "--calib", broken], capsys)
    assert_one_line_error(code, out, err, "line 2 is not valid JSON")
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((minilm_dir / "model.safetensors").read_bytes())
    code, out, err = run(compress_main, [bare, "-o", tmp_path / "o.vlora.safetensors", "--calib", empty], capsys)
    assert_one_line_error(code, out, err, "has no config.json")
    assert not (tmp_path / "o.vlora.safetensors").exists()


def test_planning_flags(gpt2_file, tmp_path, capsys):
    out = tmp_path / "p.vlora.safetensors"
    code, stdout, _ = run(compress_main, [gpt2_file, "-o", out, "-r", 3, "-c", 2, "--base", "mean", "--topology",
                                          "star", "--bounds", "equal", "--json"], capsys)
    assert code == 0
    fams = json.loads(stdout)["families"]
    assert all(f["bases"] == ["synthetic", "synthetic"] and f["topologies"] == ["star", "star"] for f in fams)
    code, stdout, _ = run(inspect_main, [out], capsys)
    assert code == 0 and "synthetic" in stdout and "star" in stdout
    for flag, value in (("--base", "median"), ("--topology", "tree"), ("--bounds", "random"), ("--ranks", "greedy")):
        code, o, err = run(compress_main, [gpt2_file, "-o", tmp_path / "x.vlora.safetensors", flag, value], capsys)
        assert_one_line_error(code, o, err, f"{flag} must be one of")
    code, o, err = run(compress_main, [gpt2_file, "-o", tmp_path / "x.vlora.safetensors", "--method", "svd",
                                       "--base", "first"], capsys)
    assert_one_line_error(code, o, err, "--method svd stores every layer alone")


def test_a_source_named_like_a_sub_command_compresses(gpt2_file, tmp_path, capsys, monkeypatch):
    """`heal` is the heal command; a checkpoint named heal is compressed with the command named."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "heal").write_bytes(gpt2_file.read_bytes())
    code, out, err = run(compress_main, ["heal", "-r", 2], capsys)
    assert_one_line_error(code, out, err, "vlora-compress heal: error:", "taken as the heal command", "write ./heal")
    assert not (tmp_path / "heal.vlora.safetensors").exists()
    for args in (["compress", "heal", "-r", 2, "-o", "a.vlora.safetensors", "--json"],
                 ["-r", 2, "-o", "b.vlora.safetensors", "--json", "--", "heal"],
                 ["./heal", "-r", 2, "-o", "c.vlora.safetensors", "--json"]):
        code, out, _ = run(compress_main, args, capsys)
        assert code == 0 and json.loads(out)["rank"] == 2
    assert (tmp_path / "a.vlora.safetensors").read_bytes() == (tmp_path / "c.vlora.safetensors").read_bytes()
    code, out, _ = run(compress_main, ["--help"], capsys)
    assert code == 0 and "--rank" in out and "vlora-compress heal" in out
    code, out, _ = run(compress_main, ["heal", "--help"], capsys)
    assert code == 0 and "--teacher" in out


def test_inspect_sub_commands_and_a_file_named_check(gpt2_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    v = tmp_path / "g.vlora.safetensors"
    run(compress_main, [gpt2_file, "-o", v, "-r", 2], capsys)
    (tmp_path / "check").write_bytes(v.read_bytes())
    code, out, _ = run(inspect_main, ["check", "check", "--max-bytes", "1GB", "--json"], capsys)
    assert code == 0 and json.loads(out)["ok"]
    code, out, _ = run(inspect_main, ["--json", "--", "check"], capsys)
    assert code == 0 and json.loads(out)["kind"] == "vlora"
    code, out, _ = run(inspect_main, ["check", "check", "--max-bytes", "1KB", "--json"], capsys)
    assert code == 1 and not json.loads(out)["ok"]


@pytest.mark.parametrize("main, args, flag", [
    (inspect_main, ["check", "{v}", "--max-bytes", "lots"], "--max-bytes must be"),
    (compress_main, ["{src}", "--calib-samples", 0, "--calib", "{src}"], "--calib-samples must be at least 1"),
    (compress_main, ["{src}", "--quantize", "int4", "--group-size", 3], "--group-size must be an even number"),
    (compress_main, ["{src}", "--quantize-passthrough"], "--quantize-passthrough needs --quantize int8"),
    (compress_main, ["{src}", "--base-quantize", "int5"], "--base-quantize must be one of int8, int4, int3, int2"),
    (compress_main, ["{src}", "--base-quantize", "int3", "--quantize", "auto"], "--base-quantize stores bases apart"),
    (compress_main, ["{src}", "--target-size", "big"], "--target-size must be a fraction"),
    (compress_main, ["heal", "{v}", "--teacher", "{src}", "--data", "{src}", "-o", "{o}", "--steps", -1],
     "--steps must be at least 0, --batch-size at least 1"),
    (compress_main, ["heal", "{v}", "--teacher", "{src}", "--data", "{src}", "-o", "{o}", "--local-share", 0],
     "--local-share in (0, 1]"),
])
def test_library_errors_name_fields_and_the_cli_names_its_flags(gpt2_file, tmp_path, capsys, main, args, flag):
    v = tmp_path / "g.vlora.safetensors"
    run(compress_main, [gpt2_file, "-o", v, "-r", 2], capsys)
    fill = {"{v}": v, "{src}": gpt2_file, "{o}": tmp_path / "o.vlora.safetensors"}
    code, out, err = run(main, [fill.get(a, a) if isinstance(a, str) else a for a in args], capsys)
    assert_one_line_error(code, out, err, flag)
    assert "`" not in err


def test_the_python_api_names_fields_not_flags(gpt2_file, tmp_path):
    from vlora_compress import compress
    from vlora_compress.errors import VloraError

    with pytest.raises(VloraError, match="`rank` must be a whole number"):
        compress(gpt2_file, tmp_path / "o.vlora.safetensors", rank=0)
    with pytest.raises(VloraError, match="`target_size` must be a fraction"):
        compress(gpt2_file, tmp_path / "o.vlora.safetensors", target_size="big")


def test_the_heal_module_runs_the_heal_command_alone():
    """`python -m vlora_compress.heal` (what torchrun launches) is the heal command itself."""
    done = subprocess.run([sys.executable, "-m", "vlora_compress.heal", "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0 and "--teacher" in done.stdout and "--rank" not in done.stdout


def test_the_options_are_the_config_fields_with_their_flags_help_and_defaults(capsys):
    """Each default, help text and flag is written once, in the config field's metadata: the compress
    and heal commands take them from there, a help panel a part; the auto chunk range is the planner's."""
    from dataclasses import fields

    import typer

    from vlora_compress.cli.app import compress_app
    from vlora_compress.cli.options import COMPRESS_GROUPS, HEAL_GROUP
    from vlora_compress.config import CompressConfig
    from vlora_compress.forms.vlora import MAX_AUTO_CHUNKS

    commands = typer.main.get_command(compress_app).commands
    for name, groups in (("compress", COMPRESS_GROUPS), ("heal", (HEAL_GROUP,))):
        options = {p.opts[0]: p for p in commands[name].params}
        for group in groups:
            flagged = [f for f in fields(group.cls) if "flag" in f.metadata]
            assert flagged and all(f.metadata["help"] for f in fields(group.cls))
            for f in flagged:
                option = options[f.metadata["flag"].split("/")[0]]
                assert (option.help, option.default, option.rich_help_panel) == (f.metadata["help"], f.default, group.title)
    assert all(f.metadata["help"] for f in fields(CompressConfig))
    assert f"1 to {MAX_AUTO_CHUNKS} " in next(f for f in fields(CompressConfig) if f.name == "chunks").metadata["help"]
    code, out, _ = run(compress_main, ["--help"], capsys)
    assert code == 0 and all(group.title.split(" (")[0] in out for group in COMPRESS_GROUPS)


def test_the_command_a_report_names_for_a_config_reads_back_to_it():
    """evaluate/alternatives names the command that makes an alternative by config.flags, from the
    fields' own flags: the compress command parses that command back to the config's values."""
    import shlex
    from dataclasses import replace

    import typer

    from vlora_compress.cli.app import compress_app
    from vlora_compress.cli.options import CALIB_GROUP, COMPRESS_GROUPS, config_values
    from vlora_compress.config import CompressConfig, flags

    command = typer.main.get_command(compress_app).commands["compress"]
    names = ("method", "ranks", "target_size", "target_of", "quantize", "group_size", "rounding", "sequential")
    made = replace(CompressConfig(), method="svd", ranks="uniform", target_size="123456B", quantize="int4",
                   group_size=64, rounding="nearest", sequential=False)
    line = flags(made, names)
    assert line == ("--method svd --ranks uniform --target-size 123456B --target-of model --quantize int4 "
                    "--group-size 64 --rounding nearest --no-sequential")
    params = command.make_context("compress", ["model", *shlex.split(line)]).params
    parsed = {k: v for g in COMPRESS_GROUPS if g is not CALIB_GROUP for k, v in config_values(params, g).items()}
    assert {n: parsed[n] for n in names} == {n: getattr(made, n) for n in names}
