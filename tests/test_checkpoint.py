"""checkpoint.py on one process with a stand-in engine that writes files like DeepSpeed does
(the real engine is exercised by the 2-rank runs in test_train_e2e.py)."""

import json
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from phi3v_train import checkpoint


class FakeEngine:
    """save/load_checkpoint with DeepSpeed's directory layout: <save_dir>/<tag>/<files>."""

    def __init__(self, value: float = 0.0, slow_s: float = 0.0):
        self.value, self.slow_s = value, slow_s

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
        d = __import__("pathlib").Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"value": self.value, "client": client_state}, d / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        time.sleep(self.slow_s)  # a kill lands here: half a checkpoint on disk
        torch.save({"opt": self.value}, d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        assert not save_latest

    def load_checkpoint(self, load_dir, tag):
        state = torch.load(__import__("pathlib").Path(load_dir) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        self.value = state["value"]
        return str(load_dir), state["client"]


def save(engine, ckpt, step, keep_last=2, **kw):
    return checkpoint.save(engine, ckpt, step, rank=0, world_size=1, keep_last=keep_last,
                           client_state={"step": step, "micro_batches_per_rank": 2 * step}, **kw)


def test_commit_layout_keep_last_and_resume(tmp_path):
    ckpt = tmp_path / "checkpoints"
    config = tmp_path / "config.yaml"
    config.write_text("seed: 0\n")
    for step in (2, 4, 6):
        save(FakeEngine(step), ckpt, step, config_path=config)
    assert (ckpt / "latest").read_text() == "step_0000006"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000004", "step_0000006"]
    d = ckpt / "step_0000006"
    assert {"meta.json", "config.yaml", "rng_rank0.pt"} <= {p.name for p in d.iterdir()}
    meta = json.loads((d / "meta.json").read_text())
    assert meta["step"] == 6 and meta["micro_batches_per_rank"] == 12 and meta["world_size"] == 1
    engine = FakeEngine()
    state = checkpoint.load(engine, ckpt, checkpoint.find_resume_tag(ckpt), rank=0, world_size=1)
    assert engine.value == 6 and state["step"] == 6
    with pytest.raises(RuntimeError, match="written by 1 ranks, this run has 2"):
        checkpoint.load(engine, ckpt, "step_0000006", rank=0, world_size=2)


def test_resume_restores_rng_states(tmp_path):
    ckpt = tmp_path / "checkpoints"
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save(FakeEngine(), ckpt, 1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.load(FakeEngine(), ckpt, "step_0000001", rank=0, world_size=1)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_find_resume_tag_falls_back_to_newest_complete(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert checkpoint.find_resume_tag(ckpt) is None
    save(FakeEngine(), ckpt, 2, keep_last=5)
    save(FakeEngine(), ckpt, 4, keep_last=5)
    (ckpt / "tmp-step_0000006").mkdir()  # an unfinished save never counts
    (ckpt / "latest").write_text("step_0000009")  # names nothing
    assert checkpoint.find_resume_tag(ckpt) == "step_0000004"
    (ckpt / "latest").unlink()
    assert checkpoint.find_resume_tag(ckpt) == "step_0000004"
    (ckpt / "latest").write_text("step_0000002\n")  # a complete older one that `latest` names wins
    assert checkpoint.find_resume_tag(ckpt) == "step_0000002"
    assert checkpoint.remove_partial(ckpt) == ["tmp-step_0000006"]


def test_save_after_resume_from_older_drops_the_abandoned_future(tmp_path):
    """Resumed from step 2 while a complete step 4 exists (killed between commit and `latest`):
    saving step 3 deletes step 4, so the next resume cannot jump into the abandoned attempt."""
    ckpt = tmp_path / "checkpoints"
    save(FakeEngine(), ckpt, 2, keep_last=5)
    save(FakeEngine(), ckpt, 4, keep_last=5)
    save(FakeEngine(), ckpt, 3, keep_last=5)
    assert checkpoint.committed_tags(ckpt) == ["step_0000002", "step_0000003"]
    save(FakeEngine(), ckpt, 4, keep_last=5)  # and the same tag again later: replaced
    assert checkpoint.find_resume_tag(ckpt) == "step_0000004"


KILLED_SAVE = textwrap.dedent('''
    import sys
    sys.path.insert(0, {tests!r})
    from test_checkpoint import FakeEngine, save
    save(FakeEngine(value={value}, slow_s={slow}), sys.argv[1], {step})
''')


@pytest.mark.parametrize("where", ["inside the engine's save", "before the commit"])
def test_kill_during_save_leaves_previous_checkpoint(tmp_path, where):
    """SIGKILL while saving step 4: `latest` and the resume stay on step 2 (intact), and the
    half-written directory is removed on resume."""
    ckpt = tmp_path / "checkpoints"
    save(FakeEngine(2), ckpt, 2)
    tests = str(__import__("pathlib").Path(__file__).parent)
    if where == "inside the engine's save":
        code = KILLED_SAVE.format(tests=tests, value=4, slow=30, step=4)
        proc = subprocess.Popen([sys.executable, "-c", code, str(ckpt)])
        marker = ckpt / "tmp-step_0000004" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        t0 = time.time()
        while not marker.exists() and time.time() - t0 < 60:
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    else:
        import os

        pid = os.fork()
        if pid == 0:  # child: the test hook train.py uses for debug.kill_in_save_step
            save(FakeEngine(4), ckpt, 4, before_commit=lambda: os.kill(os.getpid(), signal.SIGKILL))
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert (ckpt / "tmp-step_0000004" / "rng_rank0.pt").exists()  # everything written, nothing committed
    assert (ckpt / "latest").read_text() == "step_0000002"
    assert checkpoint.find_resume_tag(ckpt) == "step_0000002"
    engine = FakeEngine()
    checkpoint.load(engine, ckpt, "step_0000002", rank=0, world_size=1)
    assert engine.value == 2
    assert checkpoint.remove_partial(ckpt) == ["tmp-step_0000004"]
    save(FakeEngine(4), ckpt, 4)
    assert checkpoint.find_resume_tag(ckpt) == "step_0000004"


def test_truncate_metrics_keeps_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert checkpoint.truncate_metrics(path, 3) == 0  # no file yet
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert checkpoint.truncate_metrics(path, 3) == 3  # steps 4, 5 and the torn line
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert checkpoint.truncate_metrics(path, 3) == 0


def test_tags():
    assert checkpoint.tag_for(42) == "step_0000042" and checkpoint.step_of("step_0000042") == 42
    with pytest.raises(ValueError):
        checkpoint.step_of("tmp-step_0000042")


def test_data_order_changes_are_named_at_resume():
    """A resume with other data-order settings is named (the loader then yields other, valid batches)."""
    from phi3v_train.config import load_config
    from phi3v_train.train import data_order, data_order_changes

    shards = ["/a/train-000000.tar", "/a/train-000001.tar"]
    saved = data_order(load_config(None, []), shards)
    assert data_order_changes(saved, data_order(load_config(None, []), [s.replace("/a/", "/b/") for s in shards])) == []
    assert data_order_changes(saved, data_order(load_config(None, ["packing.padding=max_length"]), shards)) == []
    assert data_order_changes(saved, data_order(load_config(None, ["data.num_workers=4"]), shards)) == []
    changed = data_order_changes(saved, data_order(load_config(None, ["data.num_streams=4", "seed=1"]), shards[:1]))
    assert [c.split(":")[0] for c in changed] == ["seed", "data.num_streams", "shards", "shards_hash"]
    assert "data.num_streams: 8 -> 4" in changed
    assert data_order_changes(None, saved) == []  # checkpoints from before this field
