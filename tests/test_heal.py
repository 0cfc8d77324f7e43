import json
from dataclasses import replace
import os
import subprocess
import sys

import pytest
import torch

from conftest import CALIB, CORE, EVAL
from vlora_compress import VloraError, compress, expand, run
from vlora_compress.evaluate.check import Budgets, check
from vlora_compress.cli.app import compress_main
from vlora_compress.evaluate.scoring import EvalConfig, evaluate
from vlora_compress.io.fileformat import VloraFile
from vlora_compress.errors import Interrupted
from vlora_compress.heal.distill import HealConfig, heal, state_path


def test_healing_improves_the_held_out_metric_and_keeps_the_file_shape(minilm_dir, tmp_path):
    start = tmp_path / "s.vlora.safetensors"
    compress(minilm_dir, start, rank=8, chunks=2, **CORE)
    healed = tmp_path / "h.vlora.safetensors"
    report = heal(start, minilm_dir, CALIB, healed, HealConfig(steps=20, batch_size=16, lr=1e-3))
    assert report.steps == 20 and report.losses[-1] < report.losses[0]
    cfg = EvalConfig(samples=64)
    before = evaluate(start, EVAL, cfg, reference=minilm_dir).metric("cosine_to_reference").model
    after = evaluate(healed, EVAL, cfg, reference=minilm_dir).metric("cosine_to_reference").model
    assert after > before + 0.05  # Persuasion was never trained on
    a, b = VloraFile(start), VloraFile(healed)
    assert a.plan == b.plan and a.checkpoint.infos.keys() == b.checkpoint.infos.keys()
    assert healed.stat().st_size == start.stat().st_size
    dense = expand(healed)  # round-trips through expand
    assert torch.isfinite(dense["encoder.layer.3.output.dense.weight"]).all()


def test_without_eval_data_healing_scores_a_held_back_slice_and_never_writes_worse(minilm_dir, tmp_path):
    """No eval data: the last tenth of the training data is held back and scored before and after.
    Training that hurts (a learning rate of 1) leaves the file as it was, and says so: after is
    before, the best step is the start."""
    start = tmp_path / "s.vlora.safetensors"
    compress(minilm_dir, start, rank=4, chunks=2, **CORE)
    healed = tmp_path / "h.vlora.safetensors"
    report = heal(start, minilm_dir, CALIB, healed, HealConfig(steps=3, batch_size=8, lr=1.0, warmup=0, eval_samples=16))
    assert report.eval_data.startswith("the last ") and "held back" in report.eval_data
    assert [e["step"] for e in report.evals] == [0, 3] and report.evals[1]["value"] < report.evals[0]["value"]
    assert report.best_step == 0 and report.after == report.before
    a, b = VloraFile(start), VloraFile(healed)
    for name in a.checkpoint.infos:
        assert torch.equal(a.get(name), b.get(name)), name


def test_the_teacher_cache_keeps_to_its_bound_and_changes_nothing_but_time(minilm_dir, tmp_path, capsys):
    """A bound of one batch's targets caches one batch; a bound of 0 none, rerunning the teacher
    every step; the losses are the same either way. A bad size is refused naming the flag."""
    start = tmp_path / "s.vlora.safetensors"
    compress(minilm_dir, start, rank=4, chunks=2, **CORE)
    config = HealConfig(steps=4, batch_size=8, eval_samples=8)
    free = heal(start, minilm_dir, CALIB, tmp_path / "a.vlora.safetensors", config)
    assert free.teacher_cache_bytes > 0
    one_batch = free.teacher_cache_bytes // 4 + 1  # four steps, four different batches cached
    for bound in (0, one_batch):
        report = heal(start, minilm_dir, CALIB, tmp_path / f"{bound}.vlora.safetensors",
                      replace(config, cache_bytes=bound))
        assert 0 <= report.teacher_cache_bytes <= bound and report.losses == free.losses
    assert 0 < report.teacher_cache_bytes  # one batch fits
    with pytest.raises(SystemExit) as exc:
        compress_main(["heal", str(start), "--teacher", str(minilm_dir), "--data", str(CALIB), "-o",
                       str(tmp_path / "x.vlora.safetensors"), "--teacher-cache", "0.5"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--teacher-cache" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("topology", ["shared", "shared-left"])
def test_a_shared_basis_heals_as_one_tensor(minilm_dir, tmp_path, topology):
    """The basis a group of layers shares (either factor) is one trainable tensor: it moves, and the
    healed file keeps its plan and expands."""
    start = tmp_path / "s.vlora.safetensors"
    compress(minilm_dir, start, rank=8, chunks=2, base="none", topology=topology, ranks="uniform")
    healed = tmp_path / "h.vlora.safetensors"
    heal(start, minilm_dir, CALIB, healed, HealConfig(steps=3, batch_size=8, lr=1e-3, eval_samples=8),
         eval_data=EVAL)
    a, b = VloraFile(start), VloraFile(healed)
    basis = "encoder.layer.vlora_basis0.intermediate.dense.weight"
    assert a.plan == b.plan and not torch.equal(a.get(basis), b.get(basis))
    assert torch.isfinite(expand(healed)["encoder.layer.4.intermediate.dense.weight"]).all()


def test_frozen_tensors_do_not_move(minilm_dir, tmp_path):
    start = tmp_path / "s.vlora.safetensors"
    compress(minilm_dir, start, rank=4, chunks=2, **CORE)
    healed = tmp_path / "h.vlora.safetensors"
    heal(start, minilm_dir, CALIB, healed, HealConfig(steps=3, batch_size=8, train=("increments",)))
    a, b = VloraFile(start), VloraFile(healed)
    assert torch.equal(a.get("encoder.layer.0.output.dense.weight"), b.get("encoder.layer.0.output.dense.weight"))
    assert torch.equal(a.get("encoder.layer.1.output.dense.bias"), b.get("encoder.layer.1.output.dense.bias"))
    inc = "encoder.layer.1.output.dense.weight.vlora_A"
    assert not torch.equal(a.get(inc), b.get(inc))


def test_heal_cli_and_bad_input(minilm_dir, gpt2_file, tmp_path, capsys):
    start = tmp_path / "s.vlora.safetensors"
    compress(minilm_dir, start, rank=4, chunks=2, **CORE)
    with pytest.raises(SystemExit) as exc:
        compress_main(["heal", str(start), "--teacher", str(minilm_dir), "--data", str(CALIB), "-o",
                       str(tmp_path / "h.vlora.safetensors"), "--steps", "2", "--batch-size", "4", "--json",
                       "--loss", "hidden:2", "--loss", "cosine", "--eval", str(EVAL), "--eval-samples", "8",
                       "--report", str(tmp_path / "heal.md")])
    out, _ = capsys.readouterr()
    result = json.loads(out)
    assert exc.value.code == 0 and result["steps"] == 2 and result["config"]["losses"] == [["hidden", 2.0], ["cosine", 1.0]]
    assert result["metric"] == "cosine_to_reference" and [e["step"] for e in result["evals"]] == [0, 2]
    md = (tmp_path / "heal.md").read_text()
    assert "cosine_to_reference" in md and "| 2 |" in md and "hidden:2, cosine:1" in md
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    other = tmp_path / "g.vlora.safetensors"
    compress(gpt2_file, other, rank=2, **CORE)
    for args, words in (
        (["--data", str(empty)], "holds no text"),
        (["--data", str(CALIB), "--device", "cuda:7"], "is not available"),
        (["--data", str(CALIB), "--freeze", "everything"], "--freeze takes"),
        (["--data", str(CALIB), "--loss", "kl"], "needs a model with a head"),
        (["--data", str(CALIB), "--loss", "hidden:x"], "NAME:WEIGHT"),
        (["--data", str(CALIB), "--resume"], "no saved state"),
        (["--data", str(CALIB), "--precision", "fp16"], "--precision takes auto, bf16, fp32"),
        (["--data", str(CALIB), "--parallel", "zero3"], "--parallel ddp, fsdp"),
    ):
        with pytest.raises(SystemExit) as exc:
            compress_main(["heal", str(start), "--teacher", str(minilm_dir), "-o", str(tmp_path / "x.safetensors"),
                           *args])
        out, err = capsys.readouterr()
        assert exc.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(VloraError, match="does not match"):
        heal(other, minilm_dir, CALIB, tmp_path / "y.safetensors", HealConfig(steps=1))
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_compress_distill_heals_the_written_file(minilm_dir, tmp_path):
    out = tmp_path / "d.vlora.safetensors"
    plain = run(minilm_dir, tmp_path / "p.vlora.safetensors", rank=8, chunks=2, eval_data=EVAL,
                     eval_config=EvalConfig(samples=32), **CORE)
    report = run(minilm_dir, out, rank=8, chunks=2, distill=CALIB, heal_config=HealConfig(steps=12,
                      batch_size=16, lr=1e-3), eval_data=EVAL, eval_config=EvalConfig(samples=32), **CORE)
    h = report.healing
    assert h["steps"] == 12 and h["losses"][-1] < h["losses"][0] and h["tokens"] > 0 and h["device"] == "cpu"
    assert h["after"] > h["before"] == pytest.approx(plain.evaluation["metrics"][0]["model"], abs=1e-4)
    assert "healing | 12 steps" in report.to_markdown()
    assert report.evaluation["metrics"][0]["model"] > plain.evaluation["metrics"][0]["model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.vlora.safetensors", "p.vlora.safetensors"]
    saved = tmp_path / "d.report.json"  # vlora-inspect check says what healing bought, and guards it
    saved.write_text(json.dumps(report.to_dict()))
    gain = (h["after"] - h["before"]) / h["before"]  # cosine: higher is better
    verdict = check(saved, Budgets(min_heal_gain=gain / 2))
    assert verdict.ok and verdict.rules[0].value == pytest.approx(gain) and f"{h['after']:.4f}" in verdict.healing
    assert not check(saved, Budgets(min_heal_gain=2 * gain)).ok


def _tensors(path):
    f = VloraFile(path)
    return {name: f.get(name) for name in f.checkpoint.infos}


@pytest.fixture
def small_start(minilm_dir, tmp_path):
    start = tmp_path / "s.vlora.safetensors"
    compress(minilm_dir, start, rank=4, chunks=2, **CORE)
    return start


def test_resume_after_an_interruption_gives_the_uninterrupted_result(minilm_dir, small_start, tmp_path, tiny_texts):
    cfg = HealConfig(steps=6, batch_size=4, lr=1e-3, warmup=2, save_every=100, max_length=32)
    whole = tmp_path / "whole.vlora.safetensors"
    heal(small_start, minilm_dir, tiny_texts, whole, cfg)

    def stop_at_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    cut = tmp_path / "cut.vlora.safetensors"
    with pytest.raises(Interrupted, match="`resume`"):
        heal(small_start, minilm_dir, tiny_texts, cut, cfg, on_step=stop_at_3)
    assert state_path(cut).is_file() and not cut.exists()
    with pytest.raises(VloraError, match="other settings"):
        heal(small_start, minilm_dir, tiny_texts, cut, HealConfig(**{**cfg.__dict__, "lr": 2e-3}), resume=True)
    report = heal(small_start, minilm_dir, tiny_texts, cut, cfg, resume=True)
    assert report.resumed_from == 3 and report.steps == 6 and not state_path(cut).exists()
    a, b = _tensors(whole), _tensors(cut)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    with pytest.raises(VloraError, match="no saved state"):
        heal(small_start, minilm_dir, tiny_texts, tmp_path / "new.vlora.safetensors", cfg, resume=True)


def _why(stderr: str) -> str:
    """A failed run's stderr for the assertion: from a crash's Python stack where there is one
    (PYTHONFAULTHANDLER), else its tail."""
    crash = stderr.find("Fatal Python error")
    return stderr[crash:crash + 4000] if crash >= 0 else stderr[-2000:]


@pytest.fixture
def tiny_texts(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(CALIB.read_text().splitlines()[:48]) + "\n")
    return path


def test_ddp_on_two_gloo_processes_matches_one_process_layer_by_layer_and_end_to_end(minilm_dir, small_start, tmp_path, tiny_texts):
    args = [str(small_start), "--teacher", str(minilm_dir), "--data", str(tiny_texts), "--steps", "4",
            "--batch-size", "8", "--lr", "1e-3", "--warmup", "1", "--max-length", "32", "--device", "cpu", "-q",
            "--local-steps", "2", "--local-samples", "16", "--local-lr", "1e-3"]  # the block-local pass first, its gradients summed too
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash prints its stack
    one = tmp_path / "one.vlora.safetensors"
    two = tmp_path / "two.vlora.safetensors"
    subprocess.run([sys.executable, "-m", "vlora_compress.heal", *args, "-o", str(one)], check=True, env=env,
                   capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vlora_compress.heal", *args, "-o", str(two), "--json"], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, _why(run.stderr)
    assert json.loads(run.stdout)["processes"] == 2
    assert _close_runs(_tensors(one), _tensors(two), _tensors(small_start)) > 50


def _close_runs(a: dict, b: dict, start: dict) -> int:
    """Whether two healed files took the same steps from ``start``: tensors that one moved, the other
    moved alike (slack for Adam's rounding of ~0 gradients); the number of tensors moved."""
    moved, steps, gaps = 0, 0.0, 0.0
    for name in a:
        step = torch.linalg.norm((a[name] - start[name]).double())
        gap = torch.linalg.norm((a[name] - b[name]).double())
        if step == 0:
            assert gap == 0, name
            continue
        # Adam turns float noise in ~0 gradients (key biases', which softmax ignores) into
        # differently rounded steps, so single tensors get some slack and the whole a tight bound
        moved, steps, gaps = moved + 1, steps + step ** 2, gaps + gap ** 2
        assert gap < 0.1 * step + 1e-3, name
    assert gaps ** 0.5 < 0.005 * steps ** 0.5
    return moved


def test_fsdp_on_two_gloo_processes_matches_one_process_and_holds_half(tiny_llama, tmp_path, tiny_texts):
    """fully_shard: the layer-by-layer pass on whole replicas, then end to end sharded; the same
    tensors as one process, while each process holds half the teacher and the optimizer state."""
    start = tmp_path / "l.vlora.safetensors"
    compress(tiny_llama, start, rank=4, chunks=2, **CORE)
    args = [str(start), "--teacher", str(tiny_llama), "--data", str(tiny_texts), "--steps", "4", "--batch-size", "8",
            "--lr", "1e-3", "--warmup", "1", "--max-length", "32", "--device", "cpu", "--local-steps", "2",
            "--local-samples", "16", "--local-lr", "1e-3", "--parallel", "fsdp", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash prints its stack
    one, two = tmp_path / "one.vlora.safetensors", tmp_path / "two.vlora.safetensors"
    single = subprocess.run([sys.executable, "-m", "vlora_compress.heal", *args, "-o", str(one)], env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0, _why(single.stderr)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "vlora_compress.heal", *args, "-o", str(two)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, _why(run.stderr)
    a, b = json.loads(single.stdout), json.loads(run.stdout)
    assert b["processes"] == 2 and b["steps"] == a["steps"] == 4 and b["local"]["steps"] == a["local"]["steps"]
    assert b["after"] == pytest.approx(a["after"], rel=1e-3)
    for part in ("teacher", "trained", "optimizer"):  # each process's shard: about half
        assert 0.4 * a["memory"][part] < b["memory"][part] < 0.6 * a["memory"][part], part
    assert _close_runs(_tensors(one), _tensors(two), _tensors(start)) > 20
    # bf16 as on GPUs: a bf16 teacher's shard, float32 masters gathered as bf16, the same healing
    bf16 = [*args, "--precision", "bf16"]
    single = subprocess.run([sys.executable, "-m", "vlora_compress.heal", *bf16, "-o", str(one), "--force"], env=env,
                            capture_output=True, text=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "vlora_compress.heal", *bf16, "-o", str(two), "--force"], env=env, capture_output=True, text=True)
    assert single.returncode == 0 and run.returncode == 0, _why(single.stderr + run.stderr)
    c, d = json.loads(single.stdout), json.loads(run.stdout)
    assert c["precision"] == d["precision"] == "bf16" and d["memory"]["teacher"] * 2 == b["memory"]["teacher"]
    assert d["memory"]["trained"] == b["memory"]["trained"]  # float32 masters
    assert d["after"] < d["before"] and d["after"] == pytest.approx(c["after"], rel=0.01)


def test_sigterm_stops_an_fsdp_run_with_its_state_and_resume_gives_the_uninterrupted_result(tiny_llama, tmp_path,
                                                                                            tiny_texts):
    """A cluster's time limit: SIGTERM to torchrun; the processes agree on a step, gather and save the
    state; resuming on 2 processes trains the same tensors as a run that was never stopped."""
    import signal
    import time

    start = tmp_path / "l.vlora.safetensors"
    compress(tiny_llama, start, rank=4, chunks=2, **CORE)
    args = [str(start), "--teacher", str(tiny_llama), "--data", str(tiny_texts), "--steps", "40", "--batch-size", "8",
            "--lr", "1e-3", "--warmup", "2", "--max-length", "32", "--device", "cpu", "--local-steps", "0",
            "--parallel", "fsdp", "--save-every", "1", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash prints its stack
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "vlora_compress.heal", *args]
    whole, cut = tmp_path / "whole.vlora.safetensors", tmp_path / "cut.vlora.safetensors"
    run = subprocess.run([*torchrun, "-o", str(whole)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, _why(run.stderr)
    proc = subprocess.Popen([*torchrun, "-o", str(cut)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not state_path(cut).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # after the first step's save, long before the 40th
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "state saved to" in err, _why(err)
    assert state_path(cut).is_file() and not cut.exists()
    run = subprocess.run([*torchrun, "-o", str(cut), "--resume"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, _why(run.stderr)
    report = json.loads(run.stdout)
    assert 0 < report["resumed_from"] < 40 and report["steps"] == 40 and not state_path(cut).exists()
    a, b = _tensors(whole), _tensors(cut)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_kl_and_hidden_losses_heal_a_causal_lm(tiny_gpt2, tmp_path):
    start = tmp_path / "g.vlora.safetensors"
    compress(tiny_gpt2, start, rank=2, chunks=1, **CORE)
    out = tmp_path / "h.vlora.safetensors"
    report = heal(start, tiny_gpt2, CALIB, out, HealConfig(steps=30, batch_size=16, lr=3e-3, max_length=32,
                                                             eval_every=10, eval_samples=16, local_steps=0),
                  eval_data=EVAL)  # end to end alone; test_localheal.py heals layer by layer
    assert report.config["losses"] == [["hidden", 3.0], ["kl", 1.0]]
    assert report.metric == "perplexity" and [e["step"] for e in report.evals] == [0, 10, 20, 30]
    best = min(report.evals, key=lambda e: e["value"])
    assert report.best_step == best["step"] and report.after == best["value"] <= report.before
    assert report.losses[-1] < report.losses[0]
    scored = evaluate(out, EVAL, EvalConfig(task="perplexity", samples=16), config_dir=tiny_gpt2)
    assert scored.metrics[0].model == pytest.approx(report.after, rel=1e-3)  # the written file is the best step


def test_token_budget_and_bad_settings(minilm_dir, small_start, tmp_path, tiny_texts):
    report = heal(small_start, minilm_dir, tiny_texts, tmp_path / "t.vlora.safetensors",
                  HealConfig(steps=50, batch_size=8, tokens=200, max_length=32))
    assert 0 < report.steps < 50 and report.tokens >= 200
    with pytest.raises(VloraError, match="needs a model with a head"):
        heal(small_start, minilm_dir, tiny_texts, tmp_path / "k.safetensors", HealConfig(losses=(("kl", 1.0),)))
    for bad in (dict(losses=(("mse", 1.0),)), dict(tokens=0), dict(device="tpu"), dict(device="cuda:3")):
        with pytest.raises(VloraError):
            HealConfig(**bad)


def test_gradient_checkpointing_trains_the_same_tensors(minilm_dir, small_start, tmp_path, tiny_texts):
    cfg = dict(steps=3, batch_size=8, lr=1e-3, warmup=1, max_length=32)
    plain, ckpt = tmp_path / "plain.vlora.safetensors", tmp_path / "ckpt.vlora.safetensors"
    heal(small_start, minilm_dir, tiny_texts, plain, HealConfig(**cfg))
    heal(small_start, minilm_dir, tiny_texts, ckpt, HealConfig(**cfg, checkpointing=True))
    a, b, start = _tensors(plain), _tensors(ckpt), _tensors(small_start)
    name = "encoder.layer.2.intermediate.dense.weight.vlora_A"
    assert not torch.equal(a[name], start[name])
    for key in a:  # recomputing layers in backward changes no gradient beyond float noise
        assert torch.allclose(a[key], b[key], atol=1e-4), key


@pytest.mark.parametrize("aware", [True, False])
def test_a_quantized_file_heals_and_reports_what_it_wrote(tiny_gpt2, tmp_path, aware):
    start = tmp_path / "q.vlora.safetensors"
    compress(tiny_gpt2, start, rank=4, chunks=2, quantize="int4", group_size=16, **CORE)
    out = tmp_path / "h.vlora.safetensors"
    report = heal(start, tiny_gpt2, CALIB, out, HealConfig(steps=12, batch_size=16, lr=3e-3, max_length=32,
                                                             eval_samples=16, quantization_aware=aware,
                                                             local_steps=0),
                  eval_data=EVAL)
    before, after = VloraFile(start), VloraFile(out)
    assert after.plan == before.plan and after.nbytes == before.nbytes
    raw = [n for n, i in after.checkpoint.infos.items() if i.dtype == "U8"]
    moved = any(not torch.equal(after.checkpoint.read(n), before.checkpoint.read(n)) for n in raw)
    if aware:  # perplexity falls, and the integers moved
        assert report.after < report.before and moved
    else:  # small float steps can round back to the start; the start is then written as it was
        assert report.after <= report.before and (moved or report.best_step == 0)
    # the figure healing reports is the written file's, trained through the quantizer or not
    scored = evaluate(out, EVAL, EvalConfig(task="perplexity", samples=16), config_dir=tiny_gpt2)
    assert scored.metrics[0].model == pytest.approx(report.after, rel=1e-4)


def test_frozen_integers_are_held_as_stored_while_the_rest_heals(tiny_llama, tmp_path, monkeypatch):
    import vlora_compress.heal.distill as distill
    from vlora_compress.heal.student import frozen_integers

    start = tmp_path / "q.vlora.safetensors"
    compress(tiny_llama, start, method="svd", base_quantize="int4", quantize="int4", group_size=16, rank=4,
             ranks="uniform")
    vfile = VloraFile(start)
    cfg = HealConfig(steps=4, batch_size=8, lr=3e-3, max_length=32, local_steps=0, train=("increments",))
    assert frozen_integers(vfile, replace(cfg, train=("increments", "bases")), False) == set()
    bases = frozen_integers(vfile, cfg, False)
    assert bases and all(not name.endswith(("vlora_A", "vlora_B")) for name in bases)
    stored = sum(vfile.checkpoint.read(n).nbytes + vfile.checkpoint.read(n + ".scale").nbytes for n in bases)
    packed, floats = tmp_path / "packed.vlora.safetensors", tmp_path / "floats.vlora.safetensors"
    report = heal(start, tiny_llama, CALIB, packed, cfg)
    assert report.memory["student_packed"] == stored  # the bases as the file stores them, not as floats
    monkeypatch.setattr(distill, "frozen_integers", lambda *a: False)  # every integer a float parameter
    assert heal(start, tiny_llama, CALIB, floats, cfg).memory["student_packed"] == 0
    a, b, s = VloraFile(packed), VloraFile(floats), VloraFile(start)
    for name in a.checkpoint.infos:
        # the same training either way: every trained tensor equal, the frozen ones the start's
        assert torch.equal(a.checkpoint.read(name), b.checkpoint.read(name)), name
    assert any(not torch.equal(a.checkpoint.read(n), s.checkpoint.read(n)) for n in a.checkpoint.infos)
    assert all(torch.equal(a.checkpoint.read(n), s.checkpoint.read(n)) for n in bases)
