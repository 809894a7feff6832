"""The training loop: it learns, and a resumed run continues exactly like an uninterrupted one."""

import json
import threading

import pytest

from hyla.cli.train import samples as _samples
from hyla.data.tokenizer import load_tokenizer
from hyla.errors import ConfigError, DataError
from hyla.train.config import TrainConfig
from hyla.train.loop import train
from hyla.train.optim import lr_at
from tests.helpers import small_corpus

MODEL = {"hidden_size": 32, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}


def config(tmp_path, run: str, steps: int, **changes) -> TrainConfig:
    fields = dict(run_dir=str(tmp_path / run), preset="tiny", model=MODEL, data=str(tmp_path / "corpus"),
                  vocab_size=300, steps=steps, tokens_per_batch=256, max_seq_len=64, warmup=2, eval_every=4,
                  eval_batches=2, checkpoint_every=3, eval_fraction=0.1, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    fields.update(changes)
    return TrainConfig(**fields)


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metrics_without_timing(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # wall-clock speed varies; the first leg of a resumed run also evaluates at its own last step
    return [{k: v for k, v in m.items() if k not in ("tokens_per_s", "eval_loss")} for m in lines]


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    small_corpus(tmp_path / "corpus", n=40)
    straight = train(config(tmp_path, "a", steps=6), progress=False)
    train(config(tmp_path, "b", steps=3), progress=False)
    resumed = train(config(tmp_path, "b", steps=6), resume=True, progress=False)
    # Same numbers step for step: loss, lr, gradient norm and tokens seen.
    assert metrics_without_timing(tmp_path / "b") == metrics_without_timing(tmp_path / "a")
    assert resumed.eval_loss == straight.eval_loss
    assert (tmp_path / "a" / "checkpoint" / "model" / "config.json").is_file()
    assert [p.name for p in (tmp_path / "a").iterdir() if p.name.startswith(".")] == []


def test_training_lowers_the_loss(tmp_path):
    small_corpus(tmp_path / "corpus", n=40)
    train(config(tmp_path, "r", steps=30, lr=1e-2, checkpoint_every=100), progress=False)
    curve = losses(tmp_path / "r")
    assert sum(curve[-5:]) / 5 < 0.7 * sum(curve[:3]) / 3


def test_resume_refuses_another_config(tmp_path):
    small_corpus(tmp_path / "corpus", n=10)
    train(config(tmp_path, "r", steps=3), progress=False)
    with pytest.raises(DataError, match=r"another config \(differs in \['lr'\]\)"):
        train(config(tmp_path, "r", steps=6, lr=1.0), resume=True, progress=False)
    with pytest.raises(DataError, match="nothing to resume"):
        train(config(tmp_path, "new", steps=3), resume=True, progress=False)


def test_schedule_warms_up_then_decays():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.55)


def test_a_toml_config_sets_the_run_and_flags_override_it(tmp_path):
    from hyla.cli import main

    small_corpus(tmp_path / "corpus", n=10)
    (tmp_path / "run.toml").write_text(
        f'run_dir = "{tmp_path / "r"}"\npreset = "tiny"\ndata = "{tmp_path / "corpus"}"\nvocab_size = 300\nsteps = 2\n'
        f"tokens_per_batch = 128\nmax_seq_len = 32\neval_every = 2\neval_batches = 1\neval_fraction = 0.1\n"
        f'lr = 0.5\ncache_dir = "{tmp_path / "cache"}"\n\n[model]\nhidden_size = 32\nintermediate_size = 32\n'
        f"num_attention_heads = 2\nnum_key_value_heads = 1\n"
    )
    assert main(["train", "--config", str(tmp_path / "run.toml"), "--lr", "0.01"]) == 0
    saved = json.loads((tmp_path / "r" / "train.json").read_text())
    assert saved["steps"] == 2 and saved["lr"] == 0.01 and saved["model"]["hidden_size"] == 32


def test_a_bad_toml_config_is_named(tmp_path, capsys):
    from hyla.cli import main

    (tmp_path / "bad.toml").write_text("stpes = 3\n")
    assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "unknown fields ['stpes']" in capsys.readouterr().err
    (tmp_path / "broken.toml").write_text("steps = \n")
    assert main(["train", "--config", str(tmp_path / "broken.toml")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.toml")]) == 2


def test_bfloat16_autocast_trains_close_to_float32(tmp_path):
    small_corpus(tmp_path / "corpus", n=20)
    train(config(tmp_path, "f32", steps=6, lr=1e-2, checkpoint_every=100, dtype="float32"), progress=False)
    train(config(tmp_path, "bf16", steps=6, lr=1e-2, checkpoint_every=100, dtype="bfloat16"), progress=False)
    fp32, bf16 = losses(tmp_path / "f32"), losses(tmp_path / "bf16")
    assert fp32 != bf16  # autocast really ran in bfloat16
    assert all(abs(a - b) < 0.05 * a for a, b in zip(fp32, bf16, strict=True))
    assert bf16[-1] < bf16[0]


def test_an_unknown_dtype_is_named(tmp_path):
    with pytest.raises(ConfigError, match="dtype must be auto, float32 or bfloat16, got 'fp8'"):
        config(tmp_path, "r", steps=1, dtype="fp8")


def test_an_existing_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    small_corpus(tmp_path / "corpus", n=10)
    train(config(tmp_path, "r", steps=3), progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    with pytest.raises(DataError, match="already holds a run: continue it with --resume, replace it with --overwrite"):
        train(config(tmp_path, "r", steps=2, vocab_size=280), progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == before
    with pytest.raises(ConfigError, match="give one of them"):
        train(config(tmp_path, "r", steps=2), resume=True, overwrite=True, progress=False)
    # --overwrite: a fresh run, its own tokenizer (not the old one's 300 ids) and metrics.
    train(config(tmp_path, "r", steps=2, vocab_size=280), overwrite=True, progress=False, sampler=_samples)
    assert [m["step"] for m in metrics_without_timing(tmp_path / "r")] == [1, 2]
    assert load_tokenizer(tmp_path / "r").get_vocab_size() == 280
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["unigram_entropy"] > 0 and len(report["samples"]) == 3 and report["held_out_complete"]
    assert (tmp_path / "r" / "loss.png").stat().st_size > 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds other files"):
        train(config(tmp_path, "other", steps=2), overwrite=True, progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_nothing_is_written_before_the_config_is_checked(tmp_path):
    small_corpus(tmp_path / "corpus", n=5)
    for changes in ({"model": {**MODEL, "hidden_size": 101}}, {"model": {"bogus_field": 3}}, {"preset": "huge"},
                    {"data": str(tmp_path / "missing")}, {"tokenizer": str(tmp_path / "none.json")}):  # fmt: skip
        with pytest.raises((ConfigError, DataError)):
            train(config(tmp_path, "r", steps=2, **changes), progress=False)
        assert not (tmp_path / "r").exists(), changes
    assert not (tmp_path / "cache").exists()


def test_resume_compares_resolved_paths_and_a_moved_run_resumes(tmp_path, monkeypatch):
    small_corpus(tmp_path / "corpus", n=10)
    monkeypatch.chdir(tmp_path)
    train(config(tmp_path, "r", steps=3, run_dir="r", data="corpus"), progress=False)
    train(config(tmp_path, "r", steps=4, run_dir="./r/", data=str(tmp_path / "corpus")), resume=True, progress=False)
    (tmp_path / "r").rename(tmp_path / "moved")
    out = train(config(tmp_path, "moved", steps=5, data="./corpus"), resume=True, progress=False)
    assert out.step == 5 and [m["step"] for m in metrics_without_timing(tmp_path / "moved")] == [1, 2, 3, 4, 5]
    again = train(config(tmp_path, "moved", steps=5), resume=True, progress=False)
    assert (again.already_finished, again.step, again.run_dir) == (True, 5, str(tmp_path / "moved"))


def test_a_stop_saves_the_step_and_resume_continues_exactly(tmp_path):
    small_corpus(tmp_path / "corpus", n=20)
    straight = train(config(tmp_path, "a", steps=5, checkpoint_every=100), progress=False)
    stop = threading.Event()
    stop.set()  # as if Ctrl-C came during the first step
    out = train(config(tmp_path, "b", steps=5, checkpoint_every=100), progress=False, stop=stop)
    assert out.interrupted and out.step == 1 and not (tmp_path / "b" / "report.json").exists()
    resumed = train(config(tmp_path, "b", steps=5, checkpoint_every=100), resume=True, progress=False)
    assert metrics_without_timing(tmp_path / "b") == metrics_without_timing(tmp_path / "a")
    assert resumed.held_out_loss == straight.held_out_loss


def test_a_stop_during_the_final_evaluation_still_writes_the_report(tmp_path, monkeypatch):
    import hyla.train.loop as loop

    small_corpus(tmp_path / "corpus", n=20)
    stop = threading.Event()
    real = loop.evaluate_all

    def interrupted(*args, **kwargs):
        stop.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_all", interrupted)
    out = train(config(tmp_path, "r", steps=2), progress=False, stop=stop, sampler=_samples)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["interrupted"] and not report["held_out_complete"] and "samples" not in report
    assert out.step == 2 and (tmp_path / "r" / "checkpoint" / "model" / "config.json").is_file()
    # Resumed (as a sweep does), the run finishes its evaluation instead of saying it is done.
    monkeypatch.setattr(loop, "evaluate_all", real)
    resumed = train(config(tmp_path, "r", steps=2), resume=True, progress=False)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["held_out_complete"] and resumed.held_out_loss == report["held_out_loss"]
    assert train(config(tmp_path, "r", steps=2), resume=True, progress=False).already_finished


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("steps", 0, "steps must be >= 1"), ("grad_accum", 0, "grad_accum must be >= 1"),
     ("max_seq_len", 0, "max_seq_len must be >= 2"), ("tokens_per_batch", 8, "tokens_per_batch must be >= max_seq_len"),
     ("lr", -1.0, "lr must be > 0"), ("eval_fraction", 1.0, r"eval_fraction must be in \[0, 1\)")],
)  # fmt: skip
def test_a_config_that_cannot_work_is_named(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, "r", **{"steps": 3, field: value})


def test_a_corpus_with_segments_trains_and_evaluates_on_its_trained_tokens_only(tmp_path):
    """Prompt/completion lines: the held-out loss and its count of targets equal a full forward per held-out
    document scored on the completion's tokens (and the end of text after them) only."""
    import random

    import torch
    import torch.nn.functional as F

    from hyla.checkpoint import load
    from hyla.data.corpus import discover
    from hyla.data.shards import build_shards
    from hyla.data.synthetic import word_tokenizer

    rng = random.Random(0)

    def words(n: int) -> str:
        return "".join(f"w{rng.randint(1, 30)} " for _ in range(n))

    lines = [
        json.dumps({"prompt": words(rng.randint(1, 20)), "completion": words(rng.randint(1, 8))}) for _ in range(60)
    ]
    (tmp_path / "pc.jsonl").write_text("\n".join(lines) + "\n")
    word_tokenizer(30).save(str(tmp_path / "words.json"))
    cfg = config(tmp_path, "r", steps=4, data=str(tmp_path / "pc.jsonl"), tokenizer=str(tmp_path / "words.json"),
                 eval_fraction=0.2)  # fmt: skip
    report = train(cfg, progress=False)
    model = load(tmp_path / "r" / "checkpoint" / "model").eval()
    held_out = build_shards(discover(cfg.data), load_tokenizer(cfg.tokenizer), cfg.cache_dir, 0.2, False)["eval"]
    total, count = 0.0, 0
    for i in range(len(held_out)):
        doc = torch.from_numpy(held_out.document(i).astype("int64"))
        mask = torch.from_numpy(held_out.mask[held_out.offsets[i] : held_out.offsets[i + 1]].astype(bool))
        with torch.no_grad():
            logits = model(doc[None]).logits[0, :-1]
        losses = F.cross_entropy(logits, doc[1:], reduction="none")[mask[1:]]
        total, count = total + losses.sum().item(), count + len(losses)
    assert 0 < count < held_out.offsets[-1] - len(held_out)  # some tokens are targets, not all
    assert report.held_out_tokens == count
    assert report.held_out_loss == pytest.approx(total / count, rel=1e-5)


def test_a_planted_pickle_in_a_run_directory_does_not_run(tmp_path):
    import pickle

    small_corpus(tmp_path / "corpus", n=10)
    train(config(tmp_path, "r", steps=2), progress=False)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "r" / "checkpoint" / "trainer.pt").write_bytes(pickle.dumps({"step": Exploit()}))
    with pytest.raises(DataError, match=r"trainer.pt: it is not a trainer state hyla wrote"):
        train(config(tmp_path, "r", steps=4), resume=True, progress=False)
    assert not marker.exists()


def test_resume_after_a_kill_logs_each_step_once(tmp_path, monkeypatch):
    """Killed after the step past its last checkpoint: the resumed run redoes that step, and metrics.jsonl holds
    every step once, as an uninterrupted run's."""
    import hyla.train.loop as loop

    small_corpus(tmp_path / "corpus", n=20)
    train(config(tmp_path, "a", steps=5, checkpoint_every=2), progress=False)
    real = loop._step

    def killed(model, optimizer, batches, step, *args):
        if step == 3:  # steps 1-3 logged, the checkpoint at 2
            raise SystemExit("killed")
        return real(model, optimizer, batches, step, *args)

    monkeypatch.setattr(loop, "_step", killed)
    with pytest.raises(SystemExit):
        train(config(tmp_path, "b", steps=5, checkpoint_every=2), progress=False)
    monkeypatch.setattr(loop, "_step", real)
    train(config(tmp_path, "b", steps=5, checkpoint_every=2), resume=True, progress=False)
    assert metrics_without_timing(tmp_path / "b") == metrics_without_timing(tmp_path / "a")


def test_a_run_directory_is_trained_by_one_process_at_a_time(tmp_path):
    from hyla.train.loop import run_lock

    small_corpus(tmp_path / "corpus", n=10)
    train(config(tmp_path, "r", steps=2), progress=False)
    with run_lock(tmp_path / "r"), pytest.raises(DataError, match="is being trained by another process"):
        train(config(tmp_path, "r", steps=4), resume=True, progress=False)
    assert train(config(tmp_path, "r", steps=3), resume=True, progress=False).step == 3


def test_a_malformed_jsonl_line_fails_before_the_run_writes_anything(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: expected a JSON object"):
        train(config(tmp_path, "r", steps=2, data=str(tmp_path / "c.jsonl")), progress=False)
    assert not (tmp_path / "r").exists()


def test_a_full_disk_is_one_error_and_the_last_checkpoint_stays(tmp_path, monkeypatch):
    import errno

    import torch

    small_corpus(tmp_path / "corpus", n=10)
    train(config(tmp_path, "r", steps=2), progress=False)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "trainer.pt")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DataError, match=r"no space left on the device writing trainer.pt: the last complete"):
        train(config(tmp_path, "r", steps=4), resume=True, progress=False)
    monkeypatch.undo()
    assert torch.load(tmp_path / "r" / "checkpoint" / "trainer.pt", weights_only=True)["step"] == 2


def test_resume_config_takes_the_runs_own_fields(tmp_path):
    from hyla.train.loop import resume_config

    small_corpus(tmp_path / "corpus", n=10)
    train(config(tmp_path, "r", steps=2, lr=2e-3), progress=False)
    cfg = resume_config(tmp_path / "r", {"steps": 5, "cache_dir": str(tmp_path / "elsewhere"), "lr": 2e-3})
    assert (cfg.steps, cfg.lr, cfg.eval_every, cfg.cache_dir) == (5, 2e-3, 4, str(tmp_path / "elsewhere"))
    with pytest.raises(DataError, match=r"other values of \['lr'\]: a resumed run keeps its config except steps"):
        resume_config(tmp_path / "r", {"lr": 1.0})
    train(cfg, resume=True, progress=False)  # another cache directory is the same run
    assert json.loads((tmp_path / "r" / "train.json").read_text())["steps"] == 5


def test_the_plan_line_counts_a_short_runs_tokens_in_words(tmp_path):
    from hyla.train.loop import _count

    assert (_count(2 * 256), _count(3_530_000), _count(2_100_000_000)) == ("512", "3.5M", "2.1B")
