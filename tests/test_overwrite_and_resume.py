"""Issue 20, findings 1, 2, 7, 8: --overwrite replaces only a folder hovle-edge made and never an
input; resuming never unpickles code; a killed run's temporaries are cleaned by the next run and
only they; outputs get the umask's permissions; every package folder is installed."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from hovle_edge.errors import CheckpointError, OutputFolderError
from hovle_edge.files import TEMPORARY_MARKER, atomic_directory, folder_with
from hovle_edge.train.loop import Task, TrainSettings, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FOLDER = folder_with("manifest.json", format="hovle-edge/onnx")


def user_folder(path, name="my_ckpt"):
    """A folder of someone's own files, with a checkpoint-like folder inside."""
    (path / name).mkdir(parents=True)
    (path / name / "config.json").write_text("{}")
    (path / "notes.txt").write_text("mine")
    return path


def test_export_overwrite_never_replaces_the_input_or_a_foreign_folder_and_checks_first(tmp_path):
    from hovle_edge.export import export_model

    sandbox = user_folder(tmp_path / "sb")
    checkpoint = sandbox / "my_ckpt"  # not even a model: the check must come before anything loads it
    foreign = user_folder(tmp_path / "foreign", "sub")
    ours_around_input = tmp_path / "ours"
    (ours_around_input / "ckpt").mkdir(parents=True)
    (ours_around_input / "manifest.json").write_text(json.dumps({"format": "hovle-edge/onnx"}))
    cases = [(sandbox, checkpoint, "input"), (checkpoint, checkpoint, "input"), (sandbox / ".", checkpoint, "input"),
             (foreign, checkpoint, "did not write"), (ours_around_input, ours_around_input / "ckpt", "input")]
    for out, given, said in cases:
        with pytest.raises(OutputFolderError, match=said) as caught:
            export_model(str(given), str(out), overwrite=True, progress=False)
        assert os.path.realpath(out) in str(caught.value)
    with pytest.raises(OutputFolderError, match="allow overwriting it"):
        export_model(str(checkpoint), str(foreign), progress=False)
    assert (sandbox / "notes.txt").read_text() == "mine" and (checkpoint / "config.json").is_file()
    assert (foreign / "sub" / "config.json").is_file() and (ours_around_input / "ckpt").is_dir()


def test_overwrite_replaces_a_folder_we_made_with_the_umasks_permissions(tmp_path):
    out = tmp_path / "model"
    for attempt in range(2):  # the second replaces the first, which carries our manifest
        with atomic_directory(str(out), overwrite=attempt > 0, owned_by=MODEL_FOLDER, inputs=[str(tmp_path / "ckpt")]) as tmp:
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump({"format": "hovle-edge/onnx", "attempt": attempt}, f)
    assert json.loads((out / "manifest.json").read_text())["attempt"] == 1
    assert os.listdir(out) == ["manifest.json"] and [p for p in os.listdir(tmp_path) if p != "model"] == []
    previous = os.umask(0o027)
    try:
        with atomic_directory(str(out), overwrite=True, owned_by=MODEL_FOLDER) as tmp:
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                f.write('{"format": "hovle-edge/onnx"}')
        assert os.stat(out).st_mode & 0o777 == 0o750  # mkdtemp alone gives 0700: unreadable to a service user
    finally:
        os.umask(previous)
    with atomic_directory(str(out), overwrite=True, owned_by=MODEL_FOLDER) as tmp:
        pass
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~previous


def test_build_and_train_outputs_are_checked_the_same_way(tmp_path):
    from hovle_edge.shapes.demo import run_demo
    from hovle_edge.train.stages import run_stage
    from hovle_edge.shapes.teacher import pretrain_teacher

    sandbox = user_folder(tmp_path / "sb")
    for out, said in [(sandbox, "input"), (sandbox / "my_ckpt", "input"), (user_folder(tmp_path / "other"), "did not write")]:
        with pytest.raises(OutputFolderError, match=said):
            run_stage("align", str(sandbox / "my_ckpt"), str(out), data=str(tmp_path / "x.jsonl"), progress=False)
    with pytest.raises(OutputFolderError, match="did not write"):
        pretrain_teacher(str(sandbox), TrainSettings(steps=1), progress=False)
    with pytest.raises(OutputFolderError, match="demo folder"):
        run_demo(str(sandbox), progress=False)
    assert sorted(os.listdir(sandbox)) == ["my_ckpt", "notes.txt"] and os.listdir(sandbox / "my_ckpt") == ["config.json"]
    engines = folder_with("engines.json", format="hovle-edge/engines")
    with pytest.raises(OutputFolderError, match="did not write"):
        with atomic_directory(str(sandbox), overwrite=True, owned_by=engines, what="engine folder"):
            pass


class Line(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Linear(4, 1)

    def forward(self, batch):
        return ((self.model(batch["x"]) - batch["y"]) ** 2).mean(), batch["x"].shape[0]


class FitLine(Task):
    """The smallest stage: batches drawn from numpy's and Python's generators, so a resume that does
    not restore them ends on different weights."""

    def __init__(self):
        torch.manual_seed(0)
        self.module = Line()
        self.model = self.module.model

    def batch(self, step, micro, rank, world, batch_size):
        x = torch.from_numpy(np.random.rand(batch_size, 4).astype(np.float32)) + random.random()
        return {"x": x, "y": x.sum(-1, keepdim=True)}

    def save(self, directory, weights):
        from safetensors.torch import save_file

        save_file(weights, os.path.join(directory, "model.safetensors"))


SETTINGS = TrainSettings(steps=6, batch_size=2, lr=1e-2, warmup=1, save_every=2, log_every=1, precision="fp32")


def fit(out, stop_after=None):
    np.random.seed(0)
    random.seed(0)
    train(FitLine(), SETTINGS, str(out), progress=False, stop_after=stop_after)


class Payload:
    """Unpickling this writes a file: what a planted optimizer.pt would do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return exec, (f"open({self.target!r}, 'w').write('ran')",)


def test_resume_restores_every_generator_and_never_runs_a_planted_pickle(tmp_path):
    from safetensors.torch import load_file

    fit(tmp_path / "straight")
    fit(tmp_path / "resumed", stop_after=3)
    fit(tmp_path / "resumed")
    straight, resumed = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    ran = tmp_path / "payload-ran"
    live = tmp_path / "payload-is-live"
    pickle.loads(pickle.dumps(Payload(str(live))))  # plain unpickling, as resume did before, runs it
    assert live.read_text() == "ran"
    for name, write in [("optimizer.pt", lambda p: torch.save(Payload(str(ran)), p)),
                        ("rng.pt", lambda p: open(p, "wb").write(pickle.dumps(Payload(str(ran)), protocol=2)))]:
        out = tmp_path / name
        fit(out, stop_after=3)
        planted = out / "checkpoints" / "step-0000002" / name
        write(str(planted))
        with pytest.raises(CheckpointError, match=str(planted)):
            fit(out)
        assert not ran.exists()


def test_a_killed_runs_temporaries_are_cleaned_by_the_next_and_only_they(tmp_path):
    out = tmp_path / "model"
    killed = subprocess.run([sys.executable, "-c", f"""
import os, signal
from hovle_edge.files import atomic_directory
with atomic_directory({str(out)!r}) as tmp:
    open(os.path.join(tmp, "half.onnx"), "w").write("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""], cwd=str(tmp_path))
    assert killed.returncode == -signal.SIGKILL
    [stale] = [p for p in os.listdir(tmp_path) if p.startswith(".model.tmp-")]
    someone_elses = tmp_path / ".model.tmp-mine"  # the same kind of name, no marker: not ours to remove
    someone_elses.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / ".model.tmp-running"  # ours, but its process still runs
        running.mkdir()
        (running / TEMPORARY_MARKER).write_text(json.dumps({"pid": alive.pid, "host": os.uname().nodename}))
        with atomic_directory(str(out)) as tmp:
            open(os.path.join(tmp, "manifest.json"), "w").write("{}")
    finally:
        alive.kill()
        alive.wait()
    assert not (tmp_path / stale).exists() and someone_elses.is_dir() and running.is_dir()
    assert os.listdir(out) == ["manifest.json"]


def test_every_package_folder_is_a_package_setup_installs():
    from setuptools import find_packages

    found = set(find_packages(REPO, include=["hovle_edge", "hovle_edge.*"]))
    for folder, _, names in os.walk(os.path.join(REPO, "hovle_edge")):
        if "__pycache__" in folder or not any(n.endswith(".py") for n in names):
            continue
        package = os.path.relpath(folder, REPO).replace(os.sep, ".")
        assert "__init__.py" in names and package in found, f"{package} would be left out of a wheel"
