"""Evaluation: answer parsing, metrics, reports, greedy generation, and `phi3v-train eval` on an
exported tiny model (one process) and on a 2-rank ZeRO-3 checkpoint (torchrun, gloo)."""

import csv
import json
import math
import subprocess

import pytest
import torch

from phi3v_train.eval import (
    baseline_metrics,
    build_args,
    char_similarity,
    compare_outputs,
    compute_metrics,
    eval_torchrun_cmd,
    format_demo_eval,
    parse_answer,
    parse_model_spec,
    parse_price,
    render_report,
    score_sample,
    write_outputs,
)
from phi3v_train.generate import greedy_generate, score_answers

REF = "Product: Chaz Kangeroo Hoodie, Category: HOODIES & SWEATSHIRTS, Full Price: 52.0"


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, title, category, price", [
    (REF, "Chaz Kangeroo Hoodie", "HOODIES & SWEATSHIRTS", 52.0),
    ("product : chaz hoodie ,category:hoodies and sweatshirts , FULL PRICE: $52", "chaz hoodie",
     "hoodies and sweatshirts", 52.0),
    ("Category: TEES, Price: USD 1,234.50, Product: Hero Tee", "Hero Tee", "TEES", 1234.5),
    ("Product: Go-Get'r Pushup Tank, Category: BRAS & TANKS, Full Price: 52,5 €", "Go-Get'r Pushup Tank",
     "BRAS & TANKS", 52.5),
    ("Product Breathe-Easy Tank, Category TANKS, Price 34", "Breathe-Easy Tank", "TANKS", 34.0),
    ("Product: Push It Messenger Bag Category: BAGS Full Price: 45.0.0", "Push It Messenger Bag", "BAGS", 45.0),
    ("Product: A, Category: B, Full Price: 5, Product: C, Category: D, Full Price: 9", "A", "B", 5.0),  # repeated
    ("Chaz Kangeroo Hoodie, HOODIES & SWEATSHIRTS, 52.0", "Chaz Kangeroo Hoodie", "HOODIES & SWEATSHIRTS", 52.0),
    ("Title = X  |  Cost = 52.00 USD", "X", None, 52.0),  # synonyms, no category
    ("Product: X, Full Price: 52.00 USD", "X", None, 52.0),
    ("Product: , Category: , Full Price: abc", None, None, None),
    ("Product: .0", None, None, None),  # what the 60-step demo model says: no letter, no title
    ("Product: Sprite Stasis Ball 55 cm, Category: 24, Full Price: 23", "Sprite Stasis Ball 55 cm", None, 23.0),
    ("garbage without structure", None, None, None),
    ("", None, None, None),
    (None, None, None, None),
    ("\x00\ufffd<|end|>Product:::,,,", None, None, None),
])
def test_parse_answer(text, title, category, price):
    p = parse_answer(text)
    assert (p.title, p.category, p.price) == (title, category, price)
    assert p.failed_fields == [f for f, v in zip(("title", "category", "price"), (title, category, price)) if v is None]


@pytest.mark.parametrize("text, value", [
    ("$52", 52.0), ("52.00 USD", 52.0), ("USD 52", 52.0), ("1,234", 1234.0), ("52,50", 52.5), ("€ 7", 7.0),
    ("about 19.99 dollars", 19.99), ("free", None), (None, None), ("", None),
])
def test_parse_price(text, value):
    assert parse_price(text) == value


def test_parse_answer_never_raises_on_random_bytes():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        text = bytes(torch.randint(0, 256, (40,), generator=g).tolist()).decode("latin-1")
        parse_answer(text + " Price: " + text)


# ---------------------------------------------------------------------------------------------- metrics


def _row(prediction, title, category, price, stopped=True):
    truth = {"title": title, "category": category, "price": price}
    return {"truth": truth, "stopped": stopped, "num_generated_tokens": 3, **score_sample(prediction, truth)}


def test_metrics_by_hand():
    rows = [
        _row(REF, "Chaz Kangeroo Hoodie", "HOODIES & SWEATSHIRTS", 52.0),  # all right
        _row("Product: chaz kangaroo hoodie, Category: Hoodies and Sweatshirts, Full Price: $57",
             "Chaz Kangeroo Hoodie", "HOODIES & SWEATSHIRTS", 52.0),  # err 5 (< 10%), 1 char off
        _row("Product: Hero Tee, Category: TEES, Full Price: 10", "Hero Tee", "PANTS", 40.0),  # err 30 (75%)
        _row("garbage", "Nora Tank", "TANKS", 39.0, stopped=False),  # nothing parses
    ]
    m = compute_metrics(rows)
    assert m["num_samples"] == 4
    assert m["parse_failure_rate"] == 0.25
    assert m["parse_failure_rate_by_field"] == {"title": 0.25, "category": 0.25, "price": 0.25}
    assert m["stopped_rate"] == 0.75
    assert m["price_num_parsed"] == 3
    assert m["price_mae"] == pytest.approx((0 + 5 + 30) / 3)
    assert m["price_mape"] == pytest.approx((0 + 5 / 52 + 0.75) / 3)
    assert m["price_within_10pct"] == 0.5  # over all 4 samples: the failure counts as a miss
    assert m["category_accuracy"] == 0.5
    assert m["category_accuracy_by_category"]["HOODIES & SWEATSHIRTS"] == {"n": 2, "correct": 2, "accuracy": 1.0}
    assert m["category_accuracy_by_category"]["PANTS"]["accuracy"] == 0.0
    assert m["title_exact_match"] == 0.5
    sim = char_similarity("chaz kangaroo hoodie", "Chaz Kangeroo Hoodie")
    assert 0.9 < sim < 1
    assert m["title_char_similarity"] == pytest.approx((1 + sim + 1 + 0) / 4)


def test_metrics_when_nothing_parses():
    m = compute_metrics([_row("", "A", "B", 1.0), _row("???", "C", "D", 2.0)])
    assert m["parse_failure_rate"] == 1.0 and m["price_mae"] is None and m["price_mape"] is None
    assert m["category_accuracy"] == 0.0 and m["title_char_similarity"] == 0.0


def test_baseline_metrics():
    train = [{"category": "TEES", "price": 10.0}, {"category": "TEES", "price": 20.0}, {"category": "BAGS", "price": 30.0}]
    val = [{"category": "TEES", "price": 20.0}, {"category": "BAGS", "price": 40.0}]
    b = baseline_metrics(train, val)
    assert b["majority_category"] == "TEES" and b["median_price"] == 20.0
    assert b["category_accuracy"] == 0.5 and b["price_mae"] == 10.0 and b["price_within_10pct"] == 0.5


def test_report_and_compare(tmp_path):
    rows = [_row(REF, "Chaz Kangeroo Hoodie", "HOODIES & SWEATSHIRTS", 52.0)]
    for r in rows:
        r.update(model="m", key="mh01", prediction=REF)
    for name in ("a", "b"):
        result = {"models": {"m": compute_metrics(rows)}, "order": ["m"], "meta": {"num_samples": 1, "specs": {"m": name}}}
        write_outputs(tmp_path / name, result, rows)
        assert json.loads((tmp_path / name / "eval.jsonl").read_text())["prediction"] == REF
    report = compare_outputs([tmp_path / "a", tmp_path / "b"], tmp_path / "ab").read_text()
    assert "| `m` | `m (b)` |" in report and "| category accuracy | 100.0% | 100.0% |" in report
    assert "mh01" in report and "HOODIES & SWEATSHIRTS" in report
    merged = json.loads((tmp_path / "ab" / "metrics.json").read_text())
    assert merged["order"] == ["m", "m (b)"]
    assert "n/a" in render_report({"models": {"x": compute_metrics([_row("", "A", "B", 1.0)])}, "order": ["x"]})


def test_model_spec(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert (parse_model_spec(str(run)).kind, parse_model_spec(str(run)).name) == ("run", "run")
    s = parse_model_spec(f"before=init:{run}")
    assert (s.kind, s.name, s.path) == ("init", "before", run)
    assert parse_model_spec(str(hf)).kind == "hf"
    with pytest.raises(FileNotFoundError):
        parse_model_spec(str(tmp_path / "missing"))
    args = build_args([str(run), "--nproc", "2", "--max-new-tokens", "5"])
    assert args.nproc == 2 and args.max_new_tokens == 5
    assert eval_torchrun_cmd(2, ["x"])[-3:] == ["phi3v_train.cli", "eval", "x"]


# ---------------------------------------------------------------------------------------------- generation


class RuleModel(torch.nn.Module):
    """logits[b, t] favour rule[input_ids[b, t]] (then second[...]): next-token rules on the last token."""

    def __init__(self, rule, second=None, vocab=32064):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.rule, self.second, self.vocab, self.calls = rule, second or {}, vocab, 0

    def forward(self, input_ids, pixel_values=None, image_sizes=None, position_ids=None):
        self.calls += 1
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for (b, t), tok in zip(torch.cartesian_prod(*map(torch.arange, input_ids.shape)).tolist(), input_ids.flatten().tolist()):
            logits[b, t, self.rule.get(tok, 7)] = 2.0
            if tok in self.second:
                logits[b, t, self.second[tok]] = 1.0
        return type("Out", (), {"logits": logits})()


def _prompt(ids):
    return {"input_ids": torch.tensor(ids), "pixel_values": torch.zeros(0, 3, 8, 8), "image_sizes": torch.zeros(0, 2)}


def test_greedy_generate_rules():
    rule = {100: 101, 101: 102, 102: 103, 103: 32007,  # stop after 101 102 103
            200: 32044, 201: 32050}  # banned image token / beyond the tokenizer: take the second choice
    model = RuleModel(rule, second={200: 201, 201: 202})
    prompts = [_prompt([1, 5, 100]), _prompt([1, 102]), _prompt([1, 5, 6, 200]), _prompt([50, 100])]
    gens = greedy_generate(model, prompts, max_new_tokens=5, batch_size=3, vocab_limit=32045)
    assert gens[0].token_ids == [101, 102, 103] and gens[0].stopped
    assert gens[1].token_ids == [103] and gens[1].stopped  # shorter row: logits read at its own last token
    assert gens[2].token_ids == [201, 202, 7, 7, 7] and not gens[2].stopped  # pad (32000) never read
    assert gens[3].token_ids == [101, 102, 103]
    # Lock-step (ZeRO-3): another rank still runs, so every batch runs all max_new_tokens forwards.
    model.calls, syncs = 0, []
    gens2 = greedy_generate(model, prompts, max_new_tokens=5, batch_size=3, vocab_limit=32045,
                            sync=lambda running: syncs.append(running) or True)
    assert model.calls == 10 and len(syncs) == 10 + 2  # + one "any rank uncached?" per batch
    assert [g.token_ids for g in gens2] == [g.token_ids for g in gens]


# ---------------------------------------------------------------------------------------------- real tiny model


def _mini_shards(tmp_path_factory):
    from phi3v_train.config import REPO_ROOT
    from phi3v_train.data.shards import write_shards

    src = REPO_ROOT / "data/luma/products.csv"
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))[:14]
    out = tmp_path_factory.mktemp("mini")
    csv_path = out / "products.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    manifest = write_shards(csv_path, REPO_ROOT / "data/luma", out / "shards", val_fraction=0.35, seed=0)
    assert manifest["splits"]["val"]["num_samples"] >= 3
    return out / "shards"


@pytest.fixture(scope="module")
def mini_shards(tmp_path_factory):
    return _mini_shards(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_model():
    from phi3v_train.model.config import load_model_config
    from phi3v_train.model.modeling import Phi3VForCausalLM

    torch.manual_seed(0)
    cfg = load_model_config("tiny")
    # Larger init than the default 0.02 so the random model's logits are peaked: greedy ties impossible.
    cfg.text_config.initializer_range = 0.5
    return Phi3VForCausalLM._from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()


def test_batched_generation_equals_one_by_one(tiny_model, mini_shards):
    from phi3v_train.eval import read_samples, resolve_split
    from phi3v_train.eval.run import _encode
    from phi3v_train.model.processor import Phi3VProcessor

    cfg = tiny_model.config
    processor = Phi3VProcessor.from_pretrained(num_crops=cfg.num_crops, crop_size=cfg.crop_size, patch_size=cfg.patch_size)
    _, samples = read_samples(resolve_split(str(mini_shards), "val"), limit=4)
    prompts = [_encode(processor, s) for s in samples]
    assert len(prompts) >= 3
    prompts[1]["input_ids"] = torch.cat([torch.tensor([1, 1, 1]), prompts[1]["input_ids"]])  # ragged rows
    one = greedy_generate(tiny_model, prompts, max_new_tokens=6, batch_size=1, vocab_limit=32045)
    batched = greedy_generate(tiny_model, prompts, max_new_tokens=6, batch_size=4, vocab_limit=32045)
    assert [g.token_ids for g in one] == [g.token_ids for g in batched]
    assert all(len(g.token_ids) == 6 or g.stopped for g in one)
    # Teacher-forced answer scores: batched == one by one == the model's own training loss.
    targets = [_encode(processor, s, with_answer=True) for s in samples]
    targets[1]["input_ids"] = torch.cat([torch.tensor([1, 1, 1]), targets[1]["input_ids"]])
    targets[1]["labels"] = torch.cat([torch.tensor([-100] * 3), targets[1]["labels"]])
    sc1, sc4 = score_answers(tiny_model, targets, batch_size=1), score_answers(tiny_model, targets, batch_size=4)
    assert [(a.num_tokens, a.num_correct) for a in sc1] == [(b.num_tokens, b.num_correct) for b in sc4]
    assert [a.loss_sum for a in sc1] == pytest.approx([b.loss_sum for b in sc4], rel=1e-5)
    t = targets[0]
    with torch.no_grad():
        loss = tiny_model(input_ids=t["input_ids"][None], labels=t["labels"][None], pixel_values=t["pixel_values"],
                          image_sizes=t["image_sizes"]).loss
    assert sc1[0].num_tokens == int((t["labels"] != -100).sum()) and sc1[0].num_tokens > 5
    assert sc1[0].loss_sum / sc1[0].num_tokens == pytest.approx(float(loss), rel=1e-5)
    # The reference: the model's own logits on the full sequence, one argmax at a time.
    ids = prompts[0]["input_ids"][None]
    for tok in one[0].token_ids:
        logits = tiny_model(input_ids=ids, pixel_values=prompts[0]["pixel_values"],
                            image_sizes=prompts[0]["image_sizes"]).logits[0, -1, :32045]
        logits[32044] = -math.inf
        assert int(logits.argmax()) == tok
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)


def test_eval_exported_model_one_process(tiny_model, mini_shards, tmp_path):
    from phi3v_train.cli import main

    model_dir = tmp_path / "exported"
    try:
        from phi3v_train.model.export import export_hf

        export_hf(tiny_model, tiny_model.config, model_dir)
    except ImportError:
        tiny_model.save_pretrained(model_dir)
    out = tmp_path / "eval"
    rc = main(["eval", f"tiny={model_dir}", "--shards", str(mini_shards), "--out", str(out),
               "--max-new-tokens", "5", "--batch-size", "3", "--quiet"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    n = json.loads((mini_shards / "manifest.json").read_text())["splits"]["val"]["num_samples"]
    m = metrics["models"]["tiny"]
    assert m["num_samples"] == n and metrics["meta"]["world_size"] == 1
    assert 0 <= m["parse_failure_rate"] <= 1 and m["category_accuracy"] is not None
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == n and [r["index"] for r in rows] == list(range(n))
    assert {"prediction", "parsed", "truth", "parse_failed", "category_correct", "title_similarity"} <= set(rows[0])
    assert all(r["num_generated_tokens"] <= 5 and r["answer_tokens"] > 5 for r in rows)
    assert m["answer_loss"] > 0 and 0 <= m["answer_token_accuracy"] <= 1
    report = (out / "report.md").read_text()
    assert "| category accuracy |" in report and "`tiny`" in report
    summary = format_demo_eval(tmp_path)  # the demo's printout of <run>/eval/metrics.json
    assert "\n    tiny " in summary and "answer loss*" in summary


# ---------------------------------------------------------------------------------------------- 2-rank ZeRO-3


@pytest.mark.slow
def test_eval_zero3_checkpoint_two_ranks(mini_shards, tmp_path):
    """Train 2 steps on 2 ranks (ZeRO-3 checkpoint), evaluate it and its init on 2 ranks with an odd
    sample count (rank 1 pads with a dummy), and check the ZeRO-3 answers equal a 1-process eval of
    the same checkpoint (the weights really were loaded into the partitions)."""
    from phi3v_train.cli import cpu_torchrun_env, main, torchrun_cmd
    from phi3v_train.config import REPO_ROOT

    run = tmp_path / "run"
    cmd = torchrun_cmd(2, str(REPO_ROOT / "configs/train/demo.yaml"),
                       [f"run_dir={run}", f"data.shards={mini_shards}", "optim.max_steps=2", "optim.warmup_steps=0",
                        "process_group_timeout_s=120", "logging.log_every=1"])
    proc = subprocess.run(cmd, env=cpu_torchrun_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    out2 = tmp_path / "eval2"
    proc = subprocess.run(
        eval_torchrun_cmd(2, [f"after={run}", f"before=init:{run}", "--limit", "3", "--max-new-tokens", "4",
                              "--batch-size", "2", "--out", str(out2), "--timeout", "120"]),
        env=cpu_torchrun_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| metric | `after` | `before` |" in proc.stdout  # rank 0 printed the comparison report
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["meta"]["world_size"] == 2 and m2["order"] == ["after", "before"]
    assert m2["models"]["after"]["num_samples"] == 3 and m2["models"]["before"]["num_samples"] == 3
    # 2 steps of training lower the teacher-forced loss of the held-out answers below the init's.
    assert m2["models"]["after"]["answer_loss"] < m2["models"]["before"]["answer_loss"]
    rows2 = [json.loads(line) for line in (out2 / "eval.jsonl").read_text().splitlines()]
    assert [(r["model"], r["index"]) for r in rows2] == [(m, i) for m in ("after", "before") for i in range(3)]

    out1 = tmp_path / "eval1"
    assert main(["eval", f"after={run}", "--limit", "3", "--max-new-tokens", "4", "--batch-size", "1",
                 "--out", str(out1), "--quiet"]) == 0
    rows1 = [json.loads(line) for line in (out1 / "eval.jsonl").read_text().splitlines()]
    after2 = [r["prediction"] for r in rows2 if r["model"] == "after"]
    assert [r["prediction"] for r in rows1] == after2
    assert json.loads((out1 / "metrics.json").read_text())["meta"]["models"]["after"]["tag"] == "step_0000002"
