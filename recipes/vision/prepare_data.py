"""easy-vqa -> the vision recipe's data: English questions as the package has them, the same questions in Chinese.

    python recipes/vision/prepare_data.py --data-dir data/vision

Writes (image paths point into the installed `easy-vqa` package, `pip install easy-vqa`):
    train.jsonl   GLM-4V fine-tuning conversations: per training image and language, its questions shuffled and
                  cut into conversations of 1-4 turns; `"image"` on the first user turn
    train_shapes.jsonl  stage 3's mix: train.jsonl plus, per training image and language, its shape asked directly
                  and as yes / no for each of the three shapes (easy-vqa's templates on its labels), shuffled
    valid.jsonl   the same for the 200 training images held out of train.jsonl (eval loss during training)
    test.jsonl    one line per easy-vqa test question and language: {"image", "question", "answer", "lang"}
    manifest.json counts and the majority answer

Chinese: every English template is mapped to a Chinese one (`ZH_TEMPLATES`), shape and colour words and the answers
by `ZH_WORDS`; a Chinese question gets the Chinese answer (yes -> 是, no -> 否, circle -> 圆形, red -> 红色, ...).
A yes/no answer keeps the English question's truth value ("is there not a red shape?" yes <-> "没有红色图形吗？" 是).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
from pathlib import Path

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
ZH_WORDS = {"circle": "圆形", "rectangle": "矩形", "triangle": "三角形", "red": "红色", "green": "绿色", "blue": "蓝色",
            "black": "黑色", "gray": "灰色", "teal": "青色", "brown": "棕色", "yellow": "黄色", "yes": "是", "no": "否"}
# English template ({s}: a shape word, {c}: a colour word) -> Chinese
ZH_TEMPLATES = {
    "is a {c} shape present?": "图中有{c}的图形吗？",
    "is there a {c} shape?": "有{c}图形吗？",
    "does the image not contain a {c} shape?": "图片中不包含{c}图形吗？",
    "is there not a {c} shape?": "没有{c}图形吗？",
    "is there not a {c} shape in the image?": "图片里没有{c}图形吗？",
    "does the image contain a {c} shape?": "图片包含{c}图形吗？",
    "is no {c} shape present?": "不存在{c}图形吗？",
    "is there a {c} shape in the image?": "图片里有{c}图形吗？",
    "what color is the shape?": "这个图形是什么颜色？",
    "what color is the {s}?": "这个{s}是什么颜色？",
    "what shape is in the image?": "图片里是什么形状？",
    "what is the color of the {s}?": "{s}的颜色是什么？",
    "what is the color of the shape?": "图形的颜色是什么？",
    "what shape does the image contain?": "图片包含什么形状？",
    "what shape is present?": "出现的是什么形状？",
    "what is the {c} shape?": "{c}的图形是什么形状？",
    "is no {s} present?": "不存在{s}吗？",
    "is there not a {s}?": "没有{s}吗？",
    "does the image not contain a {s}?": "图片中不包含{s}吗？",
    "is there a {s}?": "有{s}吗？",
    "is there not a {s} in the image?": "图片里没有{s}吗？",
    "is a {s} present?": "图中有{s}吗？",
    "does the image contain a {s}?": "图片包含{s}吗？",
    "is there a {s} in the image?": "图片里有{s}吗？",
}
_WORD = re.compile(r"\b(" + "|".join(SHAPES + COLORS) + r")\b")
VALID_IMAGES = 200  # training images held out for the eval loss


def to_chinese(question: str, answer: str) -> tuple[str, str]:
    """An easy-vqa question and answer in Chinese (KeyError for a question no template covers)."""
    words = _WORD.findall(question)
    template = _WORD.sub(lambda m: "{s}" if m.group(1) in SHAPES else "{c}", question)
    zh = ZH_TEMPLATES[template]
    fill = {"s": next((ZH_WORDS[w] for w in words if w in SHAPES), ""), "c": next((ZH_WORDS[w] for w in words if w in COLORS), "")}
    return zh.format(**fill), ZH_WORDS[answer]


def conversations(qas: list[tuple[str, str]], image: str, rng: random.Random) -> list[dict]:
    """One image's (question, answer) pairs, shuffled, cut into conversations of 1-4 turns."""
    qas = list(qas)
    rng.shuffle(qas)
    out = []
    while qas:
        n = rng.randint(1, 4)
        turns, qas = qas[:n], qas[n:]
        msgs = []
        for k, (q, a) in enumerate(turns):
            msgs.append({"role": "user", "content": q, **({"image": image} if k == 0 else {})})
            msgs.append({"role": "assistant", "content": a})
        out.append({"messages": msgs})
    return out


# stage 3's extra questions: each training picture's shape asked directly, and as yes / no for all three shapes
DIRECT = ("what shape is in the image?", "what shape does the image contain?", "what shape is present?")
SHAPE_YES = ("is there a {s}?", "is a {s} present?", "does the image contain a {s}?", "is there a {s} in the image?")
SHAPE_NO = ("is no {s} present?", "is there not a {s}?", "does the image not contain a {s}?",
            "is there not a {s} in the image?")


def picture_shapes(questions) -> dict[int, str]:
    """image id -> its shape, from the easy-vqa questions that name it (an answer, or "what color is the circle?")."""
    shape = {}
    for q, ans, i in questions:
        if ans in SHAPES:
            shape[i] = ans
        for m in _WORD.finditer(q):
            if m.group(1) in SHAPES and q.startswith(("what color is the", "what is the color of the")):
                shape[i] = m.group(1)
    return shape


def shape_conversations(shape: dict[int, str], paths: list[str], skip: set[int], rng: random.Random) -> list[dict]:
    """Per picture and language, its shape asked directly and as yes / no for all three shapes, easy-vqa's own
    templates on easy-vqa's labels: the shapes were the models' errors (see README.md)."""
    out = []
    for i, s in shape.items():
        if i in skip:
            continue
        qa = [(rng.choice(DIRECT), s)]
        for t in SHAPES:
            if rng.random() < 0.5:
                qa.append((rng.choice(SHAPE_YES).format(s=t), "yes" if t == s else "no"))
            else:
                qa.append((rng.choice(SHAPE_NO).format(s=t), "no" if t == s else "yes"))
        img = str(Path(paths[i]).resolve())
        out += conversations(qa, img, rng)
        out += conversations([to_chinese(q, ans) for q, ans in qa], img, rng)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data/vision")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import easy_vqa

    out = Path(a.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    train_paths, test_paths = easy_vqa.get_train_image_paths(), easy_vqa.get_test_image_paths()
    by_image: dict[int, list[tuple[str, str]]] = collections.defaultdict(list)
    for q, ans, i in zip(*easy_vqa.get_train_questions()):
        by_image[i].append((q, ans))
    ids = sorted(by_image)
    valid_ids = set(random.Random(a.seed).sample(ids, VALID_IMAGES))
    counts = collections.Counter()
    for name, keep in (("train", lambda i: i not in valid_ids), ("valid", lambda i: i in valid_ids)):
        rows = []
        for i in ids:
            if not keep(i):
                continue
            en = by_image[i]
            zh = [to_chinese(q, ans) for q, ans in en]
            rows += conversations(en, str(Path(train_paths[i]).resolve()), rng)
            rows += conversations(zh, str(Path(train_paths[i]).resolve()), rng)
        rng.shuffle(rows)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        counts[name] = len(rows)
        if name == "train":  # stage 3's mix: these conversations and the shape questions, shuffled together
            rng3 = random.Random(7)
            extra = shape_conversations(picture_shapes(zip(*easy_vqa.get_train_questions())), train_paths,
                                        valid_ids, rng3)
            mixed = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows + extra]
            rng3.shuffle(mixed)
            (out / "train_shapes.jsonl").write_text("".join(mixed), encoding="utf-8")
            counts["train_shapes"] = len(mixed)
    answers = collections.Counter()
    with open(out / "test.jsonl", "w", encoding="utf-8") as f:
        for q, ans, i in zip(*easy_vqa.get_test_questions()):
            img = str(Path(test_paths[i]).resolve())
            zq, za = to_chinese(q, ans)
            f.write(json.dumps({"image": img, "question": q, "answer": ans, "lang": "en"}) + "\n")
            f.write(json.dumps({"image": img, "question": zq, "answer": za, "lang": "zh"}, ensure_ascii=False) + "\n")
            answers[ans] += 1
    majority, n_major = answers.most_common(1)[0]
    manifest = {"train_conversations": counts["train"], "train_shapes_conversations": counts["train_shapes"],
                "valid_conversations": counts["valid"],
                "train_images": len(ids) - VALID_IMAGES, "valid_images": VALID_IMAGES, "test_images": len(test_paths),
                "test_questions_per_language": sum(answers.values()), "majority_answer": majority,
                "majority_baseline": n_major / sum(answers.values())}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
