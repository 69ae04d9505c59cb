"""The command line from a new user's side: Ctrl-C is one line and a rerun resumes, every option
has help, eval refuses bad lengths, generate (FP32 / fake-quant / trained scales / engine hook),
and table with an external result merged in."""
import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sasq.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_has_help(name):
    p = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[name][0]).add_arguments(p)
    missing = [a.dest for a in p._actions if a.dest != "help" and not a.help]
    assert not missing, f"sasq {name}: options without help: {missing}"


def test_threads_help_mentions_blas():
    for name in ("run", "eval"):
        p = argparse.ArgumentParser()
        importlib.import_module(COMMANDS[name][0]).add_arguments(p)
        act = next(a for a in p._actions if a.dest == "threads")
        assert "BLAS" in act.help


@pytest.mark.parametrize("argv, message", [
    (["eval", "--data", "x.txt", "--seqlen", "0", "-q"], "--seqlen must be an integer >= 2"),
    (["eval", "--data", "x.txt", "--max-windows", "0", "-q"], "--max-windows must be >= 1"),
    (["run", "--seqlen", "0", "-q"], "--seqlen must be >= 1"),
    (["eval", "--data", "wikitext2:dev", "-q"], "no split 'dev'"),
])
def test_bad_lengths_are_refused_in_one_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def _tiny_run_args(d: Path, assets, stories_dir, steps):
    wt = assets / "wikitext-2"
    (d / "train.txt").write_text((wt / "tokens-v1" / "valid.txt").read_text()[:12_000])
    (d / "eval.txt").write_text((wt / "raw-v1" / "test.joined.txt").read_text()[:3_000])
    return ["run", "--model", str(stories_dir), "--train", str(d / "train.txt"), "--eval", str(d / "eval.txt"),
            "--bits", "W8A8", "--methods", "fp32,sasq", "--objective", "kl", "--steps", str(steps),
            "--seqlen", "32", "--batch", "1", "--calib-windows", "2", "--eval-windows", "2",
            "--own-windows", "2", "--out", str(d / "res"), "--threads", "1"]


def test_ctrl_c_is_one_line_and_a_rerun_resumes(tmp_path, assets, stories_dir):
    args = _tiny_run_args(tmp_path, assets, stories_dir, steps=3000)
    env = {**os.environ, "SASQ_PROGRESS": "off", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "sasq", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck = tmp_path / "res" / "checkpoints" / "sasq_W8A8_kl.npz"
    deadline = time.monotonic() + 120
    while not ck.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ck.exists(), "training never wrote its first checkpoint"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "sasq run: interrupted; rerun the same command to resume"

    from sasq.optim import load_checkpoint
    step = load_checkpoint(ck)[0]["step"]  # intact and readable
    assert 0 < step < 3000
    # The rerun (fewer steps is another setting: same settings, so resume) picks it up and says so.
    rerun = subprocess.run([sys.executable, "-m", "sasq", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming training from sasq_W8A8_kl.npz at step {step} of 3000" in rerun.stderr
    assert "FP32" in rerun.stdout
    doc = json.loads((tmp_path / "res" / "results.json").read_text())
    sasq_row = next(r for r in doc["rows"] if r["method"] == "sasq")
    assert sasq_row["train_steps"] == 3000
    # A third run skips the finished cells and prints their display labels.
    third = subprocess.run([sys.executable, "-m", "sasq", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert "SASQ hard clamp +sink" in third.stderr and "already in results.json, skipped" in third.stderr


def test_refused_run_does_no_work_first(tmp_path, assets, stories_dir, capsys):
    res = tmp_path / "res"
    res.mkdir()
    (res / "results.json").write_text(json.dumps({"version": 1, "meta": {"identity": {"steps": 1}}, "rows": []}))
    assert main(["run", "--quick", "--out", str(res), "-q"]) == 1
    err = capsys.readouterr().err
    assert "different settings" in err and "data-free mode" not in err and "sampling" not in err
    assert not (res / "datafree_train.npy").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, assets, stories_dir):
    d = tmp_path_factory.mktemp("gen")
    assert main(_tiny_run_args(d, assets, stories_dir, steps=3) + ["-q"]) == 0
    return d / "res"


def test_generate_fp32_fake_quant_and_trained(trained_run, capsys):
    prompt = ["--prompt", "Once upon a time", "--max-new-tokens", "12"]
    assert main(["generate", *prompt]) == 0
    fp32 = capsys.readouterr().out.strip()
    assert fp32.startswith("Once upon a time") and len(fp32) > len("Once upon a time") + 10
    assert main(["generate", *prompt, "--method", "static_tensor", "--bits", "W8A8"]) == 0
    assert "calibrated W8A8 static per-tensor" in capsys.readouterr().err
    ck = trained_run / "checkpoints" / "sasq_W8A8_kl.npz"
    assert main(["generate", *prompt, "--checkpoint", str(ck), "--compare"]) == 0
    out = capsys.readouterr().out
    assert "trained scales from sasq_W8A8_kl.npz" in out and "--- FP32" in out
    assert out.split("--- FP32\n")[1].strip() == fp32  # greedy FP32 is the same text


def test_export_then_generate_on_the_engine(tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["export", "--method", "static_channel_sink", "--bits", "W8A8", "--calib-windows", "2",
                 "--seqlen", "32", "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "--prompt", "Once upon", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "[static engine]" in captured.err and captured.out.startswith("Once upon ")
    assert main(["export", "--method", "static_channel_sink", "--out", str(out)]) == 1  # exists
    assert "exists" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "sasq_engine.json").write_text("{}")
    assert main(["generate", "--model", str(bad)]) == 1  # a broken export: one line, no traceback
    assert "config.json" in capsys.readouterr().err


def test_table_with_an_eval_json_merged(trained_run, tmp_path, stories_dir, capsys):
    """`sasq eval --json` writes the external format: merged next to the run's rows, on the
    evaluation set with the same protocol (same text, tokens, seqlen, windows, BOS)."""
    ev = trained_run.parent / "eval.txt"
    out = tmp_path / "fp32.json"
    assert main(["eval", "--model", str(stories_dir), "--data", str(ev), "--seqlen", "32",
                 "--max-windows", "2", "--json", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["table", str(trained_run), "--external", str(out), "--out", str(tmp_path / "t.md")]) == 0
    md = (tmp_path / "t.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("| FP32 (sasq eval) (external)"))
    doc = json.loads((trained_run / "results.json").read_text())
    fp32 = doc["meta"]["fp32"]["eval.txt"]["ppl"]
    assert f"{fp32:.2f} | +0.0%" in line  # the same number by another path
    assert main(["eval", "--model", str(stories_dir), "--data", str(ev), "--seqlen", "16",
                 "--max-windows", "2", "--json", str(out), "-q"]) == 0
    assert main(["table", str(trained_run), "--external", str(out)]) == 1
    assert "seqlen differs (ours 32, fp32.json 16)" in capsys.readouterr().err


def test_table_with_cells_of_a_parallel_run(trained_run, tmp_path, capsys):
    """`sasq table A --with B`: cells run into two folders with the same settings make one
    table; a cell in both with different numbers, or different settings, is refused."""
    import shutil
    doc = json.loads((trained_run / "results.json").read_text())
    # a second cell beside the trained one (its rows relabelled), as another job would add
    doc["rows"] += [dict(r, method="static_tensor", label="static per-tensor", objective="-",
                         ppl=r["ppl"] * 1.5) for r in doc["rows"] if r["method"] == "sasq"]
    cells = sorted({(r["method"], r["bits"], r["objective"]) for r in doc["rows"] if r["method"] != "fp32"})
    assert len(cells) == 2
    a, b = tmp_path / "a", tmp_path / "b"
    for d, keep in ((a, cells[::2]), (b, cells[1::2])):
        shutil.copytree(trained_run, d)
        part = dict(doc, rows=[r for r in doc["rows"] if r["method"] == "fp32"
                               or (r["method"], r["bits"], r["objective"]) in keep])
        (d / "results.json").write_text(json.dumps(part))
    capsys.readouterr()
    assert main(["table", str(a), "--out", str(tmp_path / "a.md")]) == 0
    assert main(["table", str(a), "--with", str(b), "--out", str(tmp_path / "ab.md")]) == 0
    whole = (tmp_path / "ab.md").read_text()
    assert len(whole.splitlines()) > len((tmp_path / "a.md").read_text().splitlines())
    rendered = {l for l in whole.splitlines() if l.startswith("| ")}
    from sasq.results import render_markdown
    assert {l for l in render_markdown(doc).splitlines() if l.startswith("| ")} == rendered
    bad = json.loads((b / "results.json").read_text())
    bad["rows"].append(dict(next(r for r in doc["rows"] if (r["method"], r["bits"], r["objective"])
                                 == cells[0]), ppl=1e9))
    (b / "results.json").write_text(json.dumps(bad))
    assert main(["table", str(a), "--with", str(b)]) == 1
    assert "differs from the first run" in capsys.readouterr().err
    other = json.loads((a / "results.json").read_text())
    other["meta"]["identity"]["steps"] = 12345
    (b / "results.json").write_text(json.dumps(other))
    assert main(["table", str(a), "--with", str(b)]) == 1
    assert "different settings (steps)" in capsys.readouterr().err
