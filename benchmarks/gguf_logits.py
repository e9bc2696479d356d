"""glm4 vs llama.cpp on the same GGUF files: logits of one prompt (max |difference| / max |logit|) and greedy tokens.

    python benchmarks/gguf_logits.py --llama-python /work/peer/venv/bin/python /work/peer/glm-400m/*.gguf

llama.cpp runs in a subprocess under --llama-python (llama-cpp-python, see benchmarks/bench_llamacpp.py for the
build); glm4 loads the same file with glm4.load_model. Without llama_cpp this prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = [151331, 151333] + [(i * 7919) % 150000 + 100 for i in range(30)]  # [gMASK]<sop> + 30 ordinary tokens
GREEDY = 16


def llama_worker(path: str, out: str) -> None:
    """In the peer's interpreter: logits of PROMPT (every position) and GREEDY greedy tokens after it."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(path, n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    llm.eval(PROMPT)
    logits = np.array(llm.scores[: len(PROMPT)], dtype=np.float32)
    llm.reset()
    toks = []
    for t in llm.generate(PROMPT, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        toks.append(int(t))
        if len(toks) == GREEDY:
            break
    np.save(out, logits)
    Path(out + ".json").write_text(json.dumps(toks))


def compare(path: Path, llama_python: str) -> dict:
    import numpy as np
    import torch

    import glm4
    from glm4.reference import generate

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "logits.npy")
        r = subprocess.run([llama_python, __file__, "--worker", str(path), out], capture_output=True, text=True)
        if r.returncode:
            return {"file": path.name, "error": r.stderr.strip().splitlines()[-1] if r.stderr else "llama.cpp failed"}
        ref = torch.from_numpy(np.load(out))
        ref_tokens = json.loads(Path(out + ".json").read_text())
    model = glm4.load_model(path, dtype=torch.float32)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        logits = model(ids)[0].float()
        ours = generate(model, ids, max_new_tokens=GREEDY, temperature=0.0, eos_token_ids=[])[0, len(PROMPT):].tolist()
    diff = (logits - ref).abs().max().item()
    return {"file": path.name, "max_abs_diff": diff, "rel": diff / ref.abs().max().item(),
            "argmax_equal": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "greedy_equal": ours == ref_tokens, "greedy_common_prefix": next(
                (i for i, (a, b) in enumerate(zip(ours, ref_tokens)) if a != b), GREEDY)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        llama_worker(argv[1], argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--llama-python", required=True, help="an interpreter with llama_cpp")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    probe = subprocess.run([a.llama_python, "-c", "import llama_cpp"], capture_output=True)
    if probe.returncode:
        print(f"llama_cpp is not importable under {a.llama_python}: nothing to compare")
        return 0
    rows = [compare(f, a.llama_python) for f in a.files]
    for r in rows:
        print(json.dumps(r))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
