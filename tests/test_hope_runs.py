"""Run directories of hope-train / hope-evaluate that can be trusted: a checkpoint is never lost
(no silent overwrite, --resume continues in its directory, SIGINT/SIGTERM save one, a diverged run
keeps the last good one), metrics.jsonl is strict JSON with each step once, and a checkpoint never
runs code. The commands run as subprocesses on a shrunken tiny config (torch backend)."""
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hope import checkpoint as hope_checkpoint
from hope import evaluate as hope_evaluate
from hope import train as hope_train
from hope.data import read_corpus

REPO = Path(__file__).resolve().parents[1]
SETS = ["train.backend=torch", "data.max_bytes=100000", "train.seq_len=32", "train.batch_size=4",
        "train.eval_batches=1", "train.log_interval=1", "train.warmup_steps=2"]
SMALL = ["--config", "tiny"] + [a for s in SETS for a in ("--set", s)]


def cli(module, *args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def strict_records(run: Path) -> list:
    """metrics.jsonl parsed as strict JSON (NaN / Infinity are errors, as in every other JSON reader)."""
    def no_constant(name):
        raise ValueError(f"non-JSON constant {name} in metrics.jsonl")
    return [json.loads(line, parse_constant=no_constant) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_steps_once(run: Path, last: int) -> None:
    records = strict_records(run)
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(1, last + 1)), train_steps
    val_steps = [r["step"] for r in records if "val_loss" in r]
    assert len(val_steps) == len(set(val_steps)), val_steps


def ckpt_step(run: Path) -> int:
    return int(torch.load(run / "ckpt.pt", weights_only=True)["step"])


# ---------------------------------------------------------------------- finding 1: the README flow, twice
def test_readme_flow_twice_never_loses_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "tiny"
    first = ["--out-dir", run, "--max-steps", 6, "--stop-at", 3] + SMALL
    for attempt in range(2):
        p = cli("hope.train", *first)                        # output redirected: log lines, no bar
        if attempt == 0:
            assert p.returncode == 0, p.stderr[-3000:]
            assert "new run in" in p.stdout and "step 3/3 |" in p.stdout
            assert "\r" not in p.stdout + p.stderr
            assert ckpt_step(run) == 3
        else:                                                # the finished run is refused, untouched
            assert p.returncode == 2 and "already holds a checkpoint (step 6)" in p.stderr, p.stderr[-2000:]
            assert "--resume" in p.stderr and "--overwrite" in p.stderr
            assert (run / "ckpt.pt").read_bytes() == saved and (run / "metrics.jsonl").read_text() == metrics
        p = cli("hope.train", "--resume", run)
        assert p.returncode == 0, p.stderr[-3000:]
        assert ("resuming" in p.stdout and "done: step 6" in p.stdout) if attempt == 0 else \
            "nothing to do" in p.stdout
        assert ckpt_step(run) == 6
        assert_steps_once(run, 6)
        saved, metrics = (run / "ckpt.pt").read_bytes(), (run / "metrics.jsonl").read_text()

    # starting over is explicit, and says so
    assert hope_train.main(["--out-dir", str(run), "--max-steps", "2", "--overwrite"] + SMALL) == 0
    assert "starting over" in capsys.readouterr().out
    assert ckpt_step(run) == 2
    assert_steps_once(run, 2)


# ---------------------------------------------------------------------- finding 2: --resume DIR continues in DIR
def test_resume_continues_in_the_given_directory(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert hope_train.main(["--out-dir", str(a), "--max-steps", "4", "--stop-at", "2", "--no-progress"] + SMALL) == 0
    b.mkdir()
    for f in a.iterdir():                       # a copy (or a moved run): its checkpoint says out_dir = a
        (b / f.name).write_bytes(f.read_bytes())
    before = {f.name: f.read_bytes() for f in a.iterdir()}
    assert hope_train.main(["--resume", str(b), "--no-progress"]) == 0
    assert ckpt_step(b) == 4 and ckpt_step(a) == 2
    assert {f.name: f.read_bytes() for f in a.iterdir()} == before       # the other run is untouched
    assert_steps_once(b, 4)
    assert hope_train.main(["--resume", str(b / "ckpt.pt"), "--no-progress", "--max-steps", "5"]) == 0
    assert ckpt_step(b) == 5                   # a checkpoint file resumes in its own directory too


# ---------------------------------------------------------------------- finding 3: signals
def _interrupt_after(args, run: Path, steps: int, sig, log: Path):
    """Start hope-train, wait until it has logged `steps` training steps, send `sig`; (code, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "hope.train", *map(str, args)], cwd=REPO, env=env,
                                stdout=out, stderr=err)
        metrics, deadline = run / "metrics.jsonl", time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= steps:
                break
            time.sleep(0.05)
        running = proc.poll() is None
        if running:
            proc.send_signal(sig)
        code = proc.wait(timeout=60)
    texts = log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()
    assert running, texts[1][-3000:]
    return (code,) + texts


def test_signals_save_a_checkpoint_and_every_step_is_logged_once(tmp_path):
    run = tmp_path / "run"
    code, out, err = _interrupt_after(["--out-dir", run, "--max-steps", 100000, "--no-progress",
                                       "--set", "train.checkpoint_interval=100000",
                                       "--set", "train.eval_interval=100000"] + SMALL,
                                      run, 3, signal.SIGINT, tmp_path / "first")
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGINT" in out
    stopped = ckpt_step(run)
    assert stopped >= 3
    assert_steps_once(run, stopped)

    code, out, err = _interrupt_after(["--resume", run], run, stopped + 3, signal.SIGTERM, tmp_path / "second")
    assert code == 143, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM" in out
    stopped = ckpt_step(run)
    assert_steps_once(run, stopped)

    # a process killed without a chance to save logged steps past its checkpoint (and a torn line):
    # resuming drops them, so they are logged once
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": stopped + 1, "loss": 1.0}) + "\n" + '{"step": ')
    assert hope_train.main(["--resume", str(run), "--max-steps", str(stopped + 2), "--no-progress"]) == 0
    assert_steps_once(run, stopped + 2)


# ---------------------------------------------------------------------- finding 4: divergence
def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    p = cli("hope.train", "--out-dir", run, "--max-steps", 40, "--lr", "1e6", "--set", "train.min_lr=0",
            "--set", "train.grad_clip=0", "--set", "train.checkpoint_interval=1", "--no-progress", *SMALL)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "training diverged at step" in p.stderr
    bad_step = int(p.stderr.split("training diverged at step ")[1].split(":")[0])
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert_steps_once(run, bad_step - 1)                     # strict JSON, no NaN record
    # the kept checkpoint evaluates
    assert hope_evaluate.main([str(run), "--batches", "1", "--max-new-tokens", "4", "--backend", "torch"]) == 0


def test_divergence_with_clipping_is_reported_as_divergence(tmp_path):
    cfg = hope_train.RunConfig.load("tiny", SETS + [
        "train.lr=1e6", "train.min_lr=0", "train.max_steps=40", "train.progress=false",
        f"train.out_dir={tmp_path}"])
    with pytest.raises(hope_train.TrainingDiverged, match="training diverged at step"):
        hope_train.train(cfg)


def test_evaluate_refuses_a_checkpoint_with_non_finite_weights(finished_run, tmp_path, capsys):
    ckpt = torch.load(finished_run / "ckpt.pt", weights_only=True)
    ckpt["model"]["norm.weight"][0] = float("nan")
    hope_checkpoint.save_checkpoint(tmp_path / "ckpt.pt", {k: v for k, v in ckpt.items() if k != "format"})
    with pytest.raises(SystemExit) as e:
        hope_evaluate.main([str(tmp_path), "--batches", "1"])
    assert e.value.code == 2 and "non-finite weights" in capsys.readouterr().err


# ---------------------------------------------------------------------- finding 5: checkpoints never run code
class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_crafted_checkpoint_is_refused_without_running_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"format": hope_checkpoint.FORMAT, "step": 1, "payload": _RunsCode(marker)}, evil / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        hope_evaluate.main([str(evil)])
    assert e.value.code == 2
    assert "refusing to load" in capsys.readouterr().err and not marker.exists()
    p = cli("hope.train", "--resume", evil)
    assert p.returncode == 2 and "refusing to load" in p.stderr and "Traceback" not in p.stderr
    assert not marker.exists()


# ---------------------------------------------------------------------- finding 6: small frictions
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished")
    assert hope_train.main(["--out-dir", str(run), "--max-steps", "2", "--no-progress"] + SMALL) == 0
    return run


def test_resume_with_another_optimizer_is_a_clear_error(finished_run, capsys):
    with pytest.raises(SystemExit) as e:
        hope_train.main(["--resume", str(finished_run), "--optimizer", "deep_momentum", "--max-steps", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "optimizer='adamw'" in err and "deep_momentum" in err


def test_evaluate_rejects_zero_batches(finished_run, capsys):
    for flag in ("--batches", "--batch-size"):
        with pytest.raises(SystemExit) as e:
            hope_evaluate.main([str(finished_run), flag, "0"])
        assert e.value.code == 2 and "must be a positive integer" in capsys.readouterr().err


def test_stop_at_zero_claims_no_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        hope_train.main(["--out-dir", str(tmp_path), "--stop-at", "0", "--no-progress"] + SMALL)
    assert e.value.code == 2 and "--stop-at must be a step >= 1" in capsys.readouterr().err
    assert not (tmp_path / "ckpt.pt").exists()


def test_no_stale_temporary_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "ckpt.pt.tmp").write_bytes(b"half a checkpoint from a killed save")
    assert hope_train.main(["--out-dir", str(tmp_path), "--max-steps", "1", "--no-progress"] + SMALL) == 0
    assert not (tmp_path / "ckpt.pt.tmp").exists()
    good = (tmp_path / "ckpt.pt").read_bytes()

    def interrupted_save(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        hope_checkpoint.save_checkpoint(tmp_path / "ckpt.pt", {"step": 2})
    assert not list(tmp_path.glob("ckpt.pt.tmp*")) and (tmp_path / "ckpt.pt").read_bytes() == good


# ---------------------------------------------------------------------- finding 9: plain log lines
def test_no_progress_prints_a_log_line_per_interval(tmp_path, capsys):
    assert hope_train.main(["--out-dir", str(tmp_path), "--max-steps", "4", "--no-progress"] + SMALL
                           + ["--set", "train.log_interval=2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ") and "|" in line]
    assert [line.split(" |")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all("loss" in line and "tokens/s" in line for line in lines)


def test_progress_bar_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert hope_train.main(["--out-dir", str(tmp_path), "--max-steps", "3"] + SMALL) == 0
    out, err = capsys.readouterr()
    assert "\r" in err and "train:" in err                  # the bar, redrawn in place
    assert "step 3/3 |" not in out                          # instead of log lines


# ---------------------------------------------------------------------- finding 10: the corpus is recorded
def test_run_records_python_version_and_corpus_hash(finished_run):
    want = hashlib.sha256(read_corpus(None, 100000)).hexdigest()
    meta = torch.load(finished_run / "ckpt.pt", weights_only=True)["meta"]
    info = json.loads((finished_run / "run.json").read_text())
    for m in (meta, info):
        assert m["python"] == platform.python_version() and m["corpus"]["python"] == platform.python_version()
        assert m["corpus"]["sha256"] == want and m["corpus"]["bytes"] == 100000 and m["corpus"]["files"] is None


def test_evaluate_notes_a_different_corpus(finished_run, tmp_path, capsys):
    ckpt = torch.load(finished_run / "ckpt.pt", weights_only=True)
    ckpt["meta"]["corpus"].update(sha256="0" * 64, python="2.7.18")
    hope_checkpoint.save_checkpoint(tmp_path / "ckpt.pt", {k: v for k, v in ckpt.items() if k != "format"})
    assert hope_evaluate.main([str(tmp_path), "--batches", "1", "--max-new-tokens", "2"]) == 0
    assert "the corpus differs from the one this checkpoint was trained on" in capsys.readouterr().err


def test_checkpoint_of_an_older_format_is_refused_with_a_reason(tmp_path):
    """Format v2 checkpoints hold models that compute differently now (the delta-rule CMS): refused, told to retrain."""
    torch.save({"format": "hope-checkpoint-v2", "step": 1}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="older version.*retrain"):
        hope_checkpoint.load_checkpoint(tmp_path / "ckpt.pt")
