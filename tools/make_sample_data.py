#!/usr/bin/env python3
"""Generate the bundled AdvertiseGen-format sample: ``assets/AdvertiseGen-sample.tar.gz``.

Written for this project (no real ADGEN text): records pair an attribute string
(``类型#裙*颜色#蓝色*...``) with Chinese ad copy built from per-value phrases, so the copy
depends on the attributes and a tiny model can learn the mapping. The archive mirrors the real
AdvertiseGen.tar.gz layout (``AdvertiseGen/{train,dev}.json``) and is byte-reproducible: a fixed
seed, fixed tar metadata and a gzip header without mtime give the same sha256 on every run.

    python tools/make_sample_data.py [--out PATH] [--train 480] [--dev 60] [--seed 2024]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # usable from a plain checkout, not only an installed venv

from llamapipe.core.atomic import atomic_path  # noqa: E402

SEED = 2024
MTIME = 1700000000  # fixed member mtime: the archive's bytes must not depend on when it was built


def _templated(templates: list[str], effects: dict[str, str]) -> dict[str, list[str]]:
    """Each value gets one phrase per template, all carrying the value and its own effect words."""
    return {v: [t.format(v=v, e=e) for t in templates] for v, e in effects.items()}


COLOR = _templated(
    ["{v}的配色{e}", "选用{v}，{e}", "{v}色调{e}"],
    {
        "白色": "干净纯粹", "黑色": "低调显瘦", "蓝色": "清爽宜人", "红色": "热情提气色",
        "粉色": "温柔甜美", "绿色": "充满自然气息", "黄色": "明亮有活力", "灰色": "沉稳高级",
        "卡其色": "复古又温柔", "杏色": "柔和显白",
    },
)
STYLE = _templated(
    ["{v}风格的设计{e}", "整体走{v}路线，{e}", "穿出{v}范儿，{e}"],
    {
        "清新": "青春减龄", "简约": "大方耐看", "复古": "韵味十足", "甜美": "俏皮可爱",
        "通勤": "干练利落", "街头": "酷感十足", "休闲": "轻松随性", "文艺": "知性温柔",
        "优雅": "气质出众", "性感": "妩媚迷人", "运动": "活力满满", "淑女": "端庄温婉",
    },
)
PATTERN = _templated(
    ["{v}元素{e}", "点缀{v}图案，{e}", "{v}的细节{e}"],
    {
        "蝴蝶结": "增添几分俏皮", "条纹": "拉长视觉线条", "格子": "经典又耐看", "碎花": "浪漫有春日气息",
        "印花": "吸睛又个性", "刺绣": "精致有质感", "波点": "灵动又复古", "字母": "潮流感十足",
        "线条": "利落有型",
    },
)
_MATERIAL_T = ["{v}材质{e}", "选用{v}材质，{e}", "采用{v}打造，{e}"]
_FIT_T = ["{v}版型{e}", "{v}的剪裁{e}"]


# Per category: the noun used in the copy, its measure word, the keys in src order, and a closer.
CATEGORIES: dict[str, dict] = {
    "裙": {
        "noun": "裙子", "measure": "这条", "noun_key": "裙型",
        "closers": ["无论约会还是出游都很合适。", "轻松穿出好气色。", "让你成为人群中的焦点。"],
        "keys": {
            "颜色": COLOR, "风格": STYLE, "图案": PATTERN,
            "材质": _templated(_MATERIAL_T, {"雪纺": "轻盈飘逸", "棉": "亲肤透气", "蕾丝": "精致浪漫",
                                             "真丝": "顺滑有光泽", "网纱": "仙气十足"}),
            "版型": _templated(_FIT_T, {"修身": "勾勒曼妙曲线", "显瘦": "巧妙修饰身形", "宽松": "不挑身材"}),
            "裙长": {"短裙": ["短款裙长露出纤细双腿", "短裙长度俏皮减龄"],
                            "中长裙": ["中长裙长刚好遮住膝盖", "中长款长度优雅得体"],
                            "长裙": ["长裙款式行走间摇曳生姿", "及踝长度飘逸灵动"]},
            "裙型": {"百褶裙": ["百褶裙摆灵动飘逸"], "A字裙": ["A字裙型遮肉显瘦"],
                            "包臀裙": ["包臀设计凸显曲线"], "鱼尾裙": ["鱼尾裙摆优雅迷人"],
                            "蛋糕裙": ["层层叠叠的蛋糕裙摆甜美可爱"]},
            "裙领型": {"V领": ["V领设计修饰脸型"], "圆领": ["圆领设计简洁大方"],
                              "方领": ["方领露出精致锁骨"], "一字领": ["一字领展现优美肩颈线"]},
        },
    },
    "上衣": {
        "noun": "上衣", "measure": "这件", "noun_key": "衣样式",
        "closers": ["日常搭配轻松出彩。", "搭配裙装或裤装都好看。", "是衣橱里的百搭单品。"],
        "keys": {
            "颜色": COLOR, "风格": STYLE, "图案": PATTERN,
            "材质": _templated(_MATERIAL_T, {"棉": "亲肤透气", "雪纺": "轻盈飘逸", "针织": "柔软有弹性",
                                             "亚麻": "透气凉爽", "真丝": "顺滑有光泽"}),
            "版型": _templated(_FIT_T, {"宽松": "慵懒随性不挑身材", "修身": "贴合身形", "短款": "提高腰线"}),
            "衣样式": {"衬衫": ["衬衫款式得体又百搭"], "T恤": ["T恤款式舒适随性"],
                              "卫衣": ["卫衣款式休闲减龄"], "毛衣": ["毛衣款式温暖软糯"],
                              "雪纺衫": ["雪纺衫款式清凉飘逸"]},
            "衣领型": {"圆领": ["圆领设计简洁大方"], "翻领": ["翻领设计干练有型"],
                              "V领": ["V领设计修饰脸型"], "立领": ["立领设计挺括精神"],
                              "连帽": ["连帽设计活力满满"]},
            "衣袖型": {"泡泡袖": ["泡泡袖设计俏皮可爱"], "灯笼袖": ["灯笼袖复古又浪漫"],
                              "落肩袖": ["落肩袖慵懒随性"], "喇叭袖": ["喇叭袖优雅灵动"]},
        },
    },
    "裤": {
        "noun": "裤子", "measure": "这条", "noun_key": "裤型",
        "closers": ["搭配各种上衣都好看。", "通勤休闲都能驾驭。", "让双腿看起来又长又直。"],
        "keys": {
            "颜色": COLOR, "风格": STYLE,
            "材质": _templated(_MATERIAL_T, {"牛仔布": "耐穿有型", "棉": "亲肤透气", "亚麻": "透气凉爽",
                                             "针织": "柔软有弹性", "羊毛": "保暖舒适"}),
            "版型": _templated(_FIT_T, {"宽松": "舒适不紧绷", "修身": "勾勒腿部线条", "直筒": "利落遮肉"}),
            "裤长": {"九分裤": ["九分长度露出脚踝更显高"], "七分裤": ["七分长度清爽利落"],
                            "短裤": ["短裤款式清凉活力"], "长裤": ["长裤款式修饰腿型"]},
            "裤型": {"阔腿裤": ["阔腿裤型走路带风"], "直筒裤": ["直筒裤型遮住腿部缺陷"],
                            "哈伦裤": ["哈伦裤型休闲宽松"], "铅笔裤": ["铅笔裤型紧致显瘦"],
                            "喇叭裤": ["喇叭裤型复古拉长比例"]},
            "裤腰型": {"高腰": ["高腰设计拉长腿部比例"], "松紧腰": ["松紧腰头穿着无束缚"],
                              "中腰": ["中腰设计舒适自在"]},
        },
    },
    "外套": {
        "noun": "外套", "measure": "这件", "noun_key": "衣样式",
        "closers": ["秋冬出行的必备单品。", "保暖又不失风度。", "随手一披就很有型。"],
        "keys": {
            "颜色": COLOR, "风格": STYLE, "图案": PATTERN,
            "材质": _templated(_MATERIAL_T, {"羊毛": "保暖挺括", "牛仔布": "耐穿有型", "皮革": "帅气有质感",
                                             "棉": "亲肤舒适", "羽绒": "轻暖蓬松"}),
            "版型": _templated(_FIT_T, {"宽松": "包容性强", "修身": "干练利落", "落肩": "慵懒随性"}),
            "衣样式": {"风衣": ["风衣款式潇洒帅气"], "夹克": ["夹克款式酷感十足"],
                              "西装": ["西装款式干练有气场"], "大衣": ["大衣款式大气保暖"],
                              "开衫": ["开衫款式温柔百搭"]},
            "衣长": {"短款": ["短款长度提高腰线"], "中长款": ["中长款长度优雅大方"],
                            "长款": ["长款长度保暖又有气场"]},
            "衣门襟": {"拉链": ["拉链门襟穿脱方便"], "单排扣": ["单排扣门襟经典利落"],
                              "双排扣": ["双排扣门襟复古有型"], "系带": ["系带设计收腰显瘦"]},
        },
    },
    "鞋": {
        "noun": "鞋子", "measure": "这双", "noun_key": "鞋样式",
        "closers": ["舒适好穿，百搭各种造型。", "走再多路也不累脚。", "轻松搭配日常穿搭。"],
        "keys": {
            "颜色": COLOR, "风格": STYLE,
            "材质": _templated(_MATERIAL_T, {"皮革": "柔软耐穿", "帆布": "透气轻便", "麂皮": "细腻有质感",
                                             "网面": "透气不闷脚"}),
            "鞋样式": {"小白鞋": ["小白鞋款式清爽百搭"], "乐福鞋": ["乐福鞋款式优雅休闲"],
                              "马丁靴": ["马丁靴款式帅气有型"], "帆布鞋": ["帆布鞋款式青春活力"],
                              "凉鞋": ["凉鞋款式清凉透气"]},
            "鞋跟": {"平底": ["平底设计走路舒适"], "粗跟": ["粗跟设计稳当好走"],
                            "高跟": ["高跟设计拉长腿部线条"], "坡跟": ["坡跟设计增高又舒适"]},
            "鞋头": {"圆头": ["圆头设计俏皮可爱"], "尖头": ["尖头设计显脚瘦"],
                            "方头": ["方头设计复古时髦"]},
        },
    },
}

OPENERS = ["{m}{n}", "推荐的{m}{n}", "今天分享的{m}{n}"]
CONNECTORS = ["，", "，同时", "，再加上", "，而且"]
SECOND_STARTS = ["此外", "另外", "细节上", "更棒的是"]


def _make_record(rng: random.Random) -> dict[str, str]:
    cat_name = rng.choice(sorted(CATEGORIES))
    cat = CATEGORIES[cat_name]
    keys = list(cat["keys"])
    chosen = sorted(rng.sample(keys, rng.randint(2, min(5, len(keys)))), key=keys.index)
    attrs = [(k, rng.choice(sorted(cat["keys"][k]))) for k in chosen]
    src = "*".join(f"{k}#{v}" for k, v in [("类型", cat_name)] + attrs)

    # The noun names the concrete item when the record says what it is (阔腿裤, 风衣, ...).
    noun = dict(attrs).get(cat["noun_key"], cat["noun"])
    phrases = [rng.choice(cat["keys"][k][v]) for k, v in attrs if k != cat["noun_key"]]
    if not phrases:  # only the noun-naming key was drawn: still say something about it
        phrases = [rng.choice(cat["keys"][cat["noun_key"]][noun])]
    opener = rng.choice(OPENERS).format(m=cat["measure"], n=noun)

    split = len(phrases) if len(phrases) < 3 or rng.random() < 0.4 else rng.randint(2, len(phrases) - 1)
    # Distinct connectors within a sentence, so it never reads "同时 ... 同时".
    joins = rng.sample(CONNECTORS, split - 1)
    first = opener + "，" + phrases[0] + "".join(j + p for j, p in zip(joins, phrases[1:split])) + "。"
    rest = phrases[split:]
    second = ""
    if rest:
        second = rng.choice(SECOND_STARTS) + "，" + "，".join(rest) + "。"
    tgt = first + second
    if len(tgt) < 40 or rng.random() < 0.5:
        tgt += rng.choice(cat["closers"])
    return {"src": src, "tgt": tgt}


def make_records(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` records with distinct src strings, lengths inside the ADGEN-like ranges."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records = []
    while len(records) < n:
        rec = _make_record(rng)
        if rec["src"] in seen or not (15 <= len(rec["src"]) <= 40 and 40 <= len(rec["tgt"]) <= 100):
            continue
        seen.add(rec["src"])
        records.append(rec)
    return records


def _jsonl(records: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def build_archive(files: dict[str, bytes]) -> bytes:
    """A tar.gz of ``AdvertiseGen/<name>`` with fixed metadata, so equal input gives equal bytes."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tf:
        top = tarfile.TarInfo("AdvertiseGen")
        top.type, top.mode = tarfile.DIRTYPE, 0o755
        members = [(top, None)]
        for name, data in files.items():
            info = tarfile.TarInfo(f"AdvertiseGen/{name}")
            info.size, info.mode = len(data), 0o644
            members.append((info, data))
        for info, data in members:
            info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "", ""
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    out = io.BytesIO()
    # A BytesIO has no name, so the gzip header carries no file name; mtime=0 drops the timestamp.
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "assets" / "AdvertiseGen-sample.tar.gz"))
    ap.add_argument("--train", type=int, default=480)
    ap.add_argument("--dev", type=int, default=60)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)

    records = make_records(args.train + args.dev, args.seed)
    # Distinct src strings overall, so dev attribute combinations never occur in train.
    train, dev = records[: args.train], records[args.train :]
    data = build_archive({"train.json": _jsonl(train), "dev.json": _jsonl(dev)})
    with atomic_path(args.out) as tmp:
        tmp.write_bytes(data)
    print(f"{args.out}: {len(train)} train, {len(dev)} dev records")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
