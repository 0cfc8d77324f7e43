"""Fuzzing the readers: a damaged VLoRA file or checkpoint is refused in one line, never a traceback.

Small real files written by ``compress`` are damaged with a seeded generator: the JSON of the plan,
source record and config inside ``__metadata__``, the tensor entries of the safetensors header, and
raw bytes (truncation, flipped bytes, the length prefix included). Headers are re-serialised
properly, so the damage gets past the JSON parser and reaches the plan's validation. Every case
goes to ``vlora-inspect`` (``inspect_source`` and its rendering) and to expand; each must succeed
or raise ``VloraError`` naming the file in one line, and a refused expand leaves nothing behind.

``VLORA_FUZZ_CASES`` sets the number of cases (default 300), ``VLORA_FUZZ_SEED`` the seed and
``VLORA_FUZZ_FIRST`` the first case, so a failing case of a long run can be replayed alone.
Beside the fuzz, ``REFUSALS`` damages one field per check of the plan and source record, so each
check is known to fire, with its own words, whatever the fuzz happens to draw.
"""

import copy
import io
import json
import os
import random
import re
import struct
import traceback
from pathlib import Path

import pytest
import torch
from rich.console import Console

from vlora_compress import VloraError, compress, synthetic
from vlora_compress.runtime.expand import expand_to_file
from vlora_compress.report.inspection import inspect_source, markdown_inspect, render_checkpoint, render_vlora

from conftest import CORE

CASES = int(os.environ.get("VLORA_FUZZ_CASES", "300"))
SEED = int(os.environ.get("VLORA_FUZZ_SEED", "0"))
FIRST = int(os.environ.get("VLORA_FUZZ_FIRST", "0"))

VALUES = [None, True, False, 0, 1, -1, 2, 3, 7, 8, 128, 2**31, 2**63, 10**30, -(10**30), 0.5, 1.0, -0.0,
          float("nan"), float("inf"), "", "x", "0", "-1", "é", [], {}, [0], [0, 1], [-1, 2], [[0, 1]],
          [[0, 2], [2, 4]], [[]], [[[0]]], [0, 1, 2], ["a", "b"], {"a": 1}, {"prefix": "x"}]
WORDS = ["", "x", "F64", "F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F8_E4M3", "none", "int8", "int4",
         "int2", "synthetic", "chain", "star", "first", "model.layers", "layers", "model", "0", "1", "a.b.0.c"]
FIELDS = ("stacks", "families", "chunks", "prefix", "layers", "bounds", "stack", "suffix", "shape", "dtype",
          "store_dtype", "ranks", "base", "topology", "quant", "group_size", "passthrough", "key", "notes", "aligned",
          "files", "sha256", "nbytes", "metadata", "tensors")
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64", "F8_E4M3",
          "F8_E5M2", "C64", "F33", ""]
SAME_SIZE = {"F16": "BF16", "BF16": "F16", "I8": "U8", "U8": "I8", "F32": "I32", "I32": "F32", "F64": "I64",
             "I64": "F64"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One small real file of each kind of plan, and a dense checkpoint."""
    d = tmp_path_factory.mktemp("fuzz-sources")
    dense = synthetic.write_checkpoint(d / "dense.safetensors", synthetic.llama_keys(layers=4, d=16, ffn=24, vocab=32),
                                       synthetic.planted_chain(1, 2, {0}))
    # embeddings and head of 4100 x 16 = 65,600 values: large enough for --quantize-passthrough
    wide = synthetic.write_checkpoint(d / "wide.safetensors", synthetic.llama_keys(layers=3, d=16, ffn=24, vocab=4100),
                                      dtype=torch.bfloat16)
    out = {"dense": dense}
    for name, src, options in [
        ("chain", dense, dict(rank=2, chunks=2, **CORE)),
        ("svd", dense, dict(rank=3, method="svd")),
        ("mean", dense, dict(rank=2, chunks=2, base="mean", topology="star", bounds="equal", ranks="uniform")),
        ("int4", wide, dict(rank=2, chunks=1, quantize="int4", group_size=8, quantize_passthrough=True, **CORE)),
    ]:
        out[name] = d / f"{name}.vlora.safetensors"
        compress(src, out[name], **options)
    return out


def test_the_files_fuzzed_are_the_plans_meant(files):
    """Undamaged, every file inspects and expands: damage, not the files, is what gets refused."""
    plans = {name: inspect_source(path) for name, path in files.items()}
    assert plans["dense"]["kind"] == "checkpoint"
    bases = {name: {c["base"] for f in info["families"] for c in f["chunks"]} for name, info in plans.items()
             if name != "dense"}
    assert bases["chain"] == {0, 2} and bases["svd"] == {"none"} and bases["mean"] == {"synthetic"}
    assert {f["quant"] for f in plans["int4"]["families"]} == {"int4"}
    assert {q["key"] for q in plans["int4"]["passthrough_quantized"]} == {"model.embed_tokens.weight", "lm_head.weight"}
    out_dir = files["dense"].parent / "out"
    out_dir.mkdir()
    for name in ("chain", "svd", "mean", "int4"):
        assert _outcome(files[name], out_dir) == ("ok", "")


def test_damaged_files_are_refused_in_one_line(files, tmp_path):
    work = tmp_path / "cases"
    out_dir = tmp_path / "out"
    work.mkdir()
    out_dir.mkdir()
    originals = {name: path.read_bytes() for name, path in files.items()}
    failures, outcomes = [], {"ok": 0, "refused": 0, "plan": 0}
    for case in range(FIRST, FIRST + CASES):
        rng = random.Random(f"vlora-fuzz-{SEED}-{case}")
        name = rng.choices(list(originals), weights=[1 if n == "dense" else 2 for n in originals])[0]
        data, what = damage(rng, originals[name], dense=name == "dense")
        path = work / f"case{case}.{name}.safetensors"
        path.write_bytes(data)
        kind, detail = _outcome(path, out_dir)
        path.unlink()
        if kind == "failed":
            failures.append(f"case {case} (VLORA_FUZZ_SEED={SEED} VLORA_FUZZ_FIRST={case} VLORA_FUZZ_CASES=1), "
                            f"{name}: {'; '.join(what)}\n{detail}")
        else:
            outcomes[kind] += 1
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n\n" + "\n\n".join(failures[:20])
    if CASES >= 200:  # the damage reaches the plan's validation, and some of it is harmless
        assert outcomes["plan"] > CASES // 10 and outcomes["ok"] > 0, outcomes


def _outcome(path: Path, out_dir: Path) -> tuple[str, str]:
    """("ok" | "refused" | "plan" | "failed", what went wrong): "plan" is a refusal of the plan or
    source record, "failed" anything but a clean refusal."""
    problems, refused = [], []
    for step in ("inspect", "expand"):
        out = out_dir / "expanded.safetensors"
        try:
            if step == "inspect":
                _show(inspect_source(path))
            else:
                expand_to_file(path, out, force=False)
                out.unlink()
        except VloraError as e:
            msg = str(e)
            refused.append(msg)
            if str(path) not in msg or "\n" in msg:
                problems.append(f"{step}: refused, but not in one line naming the file: {msg!r}")
        except Exception:  # noqa: BLE001 - the fuzzer's net: anything but VloraError is the bug it looks for
            problems.append(f"{step}: {traceback.format_exc(limit=-4)}")
        left = sorted(p.name for p in out_dir.iterdir())
        if left:
            problems.append(f"{step}: left {left} behind")
            for p in out_dir.iterdir():
                p.unlink()
    if problems:
        return "failed", "\n".join(problems)
    if not refused:
        return "ok", ""
    return ("plan" if any("corrupted plan" in m for m in refused) else "refused"), ""


def _show(info: dict) -> None:
    """What vlora-inspect does with the result: JSON, Markdown, and the console rendering."""
    json.dumps(info)
    markdown_inspect(info)
    console = Console(file=io.StringIO(), width=120)
    (render_vlora if info["kind"] == "vlora" else render_checkpoint)(info, console)


class Text(str):
    """Metadata text written as it is, not as JSON."""


def _source_tensor(m: dict, key: str) -> list:
    return next(t for t in m["source"]["tensors"] if t[0] == key)


Q0 = "model.layers.1.self_attn.q_proj.weight"
WEIGHED = {"label": "per-layer SVD", "form": "per-layer", "rank": 4, "storage": "none", "bytes": 100, "estimate": 0.2,
           "error": 0.1}
DECISION = {"family": "model.layers.*.self_attn.q_proj.weight", "budget": 100, "measure": "model",
            "candidates": [WEIGHED], "chosen": 0}
# (file, change to the parsed plan/source/config, the words of the refusal): one case per check
REFUSALS = [
    ("chain", lambda m: m["source"].update(nbytes=0), "nbytes 0 is not a positive whole number"),
    ("chain", lambda m: m["source"].update(nbytes="83200"), "nbytes '83200' is not a positive whole number"),
    ("chain", lambda m: m["source"].update(nbytes=m["source"]["nbytes"] + 4), "is not the"),
    ("chain", lambda m: m["source"].pop("sha256"), "the source record has no 'sha256'"),
    ("chain", lambda m: m["source"].update(sha256=None), "sha256 is not a string"),
    ("chain", lambda m: m["source"].update(metadata={"format": 1}), "metadata is not a map of strings to strings"),
    ("chain", lambda m: m["source"].update(tensors={}), "tensors are not a list"),
    ("chain", lambda m: _source_tensor(m, "model.norm.weight").__setitem__(2, ["16"]), "is not [key, dtype, shape]"),
    ("chain", lambda m: _source_tensor(m, "model.norm.weight").__setitem__(2, [-16]), "is not [key, dtype, shape]"),
    ("chain", lambda m: _source_tensor(m, "model.norm.weight").__setitem__(2, [2**64]), "is not [key, dtype, shape]"),
    ("chain", lambda m: _source_tensor(m, "model.norm.weight").pop(), "is not [key, dtype, shape]"),
    ("chain", lambda m: m["source"]["tensors"].append(m["source"]["tensors"][0]), "is listed twice"),
    ("chain", lambda m: m["source"]["tensors"][0].__setitem__(1, "F8"), "unknown dtype 'F8'"),
    ("chain", lambda m: m.update(plan=[]), "the plan is [], not a JSON object"),
    ("chain", lambda m: m["plan"].pop("families"), "field 'families' is missing"),
    ("chain", lambda m: m["plan"].update(stacks="model.layers"), "stacks is 'model.layers', not a list"),
    ("chain", lambda m: m["plan"]["stacks"][0]["bounds"].__setitem__(1, [2, 5]), "not contiguous non-empty chunks"),
    ("chain", lambda m: m["plan"]["stacks"][0]["bounds"].__setitem__(1, [2]), "not contiguous non-empty chunks"),
    ("chain", lambda m: m["plan"]["stacks"][0]["bounds"].__setitem__(1, [3, 4]), "not contiguous non-empty chunks"),
    ("chain", lambda m: m["plan"]["stacks"][0]["bounds"].insert(1, [2, 2]), "not contiguous non-empty chunks"),
    ("chain", lambda m: m["plan"]["stacks"][0]["bounds"].__setitem__(1, 2), "a chunk's bounds is 2, not a list"),
    ("chain", lambda m: m["plan"]["stacks"][0].update(layers=[0, 1, 1, 3]), "not one or more distinct whole numbers"),
    ("chain", lambda m: m["plan"]["stacks"][0].update(prefix=0), "stack prefix 0 is not a string"),
    ("chain", lambda m: m["plan"]["stacks"].append(m["plan"]["stacks"][0]), "is listed twice"),
    ("chain", lambda m: m["plan"]["stacks"][0].update(layers=[0, 1, 2, 5]), "layer 3 of model.layers.*.self_attn"),
    ("chain", lambda m: m["plan"]["families"][0].update(stack="model"), "names stack 'model', which the plan does"),
    ("chain", lambda m: m["plan"]["families"][0].update(dtype=["F32"]), "has dtype ['F32']/'F32'"),
    ("chain", lambda m: m["plan"]["families"][0].update(shape=[2**64, 16]), "has shape"),
    ("chain", lambda m: m["plan"]["families"][0].update(group_size="128"), "with group size '128'"),
    ("chain", lambda m: m["plan"]["families"][0].update(chunks=[]), "has no chunks"),
    ("chain", lambda m: m["plan"]["families"][0]["chunks"][0].update(ranks=[0, True]), "mismatched layers and ranks"),
    ("chain", lambda m: m["plan"]["families"][0]["chunks"].append(m["plan"]["families"][0]["chunks"][0]),
     "'model.layers.0.self_attn.q_proj.weight' is planned twice"),
    ("chain", lambda m: m["plan"].update(notes=[None]), "notes are not all text"),
    ("chain", lambda m: m["plan"].update(aligned="no"), "'aligned' is 'no', not true or false"),
    ("chain", lambda m: m["plan"].update(decisions={}), "decisions is {}, not a list"),
    ("chain", lambda m: m["plan"].update(decisions=[{"family": "f"}]), "field 'candidates' is missing"),
    ("chain", lambda m: m["plan"].update(decisions=[{**DECISION, "chosen": 1}]), "chosen 1 of 1 candidates"),
    ("chain", lambda m: m["plan"].update(decisions=[{**DECISION, "measure": "vibes"}]), "measure that is not"),
    ("chain", lambda m: m["plan"].update(decisions=[{**DECISION, "candidates": [{**WEIGHED, "error": "0.1"}]}]),
     "has a candidate of the wrong types"),
    ("chain", lambda m: m["plan"].update(decisions=[{**DECISION, "together": {"form": "x", "error": 0.1}}]),
     "field 'per_layer' is missing"),
    ("chain", lambda m: m["plan"].update(decisions=[{**DECISION, "together": {"form": "x", "error": 0.1,
                                                                                "per_layer": "0.2"}}]),
     "has a joint check of the wrong types"),
    ("chain", lambda m: m["plan"].update(allocations={}), "allocations is {}, not a list"),
    ("chain", lambda m: m["plan"].update(allocations=[{"outcome": "maybe"}]), "an allocation is not of its kind"),
    ("chain", lambda m: m["plan"].update(allocations=[{"outcome": "allocated", "moved": [["f", "a"]]}]),
     "an allocation is not of its kind"),
    ("chain", lambda m: _source_tensor(m, "model.norm.weight").__setitem__(0, Q0 + ".vlora_B"),
     f"tensor '{Q0}.vlora_B' has two places in the layout"),
    ("chain", lambda m: m.update(config=[]), "vlora.config is not a JSON object"),
    ("chain", lambda m: m.update(plan=Text('{"stacks": [' + "1" * 5000 + "]}")), "corrupted plan (ValueError"),
    ("chain", lambda m: m.update(source=Text("[" * 100_000)), "corrupted plan (RecursionError"),
    ("mean", lambda m: m["plan"]["families"][0]["chunks"][0].update(base=True), "base True of"),
    ("mean", lambda m: m["plan"]["families"][0]["chunks"][0].update(topology=None), "unknown topology None"),
    ("int4", lambda m: m["plan"]["families"][0].update(quant=4), "has quantization 4"),
    ("int4", lambda m: m["plan"]["passthrough"][0].update(group_size=8.0), "with group size 8.0"),
    ("int4", lambda m: m["plan"]["passthrough"][0].update(key=["lm_head.weight"]), "pass-through key ['lm_head"),
    ("int4", lambda m: m["plan"].update(passthrough={}), "passthrough is {}, not a list"),
]


@pytest.mark.parametrize("name,change,words", REFUSALS, ids=[f"{n}-{w[:40]}" for n, _, w in REFUSALS])
def test_each_check_refuses_the_damage_it_is_for(files, tmp_path, name, change, words):
    """Each check of the plan and source record, alone: the refusal names the file and the problem,
    and expand refuses before it writes anything."""
    header, body = unpack(files[name].read_bytes())
    meta = header["__metadata__"]
    docs = {k: json.loads(meta[f"vlora.{k}"]) for k in ("plan", "source", "config")}
    change(docs)
    for k, v in docs.items():
        meta[f"vlora.{k}"] = v if isinstance(v, Text) else json.dumps(v)
    path = tmp_path / "damaged.vlora.safetensors"
    path.write_bytes(pack(header, body))
    with pytest.raises(VloraError) as refused:
        inspect_source(path)
    assert words in str(refused.value) and str(refused.value).startswith(f"{path}: ")
    with pytest.raises(VloraError, match=re.escape(words)):
        expand_to_file(path, tmp_path / "expanded.safetensors")
    assert list(tmp_path.iterdir()) == [path]


def test_a_family_that_stores_nothing_is_refused(files, tmp_path):
    """Zero bases at rank 0 store no tensor, so no stored shape confirms the family's: without the
    check, expand went to torch.zeros of whatever shape the header claimed (here [2**40, 2**40])."""
    header, body = unpack(files["svd"].read_bytes())
    plan, source = (json.loads(header["__metadata__"][k]) for k in ("vlora.plan", "vlora.source"))
    family = plan["families"][0]
    family["chunks"][0]["ranks"] = [0, 0, 0, 0]
    family["shape"] = [2**40, 2**40]
    keys = [f"{family['stack']}.{layer}.{family['suffix']}" for layer in family["chunks"][0]["layers"]]
    for key in keys:
        body = drop_entry(header, body, key + ".vlora_A")
        body = drop_entry(header, body, key + ".vlora_B")
        t = next(t for t in source["tensors"] if t[0] == key)
        source["nbytes"] += 4 * (2**80 - t[2][0] * t[2][1])
        t[2] = [2**40, 2**40]
    header["__metadata__"].update({"vlora.plan": json.dumps(plan), "vlora.source": json.dumps(source)})
    path = tmp_path / "empty.vlora.safetensors"
    path.write_bytes(pack(header, body))
    words = f"{path}: corrupted plan: {family['stack']}.*.{family['suffix']} stores no tensor"
    with pytest.raises(VloraError, match=re.escape(words)):
        inspect_source(path)
    with pytest.raises(VloraError, match=re.escape(words)):
        expand_to_file(path, tmp_path / "expanded.safetensors")
    assert list(tmp_path.iterdir()) == [path]


# --- damage ---------------------------------------------------------------------------------------


def damage(rng: random.Random, data: bytes, dense: bool) -> tuple[bytes, list[str]]:
    """The damaged file and what was done to it."""
    header, body = unpack(data)
    kind = rng.choices(["json", "metadata", "entries", "bytes"], weights=[1, 2, 3, 2] if dense else [10, 1, 4, 3])[0]
    what = []
    if kind == "bytes":
        return damage_bytes(rng, data, what), what
    if kind == "json" and not dense:
        key = rng.choices(["vlora.plan", "vlora.source", "vlora.config"], weights=[6, 4, 1])[0]
        doc = json.loads(header["__metadata__"][key])
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            doc = damage_json(rng, doc, key, what)
        header["__metadata__"][key] = json.dumps(doc)
    elif kind in ("json", "metadata"):
        damage_metadata(rng, header, what)
    else:
        for _ in range(rng.choice([1, 1, 2])):
            body = damage_entries(rng, header, body, what)
    return pack(header, body), what


def unpack(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def pack(header: dict, body: bytes) -> bytes:
    """As safetensors lays a file out: length, JSON header padded to 8 bytes, data."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def nodes(doc, path=()):
    yield path, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from nodes(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from nodes(v, path + (i,))


def damage_json(rng: random.Random, doc, key: str, what: list[str]):
    """One change at a random node of the document; returns the new document."""
    every = list(nodes(doc))
    named = [(p, v) for p, v in every if p and p[-1] in FIELDS]
    if named and rng.random() < 0.5:  # half the time a field the readers do arithmetic on, or its insides
        field = rng.choice(sorted({p[-1] for p, _ in named}))
        top = rng.choice([p for p, _ in named if p[-1] == field])
        path, value = rng.choice([(p, v) for p, v in every if p[: len(top)] == top])
    else:
        path, value = rng.choice(every)
    ops = ["replace", "other", "delete"]
    if isinstance(value, int) and not isinstance(value, bool):
        ops += ["number"] * 4
    elif isinstance(value, str):
        ops += ["word"] * 3
    elif isinstance(value, list):
        ops += ["list"] * 4
    elif isinstance(value, dict):
        ops += ["dict"] * 2
    op = rng.choice(ops)
    where = key + "".join(f"[{p!r}]" for p in path)
    if op == "delete" and path:
        parent = _at(doc, path[:-1])
        del parent[path[-1]]
        what.append(f"delete {where}")
        return doc
    if op == "number":
        new = rng.choice([value + 1, value - 1, -value, 2 * value, 0, rng.randrange(10), 2**63, value + 2**32])
    elif op == "word":
        strings = [v for _, v in every if isinstance(v, str)]
        new = rng.choice([rng.choice(WORDS), rng.choice(strings), value[:-1], value + "x", value.upper()])
    elif op == "list":
        new = list(value)
        change = rng.choice(["shuffle", "truncate", "duplicate", "append", "reverse", "empty", "drop"])
        if change == "shuffle":
            rng.shuffle(new)
        elif change == "truncate":
            new = new[: rng.randrange(len(new) + 1)]
        elif change == "duplicate" and new:
            new.insert(rng.randrange(len(new) + 1), copy.deepcopy(rng.choice(new)))
        elif change == "append":
            new.append(copy.deepcopy(rng.choice(new)) if new and rng.random() < 0.5 else rng.choice(VALUES))
        elif change == "reverse":
            new.reverse()
        elif change == "drop" and new:
            new.pop(rng.randrange(len(new)))
        else:
            new = []
        op = f"list {change}"
    elif op == "dict":
        new = dict(value)
        if new and rng.random() < 0.7:
            new.pop(rng.choice(list(new)))
        else:
            new[rng.choice(["extra", "layers", "quant", "base"])] = copy.deepcopy(rng.choice(VALUES))
    elif op == "other":  # a value of the right kind from elsewhere in the document
        new = copy.deepcopy(rng.choice(every)[1])
    else:
        new = copy.deepcopy(rng.choice(VALUES))
    what.append(f"{op} {where} -> {_short(new)}")
    if not path:
        return new
    _at(doc, path[:-1])[path[-1]] = new
    return doc


def damage_metadata(rng: random.Random, header: dict, what: list[str]) -> None:
    meta = header.setdefault("__metadata__", {})
    key = rng.choice(sorted(meta) + ["vlora.format", "vlora.version"])
    op = rng.choice(["delete", "version", "format", "truncate", "character"])
    if op == "delete":
        meta.pop(key, None)
    elif op == "version":
        meta["vlora.version"] = rng.choice(["1", "2", "3", "", "02", " 2"])
    elif op == "format":
        meta["vlora.format"] = rng.choice(["vlora", "VLORA", ""])
    elif key in meta:
        text = meta[key]
        i = rng.randrange(len(text) + 1)
        meta[key] = text[:i] if op == "truncate" else text[:i] + rng.choice('{}[]",:0x') + text[i + 1 :]
    what.append(f"metadata {op} {key}")


def damage_entries(rng: random.Random, header: dict, body: bytes, what: list[str]) -> bytes:
    """Change one tensor entry of the header; some changes keep the data consistent (they reach the
    plan checks), some do not (they reach safetensors' own)."""
    names = [k for k in header if k != "__metadata__" and _sound(header[k])]
    if not names:
        return body
    name = rng.choice(names)
    entry = header[name]
    shape = entry["shape"]
    op = rng.choice(["dtype", "same-size dtype", "reshape", "shape", "offsets", "swap", "rename", "drop", "add"])
    if op == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif op == "same-size dtype":
        entry["dtype"] = SAME_SIZE.get(entry["dtype"], entry["dtype"])
    elif op == "reshape":  # the same number of values
        n = 1
        for d in shape:
            n *= d
        entry["shape"] = rng.choice([shape[::-1], [n], [1] + shape, shape + [1], []] if n == 1 else
                                    [shape[::-1], [n], [1] + shape, shape + [1]])
    elif op == "shape":
        new = list(shape)
        change = rng.choice(["grow", "shrink", "drop", "add", "negative", "type"])
        i = rng.randrange(len(new)) if new else 0
        if change in ("grow", "shrink", "negative") and new:
            new[i] = new[i] + 1 if change == "grow" else new[i] - 1 if change == "shrink" else -new[i]
        elif change == "drop" and new:
            new.pop(i)
        elif change == "add":
            new.insert(i, rng.choice([0, 1, 2]))
        else:
            new = rng.choice([None, "2", [1.5, 2], {}, [True]])
        entry["shape"] = new
        op = f"shape {change}"
    elif op == "offsets":
        a, b = entry["data_offsets"]
        k = rng.choice([1, -1, 8, len(body)])
        entry["data_offsets"] = rng.choice([[a + k, b + k], [a, b + k], [b, a], [a], [a, b, b], None, [a, str(b)]])
    elif op == "swap":  # two entries trade data of the same size: consistent for safetensors
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        same = [k for k in names if k != name and header[k]["data_offsets"][1] - header[k]["data_offsets"][0] == size]
        if same:
            other = header[rng.choice(same)]
            entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif op == "rename":
        new = rng.choice([name + "x", name + ".scale", name + ".vlora_A", rng.choice(names) + "2",
                          name.replace(".1.", ".7.")])
        if new not in header:
            header[new] = header.pop(name)
    elif op == "drop":
        body = drop_entry(header, body, name)
    else:  # a copy of the entry under a new name, its data appended
        a, b = entry["data_offsets"]
        new = rng.choice(["stray", name + ".vlora_B", name.replace(".0.", ".9."), name + ".scale"])
        if new not in header:
            header[new] = {**entry, "data_offsets": [len(body), len(body) + b - a]}
            body = body + body[a:b]
    what.append(f"entry {op} {name!r}")
    return body


def drop_entry(header: dict, body: bytes, name: str) -> bytes:
    """Remove a tensor and close the gap, so the file is a valid safetensors file without it."""
    a, b = header.pop(name)["data_offsets"]
    for entry in header.values():
        if _sound(entry) and entry["data_offsets"][0] >= b:
            entry["data_offsets"] = [x - (b - a) for x in entry["data_offsets"]]
    return body[:a] + body[b:]


def damage_bytes(rng: random.Random, data: bytes, what: list[str]) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    if rng.random() < 0.35:
        end = rng.choice([0, rng.randrange(1, 9), rng.randrange(8, 8 + n), rng.randrange(8 + n, len(data))])
        what.append(f"truncate to {end} of {len(data)} bytes")
        return data[:end]
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        region = rng.choices([(0, 8), (8, 8 + n), (8 + n, len(data))], weights=[1, 3, 3])[0]
        i = rng.randrange(*region)
        out[i] ^= rng.randrange(1, 256)
        what.append(f"flip byte {i}")
    return bytes(out)


def _sound(entry) -> bool:
    """An entry an earlier change left well formed: its shape and offsets can be worked with."""
    return (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
            and all(type(d) is int for d in entry["shape"]) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and all(type(x) is int for x in entry["data_offsets"]))


def _at(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
