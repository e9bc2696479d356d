"""`glm4 bench` runs end to end on a tiny checkpoint, with and without transformers."""

from __future__ import annotations

import json

from glm4.cli import main as cli_main
from glm4.engine import bench

TINY_ARGS = ["--prompt-len", "16", "--decode-tokens", "4", "--batch", "1,2", "--requests", "3", "--max-prompt", "20",
             "--max-output", "5", "--repeats", "1", "--kv-cache-tokens", "512"]


def test_bench_with_hf(hf_checkpoint, tmp_path, capsys):
    folder, _ = hf_checkpoint("glm")
    out = tmp_path / "r.json"
    assert bench.main(["--model", str(folder), "--json", str(out), *TINY_ARGS]) == 0
    res = json.loads(out.read_text())
    e, h = res["engine"], res["hf"]
    for k in ("prefill_tok_s", "decode_b1_tok_s", "decode_b2_tok_s", "concurrent_gen_tok_s"):
        assert e[k] > 0 and h[k] > 0
    assert e["concurrent_requests"] == 3 and e["ttft_p99_s"] >= e["ttft_p50_s"] > 0
    assert 0 < e["roofline_fraction"] and e["peak_rss_mib"] > 0
    assert "ratio" in capsys.readouterr().out


def test_bench_cli_without_hf_and_bad_input(hf_checkpoint, tmp_path, capsys):
    folder, _ = hf_checkpoint("glm")
    assert cli_main(["bench", "--model", str(folder), "--no-hf", *TINY_ARGS]) == 0
    assert "decode tok/s, batch 2" in capsys.readouterr().out
    out = tmp_path / "q.json"
    assert bench.main(["--model", str(folder), "--no-hf", "--quantization", "int8", "--json", str(out), *TINY_ARGS]) == 0
    res = json.loads(out.read_text())
    assert "engine weights int8" in res["report"] and res["engine"]["decode_b1_tok_s"] > 0
    assert bench.main(["--model", str(tmp_path / "missing")]) == 2
    assert bench.main(["--model", str(folder), "--batch", "x"]) == 2
