"""The vision recipe's starting point: a glm4v_moe checkpoint whose language half is the shipped text default.

    python recipes/vision/make_base.py --out runs/vision/base [--text glm4/assets/default]

- language model: the default's weights (glm4_moe, 8192-token bilingual tokenizer) with two rows added to the
  embedding and the output head for `<|image|>` (8192) and `<|video|>` (8193): the tokenizer had
  `<|begin_of_image|>` ... `<|end_of_video|>` but no placeholders. M-RoPE sections [4, 4, 4] cover the 12 rotary
  frequencies (head_dim 48, partial rotary 0.5); text tokens have equal positions on the three axes, so text runs
  exactly as in the default.
- tower: random (N(0, 0.02)), `vision_config.json` of this folder (or --vision-config); the processor
  (`preprocessor_config.json` or --preprocessor) upscales a 64 x 64 easy-vqa picture to 168 x 168 (min_pixels =
  2 x 168 x 168): a 12 x 12 patch grid, 36 image tokens.
- the GLM-4.1V chat template (glm4v), which renders `<|begin_of_image|><|image|><|end_of_image|>` per picture.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
IMAGE_ID, VIDEO_ID = 8192, 8193


def vision_config(text_cfg: dict, vision: dict) -> dict:
    text = {k: v for k, v in text_cfg.items() if k not in ("architectures", "torch_dtype", "use_cache")}
    text.update(model_type="glm4v_moe_text", vocab_size=text_cfg["vocab_size"] + 2, mrope_section=[4, 4, 4])
    return {"architectures": ["Glm4vMoeForConditionalGeneration"], "model_type": "glm4v_moe", "text_config": text,
            "vision_config": vision, "image_token_id": IMAGE_ID, "video_token_id": VIDEO_ID,
            "image_start_token_id": 8188, "image_end_token_id": 8189, "video_start_token_id": 8190,
            "video_end_token_id": 8191, "tie_word_embeddings": False, "eos_token_id": text_cfg["eos_token_id"]}


def tokenizer_files(text: Path, out: Path, preprocessor: Path) -> None:
    shutil.copy2(text / "tokenizer.model", out / "tokenizer.model")
    cfg = json.loads((text / "tokenizer_config.json").read_text(encoding="utf-8"))
    for tid, tok in ((IMAGE_ID, "<|image|>"), (VIDEO_ID, "<|video|>")):
        cfg["added_tokens_decoder"][str(tid)] = {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                                                 "single_word": False, "special": True}
        cfg["additional_special_tokens"].append(tok)
    cfg["chat_format"] = "glm4v"
    cfg["chat_template"] = (Path(__file__).resolve().parents[2] / "glm4/chat/templates/glm4v.jinja").read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    gen = json.loads((text / "generation_config.json").read_text())
    gen["max_new_tokens"] = 64
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    shutil.copy2(preprocessor, out / "preprocessor_config.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default="glm4/assets/default")
    ap.add_argument("--out", default="runs/vision/base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vision-config", default=str(HERE / "vision_config.json"))
    ap.add_argument("--preprocessor", default=str(HERE / "preprocessor_config.json"))
    a = ap.parse_args(argv)
    from glm4.config import config_from_dict
    from glm4.models import build_model
    from glm4.train.loop import init_weights
    from glm4.weights import load_model, save_checkpoint

    text, out = Path(a.text), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text_cfg = json.loads((text / "config.json").read_text())
    vision = json.loads(Path(a.vision_config).read_text())
    model = build_model(config_from_dict(vision_config(text_cfg, vision)))
    init_weights(model, 0.02, a.seed)
    src = load_model(text, dtype=torch.float32, progress=False)
    lm = model.model.language_model
    with torch.no_grad():
        for name, p in src.model.state_dict().items():
            dst = lm.state_dict()[name]
            if name == "embed_tokens.weight":
                dst[:p.shape[0]] = p
                dst[p.shape[0]:] = p.mean(0)  # placeholders: replaced by the tower's output anyway
            else:
                dst.copy_(p)
        head = src.lm_head.weight
        model.lm_head.weight[:head.shape[0]] = head
        model.lm_head.weight[head.shape[0]:] = head.mean(0)
    save_checkpoint(model, out)
    tokenizer_files(text, out, Path(a.preprocessor))
    n_vis = sum(p.numel() for p in model.model.visual.parameters())
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters ({n_vis / 1e6:.2f}M in the tower)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
