"""LoRA adapters served: `glm4 serve --model BASE --lora NAME=PATH`, /v1/models lists them, the request's `model`
picks one (official `openai` client; Ollama's route too), an unknown name is a 404; `--model ADAPTER_DIR` loads the
base its adapter_config.json names, or says how to name the base; `glm4 generate` / `glm4 chat` take `--lora`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from test_serve_util import ServerThread, free_port, make_checkpoint

torch.set_num_threads(1)

MODEL = "tiny-glm4"
PROMPT = "Hello world, tell me"


def write_adapter(ckpt, folder, seed, targets, base=None):
    """An adapter with glm4's own trainer tools (PEFT layout; PEFT interop: tests/test_train_lora.py)."""
    from glm4.layers.lora import LoRAConfig, apply_lora, lora_modules, save_adapter
    from glm4.weights import load_model

    model = load_model(ckpt)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(3 * torch.randn(m.lora_B.weight.shape, generator=g))
    return save_adapter(model, folder, base_model_name_or_path=base)


@pytest.fixture(scope="module")
def ckpt_and_adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_lora")
    ckpt = make_checkpoint(tmp / "tiny")
    adapters = {"sql": write_adapter(ckpt, tmp / "sql", 3, ["q_proj", "v_proj", "o_proj", "down_proj"],
                                  base=str(ckpt)),
                "poet": write_adapter(ckpt, tmp / "poet", 2, ["gate_up_proj", "down_proj"], base="THUDM/glm-4-9b")}
    return ckpt, adapters


@pytest.fixture(scope="module")
def server(ckpt_and_adapters):
    from glm4.serve.app import build_state, create_app

    ckpt, adapters = ckpt_and_adapters
    st = build_state(str(ckpt), model_name=MODEL, kv_cache_tokens=4096, lora={k: str(v) for k, v in adapters.items()})
    srv = ServerThread(create_app(st)).start()
    srv.state = st
    yield srv
    srv.stop()


def reference_text(ckpt, tokenizer, adapter=None, new=8) -> str:
    """Greedy decoding, full forward per token, of the model with the adapter applied (glm4.load_model), over the
    tokenizer's ids only (the model's padded rows past them have no text; the server never samples them)."""
    from glm4.weights import load_model

    model = load_model(ckpt, adapter=adapter)
    ids = tokenizer.encode(PROMPT)  # sent as token ids: the server adds no [gMASK]<sop> prefix to those
    out = []
    with torch.no_grad():
        for _ in range(new):
            out.append(int(model(torch.tensor([ids + out]))[0, -1, :tokenizer.vocab_size].argmax()))
    return tokenizer.decode(out, skip_special_tokens=True)


def test_models_lists_base_and_adapters(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL, "sql", "poet"]
    assert client.models.retrieve("poet").id == "poet"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_request_model_picks_the_adapter(server, ckpt_and_adapters):
    ckpt, adapters = ckpt_and_adapters
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    texts = {}
    for name in (MODEL, "sql", "poet"):
        r = client.completions.create(model=name, prompt=server.state.tokenizer.encode(PROMPT), max_tokens=8,
                                      temperature=0,
                                      extra_body={"ignore_eos": True})
        texts[name] = r.choices[0].text
        assert r.model == name  # the response names the model (adapter) that answered
        want = reference_text(ckpt, server.state.tokenizer, adapters.get(name))
        assert texts[name] == want, name
    assert len(set(texts.values())) == 3  # every adapter changes the reply
    chat = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.model == "sql"
    stream = client.chat.completions.create(model="poet", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                            stream=True)
    assert {c.model for c in stream} == {"poet"}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    r = httpx.post(server.url + "/api/generate", json={"model": "poet:latest", "prompt": PROMPT, "stream": False,
                                                        "options": {"num_predict": 4}}, timeout=60)
    assert r.status_code == 200 and r.json()["done"]
    assert httpx.post(server.url + "/api/generate", json={"model": "nope", "prompt": "x", "stream": False},
                      timeout=60).status_code == 404
    bm = server.state.engine.engine.block_manager if hasattr(server.state.engine, "engine") else None
    if bm is not None:  # every KV block back in the pool once the requests are done
        deadline = time.monotonic() + 10
        while bm.num_free_blocks != bm.num_blocks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bm.num_free_blocks == bm.num_blocks


def test_every_api_names_the_adapter_that_answered(server):
    """Anthropic, Responses and Ollama replies name the adapter in `model` (whole and streamed) and say what it
    wrote: the chat route's reply for the same adapter at temperature 0; Ollama's /api/tags lists the adapters."""
    anthropic = pytest.importorskip("anthropic")
    ollama = pytest.importorskip("ollama")
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=60)
    olla = ollama.Client(host=server.url, timeout=60)
    user = [{"role": "user", "content": PROMPT}]
    for name in ("sql", "poet"):
        want = oai.chat.completions.create(model=name, messages=user, max_tokens=6, temperature=0)
        assert want.model == name and want.choices[0].message.content  # (a random model: text, no tags)
        r = claude.messages.create(model=name, max_tokens=6, messages=user, extra_body={"temperature": 0.0})
        assert r.model == name and "".join(b.text for b in r.content if b.type == "text") == \
            want.choices[0].message.content
        with claude.messages.stream(model=name, max_tokens=3, messages=user) as s:
            assert s.get_final_message().model == name
        resp = oai.responses.create(model=name, input=PROMPT, max_output_tokens=6, temperature=0)
        assert resp.model == name and resp.output_text == want.choices[0].message.content
        streamed = [e.response.model for e in oai.responses.create(model=name, input=PROMPT, max_output_tokens=3,
                                                                   stream=True) if hasattr(e, "response")]
        assert streamed and set(streamed) == {name}
        o = olla.chat(model=name, messages=user, options={"temperature": 0, "num_predict": 6})
        assert o.model == name and o.message.content == want.choices[0].message.content
        assert {c.model for c in olla.chat(model=f"{name}:latest", messages=user, stream=True,
                                           options={"num_predict": 3})} == {f"{name}:latest"}
    tags = olla.list().models
    assert [m.model for m in tags] == [f"{MODEL}:latest", "sql:latest", "poet:latest"]
    assert [m.details.parent_model for m in tags] == ["", f"{MODEL}:latest", f"{MODEL}:latest"]
    assert olla.show("sql").details.family == tags[0].details.family


def test_adapter_name_may_not_shadow_the_model(ckpt_and_adapters):
    from glm4.serve.app import build_state

    ckpt, adapters = ckpt_and_adapters
    with pytest.raises(ValueError, match="served model's name"):
        build_state(str(ckpt), model_name="sql", kv_cache_tokens=256, lora={"sql": str(adapters["sql"])})


def test_model_adapter_dir_resolves_its_base(ckpt_and_adapters):
    from glm4.engine.lora import model_and_adapters, parse_lora_specs

    ckpt, adapters = ckpt_and_adapters
    assert model_and_adapters(str(adapters["sql"]), None) == (str(ckpt), {"sql": str(adapters["sql"])})
    assert model_and_adapters(str(ckpt), ["p=" + str(adapters["poet"])]) == (str(ckpt), {"p": str(adapters["poet"])})
    assert parse_lora_specs([str(adapters["poet"])]) == {"poet": str(adapters["poet"])}
    with pytest.raises(ValueError, match=r"--model BASE --lora poet="):
        model_and_adapters(str(adapters["poet"]), None)
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_lora_specs(["x="])


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "glm4.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_generate_and_chat_cli_take_adapters(ckpt_and_adapters):
    ckpt, adapters = ckpt_and_adapters
    ids = ["--prompt-ids", "5,6,7,8", "--max-new-tokens", "6", "--eos-ids", "0"]
    base = _cli("generate", "--model", str(ckpt), *ids)
    by_flag = _cli("generate", "--model", str(ckpt), "--lora", f"sql={adapters['sql']}", *ids)
    by_dir = _cli("generate", "--model", str(adapters["sql"]), *ids)
    assert base.returncode == by_flag.returncode == by_dir.returncode == 0, base.stderr + by_flag.stderr
    assert by_flag.stdout == by_dir.stdout != base.stdout
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-m", "glm4.cli", "chat", "--model", str(ckpt), "--lora",
                         f"sql={adapters['sql']}", "--max-tokens", "3"], input="hi\n/exit\n", env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "Traceback" not in ok.stderr, ok.stderr
    two = _cli("chat", "--model", str(ckpt), "--lora", f"sql={adapters['sql']}", "--lora", f"p={adapters['poet']}")
    assert two.returncode == 2 and "one LoRA adapter" in two.stderr
    bad = _cli("chat", "--model", str(adapters["poet"]))
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "--model BASE --lora poet=" in bad.stderr, bad.stderr
    assert "glm4 finetune ... --merge" in bad.stderr


def test_cli_serve_model_adapter_dir(ckpt_and_adapters):
    """`glm4 serve --model ADAPTER_DIR` as a process: the base and the adapter are both served."""
    ckpt, adapters = ckpt_and_adapters
    bad = _cli("serve", "--model", str(adapters["poet"]))
    assert bad.returncode == 2 and "--model BASE --lora poet=" in bad.stdout, bad.stdout + bad.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glm4.cli", "serve", "--model", str(adapters["sql"]), "--port",
                             str(port), "--log-level", "warning"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(url + "/v1/models", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
                time.sleep(0.2)
        assert [m["id"] for m in r.json()["data"]] == [ckpt.name, "sql"]
        body = {"model": "sql", "prompt": PROMPT, "max_tokens": 3}
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_bad_adapter_config_is_one_line(ckpt_and_adapters, tmp_path):
    ckpt, _ = ckpt_and_adapters
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                                          "target_modules": ["q_proj"]}))
    r = _cli("serve", "--model", str(ckpt), "--lora", f"b={tmp_path / 'broken'}")
    assert r.returncode == 2 and "adapter_model.safetensors" in r.stdout and "Traceback" not in r.stdout + r.stderr
