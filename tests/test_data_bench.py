"""`phi3v-train bench data` runs end to end (smoke test with tiny settings; not a timed test)."""

import json

from phi3v_train.cli import main


def test_bench_data_smoke(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "data", "--out", str(out), "--seq-lens", "8192,131072", "--stream-samples", "300",
               "--batches", "1", "--warmup", "0", "--workers", "0", "--max-seq-len", "4096",
               "--resume-batches", "2", "--num-crops", "4"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert {r["max_seq_len"] for r in report["packing"]} == {8192, 131072}
    assert report["throughput"][0]["samples"] >= 1 and report["throughput"][0]["samples_per_cpu_s"] > 0
    assert report["resume"]["records_replayed"] > 0 and report["hardware"]["cpu_count"] >= 1
    stages = report["profile"]["stages"]
    assert stages["HD transform (resize, normalise, crops, global view)"]["seconds"] > 0
    text = capsys.readouterr().out
    assert "packing efficiency" in text and "where the time goes" in text
    md = (out / "report.md").read_text()
    row = next(r for r in report["packing"] if r["max_seq_len"] == 8192 and r["strategy"] == "best_fill")
    assert f"| 8192 | {100 * row['efficiency']:.2f}% |" in md and "## Where the time goes" in md
    assert row["efficiency_all"] <= row["bound"] + 1e-9 and row["efficiency"] <= row["efficiency_longest"]  # bound: all packs
