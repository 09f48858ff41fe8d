"""Runs that cannot be mixed up, and one line with exit 2 for every command-line or config mistake:
one writer per run directory (a lock), no silent overwrite of any run file, a resume that is the
same run, finite and typed config values, checkpoints checked against their digest, a corpus read
no further than max_bytes (that `hope.train` is imported only by its entry points: tests/test_imports.py)."""
import errno
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
import torch

from hope import HOPE
from hope import checkpoint as hope_checkpoint
from hope import evaluate as hope_evaluate
from hope import train as hope_train
from hope.config import HOPEConfig
from hope.data import read_corpus
from hope.runtime import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
SETS = ["train.backend=torch", "model.num_layers=1", "model.dim=16", "data.max_bytes=20000",
        "train.seq_len=16", "train.batch_size=2", "train.eval_batches=1", "train.log_interval=1",
        "train.warmup_steps=2"]
SMALL = ["--config", "tiny", "--no-progress"] + [a for s in SETS for a in ("--set", s)]


def refused(capsys, argv, module=hope_train) -> str:
    """Run a command that must refuse: exit 2 and exactly one line on stderr, returned."""
    with pytest.raises(SystemExit) as e:
        module.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def train_steps(run: Path) -> list:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert hope_train.main(["--out-dir", str(run), "--max-steps", "2"] + SMALL) == 0
    return run


# ---------------------------------------------------------------------- one writer per run directory
RACE = textwrap.dedent("""
    import json, os, sys, traceback
    import torch._dynamo  # noqa: F401  (imported by the optimizers on first use: once, before forking)
    from hope.train import main

    def start(argv, log):
        pid = os.fork()
        if pid:
            return pid
        for fd, name in ((1, log + ".out"), (2, log + ".err")):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 3
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)

    def wait(pid):
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    for line in sys.stdin:
        job = json.loads(line)
        if job.get("first"):
            assert wait(start(job["first"], job["log"] + ".first")) == 0
        pids = [start(argv, f"{job['log']}.{i}") for i, argv in enumerate(job["pair"])]
        print(json.dumps({"pids": pids, "codes": [wait(p) for p in pids]}), flush=True)
""")


def test_two_trainers_on_one_directory_never_mix(tmp_path):
    """20 times two copies of hope-train's entry point start together on one directory (forked from one
    interpreter, so that they start within milliseconds): new runs with different seeds, or two
    --resume of one run with different eval intervals. Exactly one runs; the other exits 2 at once
    naming the lock and the runner's pid; the metrics hold each step once up to the checkpoint's
    step, and config.yaml is the runner's."""
    jobs = []
    for trial in range(20):
        run, log = tmp_path / f"run{trial}", str(tmp_path / f"log{trial}")
        base = ["--out-dir", str(run)] + SMALL + ["--set", "train.checkpoint_interval=1"]
        if trial % 2 == 0:
            pair = [base + ["--max-steps", "4", "--set", f"train.seed={s}"] for s in (1, 2)]
            jobs.append({"pair": pair, "log": log})
        else:
            pair = [["--resume", str(run), "--max-steps", "5", "--set", f"train.eval_interval={i}"]
                    for i in (100, 200)]
            jobs.append({"first": base + ["--max-steps", "2"], "pair": pair, "log": log})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", RACE], input="".join(json.dumps(j) + "\n" for j in jobs),
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(results) == 20
    for trial, (job, res) in enumerate(zip(jobs, results)):
        run = tmp_path / f"run{trial}"
        errs = [Path(f"{job['log']}.{i}.err").read_text() for i in range(2)]
        assert sorted(res["codes"]) == [0, 2], (trial, res, errs)
        win = res["codes"].index(0)
        lose = 1 - win
        assert errs[lose].count("\n") == 1 and "Traceback" not in errs[lose], errs[lose]
        assert str(run / LOCK_NAME) in errs[lose] and f"pid {res['pids'][win]}" in errs[lose], errs[lose]
        ckpt = torch.load(run / "ckpt.pt", weights_only=True)
        assert train_steps(run) == list(range(1, ckpt["step"] + 1)) and ckpt["step"] == (4 if trial % 2 == 0 else 5)
        key, value = ("seed", 1 + win) if trial % 2 == 0 else ("eval_interval", 100 * (1 + win))
        assert getattr(hope_train.RunConfig.load(str(run / "config.yaml")).train, key) == value
        assert ckpt["config"]["train"][key] == value
        assert not (run / LOCK_NAME).exists() and not list(run.glob("*.tmp*"))


def test_temporary_files_are_per_process(tmp_path):
    assert hope_checkpoint.temporary_path(tmp_path / "ckpt.pt").name == f"ckpt.pt.tmp.{os.getpid()}"


# ---------------------------------------------------------------------- no silent overwrite of any run file
def test_a_directory_with_run_files_but_no_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("my notes\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    line = refused(capsys, ["--out-dir", tmp_path, "--max-steps", 1] + SMALL)
    assert "config.yaml" in line and "metrics.jsonl" in line and "--overwrite" in line
    assert (tmp_path / "config.yaml").read_text() == "my notes\n"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert hope_train.main(["--out-dir", str(tmp_path), "--max-steps", "1", "--overwrite"] + SMALL) == 0
    assert "starting over" in capsys.readouterr().out and train_steps(tmp_path) == [1]


# ---------------------------------------------------------------------- resume means the same run
def test_resume_refuses_changed_hyperparameters_and_records_allowed_changes(finished_run, capsys):
    before = {f.name: f.read_bytes() for f in finished_run.iterdir()}
    line = refused(capsys, ["--resume", finished_run, "--set", "train.lr=1e30", "--max-steps", 3])
    assert "train.lr=0.003 (now 1e+30)" in line and "train.max_steps" in line
    line = refused(capsys, ["--resume", finished_run, "--set", "model.dropout=0.5"])
    assert "model.dropout" in line
    assert {f.name: f.read_bytes() for f in finished_run.iterdir()} == before
    assert hope_train.main(["--resume", str(finished_run), "--max-steps", "3", "--set", "train.log_interval=2"]) == 0
    assert "train.max_steps 2 -> 3" in capsys.readouterr().out
    ran = hope_train.RunConfig.load(str(finished_run / "config.yaml")).train
    assert (ran.max_steps, ran.log_interval, ran.lr) == (3, 2, 0.003)
    changed = json.loads((finished_run / "run.json").read_text())["changed_on_resume"]
    assert changed["train.max_steps"] == [2, 3] and changed["train.log_interval"] == [1, 2]


# ---------------------------------------------------------------------- finite, typed config values
@pytest.mark.parametrize("override, named", [
    ("model.norm_eps=inf", "model.norm_eps"), ("model.rope_base=nan", "model.rope_base"),
    ("model.init_std=.inf", "model.init_std"), ("model.mlp_ratio=nan", "model.mlp_ratio"),
    ("train.lr=nan", "train.lr"), ("train.grad_clip=-.inf", "train.grad_clip"),
    ("data.val_fraction=nan", "data.val_fraction"), ("model.dim=64.5", "model.dim"),
    ("train.adam_betas=0.9", "train.adam_betas"), ("train.adam_betas=[0.9]", "train.adam_betas"),
    ("train.adam_betas=[0.9, abc]", "train.adam_betas"), ("train.adam_betas=[0.9, 1.5]", "train.adam_betas"),
    ("train.momentum_betas=[]", "train.momentum_betas"), ("train.amp=maybe", "train.amp"),
    ("data.files=5", "data.files"), ("data.files=''", "data.files"), ("model.cms=2", "model.cms"),
])
def test_config_values_are_finite_and_typed(override, named, tmp_path, capsys):
    run = tmp_path / "run"
    line = refused(capsys, ["--out-dir", run] + SMALL + ["--set", override])
    assert named in line and not run.exists()


def test_hope_config_rejects_non_finite_floats():
    for field in ("norm_eps", "rope_base", "init_std", "mlp_ratio", "cms_tau_min", "dropout"):
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=field):
                HOPEConfig(**{field: bad})
    with pytest.raises(ValueError, match="tie_weights"):
        HOPEConfig(tie_weights="yes")


# ---------------------------------------------------------------------- checkpoint integrity
def test_corrupted_checkpoint_is_refused(finished_run, tmp_path, capsys):
    raw = (finished_run / "ckpt.pt").read_bytes()
    weight = torch.load(finished_run / "ckpt.pt", weights_only=True)["model"]["embed.tok.weight"]
    at = raw.find(weight.numpy().tobytes()[:256])
    assert at > 0
    flipped = bytearray(raw)
    flipped[at + 512:at + 576] = bytes(b ^ 0xFF for b in flipped[at + 512:at + 576])
    (tmp_path / "ckpt.pt").write_bytes(bytes(flipped))
    assert "corrupted" in refused(capsys, [tmp_path, "--batches", 1], hope_evaluate)
    assert "corrupted" in refused(capsys, ["--resume", tmp_path])


def test_files_that_are_not_hope_checkpoints_are_refused(finished_run, tmp_path, capsys):
    ckpt = torch.load(finished_run / "ckpt.pt", weights_only=True)
    torch.save({"format": hope_checkpoint.FORMAT}, tmp_path / "ckpt.pt")
    assert "is not a hope checkpoint" in refused(capsys, [tmp_path], hope_evaluate)
    assert "is not a hope checkpoint" in refused(capsys, ["--resume", tmp_path])
    for name, change in (("missing", lambda m: m.pop("norm.weight")),
                         ("wrong shape", lambda m: m.update({"norm.weight": torch.ones(3)}))):
        bad = {k: v for k, v in ckpt.items() if k != "format"}
        bad["model"] = dict(bad["model"])
        change(bad["model"])
        hope_checkpoint.save_checkpoint(tmp_path / "ckpt.pt", bad)
        line = refused(capsys, [tmp_path, "--batches", 1], hope_evaluate)
        assert "do not fit the model" in line and name in line and "norm.weight" in line
        assert "do not fit the model" in refused(capsys, ["--resume", tmp_path, "--max-steps", 4])


def test_checkpoint_without_a_digest_still_loads(finished_run, tmp_path, capsys):
    """A checkpoint written as before the digest existed (torch.save of the same payload, no sha256)."""
    ckpt = torch.load(finished_run / "ckpt.pt", weights_only=True)
    assert ckpt.pop(hope_checkpoint.DIGEST_KEY) == hope_checkpoint.payload_digest(ckpt)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    loaded = hope_checkpoint.load_checkpoint(tmp_path / "ckpt.pt", for_resume=True)
    assert all(torch.equal(loaded["model"][k], v) for k, v in ckpt["model"].items())
    assert hope_evaluate.main([str(tmp_path), "--batches", "1", "--max-new-tokens", "2"]) == 0


# ---------------------------------------------------------------------- the corpus costs max_bytes, not the file
def test_read_corpus_reads_no_further_than_max_bytes(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:                   # sparse: 256 MiB of zeros that take no disk
        f.write(b"head of the file\n")
        f.truncate(256 * 2**20)
    tracemalloc.start()
    try:
        data = read_corpus([big], max_bytes=60000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data) == 60000 and data.startswith(b"head of the file\n")
    assert peak < 4 * 2**20, peak


# ---------------------------------------------------------------------- every mistake: one line, exit 2
def test_cli_mistakes_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  dim: [64\n")
    cases = [
        (["--set", "model.cms_periods=[8, 16"], "model.cms_periods"),
        (["--config", broken], "not valid YAML"),
        (["--config", tmp_path], "is a directory"),
        (["--device", "tpu"], "tpu"),
        (["--set", "data.files=/dev/null"], "not a regular file"),
        (["--lr", "abc"], "--lr"),                         # argparse's own errors: one line too
    ]
    for args, match in cases:
        argv = (SMALL + ["--out-dir", run] + args) if "--config" not in args else \
            (args + ["--out-dir", run] + SMALL[2:])
        assert match in refused(capsys, argv) and not run.exists(), args
    assert "is a file" in refused(capsys, SMALL + ["--out-dir", a_file]) and a_file.read_text() == "x"
    assert "not a regular file" in refused(capsys, ["--resume", "/dev/null"])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    line = refused(capsys, SMALL + ["--out-dir", run, "--backend", "triton", "--device", "cpu"])
    assert "triton" in line and "TRITON_INTERPRET" in line and not run.exists()


def test_a_full_disk_names_the_disk_and_the_step(tmp_path, capsys, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", no_space)
    line = refused(capsys, ["--out-dir", tmp_path, "--max-steps", 3, "--set", "train.checkpoint_interval=2"] + SMALL)
    assert "No space left on device" in line and "step 2" in line and "the disk mounted at" in line
    assert not (tmp_path / "ckpt.pt").exists() and not list(tmp_path.glob("*.tmp*"))
    assert train_steps(tmp_path) == [1, 2]


def test_evaluate_and_generate_reject_bad_arguments(finished_run, capsys):
    assert "prompt" in refused(capsys, [finished_run, "--prompt", ""], hope_evaluate)
    assert "temperature" in refused(capsys, [finished_run, "--temperature", "nan"], hope_evaluate)
    model = HOPE(vocab_size=256, dim=16, num_layers=1, num_heads=2, max_seq_len=8, position="learned",
                 backend="torch")
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    for kwargs, err, match in [
        (dict(prompt=[1, 2], max_new_tokens=2.5), TypeError, "max_new_tokens"),
        (dict(prompt=[1, 2], max_new_tokens=2, top_k=2.5), TypeError, "top_k"),
        (dict(prompt=[1, 2], max_new_tokens=2, temperature=float("nan")), ValueError, "temperature"),
        (dict(prompt="abc", max_new_tokens=2), TypeError, "prompt"),
        (dict(prompt=[1, 2, 3], max_new_tokens=7), ValueError, "max_seq_len"),
    ]:
        with pytest.raises(err, match=match):
            model.generate(**kwargs)
    assert calls == []                                                            # refused up front
    assert model.generate([1, 2, 3], max_new_tokens=6, temperature=0).shape == (9,)   # 8 positions fed
